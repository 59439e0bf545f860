"""The house's figures (issue 15's Measure): lines per package and functions over 60 lines.

Run by hand from the checkout's root: ``python bench/house_figures.py [--long N]``.
The `duplicates` pair count (the tool library's `duplicates`) and ruff's C901 count
(``ruff check --select C901 --config 'lint.mccabe.max-complexity=10' .``) are measured
beside it; docs/house.md records the figures.
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGES = ("fed", "reconciler", "maildir_system", "station_agent", "mailferry", "tests")


def python_files(root: Path) -> Iterator[Path]:
    yield from sorted(p for p in root.rglob("*.py") if ".venv" not in p.parts)


def line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def long_functions(path: Path, limit: int) -> Iterator[tuple[str, int]]:
    """(qualified name, lines) of every function or method longer than `limit` lines."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                length = (child.end_lineno or child.lineno) - child.lineno + 1
                if length > limit:
                    yield name, length
                yield from walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")

    yield from walk(tree, "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", type=int, default=60, help="a long function has more lines")
    parser.add_argument("--list", action="store_true", help="name every long function")
    args = parser.parse_args()
    root = Path.cwd()
    print("lines per package")
    for package in PACKAGES:
        top = root / package
        total = sum(line_count(p) for p in python_files(top))
        print(f"  {package:16} {total:6}")
        if package == "reconciler":
            for sub in sorted(d for d in top.iterdir() if d.is_dir() and d.name != "__pycache__"):
                lines = sum(line_count(p) for p in python_files(sub))
                if lines:
                    print(f"    {sub.name + '/':14} {lines:6}")
            own = sum(line_count(p) for p in sorted(top.glob("*.py")))
            print(f"    {'(top modules)':14} {own:6}")
    found: list[tuple[str, int]] = []
    for package in PACKAGES:
        for path in python_files(root / package):
            rel = path.relative_to(root)
            found += [(f"{rel}:{name}", n) for name, n in long_functions(path, args.long)]
    print(f"functions over {args.long} lines: {len(found)}")
    if args.list:
        for name, n in sorted(found, key=lambda item: -item[1]):
            print(f"  {n:4}  {name}")


if __name__ == "__main__":
    main()
