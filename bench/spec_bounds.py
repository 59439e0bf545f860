"""Hostile specs: how fast and how small the loader refuses an alias bomb, next to PyYAML.

Why: `reconcile --plan` runs in CI on pull requests anyone may open; a 666-byte spec of
nine levels of `&a [*a, *a, ...]` used to take 11.2 GB and never finish, because the
loader builds every node with its own line map and so expands aliases. The bound
(`yamlpos.MAX_ALIAS_NODES`) refuses it at its line. The peer is PyYAML's own
`yaml.load(..., CSafeLoader)` on the same text, which shares the aliased lists instead of
expanding them (so it is fast, but keeps no line numbers, which the loader exists for).

Each measurement runs in a fresh process under a 1 GiB address-space limit; reported are
the best of 5 runs and the child's peak RSS. Also: the bound's cost on a legitimate set
(20,000 mailboxes, a few aliases), to show the budget bookkeeping is cheap.

Usage: `python bench/spec_bounds.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n"
    for p, n in zip("abcdefgh", "bcdefghi", strict=True))

CHILD = textwrap.dedent("""
    import gc, json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))
    import yaml
    from reconciler.spec.yamlpos import parse_documents
    which, text = sys.argv[1], sys.stdin.read()
    run = (lambda: yaml.load(text, Loader=yaml.CSafeLoader)) if which == "pyyaml" \\
        else (lambda: parse_documents(text))
    best = float("inf")
    gc.disable()  # as load_specs does (loader._paused_gc)
    for _ in range(5):
        t = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - t)
    verdict = getattr(result, "error", None) or "loaded"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"s": best, "rss_mb": rss, "verdict": verdict}))
""")


def measure(which: str, text: str) -> dict[str, Any]:  # the child's JSON
    done = subprocess.run([sys.executable, "-c", CHILD, which], input=text, text=True,
                          capture_output=True, timeout=600, check=True)
    return dict(json.loads(done.stdout))


def main() -> None:
    boxes = "".join(f"    - {{address: u{i}@corp.example, aliases: [a{i}@corp.example]}}\n"
                    for i in range(20_000))
    legit = ("apiVersion: mailferry/v1\nkind: MailboxPlacement\nmetadata: {name: p}\n"
             "spec:\n  system: s1\n  mailboxes:\n" + boxes)
    print(f"alias bomb: {len(BOMB)} bytes")
    for name, text in (("alias bomb", BOMB), ("20,000 mailboxes", legit)):
        ours, peer = measure("yamlpos", text), measure("pyyaml", text)
        print(f"  {name}: yamlpos {ours['s'] * 1000:.2f} ms, {ours['rss_mb']:.0f} MB "
              f"({str(ours['verdict'])[:60]}); PyYAML CSafeLoader {peer['s'] * 1000:.2f} ms, "
              f"{peer['rss_mb']:.0f} MB; ratio x{ours['s'] / peer['s']:.1f}")


if __name__ == "__main__":
    main()
