"""mailferry as an installed tool: `reconcile init`, services, private files, read-only
commands without secrets, the CLI's finish.

The wheel itself (built, installed in a fresh virtual environment outside the checkout,
then `init`, `--plan` and `demo` from an empty folder) is checked by `.ci/wheel-smoke.sh`,
which `./bootstrap.sh test` runs: building and installing take longer than a unit test may.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mailferry import __version__
from mailferry.resources import data_path, quickstart_dir, schema_dir
from mailferry.service import exposure, notify_ready
from reconciler.status import StatusRow, table

from fedutil import FakeSystem, Fed
from helpers.processes import stop_process
from sysutil import free_port
from world import REPO, run_cli

pytestmark = pytest.mark.timeout(120)
NO_TOKEN = {"MAILFERRY_FED_TOKEN": ""}


def _init(tmp_path: Path, *args: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
    repo = tmp_path / "specs-repo"
    result = run_cli("init", *args, str(repo), cwd=tmp_path)
    return repo, result


def _free_ports(repo: Path) -> None:
    """The starter's fixed ports replaced by free ones (tests run side by side)."""
    for name in ("fed.yaml", "systems.yaml"):
        path = repo / name
        text = re.sub(r"127\.0\.0\.1:\d+", lambda _m: f"127.0.0.1:{free_port()}",
                      path.read_text())
        path.write_text(text)


# -- package data ---------------------------------------------------------------------------

def test_package_data_is_the_source_trees_one_copy() -> None:
    # mailferry/data links to the top-level folders: the same files, not copies.
    assert schema_dir().resolve() == (REPO / "schemas").resolve()
    assert quickstart_dir().resolve() == (REPO / "examples" / "quickstart").resolve()
    assert (data_path("examples", "ci") / "plan-comment.sh").is_file()
    with pytest.raises(FileNotFoundError, match="install is incomplete"):
        data_path("no-such-thing")


# -- reconcile init -------------------------------------------------------------------------

def test_init_makes_a_repository_that_plans_at_once(tmp_path: Path) -> None:
    repo, result = _init(tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("fed.yaml", "systems.yaml", "placement.yaml", "README.md", ".gitignore",
                 ".github/workflows/mailferry.yml", ".gitlab-ci.yml", "ci/plan-comment.sh",
                 ".vscode/settings.json", "schemas/mailsystem.schema.json"):
        assert (repo / name).is_file(), name
    assert (repo / ".git").is_dir()
    assert os.access(repo / "ci" / "plan-comment.sh", os.X_OK)
    assert (repo / ".gitignore").read_text().splitlines()[-1] == "var/"
    assert (repo / "systems.yaml").read_text().startswith(
        "# yaml-language-server: $schema=schemas/mailsystem.schema.json\n")
    # The pipeline calls what the repository holds, with the layout init made.
    workflow = (repo / ".github/workflows/mailferry.yml").read_text()
    assert "ci/plan-comment.sh plan.txt plan.jsonl" in workflow
    assert "--specs . --plan" in workflow and 'pip install -q "$MAILFERRY_PACKAGE"' in workflow
    # No fed running, no token file yet: the plan is still made, and says what it missed.
    plan = run_cli("--specs", ".", "--plan", cwd=repo, env=NO_TOKEN)
    assert plan.returncode == 2, plan.stdout + plan.stderr  # three mailboxes to create
    assert "@ no commits yet (uncommitted changes)" in plan.stdout
    assert plan.stdout.rstrip().splitlines()[-1].startswith("Plan: 3 mailboxes, 3 due now")
    assert "Traceback" not in plan.stderr
    assert re.search(r"note: fed's directory not read \(.*fed\.token.*\)", plan.stderr)
    jsonl = run_cli("--specs", ".", "--plan", "--json", cwd=repo)
    assert '"type": "warning", "message": "fed\'s directory not read' in jsonl.stdout
    # A saved plan must not be made from half the world.
    saved = run_cli("--specs", ".", "--plan", "--out", "plan.json", cwd=repo)
    assert saved.returncode == 1 and not (repo / "plan.json").exists()
    assert "the plan is not saved" in saved.stderr
    # Once committed, the header names the commit.
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"],
                   cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm",
                    "specs"], cwd=repo, check=True)
    again = run_cli("--specs", ".", "--plan", cwd=repo)
    assert re.search(r"@ [0-9a-f]{10}, at ", again.stdout), again.stdout


