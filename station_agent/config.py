"""The agent's configuration file (`station-agent.toml`), as written by `reconcile station enrol`.

Why a file. A help desk enrols a station with one command and drops one file (plus the
token file beside it) on the workstation; a systemd user unit or a Windows scheduled task
then runs `station-agent run --config FILE` with nothing else to type. Command-line options
still override the file, which keeps scripted and test runs explicit.

Why TOML. It is readable and editable by a technician, comments are allowed (the generated
file explains itself), and Python reads it with the standard library (`tomllib`): no TOML
library to install on workstations. Relative paths are taken relative to the file's folder; `~` and
environment variables (`%APPDATA%`, `$HOME`) are expanded, so one file fits a fleet.

Secrets are never in this file: the station token and the user's IMAP password each live in
a file of their own (readable by the user only), named here.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from mailferry import secretfile
from mailferry.mail.oauth2 import MECHANISMS, OAuth2Settings


class ConfigError(Exception):
    """The configuration file is missing, unreadable or wrong."""


def expand(value: str, base: Path) -> Path:
    """A path from the file: variables and ~ expanded, relative to `base`."""
    path = Path(os.path.expanduser(os.path.expandvars(value)))
    return path if path.is_absolute() else base / path


def load(path: Path) -> dict[str, Any]:
    """The file as flat AgentConfig keyword arguments (paths resolved)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    base = path.resolve().parent
    out: dict[str, Any] = {}
    client = _table(data, "client", path)
    imap = _table(data, "imap", path)
    switch = _table(data, "switch", path)
    checks = _table(data, "checks", path)
    for key in ("api", "station", "address"):
        if key in data:
            out[key] = _str(data[key], key, path)
    for key in ("token_file", "state_dir", "log_file"):
        if key in data:
            out[key] = expand(_str(data[key], key, path), base)
    if "interval" in data:
        out["interval"] = _num(data["interval"], "interval", path)
    if "kind" in client:
        out["client"] = _str(client["kind"], "client.kind", path)
    for key, name in (("profile", "profile"), ("local_mail", "local_mail"),
                      ("profiles_ini", "profiles_ini")):
        if client.get(key):
            out[name] = expand(_str(client[key], f"client.{key}", path), base)
    if "pop3_folders" in client:
        policy = _str(client["pop3_folders"], "client.pop3_folders", path)
        if policy not in ("account", "merge"):
            raise ConfigError(f"{path}: client.pop3_folders must be \"account\" or "
                              f"\"merge\", not {policy!r}")
        out["pop3_folders"] = policy
    if client.get("profile_name"):
        out["profile_name"] = _str(client["profile_name"], "client.profile_name", path)
    archives = client.get("archives", [])
    if not isinstance(archives, list) or not all(isinstance(a, str) for a in archives):
        raise ConfigError(f"{path}: client.archives must be a list of folder paths")
    out["archives"] = [expand(a, base) for a in archives]
    if imap.get("user"):
        out["imap_user"] = _str(imap["user"], "imap.user", path)
    if imap.get("password_file"):
        out["imap_password_file"] = expand(_str(imap["password_file"], "imap.password_file",
                                                path), base)
    if imap.get("ca_file"):
        out["ca_file"] = str(expand(_str(imap["ca_file"], "imap.ca_file", path), base))
    if "oauth2" in imap:
        out["imap_oauth2"] = _oauth2(_table(imap, "oauth2", path), path, base)
    for key in ("retries",):
        if key in switch:
            out[key] = int(_num(switch[key], f"switch.{key}", path))
    for key in ("retry_delay", "cleanup_delay"):
        if key in switch:
            out[key] = _num(switch[key], f"switch.{key}", path)
    if "min_free_mb" in checks:
        out["min_free_mb"] = int(_num(checks["min_free_mb"], "checks.min_free_mb", path))
    return out


