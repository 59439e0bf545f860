"""One copy of each helper the tests share (issue 15): import from the module named for
what it does -- `helpers.waiting`, `helpers.processes`, `helpers.mail`.

tests/ is not a package: pytest puts tests/ on sys.path (conftest.py's folder), so this
package is `helpers`, as the harness modules (sysutil, fedutil, world, ...) are top-level
names. The harnesses that start real servers stay in their own modules beside the tests.
"""
