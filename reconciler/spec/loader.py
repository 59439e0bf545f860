"""Load the `specs/` folder into a validated, frozen `SpecSet`, or say everything wrong with it.

Why all problems at once: invariant 5 says bad input changes nothing, so a broken spec set
stops the reconciler cold; an admin fixing a pull request one error per CI run would rightly
hate that. The loader therefore keeps going after a problem and raises a single `SpecError`
listing every finding, one per line, in a form editors and CI annotators understand::

    specs/placements.yaml:14: spec.mailboxes[2].aliases[0]: address 'bob@corp.example' ...

(FILE relative to the working directory when it is below it, LINE 1-based, FIELD the dotted
path or ``-`` for a whole document; folder-level problems such as a missing FedHub use line 0.)

The pipeline, and why it is in this order:

1. YAML, with a line for every node (`yamlpos`). A syntax error loses the rest of its file,
   not the documents before it.
2. Kind and apiVersion, checked by hand first: they choose the schema, and "unknown kind" is a
   clearer message than twenty schema errors from the wrong schema.
3. JSON Schema, with the files in `schemas/` (the same ones editors use, so an editor and the
   reconciler can never disagree). Messages are made friendlier where jsonschema's are not
   (unknown fields get a did-you-mean; `errorMessage` annotations in the schema replace the
   unreadable anyOf/oneOf texts, and never echo a value, which might be a pasted secret).
4. Per-document semantics the schema cannot express (time zones, cron, rule shapes, ranges,
   ports), while building the typed objects.
5. Cross-document checks: duplicate names, exactly one FedHub, references, addresses claimed
   twice, addresses outside the target system's domains.

A document that fails 1-4 is not built, so checks that depend on it are skipped rather than
reported as noise: a reference to a MigrationWindow whose own document is broken is not also
"unknown". Likewise, when a file has a YAML syntax error, "unknown reference" and "no FedHub"
are not reported (the missing object may be in the unreadable part): they will show on the
next run, once the syntax is fixed. Everything else in the other documents is still reported.

Side effects: reads the folder's files and asks git for the commit (`gitinfo`); nothing else.
"""

from __future__ import annotations

import difflib
import gc
import hashlib
import ipaddress
import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from mailferry import secretfile
from mailferry.mail.addresses import (
    AddressError,
    address_key,
    check,
    domain_key,
    domain_to_unicode,
    format_address,
)
from mailferry.resources import schema_dir

from ..errors import SpecError
from .durations import parse_duration
from .fastcheck import compile_object
from .gitinfo import git_state
from .model import (
    DataTransfer,
    Endpoint,
    FedSpec,
    ImapOptions,
    MailboxSpec,
    MailSystemSpec,
    MasterUser,
    OAuth2Options,
    PlacementSpec,
    PolicySpec,
    PostfixDovecotOptions,
    SecretRef,
    SourceLocation,
    SpecSet,
    SshTarget,
    WindowKind,
    WindowRule,
    WindowSpec,
)
from .yamlpos import Budget, JsonPath, YamlDocument, parse_documents

API_VERSION = "mailferry/v1"
SCHEMA_DIR = schema_dir()  # the package data: the same files as the source tree's schemas/
KINDS: dict[str, str] = {  # kind -> schema file stem
    "MailSystem": "mailsystem",
    "FedHub": "fedhub",
    "MailboxPlacement": "mailboxplacement",
    "MigrationWindow": "migrationwindow",
    "MigrationPolicy": "migrationpolicy",
}
SPEC_SUFFIXES = (".yaml", ".yml")
# A spec set is read whole into memory (and by CI, on pull requests anyone may open): 100,000
# mailboxes are about 8 MiB, so 64 MiB is room to grow, and a bound on what a file can cost.
MAX_SPEC_BYTES = 64 * 1024 * 1024


@lru_cache(maxsize=1)
def load_schemas() -> dict[str, dict[str, Any]]:
    """kind -> JSON Schema, read from the package data (the source tree's `schemas/`)."""
    schemas: dict[str, dict[str, Any]] = {}
    for kind, stem in KINDS.items():
        path = SCHEMA_DIR / f"{stem}.schema.json"
        schemas[kind] = cast(dict[str, Any], json.loads(path.read_text(encoding="utf-8")))
    return schemas


@lru_cache(maxsize=1)
def _validators() -> dict[str, Draft202012Validator]:
    """kind -> validator (compiled once per process)."""
    return {kind: Draft202012Validator(schema) for kind, schema in load_schemas().items()}


@lru_cache(maxsize=1)
def _mailbox_check() -> Callable[[Any], bool] | None:
    """The compiled item schema of `spec.mailboxes` (None if it is not a simple one)."""
    spec = load_schemas()["MailboxPlacement"]["properties"]["spec"]
    return compile_object(spec["properties"]["mailboxes"]["items"])


