"""The desired state, as typed values: what the loader builds from validated YAML.

PURE: no I/O here (DESIGN rule 1). The loader (`loader.py`) reads files, validates them
against `schemas/*.json` and builds these objects; `plan.py` reads them.

The YAML format, one document per object (several documents per file allowed)::

    apiVersion: mailferry/v1
    kind: MailSystem  # MailSystem | FedHub | MailboxPlacement | MigrationWindow | MigrationPolicy
    metadata: {name: s1}
    spec: {...}

MailSystem.spec:   driver: maildir; domains: [corp.example]; internalDomain: s1.internal;
                   maildir: {root: var/s1, lmtp: 127.0.0.1:2401, submission: 127.0.0.1:2501}
                   | driver: postfix-dovecot; postfixDovecot: {stateDir, postfixConfigDir,
                     dovecotConfig, mailRoot, mailUser, smtp, lmtp, imap,
                     masterUser: {user, password: {env|file}}, directMaildirWrites}
                     (docs/postfix-dovecot.md)
                   | driver: imap; imap: {server, tls, login: master|per-user,
                     masterUser | passwords: {file}, loginFormat, stateDir, smtp}
FedHub.spec:       smtp: 127.0.0.1:2525; control: http://127.0.0.1:8025;
                   token: {env: MAILFERRY_FED_TOKEN} | {file: path}; stateDir: var/fed;
                   domains: [corp.example]
MigrationWindow.spec: timeZone: Europe/Paris; windows: [ {kind: allow|deny,
                   start: ISO, end: ISO} | {kind: allow|deny, schedule: "0 20 * * 1-5",
                   duration: 4h} ]
MigrationPolicy.spec: stationChecks: bool; dataTransfer: none|copy|validate-and-copy|diary-only;
                   diary: bool; localStationData: bool;
                   deleteSource: {after: 7d, consent: true} | never;
                   prestageLead: 3d; recheckLead: 1h; maxParallel: 10; retention: 30d;
                   stationRetries: 3; folderMap: [{from: INBOX.Sent, to: Sent}];
                   throttle: {messagesPerSecond: 50, bytesPerSecond: 2000000};
                   prestageCopy: false; verify: fast|deep
MailboxPlacement.spec: system: s2; window: wave-1; policy: default;
                   mailboxes: [{address: a@corp.example, aliases: [..], station: ws-1}];
                   allowMoveBack: false; reportTo: [ops@corp.example]

Relative paths (maildir roots, fed stateDir, token files) are relative to the specs folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from .modes import DataTransfer as DataTransfer  # re-exported: the loader names it here
from .modes import Modes

WindowKind = Literal["allow", "deny"]


@dataclass(frozen=True)
class SourceLocation:
    """Where an object was written: for error messages and the plan."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Endpoint:
    """host:port on which a server listens."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SecretRef:
    """A credential named by reference, never written in the specs (invariant 7)."""

    env: str | None = None
    file: str | None = None  # absolute once loaded


@dataclass(frozen=True)
class MasterUser:
    """An IMAP login that may read every mailbox (SASL PLAIN with an authorization identity)."""

    user: str
    password: SecretRef


@dataclass(frozen=True)
class SshTarget:
    """A mail host reached over SSH (``host: ssh://user@mail1.example:22``)."""

    user: str | None  # None: the OpenSSH client's default (ssh_config, then the local user)
    hostname: str
    port: int = 22
    identity_file: str | None = None  # absolute, on the reconciler's machine
    known_hosts_file: str | None = None  # absolute; None: the client's own known_hosts
    sudo: bool = False  # a non-root user: privileged commands through `sudo -n`

    @property
    def url(self) -> str:
        user = f"{self.user}@" if self.user else ""
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return f"ssh://{user}{host}:{self.port}"


@dataclass(frozen=True)
class PostfixDovecotOptions:
    """Where a Postfix + Dovecot system keeps what the driver administers (driver-specific)."""

    state_dir: str  # absolute: passwd-file, Postfix maps, mailferry.db, lock
    postfix_config_dir: str  # absolute: `postfix -c` / `postconf -c` / `postmap -c`
    dovecot_config: str  # absolute: `doveadm -c`
    mail_root: str  # absolute: homes are <mail_root>/<mailbox id>
    mail_user: str
    smtp: Endpoint  # Postfix smtpd: fed delivers here, local users submit here
    lmtp: Endpoint  # Dovecot LMTP: Postfix's virtual_transport
    imap: Endpoint  # Dovecot IMAP: the data mover reads and writes here
    master: MasterUser
    imap_tls: str = "none"  # none | starttls | implicit
    imap_cafile: str | None = None  # absolute: a private CA for Dovecot's certificate
    smtp_tls: str = "none"  # none | starttls: fed -> Postfix, the checks of Postfix and LMTP
    smtp_cafile: str | None = None  # absolute: a private CA for Postfix's certificate
    adopt: bool = False  # the admin's own system: learn it, overlay what mailferry adds
    host: SshTarget | None = None  # None: Postfix and Dovecot run on this machine
    tables_dir: str | None = None  # on the host: the rendered tables (None: state_dir)
    alias_candidates: str | None = None  # absolute, here: addresses to ask unlistable maps
    # big messages copied in written into Dovecot's Maildirs, as dsync writes them (only
    # with host None: `reconciler/mover/dovecot_direct.py`)
    direct_maildir_writes: bool = False

    @property
    def tables_folder(self) -> str:
        """Where Postfix and Dovecot read the tables mailferry renders (on their host)."""
        return self.tables_dir or self.state_dir


@dataclass(frozen=True)
class OAuth2Options:
    """login: oauth2 of a generic IMAP system: where its access tokens come from."""

    token_url: str
    client_id: str
    client_secret: SecretRef | None = None  # None: a public client
    grant: str = "refresh_token"  # refresh_token | client_credentials
    refresh_token: SecretRef | None = None  # one for every mailbox
    refresh_tokens: SecretRef | None = None  # a file of "address refresh-token" lines
    scope: str | None = None
    mechanism: str = "xoauth2"  # xoauth2 | oauthbearer
    cafile: str | None = None  # absolute: a private CA for the token endpoint


@dataclass(frozen=True)
class ImapOptions:
    """A generic IMAP server mailferry can read but not administer (driver-specific)."""

    server: Endpoint
    state_dir: str  # absolute: the driver's own registry of the mailboxes it was given
    tls: str = "implicit"  # none | starttls | implicit
    cafile: str | None = None  # absolute: a private CA for the server's certificate
    login: str = "master"  # master | per-user | oauth2
    master: MasterUser | None = None
    oauth2: OAuth2Options | None = None  # login: oauth2
    passwords: SecretRef | None = None  # per-user: a file of "address password" lines
    login_format: str = "{address}"  # {address}, {local}, {domain}
    smtp: Endpoint | None = None  # where fed delivers for this system, if anywhere
    lmtp: Endpoint | None = None  # or over LMTP (Cyrus's lmtpd); wins over smtp
    smtp_tls: str = "none"  # fed's TLS to smtp: none | starttls | implicit
    smtp_cafile: str | None = None  # absolute: the CA of the SMTP server's certificate
    smtp_auth: MasterUser | None = None  # fed's SMTP AUTH (the password: a file fed reads)
    smtp_recipient: str = ""  # RCPT TO format ({address}, {local}, {domain}); "": physical


@dataclass(frozen=True)
class MailSystemSpec:
    name: str
    driver: str
    domains: tuple[str, ...]
    internal_domain: str
    root: str  # absolute path of the system's data folder (maildir root or driver state)
    lmtp: Endpoint | None  # where deliveries enter the mailbox store (None: not reachable)
    submission: Endpoint | None  # where the system's users submit mail (None: unknown)
    location: SourceLocation
    postfix_dovecot: PostfixDovecotOptions | None = None
    imap: ImapOptions | None = None


@dataclass(frozen=True)
class FedSpec:
    name: str
    smtp: Endpoint
    control_url: str
    token: SecretRef
    state_dir: str  # absolute
    domains: tuple[str, ...]
    location: SourceLocation
    relay_networks: tuple[str, ...] = ()  # CIDRs that may relay without AUTH (fed serve)
    tls_cert: str | None = None  # absolute: fed's STARTTLS certificate chain (fed serve)
    tls_key: str | None = None  # absolute: its private key


@dataclass(frozen=True)
class WindowRule:
    kind: WindowKind
    start: datetime | None = None  # absolute range (aware datetimes)
    end: datetime | None = None
    schedule: str | None = None  # cron expression, evaluated in the window's time zone
    duration: timedelta | None = None


@dataclass(frozen=True)
class WindowSpec:
    name: str
    time_zone: str
    rules: tuple[WindowRule, ...]
    location: SourceLocation


@dataclass(frozen=True)
class PolicySpec:
    name: str
    station_checks: bool = False
    data_transfer: DataTransfer = "copy"
    diary: bool = True
    local_station_data: bool = False
    delete_source_after: timedelta | None = timedelta(days=7)  # None: never delete
    delete_consent: bool = False  # deleteSource.consent: E41 runs only with it (invariant 6)
    prestage_lead: timedelta = timedelta(days=3)
    recheck_lead: timedelta = timedelta(hours=1)
    max_parallel: int = 10
    retention: timedelta = timedelta(days=30)
    station_retries: int = 3
    folder_map: tuple[tuple[str, str], ...] = ()  # (from, to) rules of the data mover
    throttle_messages_per_second: float = 0.0  # 0: unlimited
    throttle_bytes_per_second: float = 0.0
    prestage_copy: bool = False  # bulk copy before the cutover
    verify: str = "fast"  # fast | deep
    # (target system, rewrite name): changes that target makes on store which the admin
    # accepts as equivalent (reconciler/mover/rewrites.py); the proof then checks them
    accept_store_rewrites: tuple[tuple[str, str], ...] = ()
    # (system, connections, connections per user, bytes per day); 0: no limit
    system_limits: tuple[tuple[str, int, int, int], ...] = ()
    location: SourceLocation | None = None

    def accepted_rewrites(self, system: str) -> frozenset[str]:
        """The rewrites accepted for a target system."""
        return frozenset(r for s, r in self.accept_store_rewrites if s == system)

    def modes(self) -> Modes:
        """The modes recorded with a migration (E1)."""
        return Modes(
            policy=self.name, station_checks=self.station_checks,
            data_transfer=self.data_transfer, diary=self.diary,
            local_station_data=self.local_station_data,
            delete_source_after=self.delete_source_after, prestage_lead=self.prestage_lead,
            recheck_lead=self.recheck_lead, retention=self.retention,
            station_retries=self.station_retries, folder_map=self.folder_map,
            throttle_messages_per_second=self.throttle_messages_per_second,
            throttle_bytes_per_second=self.throttle_bytes_per_second,
            prestage_copy=self.prestage_copy, verify="deep" if self.verify == "deep" else "fast",
            accept_store_rewrites=self.accept_store_rewrites, max_parallel=self.max_parallel,
            system_limits=self.system_limits,
        )


DEFAULT_POLICY = PolicySpec(name="(default)")


@dataclass(frozen=True)
class MailboxSpec:
    address: str
    aliases: tuple[str, ...] = ()
    station: str | None = None
    location: SourceLocation | None = None


@dataclass(frozen=True)
class PlacementSpec:
    name: str
    system: str
    window: str | None
    policy: str | None
    mailboxes: tuple[MailboxSpec, ...]
    location: SourceLocation
    allow_move_back: bool = False  # allowMoveBack: finished mailboxes may move again
    report_to: tuple[str, ...] = ()  # reportTo: who gets the wave report by mail
    description: str = ""  # metadata.description: free text (the status page shows it)


@dataclass(frozen=True)
class DesiredMailbox:
    """One address's desired state: the result of joining a placement with its references."""

    address: str
    aliases: tuple[str, ...]
    system: str
    placement: str
    window: WindowSpec | None
    policy: PolicySpec
    station: str | None
    allow_move_back: bool = False


@dataclass(frozen=True)
class SpecSet:
    """The whole validated spec set."""

    root: str
    systems: dict[str, MailSystemSpec]
    fed: FedSpec
    windows: dict[str, WindowSpec] = field(default_factory=dict)
    policies: dict[str, PolicySpec] = field(default_factory=dict)
    placements: dict[str, PlacementSpec] = field(default_factory=dict)
    commit: str | None = None  # git commit of the specs folder, None outside git
    dirty: bool = False  # uncommitted changes in the specs folder
    digest: str = ""  # sha256 of every spec file's name and bytes (saved plans compare it)
    # desired(), built once (the specs are frozen): the loader builds it with the rest
    _desired: dict[str, DesiredMailbox] = field(default_factory=dict, init=False, repr=False,
                                                compare=False)

    def desired(self) -> dict[str, DesiredMailbox]:
        """address -> desired mailbox, over every placement (addresses are unique).

        The same dict on every call: read it, do not change it."""
        if not self._desired:
            self._desired.update(self._build_desired())
        return self._desired

    def _build_desired(self) -> dict[str, DesiredMailbox]:
        result: dict[str, DesiredMailbox] = {}
        for placement in self.placements.values():
            window = self.windows.get(placement.window) if placement.window else None
            policy = self.policies.get(placement.policy, DEFAULT_POLICY) if placement.policy \
                else DEFAULT_POLICY
            system, name, back = placement.system, placement.name, placement.allow_move_back
            for box in placement.mailboxes:  # positional: 100,000 of them
                address = box.address.lower()
                result[address] = DesiredMailbox(
                    address, tuple([a.lower() for a in box.aliases]) if box.aliases else (),
                    system, name, window, policy, box.station, back)
        return result
