"""The deployment's systemd units (examples/deployment/, docs/deployment.md).

One reconciler, N workers, M fed nodes: each unit must load (`systemd-analyze verify`, as
`reconcile init --systemd`'s units are checked in test_install.py), follow the project's
service rules (notify, hardened, umask 077), keep every secret a systemd credential, and
its ExecStart, with the specifiers and the example env file's variables expanded as systemd
does, must parse with the tool's own parser (fed's argparse, reconcile's click).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import click
import pytest

from fed.cli import parser as fed_parser
from mailferry.resources import data_path
from mailferry.secretfile import CREDENTIALS
from reconciler.cli import main as reconcile_main
from reconciler.spec.loader import load_specs
from reconciler.spec.model import SecretRef, SpecSet

BIN = Path(sys.executable).parent
UNITS = sorted(p.name for p in data_path("examples", "deployment").glob("*.service"))
RULES = ("Type=notify", "NotifyAccess=main", "User=mailferry", "Restart=on-failure",
         "UMask=0077", "NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=",
         "ProtectHome=yes", "PrivateTmp=yes", "EnvironmentFile=/etc/mailferry/")


def folder() -> Path:
    return data_path("examples", "deployment")


def settings(unit: str) -> dict[str, list[str]]:
    """KEY -> every value it is given in the unit (comments skipped)."""
    found: dict[str, list[str]] = {}
    for line in (folder() / unit).read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def instance(unit: str) -> str:
    """The name the unit runs under: a template's first instance."""
    return unit.replace("@.", "@1.")


def specifiers(text: str, unit: str) -> str:
    """systemd's specifiers as used in these units (any other one fails the test)."""
    name = instance(unit)
    values = {"d": f"/run/credentials/{name}", "H": socket.gethostname(), "n": name,
              "i": "1", "%": "%"}

    def one(match: re.Match[str]) -> str:
        assert match.group(1) in values, f"{unit}: specifier %{match.group(1)} not expected"
        return values[match.group(1)]
    return re.sub(r"%(.)", one, text)


def environment(unit: str) -> dict[str, str]:
    """Environment= and the example env file named by EnvironmentFile= (same basename)."""
    env: dict[str, str] = {}
    for path in settings(unit).get("EnvironmentFile", []):
        for line in (folder() / Path(path).name).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition("=")
                env[key] = value
    for value in settings(unit).get("Environment", []):
        key, _, val = specifiers(value, unit).partition("=")
        env[key] = val
    return env


def command_line(unit: str) -> list[str]:
    """ExecStart as systemd runs it: specifiers, words, then `$VAR` (split into words) and
    `${VAR}` (one word) from the unit's environment; an unset variable fails the test."""
    [line] = settings(unit)["ExecStart"]
    env = environment(unit)
    argv: list[str] = []
    for word in shlex.split(specifiers(line, unit)):
        whole = re.fullmatch(r"\$([A-Za-z_]\w*)", word)
        if whole:
            assert whole.group(1) in env, f"{unit}: ${whole.group(1)} is not set"
            argv += env[whole.group(1)].split()
            continue

        def braced(match: re.Match[str]) -> str:
            assert match.group(1) in env, f"{unit}: ${{{match.group(1)}}} is not set"
            return env[match.group(1)]
        argv.append(re.sub(r"\$\{([A-Za-z_]\w*)\}", braced, word))
    return argv


def reconcile_lists_worker() -> bool:
    script = BIN / "reconcile"
    if not script.exists():
        return False
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True,
                          timeout=60, check=False)
    return re.search(r"^\s+worker\s", done.stdout, re.MULTILINE) is not None


def test_the_deployment_has_its_three_units() -> None:
    assert UNITS == ["mailferry-fed-node.service", "mailferry-reconciler.service",
                     "mailferry-worker@.service"]


@pytest.mark.parametrize("unit", UNITS)
def test_each_unit_is_a_hardened_notify_service(unit: str) -> None:
    text = (folder() / unit).read_text()
    for rule in RULES:
        assert f"\n{rule}" in text, (unit, rule)
    assert settings(unit)["CapabilityBoundingSet"] in ([""], ["CAP_NET_BIND_SERVICE"])


def credentials(found: object) -> set[str]:
    """The systemd credentials a loaded spec object names ({file: $CREDENTIALS_DIRECTORY/N})."""
    if isinstance(found, SecretRef):
        file = found.file or ""
        return {file[len(CREDENTIALS):]} if file.startswith(CREDENTIALS) else set()
    if dataclasses.is_dataclass(found) and not isinstance(found, type):
        return set().union(*(credentials(getattr(found, f.name))
                             for f in dataclasses.fields(found)))
    if isinstance(found, dict):
        return set().union(set(), *(credentials(v) for v in found.values()))
    if isinstance(found, (list, tuple)):
        return set().union(set(), *(credentials(v) for v in found))
    return set()


