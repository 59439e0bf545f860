"""The package data, found through `importlib.resources` wherever mailferry is installed.

`schemas/` and `examples/` live once, at the top of the source tree where editors and
readers look for them; `mailferry/data/` links to them, and a build (sdist, wheel) copies
the files themselves into the package. So an editable install, a wheel in a virtual
environment and a pipx install all find the same files here, whatever the current
directory. Installs are unpacked folders (pip and pipx never run from a zip), which is
what Alembic and `shutil.copytree` need: `data_path` returns a real `Path`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def data_path(*parts: str) -> Path:
    """A file or folder of the package data, e.g. `data_path("schemas")`."""
    root = resources.files("mailferry.data")
    path = Path(str(root.joinpath(*parts)))
    if not path.exists():
        raise FileNotFoundError(f"mailferry's package data has no {'/'.join(parts)} "
                                f"(looked in {root}); the install is incomplete")
    return path


def schema_dir() -> Path:
    return data_path("schemas")


def quickstart_dir() -> Path:
    return data_path("examples", "quickstart")
