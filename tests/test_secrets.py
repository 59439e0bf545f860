"""Secrets: one reader (`mailferry.secretfile`) for every token and password file.

A malformed secret is refused by name -- `token file F: more than one line` -- and never
printed, logged or put into an exception: each program is run as a real subprocess and its
whole output is searched for the secret's text.
"""

from __future__ import annotations

import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import yaml

from mailferry import secretfile
from reconciler.errors import MailferryError
from reconciler.secrets import ensure_file_secret, resolve
from reconciler.spec.loader import load_specs
from reconciler.spec.model import SecretRef

from sysutil import free_port
from world import base_documents, run_cli

SECRET = "first-line-secret"
TWO_LINES = f"{SECRET}\nsecond-line\n"


def _write(path: Path, data: str | bytes) -> Path:
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


@pytest.mark.parametrize(("content", "problem"), [
    (TWO_LINES, "more than one line"),
    (f"{SECRET}\r\nsecond\r\n", "more than one line"),
    (f"{SECRET}\x1b[2J\n", "contains a control character"),
    ("\n  \n", "empty"),
    (b"\xff" + SECRET.encode(), "not UTF-8 text"),
    ("x" * (secretfile.MAX_SECRET_BYTES + 1), "larger than 65536 bytes"),
])
def test_malformed_token_files_are_refused_by_name(tmp_path: Path, content: str | bytes,
                                                   problem: str) -> None:
    path = _write(tmp_path / "fed.token", content)
    with pytest.raises(secretfile.SecretError) as caught:
        secretfile.read_file(path)
    assert str(caught.value) == f"token file {path}: {problem}"
    shown = "".join(traceback.format_exception(caught.value))  # with any chained exception
    assert SECRET not in shown and "x" * 100 not in shown, shown


def test_one_line_with_its_newline_is_the_token(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert secretfile.read_file(_write(tmp_path / "t", f"  {SECRET}\r\n")) == SECRET
    monkeypatch.setenv("MF_T", f"{SECRET}\n")
    assert secretfile.read_env("MF_T") == SECRET
    monkeypatch.setenv("MF_T", TWO_LINES)
    with pytest.raises(secretfile.SecretError, match=r"^token variable \$MF_T: more than one"):
        secretfile.read_env("MF_T")
    with pytest.raises(secretfile.SecretError, match=r"cannot read: No such file"):
        secretfile.read_file(tmp_path / "missing")


def test_reconciler_resolve_names_what_and_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "master.pw", TWO_LINES)
    with pytest.raises(MailferryError) as caught:
        resolve(SecretRef(file=str(path)), what="s1 IMAP master user admin")
    assert str(caught.value) == f"s1 IMAP master user admin: secret file {path}: more than " \
        "one line"


def _no_secret(done: subprocess.CompletedProcess[str]) -> str:
    output = done.stdout + done.stderr
    assert SECRET not in output and "second-line" not in output, output
    assert "Traceback" not in output, output
    return output


def test_reconcile_refuses_a_two_line_fed_token(tmp_path: Path) -> None:
    docs = base_documents(tmp_path)
    (tmp_path / "var").mkdir()
    token = _write(tmp_path / "var" / "fed.token", TWO_LINES)
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "base.yaml").write_text(yaml.safe_dump_all(docs))
    why = f"the token of FedHub fed: secret file {token}: more than one line"
    # --plan needs no token: it plans without fed's directory and says why, by name.
    plan = run_cli("--specs", str(specs), "--state", str(tmp_path / "state.db"), "--plan",
                   cwd=tmp_path)
    assert why in _no_secret(plan)
    done = run_cli("--specs", str(specs), "--state", str(tmp_path / "state.db"), "--apply",
                   cwd=tmp_path)
    output = _no_secret(done)
    assert done.returncode == 1, output
    assert why in output


def test_fed_refuses_a_two_line_token_file(tmp_path: Path) -> None:
    token = _write(tmp_path / "fed.token", TWO_LINES)
    done = subprocess.run(
        [sys.executable, "-m", "fed", "serve", "--smtp", f"127.0.0.1:{free_port()}",
         "--control", f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "state"),
         "--domain", "corp.example", "--token-file", str(token)],
        capture_output=True, text=True, timeout=60, check=False)
    output = _no_secret(done)
    assert done.returncode == 2, output
    assert f"fed: token file {token}: more than one line" in output


def test_station_agent_refuses_a_two_line_token_file(tmp_path: Path) -> None:
    token = _write(tmp_path / "station.token", TWO_LINES)
    profile = _write(tmp_path / "profile.json", "{}")
    done = subprocess.run(
        [sys.executable, "-m", "station_agent", "run", "--once", "--api",
         f"http://127.0.0.1:{free_port()}", "--station", "ws-a", "--token-file", str(token),
         "--state-dir", str(tmp_path / "state"), "--client", "json", "--profile", str(profile)],
        capture_output=True, text=True, timeout=60, check=False)
    output = _no_secret(done)
    assert done.returncode == 1, output
    assert f"token file {token}: more than one line" in output


def test_a_file_in_systemds_credentials_directory(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # LoadCredential=fed-token:... in a unit; the specs say {file: $CREDENTIALS_DIRECTORY/
    # fed-token}, the same in every unit (docs/deployment.md).
    ref = "$CREDENTIALS_DIRECTORY/fed-token"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(MailferryError) as caught:
        resolve(SecretRef(file=ref), what="the token of FedHub fed")
    assert str(caught.value) == ("the token of FedHub fed: secret file "
                                 "$CREDENTIALS_DIRECTORY/fed-token: $CREDENTIALS_DIRECTORY is "
                                 "not set (systemd sets it for a unit with LoadCredential=)")
    _write(tmp_path / "fed-token", SECRET + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert resolve(SecretRef(file=ref), what="the token") == SECRET
    _write(tmp_path / "fed-token", TWO_LINES)
    with pytest.raises(MailferryError, match=r"secret file \$CREDENTIALS_DIRECTORY/fed-token: "
                                             r"more than one line$"):
        resolve(SecretRef(file=ref), what="the token")


def test_the_loader_keeps_a_credentials_reference_for_the_unit_to_resolve(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = base_documents(tmp_path)
    fed = next(d for d in docs if d["kind"] == "FedHub")
    fed["spec"]["token"] = {"file": "$CREDENTIALS_DIRECTORY/fed-token"}
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "base.yaml").write_text(yaml.safe_dump_all(docs))
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    loaded = load_specs(specs)
    assert loaded.fed.token.file == "$CREDENTIALS_DIRECTORY/fed-token"
    ensure_file_secret(loaded.fed.token)  # the admin provides credentials: nothing created
    assert not (specs / "$CREDENTIALS_DIRECTORY").exists()
    assert not Path("$CREDENTIALS_DIRECTORY").exists()