def test_init_never_overwrites_silently(tmp_path: Path) -> None:
    repo, first = _init(tmp_path)
    assert first.returncode == 0
    twice = run_cli("init", str(repo), cwd=tmp_path)
    assert twice.returncode == 0 and "wrote" not in twice.stdout
    edited = "# our own fed\n" + (repo / "fed.yaml").read_text()
    (repo / "fed.yaml").write_text(edited)
    (repo / "README.md").write_text("ours\n")
    (repo / "policy.yaml").unlink()
    refused = run_cli("init", str(repo), cwd=tmp_path)
    assert refused.returncode == 1
    assert "fed.yaml, README.md" in refused.stderr and "nothing written" in refused.stderr
    assert not (repo / "policy.yaml").exists()  # checked everything before writing anything
    assert (repo / "fed.yaml").read_text() == edited
    forced = run_cli("init", "--force", str(repo), cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert "REPLACED  fed.yaml (the old file is fed.yaml~)" in forced.stdout
    assert "REPLACED  README.md" in forced.stdout and "wrote     policy.yaml" in forced.stdout
    assert (repo / "fed.yaml~").read_text() == edited
    assert (repo / "README.md~").read_text() == "ours\n"
    # A second --force keeps the first backup too.
    (repo / "fed.yaml").write_text("# edited again\n" + edited)
    again = run_cli("init", "--force", str(repo), cwd=tmp_path)
    assert "REPLACED  fed.yaml (the old file is fed.yaml~2)" in again.stdout, again.stdout
    assert (repo / "fed.yaml~").read_text() == edited
    assert (repo / "fed.yaml~2").read_text() == "# edited again\n" + edited


def test_init_systemd_units_are_hardened_and_verify(tmp_path: Path) -> None:
    repo, result = _init(tmp_path, "--systemd")
    assert result.returncode == 0, result.stderr
    assert "systemctl enable --now mailferry-serve.service" in result.stdout
    assert stat.S_IMODE((repo / "var").stat().st_mode) == 0o700
    units = sorted((repo / "systemd").glob("*.service"))
    assert [u.name for u in units] == ["mailferry-fed.service", "mailferry-serve.service",
                                       "mailferry-watch.service"]
    station = sorted(data_path("examples", "station").glob("*.service"))
    for unit in units + station:
        text = unit.read_text()
        for rule in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=",
                     "UMask=0077"):
            assert rule in text, (unit.name, rule)
        if "oneshot" not in text:
            assert "Type=notify" in text and "Restart=on-failure" in text, unit.name
    for unit in units:
        text = unit.read_text()
        assert "User=mailferry" in text
        assert str(Path(sys.executable).parent) in text or shutil.which("reconcile")
    serve = (repo / "systemd" / "mailferry-serve.service").read_text()
    assert f"ReadWritePaths={repo.resolve()}/var\n" in serve
    assert f"--specs {repo.resolve()} serve" in serve
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed: units checked by content only")
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "reconcile").exists():
        pytest.skip("no reconcile console script next to this Python")
    for unit in units:
        done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0 and not done.stderr.strip(), (unit.name, done.stderr)


# -- services: sd_notify --------------------------------------------------------------------

@contextmanager
def _notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()


def test_notify_ready_sends_one_datagram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify_ready() is False  # not under systemd: nothing to do
    with _notify_socket(tmp_path) as (sock, path):
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify_ready("up") is True
        sock.settimeout(5)
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert notify_ready() is False  # the supervisor went away: not a reason to die


def test_reconcile_serve_is_ready_when_its_servers_are(tmp_path: Path) -> None:
    repo, result = _init(tmp_path)
    assert result.returncode == 0
    _free_ports(repo)
    with _notify_socket(tmp_path) as (sock, path):
        proc = subprocess.Popen([sys.executable, "-m", "reconciler", "--specs", ".", "serve"],
                                cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "NOTIFY_SOCKET": path})
        try:
            sock.settimeout(60)
            first = sock.recv(4096)
            assert first.startswith(b"READY=1"), first
            # Ready means ready: fed's SMTP and both systems' LMTP listen now.
            text = (repo / "fed.yaml").read_text() + (repo / "systems.yaml").read_text()
            ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", text)]
            for port in ports:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
        finally:
            stop_process(proc)
        # Every process has exited: only `reconcile serve` spoke to systemd, not each server
        # it started (whatever they sent is queued by now).
        assert _pending(sock) == []
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""


