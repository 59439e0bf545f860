"""Which git commit do the specs come from, and has anyone edited them since?

Why the reconciler cares: in GitOps the commit is the audit trail. Every migration records
the commit of the specs that asked for it, so "who moved Alice's mailbox, and why" is a
`git show` away; and the plan warns when it runs on a dirty folder (uncommitted edits), the
one case where what happens is not what was reviewed.

We shell out to `git` (no GitPython dependency), with a short timeout, and treat every
failure (no git binary, not a work tree, a repository owned by someone else, a hung
filesystem) as "not in git": provenance is informative, never a reason to refuse a plan.

`GIT_OPTIONAL_LOCKS=0` keeps `git status` from refreshing the index and so from taking
`.git/index.lock`: the reconciler runs next to admins who are committing.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

GIT_TIMEOUT = 5.0  # seconds; git on a sane repository answers in milliseconds


def _git(directory: Path, *args: str) -> str | None:
    """stdout of `git -C directory args...`, or None on any failure."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0", LC_ALL="C")
    try:
        done = subprocess.run(
            ["git", "-C", str(directory), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT,
            env=env,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(directory: str | Path) -> tuple[str | None, bool]:
    """(HEAD commit sha or None, whether files under `directory` have uncommitted changes)."""
    folder = Path(directory).resolve()
    inside = _git(folder, "rev-parse", "--is-inside-work-tree")
    if inside is None or inside.strip() != "true":
        return None, False
    head = _git(folder, "rev-parse", "--verify", "-q", "HEAD")
    commit = head.strip() or None if head is not None else None
    # Untracked spec files count: they change what the loader reads, yet nobody reviewed them.
    status = _git(folder, "status", "--porcelain", "--untracked-files=all", "--", ".")
    dirty = bool(status and status.strip())
    return commit, dirty


def describe(directory: str | Path, commit: str | None) -> str:
    """The specs' provenance for a person: the short commit, "no commits yet" for a fresh
    `git init` (such as `reconcile init` makes), else "not in git"."""
    if commit:
        return commit[:10]
    inside = _git(Path(directory).resolve(), "rev-parse", "--is-inside-work-tree")
    return "no commits yet" if inside is not None and inside.strip() == "true" else "not in git"