def _oauth2(box: dict[str, Any], path: Path, base: Path) -> OAuth2Settings:
    """[imap.oauth2]: token_url, client_id, refresh_token_file, optional client_secret_file,
    scope, mechanism (oauthbearer by default), ca_file; secrets only as files."""
    for key in ("token_url", "client_id", "refresh_token_file"):
        if not box.get(key):
            raise ConfigError(f"{path}: imap.oauth2.{key} is missing")
    mechanism = _str(box.get("mechanism", "oauthbearer"), "imap.oauth2.mechanism", path)
    if mechanism not in MECHANISMS:
        raise ConfigError(f"{path}: imap.oauth2.mechanism must be \"oauthbearer\" or "
                          f"\"xoauth2\", not {mechanism!r}")
    refresh = expand(_str(box["refresh_token_file"], "imap.oauth2.refresh_token_file", path),
                     base)
    secret = expand(_str(box["client_secret_file"], "imap.oauth2.client_secret_file", path),
                    base) if box.get("client_secret_file") else None
    ca = box.get("ca_file")
    return OAuth2Settings(
        token_url=_str(box["token_url"], "imap.oauth2.token_url", path),
        client_id=_str(box["client_id"], "imap.oauth2.client_id", path),
        client_secret=(lambda: secretfile.read_file(secret, "OAuth2 client secret"))
        if secret is not None else None,
        refresh_token=lambda: secretfile.read_file(refresh, "OAuth2 refresh token"),
        scope=_str(box["scope"], "imap.oauth2.scope", path) if box.get("scope") else None,
        mechanism=mechanism, refresh_ref=str(refresh),
        cafile=str(expand(_str(ca, "imap.oauth2.ca_file", path), base)) if ca else None)


def _table(data: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    return value


def _str(value: object, key: str, path: Path) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: {key} must be a string")
    return value


def _num(value: object, key: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{path}: {key} must be a number >= 0")
    return float(value)


def render(*, api: str, station: str, address: str, token_file: str,
           client: str = "thunderbird", state_dir: str = "state",
           log_file: str = "agent.log") -> str:
    """A ready-to-use, self-explaining configuration file."""
    def q(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return f"""# mailferry station agent configuration for station {station} ({address}).
# Run: station-agent run --config THIS-FILE   (relative paths are relative to this file)
api = {q(api)}
station = {q(station)}
address = {q(address)}
token_file = {q(token_file)}      # the station token: keep it readable by the user only
state_dir = {q(state_dir)}        # outbox, upload manifests, what was done
log_file = {q(log_file)}          # what the help desk reads
interval = 30                     # seconds between polls (+-20 % jitter)

[client]
kind = {q(client)}                # "thunderbird", or "json" (a simple JSON profile)
# profile = "~/.thunderbird/abcd1234.default-release"   # default: from profiles.ini
# profile_name = "default-release"
# profiles_ini = "~/.thunderbird/profiles.ini"
archives = []                     # more mbox folders to upload, e.g. ["~/Mail-archive"]
# A POP3 account's local folders (Mail/<pop server>/) go into the new mailbox under a
# folder named for the account ("account"), or merged into it: Inbox into INBOX, Sent into
# Sent, the others beside them ("merge").
pop3_folders = "account"

[imap]
# Where the target system has IMAP, local mail is uploaded and the switch tested with the
# user's own login. The password is read from this file (never from this configuration).
# user = {q(address)}
password_file = "imap.password"
# ca_file = ""                    # a private CA for the new servers' TLS certificates
# Or a bearer token instead of the password (SASL OAUTHBEARER; docs/oauth2.md):
# [imap.oauth2]
# token_url = "https://login.microsoftonline.com/TENANT/oauth2/v2.0/token"
# client_id = "..."
# refresh_token_file = "imap.refresh-token"
# scope = "https://outlook.office.com/IMAP.AccessAsUser.All offline_access"
# mechanism = "oauthbearer"       # or "xoauth2"

[switch]
retries = 3                       # retries of a failed switch test (E32)
retry_delay = 30                  # seconds before the first retry, doubled each time
cleanup_delay = 0                 # seconds to keep the old settings after success (E33)

[checks]
min_free_mb = 100
"""