def _pending(sock: socket.socket) -> list[bytes]:
    sock.setblocking(False)
    found = []
    while True:
        try:
            found.append(sock.recv(4096))
        except BlockingIOError:
            return found


@pytest.mark.parametrize("processes", [1, 2])
def test_fed_serve_is_ready_when_it_listens(tmp_path: Path, processes: int,
                                            systems: tuple[FakeSystem, FakeSystem],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with _notify_socket(tmp_path) as (sock, path):
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        fed = Fed(tmp_path / "state", list(systems),
                  extra=["--processes", str(processes)]).start()
        try:
            sock.settimeout(30)
            ready = sock.recv(4096)
            assert ready.startswith(b"READY=1\nSTATUS="), ready
            socket.create_connection(("127.0.0.1", fed.smtp_port), timeout=5).close()
            assert fed.client.health()
        finally:
            assert fed.stop() == 0
        assert _pending(sock) == []  # one READY, from the process systemd started


def test_station_agent_is_ready_when_it_polls(tmp_path: Path) -> None:
    (tmp_path / "station.token").write_text("a-station-token\n")
    (tmp_path / "profile.json").write_text("{}")
    with _notify_socket(tmp_path) as (sock, path):
        agent = subprocess.Popen(
            [sys.executable, "-m", "station_agent", "run", "--api",
             f"http://127.0.0.1:{free_port()}", "--station", "ws-1", "--token-file",
             "station.token", "--client", "json", "--profile", "profile.json",
             "--state-dir", "state"], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "NOTIFY_SOCKET": path})
        try:
            sock.settimeout(30)
            assert sock.recv(4096).startswith(b"READY=1\nSTATUS=polling http://127.0.0.1:")
        finally:
            stop_process(agent)
    # Its own folder (the outbox of the user's local mail) is the user's only.
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


# -- private files --------------------------------------------------------------------------