def _fast_checked(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """What jsonschema must still see: a placement whose mailbox entries all pass the fast
    check is validated with only its first entry (same verdict, a fraction of the time);
    otherwise the whole document, so that every message is the slow path's own."""
    check = _mailbox_check()
    spec = data.get("spec")
    if kind != "MailboxPlacement" or check is None or not isinstance(spec, dict):
        return data
    boxes = spec.get("mailboxes")
    if not isinstance(boxes, list) or len(boxes) < 2 or not all(check(b) for b in boxes):
        return data
    return {**data, "spec": {**spec, "mailboxes": boxes[:1]}}


def display_path(path: Path) -> str:
    """`path` relative to the working directory when below it, else absolute."""
    absolute = Path(os.path.abspath(path))
    for cwd in (Path(os.path.abspath(os.getcwd())), Path.cwd().resolve()):
        for candidate in (absolute, absolute.resolve()):
            try:
                return str(candidate.relative_to(cwd))
            except ValueError:
                continue
    return str(absolute)


def dotted(path: Iterable[str | int]) -> str:
    """JSON path -> ``spec.mailboxes[2].aliases[0]`` (``-`` for the whole document)."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "-"


def _address_format(template: str) -> bool:
    """True if `template` fills in to an address-like text ({address}, {local}, {domain})."""
    try:
        return bool(format_address(template, "a@b.example").strip())
    except (KeyError, IndexError, ValueError):
        return False


@dataclass(order=True)
class _Problem:
    order: int  # file order; folder-level problems come last
    line: int
    text: str = field(compare=False)


@dataclass
class _Doc:
    """One YAML document of a known kind, with where it came from."""

    display: str
    order: int
    ydoc: YamlDocument
    kind: str
    name: str | None
    valid: bool = True

    @property
    def data(self) -> dict[str, Any]:
        """The document's value (a mapping: non-mappings never become `_Doc`s)."""
        return cast(dict[str, Any], self.ydoc.data)

    @property
    def spec(self) -> dict[str, Any]:
        """The document's spec mapping."""
        return cast(dict[str, Any], self.data["spec"])

    def location(self) -> SourceLocation:
        """Where the document starts."""
        return SourceLocation(self.display, self.ydoc.line)

    def at(self, *path: str | int) -> SourceLocation:
        """Where the node at `path` was written."""
        return SourceLocation(self.display, self.ydoc.line_of(path))


class _Loader:
    """One load: the problems found so far and the objects built so far."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.root = directory.resolve()
        self.problems: list[_Problem] = []
        self.docs: list[_Doc] = []
        self.hasher = hashlib.sha256()  # what saved plans compare: every file read, in order
        # True when some object may be missing because its text was unreadable (YAML syntax,
        # unknown kind): "unknown reference" and "no FedHub" would then be guesses.
        self.uncertain = False
        self.broken: set[tuple[str, str]] = set()  # (kind, name) present but invalid
        self.systems: dict[str, MailSystemSpec] = {}
        self.feds: list[FedSpec] = []
        self.windows: dict[str, WindowSpec] = {}
        self.policies: dict[str, PolicySpec] = {}
        self.placements: dict[str, PlacementSpec] = {}
        self.claims: dict[str, list[str]] = {}  # placement -> its addresses and aliases, in order
        self.budget = Budget()  # YAML nodes and alias expansions left for the whole set
        self.bytes_left = MAX_SPEC_BYTES
        self.over_budget = False  # a bound was reached: the remaining files are not read

    # -- reporting ---------------------------------------------------------------------------

    def report(self, display: str, order: int, line: int, path: JsonPath | str, msg: str) -> None:
        """Record one problem as ``FILE:LINE: FIELD: message``."""
        where = path if isinstance(path, str) else dotted(path)
        self.problems.append(_Problem(order, line, f"{display}:{line}: {where}: {msg}"))

    def fail(self, doc: _Doc, path: JsonPath, msg: str, *, key_line: bool = False) -> None:
        """Record a problem at a node of `doc` and mark the document invalid."""
        line = doc.ydoc.key_line_of(path) if key_line else doc.ydoc.line_of(path)
        self.report(doc.display, doc.order, line, path, msg)
        doc.valid = False

    # -- stage 1-3: files, YAML, kinds, schemas ----------------------------------------------

    def read_folder(self) -> None:
        """Parse and schema-check every spec file of the folder."""
        if not self.directory.is_dir():
            self.report(display_path(self.directory), 0, 0, "-", "specs folder not found")
            self.uncertain = True
            return
        files = sorted(
            p for p in self.directory.iterdir()
            if p.suffix in SPEC_SUFFIXES and not p.name.startswith(".") and p.is_file()
        )
        for order, path in enumerate(files):
            if self.over_budget:
                break
            self.read_file(path, order)

    def read_file(self, path: Path, order: int) -> None:
        """Parse one file and check each of its documents up to the schema."""
        display = display_path(path)
        try:
            size = path.stat().st_size
            if size > self.bytes_left:
                self.report(display, order, 1, "-", f"the spec set is larger than "
                            f"{MAX_SPEC_BYTES:,} bytes; not read further")
                self.uncertain = self.over_budget = True
                return
            self.bytes_left -= size
            raw = path.read_bytes()
            self.hasher.update(f"{path.name}\0{len(raw)}\0".encode())
            self.hasher.update(raw)
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.report(display, order, 1, "-", f"cannot read file: {exc}")
            self.uncertain = True
            return
        parsed = parse_documents(text, self.budget)
        if parsed.error is not None:
            self.uncertain = True
            self.over_budget = parsed.over_budget
            label = "" if parsed.over_budget else "YAML syntax: "
            self.report(display, order, parsed.error_line or 1, "-", f"{label}{parsed.error}")
        for ydoc in parsed.documents:
            self.check_document(display, order, ydoc)

    def check_document(self, display: str, order: int, ydoc: YamlDocument) -> None:
        """Kind, apiVersion and schema of one document; keeps it for building if known."""
        data = ydoc.data
        if not isinstance(data, dict):
            found = "a list" if isinstance(data, list) else f"{type(data).__name__} {data!r}"
            self.report(display, order, ydoc.line, "-", f"a spec document must be a mapping "
                        f"(apiVersion, kind, metadata, spec), found {found}")
            return
        kind, version = data.get("kind"), data.get("apiVersion")
        meta = data.get("metadata")
        name = meta.get("name") if isinstance(meta, dict) else None
        name = name if isinstance(name, str) else None
        if not isinstance(kind, str) or kind not in KINDS:
            known = ", ".join(sorted(KINDS))
            msg = "missing" if kind is None else f"unknown kind {kind!r}"
            self.report(display, order, ydoc.line_of(("kind",)), ("kind",),
                        f"{msg} (expected one of {known})")
            self.uncertain = True  # the document may have been meant as anything
            return
        doc = _Doc(display, order, ydoc, str(kind), name)
        self.docs.append(doc)
        if version != API_VERSION:
            msg = "missing" if version is None else f"unknown apiVersion {version!r}"
            self.fail(doc, ("apiVersion",), f"{msg} (expected {API_VERSION})")
            return
        for line, path, msg in ydoc.problems:
            self.report(display, order, line, path, msg)
            doc.valid = False
        for error in _validators()[doc.kind].iter_errors(_fast_checked(doc.kind, data)):
            self.schema_problem(doc, error)

    def schema_problem(self, doc: _Doc, error: ValidationError) -> None:
        """Turn one jsonschema error into problems located at the offending YAML node."""
        path: JsonPath = tuple(error.absolute_path)
        schema = error.schema if isinstance(error.schema, dict) else {}
        if error.validator == "required" and isinstance(error.instance, dict):
            for prop in cast(list[str], error.validator_value):
                if prop not in error.instance:
                    # A missing key has no line: point at the mapping that lacks it.
                    line = doc.ydoc.line_of(path)
                    self.report(doc.display, doc.order, line, (*path, prop),
                                "required field missing")
            doc.valid = False
            return
        custom = schema.get("errorMessage")
        if error.validator == "additionalProperties" and not custom \
                and isinstance(error.instance, dict):
            allowed = sorted(cast(dict[str, Any], schema.get("properties", {})))
            for key in error.instance:
                if key in allowed:
                    continue
                hint = difflib.get_close_matches(key, allowed, n=1)
                msg = f"unknown field {key!r}"
                msg += f", did you mean {hint[0]!r}?" if hint else ""
                msg += f" (allowed: {', '.join(allowed)})"
                self.fail(doc, (*path, key), msg, key_line=True)
            return
        if path in (("apiVersion",), ("kind",)):
            return  # already checked by hand, with a better message
        self.fail(doc, path, str(custom) if custom else error.message)

    # -- stage 4: building the typed objects ----------------------------------------------

    def path_value(self, value: str) -> str:
        """A spec path made absolute against the specs folder."""
        return os.path.normpath(os.path.join(self.root, os.path.expanduser(value)))

    def endpoint(self, doc: _Doc, path: JsonPath, value: str) -> Endpoint:
        """host:port -> Endpoint; a port outside 1-65535 is reported."""
        host, _, port = value.rpartition(":")
        number = int(port)
        if not 1 <= number <= 65535:
            self.fail(doc, path, f"port {number} is outside 1-65535")
        return Endpoint(host.strip("[]"), number)

    def duration(self, doc: _Doc, path: JsonPath, value: Any) -> timedelta:
        """A schema-checked duration (parse errors cannot happen, but are reported if they do)."""
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(doc, path, str(exc))
            return timedelta(0)

    def secret(self, ref: dict[str, str]) -> SecretRef:
        """{env: X} | {file: path} -> SecretRef (a file made absolute, unless it is in
        systemd's credentials directory: ``$CREDENTIALS_DIRECTORY/NAME``, resolved when
        read, in the unit that reads it)."""
        file = ref.get("file")
        if file is not None and not file.startswith(secretfile.CREDENTIALS):
            file = self.path_value(file)
        return SecretRef(env=ref.get("env"), file=file)

    def master_user(self, raw: dict[str, Any] | None) -> MasterUser | None:
        """A schema-checked masterUser object, or None."""
        if raw is None:
            return None
        return MasterUser(user=str(raw["user"]), password=self.secret(raw["password"]))

    def oauth2(self, doc: _Doc, here: JsonPath, box: dict[str, Any]) -> OAuth2Options:
        """A schema-checked spec.imap.oauth2 object; what the schema cannot say (which
        refresh token goes with which grant, https) reported at its line."""
        grant = str(box.get("grant", "refresh_token"))
        given = [k for k in ("refreshToken", "refreshTokens") if k in box]
        if grant == "refresh_token" and len(given) != 1:
            self.fail(doc, here, "grant refresh_token needs one of refreshToken (one for "
                      "every mailbox) or refreshTokens (a file of 'address token' lines)"
                      + (", not both" if given else ""), key_line=True)
        if grant == "client_credentials":
            if given:
                self.fail(doc, (*here, given[0]), "only with grant: refresh_token",
                          key_line=True)
            if "clientSecret" not in box:
                self.fail(doc, here, "grant client_credentials needs clientSecret",
                          key_line=True)
        url = urlsplit(str(box["tokenUrl"]))
        if url.scheme != "https" and url.hostname not in ("127.0.0.1", "::1", "localhost"):
            self.fail(doc, (*here, "tokenUrl"), "must be https:// (the client secret and "
                      "the tokens travel in it); http:// only for 127.0.0.1 or localhost")
        return OAuth2Options(
            token_url=str(box["tokenUrl"]), client_id=str(box["clientId"]),
            client_secret=self.secret(box["clientSecret"]) if "clientSecret" in box else None,
            grant=grant,
            refresh_token=self.secret(box["refreshToken"]) if "refreshToken" in box else None,
            refresh_tokens=self.secret(box["refreshTokens"]) if "refreshTokens" in box
            else None,
            scope=str(box["scope"]) if "scope" in box else None,
            mechanism=str(box.get("mechanism", "xoauth2")),
            cafile=self.path_value(box["caFile"]) if "caFile" in box else None)

    def host_path(self, doc: _Doc, path: JsonPath, value: str) -> str:
        """A path on a remote host: absolute as written (no specs folder over there)."""
        if not value.startswith("/"):
            self.fail(doc, path, f"{value!r} is a path on the host (spec.postfixDovecot.host): "
                      "it must be absolute")
        return os.path.normpath(value)

    def ssh_target(self, doc: _Doc, here: JsonPath, box: dict[str, Any]) -> SshTarget | None:
        """spec.postfixDovecot.host (ssh://user@host:port) and its SSH options, or None."""
        ssh_only = ("tablesDir", "sshIdentityFile", "sshKnownHostsFile", "sshSudo")
        if "host" not in box:
            for key in ssh_only:
                if key in box:
                    self.fail(doc, (*here, key), "only with host (ssh://...): without it the "
                              "driver works on this machine", key_line=True)
            return None
        url = urlsplit(str(box["host"]))
        try:
            port = url.port or 22
        except ValueError:
            port = 0
        if not 1 <= port <= 65535:
            self.fail(doc, (*here, "host"), "port is outside 1-65535")
        if "tablesDir" not in box:
            self.fail(doc, here, "required field missing: tablesDir (with host: the folder on "
                      "the host for the tables Postfix and Dovecot read)", key_line=True)
        identity, known = box.get("sshIdentityFile"), box.get("sshKnownHostsFile")
        return SshTarget(
            user=url.username, hostname=url.hostname or "", port=port,
            identity_file=self.path_value(identity) if identity else None,
            known_hosts_file=self.path_value(known) if known else None,
            sudo=bool(box.get("sshSudo", False)))

    def address(self, doc: _Doc, path: JsonPath, text: str) -> str:
        """The key of a spec's address (`addresses.check`: IDN domains with A-labels, a UTF-8
        local part in NFC, lowercased); a problem at its line when it is none."""
        if text.isascii() and "xn--" not in text.lower():
            return address_key(text)  # the schema's pattern already proved its syntax
        try:
            return check(text)
        except AddressError as exc:
            self.fail(doc, path, str(exc))
            return text.lower()

    def address_key(self, doc: _Doc, box: int, claim: int, text: str) -> str:
        """`address` of a mailbox's claim (`_claim_path`), its path made only when needed."""
        if text.isascii() and "xn--" not in text.lower():
            return address_key(text)  # as `address` does
        return self.address(doc, _claim_path(box, claim), text)

    def domains(self, doc: _Doc, texts: Iterable[str]) -> tuple[str, ...]:
        """spec.domains as keys hold them (A-labels); a problem for a domain that is no IDN."""
        found: list[str] = []
        for i, text in enumerate(texts):
            key = domain_key(text)
            if not text.isascii() or "xn--" in key:
                try:
                    check(f"x@{text}")
                except AddressError as exc:
                    self.fail(doc, ("spec", "domains", i), str(exc).replace("'x@", "'"))
            found.append(key)
        return tuple(found)

    def build_system(self, doc: _Doc) -> None:
        """A MailSystem document -> MailSystemSpec (with its driver's settings object)."""
        spec, name = doc.spec, cast(str, doc.name)
        driver = str(spec["driver"])
        own = {"maildir": "maildir", "postfix-dovecot": "postfixDovecot", "imap": "imap"}
        for other in own.values():
            if other in spec and other != own.get(driver):
                self.fail(doc, ("spec", other), f"settings of another driver: driver is "
                          f"{driver!r}, which reads spec.{own.get(driver)}", key_line=True)
        here = ("spec", own.get(driver, driver))
        common = MailSystemSpec(
            name=name, driver=driver, domains=self.domains(doc, spec["domains"]),
            internal_domain=str(spec.get("internalDomain", f"{name}.internal")).lower(),
            root="", lmtp=None, submission=None, location=doc.location())
        if driver == "postfix-dovecot":
            box = spec["postfixDovecot"]
            ssh = self.ssh_target(doc, here, box)
            if "aliasCandidates" in box and not box.get("adopt", False):
                self.fail(doc, (*here, "aliasCandidates"), "only with adopt: true (the "
                          "addresses to ask the admin's alias maps mailferry cannot list)",
                          key_line=True)

            if box.get("directMaildirWrites", False) and ssh is not None:
                self.fail(doc, (*here, "directMaildirWrites"), "only when Postfix and "
                          "Dovecot run on the reconciler's machine (no host:): the mover "
                          "writes the Maildir files itself", key_line=True)

            def on_host(key: str) -> str:  # a path where Postfix and Dovecot run
                if ssh is None:
                    return self.path_value(box[key])
                return self.host_path(doc, (*here, key), box[key])

            options = PostfixDovecotOptions(
                state_dir=self.path_value(box["stateDir"]),
                postfix_config_dir=on_host("postfixConfigDir"),
                dovecot_config=on_host("dovecotConfig"),
                mail_root=on_host("mailRoot"),
                mail_user=str(box.get("mailUser", "vmail")),
                smtp=self.endpoint(doc, (*here, "smtp"), box["smtp"]),
                lmtp=self.endpoint(doc, (*here, "lmtp"), box["lmtp"]),
                imap=self.endpoint(doc, (*here, "imap"), box["imap"]),
                master=cast(MasterUser, self.master_user(box["masterUser"])),
                imap_tls=str(box.get("imapTls", "none")),
                imap_cafile=self.path_value(box["imapCaFile"]) if "imapCaFile" in box else None,
                smtp_tls=str(box.get("smtpTls", "none")),
                smtp_cafile=self.path_value(box["smtpCaFile"]) if "smtpCaFile" in box else None,
                adopt=bool(box.get("adopt", False)),
                host=ssh,
                tables_dir=on_host("tablesDir") if ssh is not None and "tablesDir" in box
                else None,
                alias_candidates=self.path_value(box["aliasCandidates"])
                if "aliasCandidates" in box else None,
                direct_maildir_writes=bool(box.get("directMaildirWrites", False)),
            )
            system = replace(common, root=options.state_dir, lmtp=options.lmtp,
                             submission=options.smtp, postfix_dovecot=options)
        elif driver == "imap":
            box = spec["imap"]
            login = str(box.get("login", "master"))
            if login == "master" and "masterUser" not in box:
                self.fail(doc, (*here, "masterUser"), "required field missing (login: master)")
            if login == "per-user" and "passwords" not in box:
                self.fail(doc, (*here, "passwords"), "required field missing (login: per-user)")
            if login == "oauth2" and "oauth2" not in box:
                self.fail(doc, (*here, "oauth2"), "required field missing (login: oauth2)")
            if login != "oauth2" and "oauth2" in box:
                self.fail(doc, (*here, "oauth2"), f"only with login: oauth2 (login is "
                          f"{login!r})", key_line=True)
            smtp = self.endpoint(doc, (*here, "smtp"), box["smtp"]) if "smtp" in box else None
            lmtp = self.endpoint(doc, (*here, "lmtp"), box["lmtp"]) if "lmtp" in box else None
            imap = ImapOptions(
                server=self.endpoint(doc, (*here, "server"), box["server"]),
                state_dir=self.path_value(box["stateDir"]), tls=str(box.get("tls", "implicit")),
                cafile=self.path_value(box["caFile"]) if "caFile" in box else None,
                login=login, master=self.master_user(box.get("masterUser")),
                passwords=self.secret(box["passwords"]) if "passwords" in box else None,
                oauth2=self.oauth2(doc, (*here, "oauth2"), box["oauth2"])
                if "oauth2" in box else None,
                login_format=str(box.get("loginFormat", "{address}")), smtp=smtp, lmtp=lmtp,
                smtp_tls=str(box.get("smtpTls", "none")),
                smtp_cafile=self.path_value(box["smtpCaFile"]) if "smtpCaFile" in box else None,
                smtp_auth=self.master_user(box.get("smtpAuth")),
                smtp_recipient=str(box.get("smtpRecipient", "")),
            )
            for key in ("smtpTls", "smtpCaFile", "smtpAuth", "smtpRecipient"):
                if key in box and smtp is None:
                    self.fail(doc, (*here, key), "only with smtp (where fed delivers)",
                              key_line=True)
            if imap.smtp_auth is not None and imap.smtp_tls == "none":
                self.fail(doc, (*here, "smtpAuth"), "needs smtpTls starttls or implicit: fed "
                          "never sends a password in cleartext", key_line=True)
            for key, template in (("loginFormat", imap.login_format),
                                  ("smtpRecipient", imap.smtp_recipient)):
                if template and not _address_format(template):
                    self.fail(doc, (*here, key), f"{template!r} is not a format of {{address}}, "
                              "{local} and {domain}")
            system = replace(common, root=imap.state_dir, submission=smtp, lmtp=lmtp,
                             imap=imap)
        else:
            box = spec["maildir"]
            system = replace(
                common, root=self.path_value(box["root"]),
                lmtp=self.endpoint(doc, ("spec", "maildir", "lmtp"), box["lmtp"]),
                submission=self.endpoint(doc, ("spec", "maildir", "submission"),
                                         box["submission"]),
            )
        if doc.valid:
            self.systems[name] = system

    def build_fed(self, doc: _Doc) -> None:
        """A FedHub document -> FedSpec."""
        spec = doc.spec
        token = spec["token"]
        networks: list[str] = []
        for i, raw in enumerate(spec.get("relayNetworks", [])):
            try:
                networks.append(str(ipaddress.ip_network(str(raw), strict=False)))
            except ValueError as exc:
                self.fail(doc, ("spec", "relayNetworks", i), f"not a network: {exc}")
        if ("tlsCert" in spec) != ("tlsKey" in spec):
            self.fail(doc, ("spec", "tlsCert" if "tlsCert" in spec else "tlsKey"),
                      "tlsCert and tlsKey go together", key_line=True)
        fed = FedSpec(
            name=cast(str, doc.name),
            smtp=self.endpoint(doc, ("spec", "smtp"), spec["smtp"]),
            control_url=str(spec["control"]).rstrip("/"),
            token=self.secret(token),
            state_dir=self.path_value(spec["stateDir"]),
            domains=self.domains(doc, spec["domains"]),
            location=doc.location(),
            relay_networks=tuple(networks),
            tls_cert=self.path_value(spec["tlsCert"]) if "tlsCert" in spec else None,
            tls_key=self.path_value(spec["tlsKey"]) if "tlsKey" in spec else None,
        )
        if doc.valid:
            self.feds.append(fed)

    def build_window(self, doc: _Doc) -> None:
        """A MigrationWindow document -> WindowSpec (rule shapes, zone, cron, ranges)."""
        spec = doc.spec
        tz_name = str(spec.get("timeZone", "UTC"))
        zone: ZoneInfo | None = None
        try:
            zone = ZoneInfo(tz_name)
        except (ZoneInfoNotFoundError, ValueError):
            self.fail(doc, ("spec", "timeZone"),
                      f"unknown time zone {tz_name!r} (expected an IANA name like Europe/Paris)")
        rules: list[WindowRule] = []
        for i, raw in enumerate(spec["windows"]):
            rule = self.build_rule(doc, ("spec", "windows", i), raw, zone)
            if rule is not None:
                rules.append(rule)
        if doc.valid:
            self.windows[cast(str, doc.name)] = WindowSpec(
                name=cast(str, doc.name), time_zone=tz_name, rules=tuple(rules),
                location=doc.location(),
            )

    def build_rule(self, doc: _Doc, path: JsonPath, raw: dict[str, Any],
                   zone: ZoneInfo | None) -> WindowRule | None:
        """One window rule: exactly one of (start, end) and (schedule, duration)."""
        kind = cast(WindowKind, raw["kind"])
        absolute = [k for k in ("start", "end") if k in raw]
        recurring = [k for k in ("schedule", "duration") if k in raw]
        if absolute and recurring:
            self.fail(doc, path, "a rule is either absolute (start, end) or recurring "
                      "(schedule, duration), not both")
            return None
        if not absolute and not recurring:
            self.fail(doc, path, "a rule needs start and end, or schedule and duration")
            return None
        if recurring:
            if len(recurring) == 1:
                have: str = recurring[0]
                need: str = ({"schedule", "duration"} - {have}).pop()
                self.fail(doc, (*path, have), f"{have} without {need}: a recurring rule "
                          "needs both schedule and duration")
                return None
            schedule = str(raw["schedule"]).strip()
            if not croniter.is_valid(schedule):
                self.fail(doc, (*path, "schedule"), f"invalid cron expression {schedule!r}")
            duration = self.duration(doc, (*path, "duration"), raw["duration"])
            if duration <= timedelta(0):
                self.fail(doc, (*path, "duration"), "duration must be more than 0")
            return WindowRule(kind=kind, schedule=schedule, duration=duration)
        if len(absolute) == 1:
            have = absolute[0]
            need = ({"start", "end"} - {have}).pop()
            self.fail(doc, (*path, have), f"{have} without {need}: an absolute rule "
                      "needs both start and end")
            return None
        start = self.instant(doc, (*path, "start"), raw["start"], zone)
        end = self.instant(doc, (*path, "end"), raw["end"], zone)
        if start is None or end is None:
            return None
        if end <= start:
            self.fail(doc, (*path, "end"), f"end {raw['end']} is not after start {raw['start']}")
            return None
        return WindowRule(kind=kind, start=start, end=end)

    def instant(self, doc: _Doc, path: JsonPath, text: str,
                zone: ZoneInfo | None) -> datetime | None:
        """ISO 8601 text -> aware datetime; without offset it is in the window's zone."""
        try:
            value = datetime.fromisoformat(str(text).upper())
        except ValueError:
            self.fail(doc, path, f"not an ISO 8601 time: {text!r}")
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=zone or ZoneInfo("UTC"))
        return value

    def build_policy(self, doc: _Doc) -> None:
        """A MigrationPolicy document -> PolicySpec (absent fields keep the model defaults)."""
        spec, name = doc.spec, cast(str, doc.name)
        base = PolicySpec(name=name)

        def dur(key: str, default: timedelta) -> timedelta:
            return self.duration(doc, ("spec", key), spec[key]) if key in spec else default

        delete_after: timedelta | None = base.delete_source_after
        consent = False
        if "deleteSource" in spec:
            raw = spec["deleteSource"]
            delete_after = None if raw == "never" else self.duration(
                doc, ("spec", "deleteSource", "after"), raw["after"])
            consent = raw != "never" and bool(raw.get("consent", False))
        policy = PolicySpec(
            name=name,
            station_checks=bool(spec.get("stationChecks", base.station_checks)),
            data_transfer=cast(DataTransfer, spec.get("dataTransfer", base.data_transfer)),
            diary=bool(spec.get("diary", base.diary)),
            local_station_data=bool(spec.get("localStationData", base.local_station_data)),
            delete_source_after=delete_after,
            delete_consent=consent,
            prestage_lead=dur("prestageLead", base.prestage_lead),
            recheck_lead=dur("recheckLead", base.recheck_lead),
            max_parallel=int(spec.get("maxParallel", base.max_parallel)),
            retention=dur("retention", base.retention),
            station_retries=int(spec.get("stationRetries", base.station_retries)),
            folder_map=tuple((str(r["from"]), str(r["to"])) for r in spec.get("folderMap", [])),
            throttle_messages_per_second=float(
                spec.get("throttle", {}).get("messagesPerSecond", 0)),
            throttle_bytes_per_second=float(spec.get("throttle", {}).get("bytesPerSecond", 0)),
            prestage_copy=bool(spec.get("prestageCopy", base.prestage_copy)),
            verify=str(spec.get("verify", base.verify)),
            accept_store_rewrites=tuple((str(r["system"]), str(r["rewrite"]))
                                        for r in spec.get("acceptStoreRewrites", [])),
            system_limits=tuple((str(r["system"]), int(r.get("connections", 0)),
                                 int(r.get("connectionsPerUser", 0)),
                                 int(r.get("bytesPerDay", 0)))
                                for r in spec.get("systemLimits", [])),
            location=doc.location(),
        )
        if doc.valid:
            self.policies[name] = policy

    def build_placement(self, doc: _Doc) -> None:
        """A MailboxPlacement document -> PlacementSpec (addresses as keys: `address`)."""
        spec, name = doc.spec, cast(str, doc.name)
        # One loop, no path made unless an address is a problem (100,000 entries: the paths
        # and generators were a third of this); every address claimed, in order, for
        # `check_placements`.
        boxes: list[MailboxSpec] = []
        claims: list[str] = []
        key, line_of, display = self.address_key, doc.ydoc.line_of, doc.display
        for i, box in enumerate(spec["mailboxes"]):
            address = key(doc, i, 0, str(box["address"]))
            claims.append(address)
            aliases: tuple[str, ...] = ()
            if box.get("aliases"):
                aliases = tuple([key(doc, i, 1 + j, str(a))
                                 for j, a in enumerate(box["aliases"])])
                claims += aliases
            boxes.append(MailboxSpec(address=address, aliases=aliases,
                                     station=box.get("station"),
                                     location=SourceLocation(display, line_of(
                                         ("spec", "mailboxes", i)))))
        self.claims[name] = claims
        self.placements[name] = PlacementSpec(
            name=name, system=spec["system"], window=spec.get("window"),
            policy=spec.get("policy"), mailboxes=tuple(boxes), location=doc.location(),
            allow_move_back=bool(spec.get("allowMoveBack", False)),
            report_to=tuple(self.address(doc, ("spec", "reportTo", i), str(a))
                            for i, a in enumerate(spec.get("reportTo", []))),
            description=str(doc.data.get("metadata", {}).get("description", "")),
        )

    def build_all(self) -> None:
        """Build every schema-valid document; note the names of the broken ones."""
        builders: dict[str, Callable[[_Doc], None]] = {
            "MailSystem": self.build_system,
            "FedHub": self.build_fed,
            "MigrationWindow": self.build_window,
            "MigrationPolicy": self.build_policy,
            "MailboxPlacement": self.build_placement,
        }
        for doc in self.docs:
            if doc.valid:
                builders[doc.kind](doc)
            if not doc.valid and doc.name is not None:
                self.broken.add((doc.kind, doc.name))

    # -- stage 5: across documents ------------------------------------------------------------

    def check_names(self) -> None:
        """metadata.name is unique per kind; exactly one FedHub."""
        first: dict[tuple[str, str], _Doc] = {}
        for doc in self.docs:
            if doc.name is None:
                continue
            key = (doc.kind, doc.name)
            if key in first:
                where = first[key].at("metadata", "name")
                self.report(doc.display, doc.order, doc.ydoc.line_of(("metadata", "name")),
                            ("metadata", "name"),
                            f"duplicate {doc.kind} name {doc.name!r}: also defined at {where}")
            else:
                first[key] = doc
        feds = [d for d in self.docs if d.kind == "FedHub"]
        if not feds and not self.uncertain:
            self.report(display_path(self.directory), len(self.docs) + 10**6, 0, "-",
                        "no FedHub in the spec set (exactly one is required)")
        for extra in feds[1:]:
            self.report(extra.display, extra.order, extra.ydoc.line, "-",
                        f"a second FedHub {extra.name!r}: exactly one is allowed, "
                        f"{feds[0].name!r} is defined at {feds[0].location()}")

    def check_placements(self) -> None:
        """References, addresses claimed twice, and domains served by the target system."""
        # address -> (document, mailbox index, 0 for the address or 1 + alias index) where
        # it was first claimed; paths and texts are made only for a problem.
        claimed: dict[str, tuple[_Doc, int, int]] = {}
        placements = [d for d in self.docs if d.kind == "MailboxPlacement" and d.valid]
        # The usual spec set claims every address once: then a placement whose domains are
        # all served has nothing to report, and is not walked address by address.
        claims = [self.claims[cast(str, d.name)] for d in placements]
        once = len(set().union(*claims)) == sum(len(c) for c in claims)
        for doc, its_claims in zip(placements, claims, strict=True):
            placement = self.placements[cast(str, doc.name)]
            self.check_reference(doc, "system", "MailSystem", set(self.systems))
            self.check_reference(doc, "window", "MigrationWindow", set(self.windows))
            self.check_reference(doc, "policy", "MigrationPolicy", set(self.policies))
            system = self.systems.get(placement.system)
            served = None if system is None else set(system.domains)
            if once and (served is None
                         or {a.rpartition("@")[2] for a in its_claims} <= served):
                continue
            for i, box in enumerate(placement.mailboxes):
                for j, address in enumerate((box.address, *box.aliases)):
                    here = (doc, i, j)
                    first = claimed.setdefault(address, here)
                    if first is not here:
                        other, other_path = first[0], _claim_path(first[1], first[2])
                        path = _claim_path(i, j)
                        written, before = _written(doc, path), _written(other, other_path)
                        spelling = "" if written.lower() == before.lower() else (
                            f" (written {written!r} here, {before!r} there: "
                            f"{_why_same(address)})")
                        self.report(doc.display, doc.order, doc.ydoc.line_of(path), path,
                                    f"address {address!r} is claimed twice: also at "
                                    f"{other.at(*other_path)} ({dotted(other_path)} of "
                                    f"placement {other.name}){spelling}")
                    if served is not None and address.rpartition("@")[2] not in served:
                        assert system is not None
                        path = _claim_path(i, j)
                        self.report(doc.display, doc.order, doc.ydoc.line_of(path), path,
                                    f"domain {address.rpartition('@')[2]!r} is not served by "
                                    f"MailSystem {system.name!r} (domains: "
                                    f"{', '.join(system.domains)})")

    def check_limits(self) -> None:
        """A policy's `systemLimits`: known systems, each once, per user within per system."""
        for doc in self.docs:
            if doc.kind != "MigrationPolicy" or not doc.valid:
                continue
            seen: dict[str, int] = {}
            for i, (system, conns, per_user, _) in enumerate(
                    self.policies[cast(str, doc.name)].system_limits):
                path: JsonPath = ("spec", "systemLimits", i, "system")
                line = doc.ydoc.line_of(path)
                if system not in self.systems and ("MailSystem", system) not in self.broken:
                    known = ", ".join(sorted(self.systems)) or "none"
                    self.report(doc.display, doc.order, line, path,
                                f"unknown MailSystem {system!r} (known: {known})")
                if system in seen:
                    self.report(doc.display, doc.order, line, path,
                                f"limits for {system!r} given twice: also at "
                                f"{doc.at('spec', 'systemLimits', seen[system])}")
                seen.setdefault(system, i)
                if conns and per_user > conns:
                    here: JsonPath = ("spec", "systemLimits", i, "connectionsPerUser")
                    self.report(doc.display, doc.order, doc.ydoc.line_of(here), here,
                                f"{per_user} connections per user is more than the "
                                f"{conns} connections the whole system allows")

    def check_reference(self, doc: _Doc, key: str, kind: str, known: set[str]) -> None:
        """spec.<key> names an existing object of `kind` (broken ones excepted)."""
        name = doc.spec.get(key)
        if name is None or name in known or (kind, name) in self.broken or self.uncertain:
            return
        listing = ", ".join(sorted(known)) or "none"
        self.report(doc.display, doc.order, doc.ydoc.line_of(("spec", key)), ("spec", key),
                    f"unknown {kind} {name!r} (known: {listing})")

    # -- all together ---------------------------------------------------------------------

    def load(self) -> SpecSet:
        """Run every stage; raise SpecError with every problem, or return the SpecSet."""
        self.read_folder()
        self.build_all()
        self.check_names()
        self.check_placements()
        self.check_limits()
        if self.problems or not self.feds:
            lines = [p.text for p in sorted(self.problems)]
            raise SpecError(list(dict.fromkeys(lines)) or ["-:0: -: no valid FedHub"])
        commit, dirty = git_state(self.root)
        return SpecSet(
            root=str(self.root),
            systems=dict(self.systems),
            fed=self.feds[0],
            windows=dict(self.windows),
            policies=dict(self.policies),
            placements=dict(self.placements),
            commit=commit,
            dirty=dirty,
            digest=self.hasher.hexdigest(),
        )


def _written(doc: _Doc, path: JsonPath) -> str:
    """An address as the spec file spells it (a claim's path into the document)."""
    node: Any = doc.data
    for key in path:
        node = node[key]
    return str(node)


def _why_same(key: str) -> str:
    """Why two spellings of an address are one (for the claimed-twice message)."""
    domain = key.rpartition("@")[2]
    if "xn--" in domain:
        return f"one domain in its two IDN forms, {domain_to_unicode(domain)} and {domain}"
    return "one address in two Unicode normal forms"


def _claim_path(box: int, claim: int) -> JsonPath:
    """Where a placement's mailbox `box` claims an address: 0 its address, 1 + N alias N."""
    if claim == 0:
        return ("spec", "mailboxes", box, "address")
    return ("spec", "mailboxes", box, "aliases", claim - 1)


def load_specs(directory: str | Path, *, long_lived: bool = False) -> SpecSet:
    """Load and validate every spec in `directory`; raise SpecError listing all problems.

    `long_lived`: the process keeps and plans with these specs (the CLI, a watch, the status
    page): they are settled out of the collector's sight once built (`settle_long_lived`),
    before the collector runs again, so it never walks them at all."""
    with _paused_gc():
        specs = _Loader(Path(directory)).load()
        specs.desired()  # built now, under the pause, and kept with the specs
        if long_lived:
            settle_long_lived()
        return specs


def settle_long_lived() -> None:
    """Take what lives now -- above all the specs just loaded and their desired mailboxes
    (at 100,000 mailboxes about 370,000 tracked objects) -- out of the collector's sight.

    Why: each plan builds some 300,000 objects (views, changes), and every collection those
    trigger used to walk the specs again, which is why the engine once switched the collector
    off process-wide around each plan, under the feet of the web and station API threads.
    `gc.freeze()` instead leaves the collector on for everything built later, for every
    thread. Frozen objects are still freed by reference counting when dropped (the specs are
    acyclic); only a garbage cycle alive at this instant would be kept, so a process that
    settles again (a watch reloading its specs) first unfreezes and collects: what is frozen
    is always what was alive at the last settle. The first settle of a process pays nothing."""
    if gc.get_freeze_count():
        gc.unfreeze()
        gc.collect()
    gc.freeze()


@contextmanager
def _paused_gc() -> Iterator[None]:
    """No cyclic garbage collection while the loader builds: composing and building 100,000
    mailbox entries (YAML nodes, line maps, typed objects, all acyclic) otherwise triggers
    collections over them again and again (measured at 100,000 mailboxes: 4.3 s of CPU
    with the collector on, 2.1 s paused). Reference counting still frees. The one pause
    in the reconciler, for the load's duration only; what the load built is then frozen
    out of the collector's sight by the process that keeps it (`settle_long_lived`),
    and the engine plans with the collector on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
