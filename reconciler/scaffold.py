"""`reconcile init DIR`: a specs repository a team can commit on day one.

What goes in (all from the package data, `mailferry.resources`, so any installed copy
writes the same repository):

- the starter spec set (`examples/starter/`: the embedded default, fed and two maildir
  systems, so `reconcile --specs DIR serve` and `--plan` work at once), each file opening
  with a `yaml-language-server` modeline naming its schema;
- `schemas/` (the JSON Schemas the loader validates with) and `.vscode/settings.json`
  mapping them onto the spec files, for editors without modelines;
- the CI pipelines of `examples/ci/` where they work as written: `.github/workflows/`,
  `.gitlab-ci.yml`, and their helper `ci/plan-comment.sh`;
- `.gitignore` for `var/` (state, spool, Maildirs, token), a README of next steps;
- with `systemd=True`, the units of `examples/systemd/` for this folder and this install.

Nothing is half-written: every target is compared first. A file that exists with other
content stops the whole run (nothing written) unless `force`; with `force` it is replaced
and the old content kept next to it as `FILE~` (`FILE~2`... if that exists), and each such
file is named in the output.
Identical files are left alone, so running init twice is harmless.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from mailferry.resources import data_path
from reconciler.errors import MailferryError
from reconciler.spec.loader import KINDS

# Spec files of the starter set, in the order the README lists them.
STARTER = ("fed.yaml", "systems.yaml", "window.yaml", "policy.yaml", "placement.yaml")
SHIPPED_UNITS = ("mailferry-serve.service", "mailferry-watch.service", "mailferry-fed.service")
# The shipped units name these; init writes the real folder and commands instead.
UNIT_REPO, UNIT_BIN = "/srv/mailferry", "/usr/local/bin"


@dataclass(frozen=True)
class Planned:
    """One file init writes."""

    path: str  # relative to the new repository
    content: bytes
    mode: int = 0o644


@dataclass
class InitResult:
    written: list[str]
    unchanged: list[str]
    replaced: list[str]  # with --force: "FILE (the old file is FILE~)"
    git_initialised: bool


def _schema_of(text: str) -> str:
    """The schema file of a spec file's (first) kind."""
    for doc in yaml.safe_load_all(text):
        if isinstance(doc, dict) and doc.get("kind") in KINDS:
            return f"{KINDS[doc['kind']]}.schema.json"
    raise MailferryError("starter spec without a known kind (the install is damaged)")


def planned_files(*, systemd: bool, repo: Path, bin_dir: Path) -> list[Planned]:
    """Every file of a new specs repository, rendered."""
    starter = data_path("examples", "starter")
    files: list[Planned] = []
    editor_map: dict[str, list[str]] = {}
    for name in STARTER:
        text = (starter / name).read_text(encoding="utf-8")
        schema = _schema_of(text)
        editor_map.setdefault(f"./schemas/{schema}", []).append(name)
        modeline = f"# yaml-language-server: $schema=schemas/{schema}\n"
        files.append(Planned(name, (modeline + text).encode()))
    for schema_file in sorted(data_path("schemas").glob("*.schema.json")):
        files.append(Planned(f"schemas/{schema_file.name}", schema_file.read_bytes()))
    settings = {"yaml.schemas": editor_map, "files.exclude": {"var": True}}
    files.append(Planned(".vscode/settings.json",
                         (json.dumps(settings, indent=2) + "\n").encode()))
    # The YAML language server (VS Code's YAML extension) reads both the map above and the
    # modelines; Neovim, Helix and others run the same server and read the modelines.
    files.append(Planned(".vscode/extensions.json",
                         b'{\n  "recommendations": ["redhat.vscode-yaml"]\n}\n'))
    ci = data_path("examples", "ci")
    files += [
        Planned(".github/workflows/mailferry.yml", (ci / "github-actions.yml").read_bytes()),
        Planned(".gitlab-ci.yml", (ci / "gitlab-ci.yml").read_bytes()),
        Planned("ci/plan-comment.sh", (ci / "plan-comment.sh").read_bytes(), 0o755),
        Planned(".gitignore", b"# state: fed's spool, the embedded Maildirs, the token\nvar/\n"),
        Planned("README.md", (starter / "README.md").read_bytes()),
    ]
    if systemd:
        units = data_path("examples", "systemd")
        for unit in SHIPPED_UNITS:
            text = (units / unit).read_text(encoding="utf-8")
            text = text.replace(UNIT_REPO, str(repo)).replace(UNIT_BIN, str(bin_dir))
            if repo.is_relative_to("/home") or repo.is_relative_to("/root"):
                # The repository itself is under a home folder: hide the others only.
                text = text.replace("ProtectHome=yes", "ProtectHome=read-only")
            files.append(Planned(f"systemd/{unit}", text.encode()))
    return files


