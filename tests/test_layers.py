"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and each one breaks when
the import it forbids is written: a copy of the tree gets one violating line a contract,
and `lint-imports` run there must name that contract and that import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("mailferry", "reconciler", "fed", "station_agent", "maildir_system")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    # cwd first on sys.path: lint-imports reads the copy, not the installed packages.
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True,
                          text=True, timeout=60, check=False)


def test_the_tree_keeps_every_contract() -> None:
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [
    ("reconciler/steps/base.py", "from reconciler import engine",
     "reconciler.steps is not allowed to import reconciler.engine"),
    ("reconciler/state/store.py", "import reconciler.drivers.registry",
     "reconciler.state is not allowed to import reconciler.drivers"),
    ("reconciler/drivers/base.py", "import reconciler.mover.endpoints",
     "reconciler.drivers is not allowed to import reconciler.mover"),
    ("reconciler/mover/progress.py", "import reconciler.fit",
     "reconciler.mover is not allowed to import reconciler.fit"),
    ("reconciler/humanize.py", "import reconciler.errors",
     "reconciler.humanize is not allowed to import reconciler.errors"),
    ("reconciler/steps/prestage.py", "import reconciler.drivers.maildir",
     "reconciler.steps is not allowed to import reconciler.drivers.maildir"),
    ("fed/__init__.py", "import reconciler.errors", "fed is not allowed to import reconciler"),
    ("fed/queue/spool.py", "import fed.admin.control",
     "fed.queue is not allowed to import fed.admin"),
    ("fed/smtp/server.py", "import fed.delivery.scheduler",
     "fed.smtp is not allowed to import fed.delivery"),
    ("station_agent/__init__.py", "import reconciler.errors",
     "station_agent is not allowed to import reconciler"),
    ("mailferry/__init__.py", "import fed", "mailferry is not allowed to import fed"),
    ("reconciler/plan.py", "import sqlalchemy",
     "reconciler.plan is not allowed to import sqlalchemy"),
    ("reconciler/spec/model.py", "import reconciler.state.store",
     "reconciler.spec.model is not allowed to import reconciler.state"),
    ("reconciler/web/views.py", "import urllib.request",
     "reconciler.web.views is not allowed to import urllib"),
])
def test_a_contract_breaks_when_its_import_is_written(
        tmp_path: Path, module: str, line: str, broken: str) -> None:
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    assert lint_imports(tmp_path).returncode == 0  # the copy is as good as the tree
    with (tmp_path / module).open("a", encoding="utf-8") as f:
        f.write(f"\n{line}  # written by the test\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert broken in done.stdout, done.stdout
