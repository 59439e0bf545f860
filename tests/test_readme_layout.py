"""The README's Layout names every module and folder of the code, so that it stays drawn from
the code as it is (issue 15): a module added without a word in the Layout fails here."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reconciler", "fed", "maildir_system", "station_agent", "mailferry", "tests")
# Named by their folder or by convention: Alembic's revisions (state/alembic in the Layout),
# package boilerplate, pytest's own files, the test modules themselves (test_*.py).
UNNAMED = {"__init__", "__main__", "conftest", "versions", "__pycache__"}


def layout_words(readme: str) -> set[str]:
    """The words of the code block under "## Layout"."""
    section = readme.split("\n## Layout\n", 1)[1]
    block = section.split("```", 2)[1]
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", block))


def unnamed_parts(root: Path, words: set[str]) -> list[str]:
    """Modules (.py) and folders below the packages whose name the Layout does not have."""
    missing = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*")):
            parts = path.relative_to(root).parts
            names = [*parts[:-1], path.stem]
            if any(n in UNNAMED or n.startswith(".") for n in names) or "alembic" in parts:
                continue
            if not (path.is_dir() or path.suffix == ".py"):
                continue
            if package == "tests" and path.name.startswith("test_"):
                continue
            if path.stem not in words:
                missing.append(str(path.relative_to(root)))
    return missing


def test_the_layout_names_every_module() -> None:
    words = layout_words((ROOT / "README.md").read_text(encoding="utf-8"))
    assert unnamed_parts(ROOT, words) == []


def test_a_module_the_layout_does_not_name_is_found(tmp_path: Path) -> None:
    (tmp_path / "fed" / "newroom").mkdir(parents=True)
    (tmp_path / "fed" / "newroom" / "__init__.py").write_text("")
    (tmp_path / "fed" / "newroom" / "gadget.py").write_text("")
    (tmp_path / "fed" / "app.py").write_text("")
    assert unnamed_parts(tmp_path, {"fed", "app"}) == ["fed/newroom", "fed/newroom/gadget.py"]