def install_commands(repo: Path) -> list[str]:
    """What an admin runs (as root) to install the units `--systemd` wrote."""
    return [
        "useradd --system --user-group --home-dir /var/lib/mailferry --shell "
        "/usr/sbin/nologin mailferry",
        f"install -d -o mailferry -g mailferry -m 0700 {repo}/var",
        f"git config --system --add safe.directory {repo}",
        f"cp {repo}/systemd/mailferry-serve.service {repo}/systemd/mailferry-watch.service "
        "/etc/systemd/system/",
        "systemctl daemon-reload",
        "systemctl enable --now mailferry-serve.service mailferry-watch.service",
    ]


def command_dir() -> Path:
    """Where this install's `reconcile`, `fed` live (the units' ExecStart)."""
    here = Path(sys.argv[0]).resolve().parent if sys.argv and sys.argv[0] else None
    if here is not None and (here / "reconcile").exists():
        return here
    found = shutil.which("reconcile")
    return Path(found).resolve().parent if found else Path(sys.executable).parent


def init_repo(target: Path, *, force: bool = False, systemd: bool = False,
              bin_dir: Path | None = None) -> InitResult:
    """Write the repository into `target` (created if missing); see the module's doc."""
    repo = target.resolve()
    if repo.exists() and not repo.is_dir():
        raise MailferryError(f"{target} exists and is not a folder")
    files = planned_files(systemd=systemd, repo=repo, bin_dir=bin_dir or command_dir())
    result = InitResult([], [], [], False)
    conflicts = []
    for f in files:
        path = repo / f.path
        if path.is_dir():
            raise MailferryError(f"{path} is a folder; init wants to write a file there")
        if path.exists():
            if path.read_bytes() == f.content:
                result.unchanged.append(f.path)
            else:
                conflicts.append(f.path)
    if conflicts and not force:
        raise MailferryError(
            f"{target}: {len(conflicts)} file(s) exist with other content: "
            + ", ".join(conflicts) + "; nothing written (--force replaces them and keeps "
            "each old one as FILE~)")
    for f in files:
        if f.path in result.unchanged:
            continue
        path = repo / f.path
        path.parent.mkdir(parents=True, exist_ok=True)
        if f.path in conflicts:
            backup = _free_backup(path)
            os.replace(path, backup)
            result.replaced.append(f"{f.path} (the old file is {backup.relative_to(repo)})")
        else:
            result.written.append(f.path)
        tmp = path.with_name(f".{path.name}.init-tmp")
        tmp.write_bytes(f.content)
        tmp.chmod(f.mode & ~_umask())
        os.replace(tmp, path)
    if systemd:
        (repo / "var").mkdir(mode=0o700, exist_ok=True)
    if not (repo / ".git").exists():
        _git(repo, "init", "-q")
        _git(repo, "symbolic-ref", "HEAD", "refs/heads/main")
        result.git_initialised = True
    return result


def _free_backup(path: Path) -> Path:
    """FILE~, or FILE~2, FILE~3... when an earlier --force left one: never overwritten."""
    candidate, n = path.with_name(f"{path.name}~"), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}~{n}")
    return candidate


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _git(repo: Path, *args: str) -> None:
    if shutil.which("git") is None:
        raise MailferryError("git is not installed: the files are written, but "
                             f"{repo} is not a git repository (install git, run git init)")
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          timeout=30, check=False)
    if done.returncode != 0:
        raise MailferryError(f"git {' '.join(args)} in {repo} failed: "
                             f"{done.stderr.strip() or done.returncode}")