def test_fed_warns_about_a_token_file_others_can_read(tmp_path: Path) -> None:
    token = tmp_path / "fed.token"
    token.write_text("s3cret-token-value\n")
    token.chmod(0o644)
    assert exposure(token) is not None
    queue = [sys.executable, "-m", "fed", "queue", "list", "--token-file", str(token),
             "--control", f"127.0.0.1:{free_port()}"]
    loose = subprocess.run(queue, capture_output=True, text=True, timeout=30, check=False)
    assert f"fed: warning: token file {token} is accessible by others (mode 0644)" \
        in loose.stderr
    assert "s3cret" not in loose.stderr + loose.stdout
    # `fed serve` says it in its log, as a JSON line when the log is JSON.
    log = tmp_path / "fed.log"
    with open(log, "w") as err:
        serve = subprocess.Popen(
            [sys.executable, "-m", "fed", "serve", "--smtp", "127.0.0.1:0", "--control",
             "127.0.0.1:0", "--state-dir", str(tmp_path / "state"), "--token-file",
             str(token), "--domain", "corp.example", "--log-format", "json"],
            stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert serve.stdout is not None and "fed ready" in serve.stdout.readline()
    finally:
        stop_process(serve)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    warned = [r for r in records if "accessible by others" in r["msg"]]
    assert warned and warned[0]["level"] == "warning", records[:3]
    assert "s3cret" not in log.read_text()
    token.chmod(0o600)
    assert exposure(token) is None
    tight = subprocess.run(queue, capture_output=True, text=True, timeout=30, check=False)
    assert "warning: token file" not in tight.stderr


def test_demo_world_files_are_private_under_umask_022(tmp_path: Path) -> None:
    """Every file the demo world writes (state store, fed's spool and databases, the
    Maildirs, logs, token, the specs repository) is for its owner only."""
    work = tmp_path / "demo"
    old = os.umask(0o022)
    try:
        result = run_cli("demo", "--workdir", str(work), "--mailboxes", "3",
                         "--old-messages", "2", "--rate", "20", cwd=tmp_path, timeout=110)
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stdout + result.stderr
    seen = {"files": 0, "maildir": 0, "spool": 0, "token": 0, "state": 0}
    exposed = []
    for path in [work, *work.rglob("*")]:
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            exposed.append(f"{mode:04o} {path.relative_to(tmp_path)}")
        if path.is_file():
            seen["files"] += 1
            rel = str(path.relative_to(work))
            seen["maildir"] += "/cur/" in rel or "/new/" in rel
            seen["spool"] += "fed" in rel and "spool" in rel
            seen["token"] += rel.endswith("fed.token")
            seen["state"] += rel.endswith("state.db")
    assert not exposed, "\n".join(exposed[:20])
    assert seen["maildir"] > 0 and seen["token"] == 1 and seen["state"] == 1, seen
    assert seen["files"] > 50, seen


def test_demo_removes_its_temporary_folder(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    result = run_cli("demo", "--mailboxes", "2", "--old-messages", "1", "--rate", "10",
                     cwd=tmp_path, env={"TMPDIR": str(temp)}, timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"demo: removed .*mailferry-demo-", result.stdout)
    assert list(temp.iterdir()) == []


# -- read-only commands need no secret ------------------------------------------------------

def test_status_and_events_work_without_the_token(tmp_path: Path) -> None:
    repo, _ = _init(tmp_path)
    status = run_cli("--specs", ".", "status", cwd=repo, env=NO_TOKEN)
    assert status.returncode == 0, status.stderr
    assert "alice@corp.example" in status.stdout and "(new) -> s1" in status.stdout
    assert "3 mailboxes; lease held by nobody" in status.stdout
    assert "note: fed's directory not read" in status.stderr
    events = run_cli("--specs", ".", "events", "alice@corp.example", cwd=repo, env=NO_TOKEN)
    assert events.returncode == 0 and events.stdout == "", events.stderr
    # --apply still needs it, and says which.
    apply = run_cli("--specs", ".", "--apply", "--allow-dirty", cwd=repo, env=NO_TOKEN)
    assert apply.returncode == 1 and "fed.token" in apply.stderr


def test_status_shows_a_mailbox_that_stays_as_equal() -> None:
    rows = [StatusRow("a@x", "p", "s1", "s1", "13", "in-sync", "", "", ""),
            StatusRow("b@x", "p", "s1", "s2", "3", "step", "E4", "due now", "")]
    lines = table(rows)
    assert "= s1" in lines[1] and "s1 -> s1" not in lines[1]
    assert "s1 -> s2" in lines[2]


# -- CLI finish -----------------------------------------------------------------------------

@pytest.mark.parametrize("module, name", [("reconciler", "reconcile"), ("fed", "fed"),
                                          ("station_agent", "station-agent"),
                                          ("maildir_system", "maildir-system"),
                                          ("reconciler.mover", "mover")])
def test_every_command_has_version(module: str, name: str) -> None:
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{name} (mailferry) {__version__}"
    assert __version__ != "0+unknown"


def test_shell_completion_script(tmp_path: Path) -> None:
    done = run_cli("completion", "bash", cwd=tmp_path)
    assert done.returncode == 0 and "_RECONCILE_COMPLETE=bash_complete" in done.stdout
    # The script works: click completes the subcommands.
    env = {"_RECONCILE_COMPLETE": "bash_complete", "COMP_WORDS": "reconcile st",
           "COMP_CWORD": "1"}
    words = subprocess.run([sys.executable, "-m", "reconciler"], capture_output=True,
                           text=True, timeout=30, env={**os.environ, **env}, check=False)
    assert "plain,station" in words.stdout and "plain,status" in words.stdout
    assert not list(tmp_path.iterdir())  # neither wrote a var/ folder


def test_apply_says_one_pass() -> None:
    from reconciler.run import Output

    lines: list[str] = []

    class Report:
        applied, errors, passes = 0, list[str](), 1

    class Plan:
        @staticmethod
        def summary() -> str:
            return "Plan: ..."

    Output(lines.append, False).summary(Plan(), Report())  # type: ignore[arg-type]
    assert "in 1 pass." in lines[0]
    Report.passes = 2
    Output(lines.append, False).summary(Plan(), Report())  # type: ignore[arg-type]
    assert "in 2 passes." in lines[2]


def test_events_show_a_first_state_as_new(tmp_path: Path) -> None:
    from reconciler.state.model import Event, utcnow
    from reconciler.state.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    with store.session() as session:
        session.add(Event(address="a@corp.example", at=utcnow(), step="create",
                          from_state=None, to_state=0, detail="created"))
        session.commit()
    done = run_cli("--state", str(tmp_path / "state.db"), "events", "a@corp.example",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert " new->0 " in done.stdout and "None" not in done.stdout