@pytest.fixture(scope="module")
def example_specs(tmp_path_factory: pytest.TempPathFactory) -> SpecSet:
    root = tmp_path_factory.mktemp("deployment-specs")
    shutil.copy(folder() / "specs.yaml", root / "specs.yaml")
    return load_specs(root)


@pytest.mark.parametrize("unit", UNITS)
def test_secrets_are_credentials_never_in_the_unit_or_its_env_file(
        unit: str, example_specs: SpecSet) -> None:
    loaded = {v.partition(":")[0]: v.partition(":")[2]
              for v in settings(unit).get("LoadCredential", [])}
    for name, source in loaded.items():
        assert source == f"/etc/mailferry/credentials/{name}", (unit, name)
    fed = credentials(example_specs.fed)
    systems = credentials(example_specs.systems)
    assert fed == {"fed-token"} and systems == {"imap-passwords"}
    wanted = {"mailferry-reconciler.service": fed | systems | {"pgpass", "web-token"},
              "mailferry-worker@.service": systems | {"pgpass"},  # no fed token
              "mailferry-fed-node.service": {"fed-token", "pgpass"}}[unit]
    assert set(loaded) == wanted, unit
    used = set(re.findall(r"%d/([\w.-]+)", (folder() / unit).read_text()))
    assert used <= set(loaded), unit
    assert settings(unit)["Environment"] == ["PGPASSFILE=%d/pgpass"]
    # No password in a database URL, no secret-looking setting in the env file.
    env = environment(unit)
    for value in env.values():
        for url in re.findall(r"postgresql\+psycopg://([^/\s]+)/", value):
            assert ":" not in url.partition("@")[0], (unit, "a password in the URL")
    for key in env:
        assert not any(word in key for word in ("PASSWORD", "TOKEN", "SECRET")), (unit, key)


@pytest.mark.parametrize("unit", UNITS)
def test_the_command_line_parses(unit: str, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = command_line(unit)
    tool = Path(argv[0])
    assert tool.parent == Path("/usr/local/bin"), unit  # as in examples/systemd/
    if tool.name == "fed":
        args = fed_parser().parse_args(argv[1:])  # argparse: exits 2 on a bad option
        assert args.command == "serve"
        assert args.token_file == Path(f"/run/credentials/{instance(unit)}/fed-token")
        assert args.shared_db.startswith("postgresql+psycopg://") and args.node_notify
        assert args.node_name == socket.gethostname() and args.system
        return
    assert tool.name == "reconcile", unit
    if ("worker" in argv or "--workers" in argv) and not reconcile_lists_worker():
        pytest.skip("`reconcile --help` lists no `worker` command yet (another change adds "
                    "it, with --workers): this unit's command line is checked once it does")
    for key, value in environment(unit).items():  # click reads MAILFERRY_STATE itself
        monkeypatch.setenv(key, value)
    # The group's options, then the subcommand's (click parses each without running it).
    at = argv.index("worker") if "worker" in argv else len(argv)
    ctx = reconcile_main.make_context("reconcile", argv[1:at])
    assert ctx.params["specs_dir"] == "/srv/mailferry/specs"
    assert str(ctx.params["state"]).startswith("postgresql+psycopg://")
    if "worker" in argv:
        command = reconcile_main.get_command(ctx, "worker")
        assert isinstance(command, click.Command)
        sub = command.make_context("worker", argv[at + 1:], parent=ctx)
        assert sub.params["concurrency"] == int(environment(unit)["WORKER_CONCURRENCY"])
    else:
        assert ctx.params["do_watch"] and ctx.params["use_workers"]
        assert ctx.params["web_token_file"] == f"/run/credentials/{instance(unit)}/web-token"


def test_systemd_analyze_verifies_every_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed: the units are checked by content only")
    missing = [tool for tool in ("reconcile", "fed") if not (BIN / tool).exists()]
    if missing:
        pytest.skip(f"no {' or '.join(missing)} console script next to this Python")
    # As installed, but with this environment's commands (verify checks they exist).
    for unit in UNITS:
        text = (folder() / unit).read_text().replace("/usr/local/bin/", f"{BIN}/")
        (tmp_path / instance(unit)).write_text(text)
    for unit in UNITS:
        done = subprocess.run([analyze, "verify", str(tmp_path / instance(unit))],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0 and not done.stderr.strip(), (unit, done.stderr)
