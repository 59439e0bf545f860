"""The station agent's decision loop: poll the task, do it, report it.

Why a poll loop. The reconciler decides what every station must do (the patent's migration
control server "triggers" the station's steps); the station cannot be reached from the
server (NAT, firewalls, switched-off laptops), so it asks. Each cycle:

1. send the reports still in the outbox (a previous run could not deliver them);
2. ask for the task (`GET /v1/stations/{name}/task`);
3. do what the action says, once per (migration, action, action_since):
   - `check1` / `check2` (E20 / E22, with E23's type and size): run the verifications and
     report them. A passing check is not run again; a failing one is re-run on every poll
     (the user may close the mail client in the meantime) but only re-reported when its
     problems change, so a help desk reading the reports sees changes, not noise;
   - `local-migrate` (E30-E33): wait while the mail client runs; upload the local mail
     (idempotent; over IMAP with the user's own login where the target has IMAP, else
     through the station API), switch the client, test it (SMTP, and IMAP login where the
     client uses IMAP); on a failed test restore the old settings and retry with exponential
     back-off, and after the last retry report `failed`; on success delete the old settings
     (cleanup) and report `done` -- or, with a cleanup delay, report `done` at once and
     delete the old settings on the first poll after the delay (the help desk can still put
     the user back meanwhile), then report `cleanup`.
4. send the new reports (each one was written to the outbox before any attempt to send it).

What was finished (and which cleanups are due when) is remembered in
`<state-dir>/agent-state.json`, so a restarted agent does not redo a finished local
migration; an admin who wants it redone makes the engine issue the action again (a new
`action_since`).

Log lines are written for a help desk: what was done, for which migration, and in words what
failed and what the user should do.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailferry import secretfile
from mailferry.mail.backoff import backoff
from mailferry.mail.oauth2 import OAuth2Settings, tokens_for
from station_agent import checks, imapupload, localdata
from station_agent.client import ApiRefused, ApiUnreachable, StationApiClient
from station_agent.clients import ClientError, JsonProfile, MailClient, Target, Thunderbird
from station_agent.fsutil import atomic_write
from station_agent.outbox import Outbox
from station_agent.thunderbird.switch import Endpoint

log = logging.getLogger("station_agent")


@dataclass
class AgentConfig:
    """Everything the agent needs to know, from its configuration file and command line."""

    api: str
    station: str
    token: str
    profile: Path | None
    local_mail: Path | None
    state_dir: Path
    interval: float = 30.0
    min_free_mb: int = 100
    retries: int = 3
    retry_delay: float = 30.0
    timeout: float = 30.0
    client: str = "json"  # json | thunderbird
    address: str | None = None  # default: the address the station API names
    profile_name: str | None = None
    profiles_ini: Path | None = None
    archives: list[Path] = field(default_factory=list)
    imap_user: str | None = None
    imap_password_file: Path | None = None
    ca_file: str | None = None
    # [imap.oauth2]: log in to the new IMAP server with a bearer token instead of a password
    imap_oauth2: OAuth2Settings | None = None
    cleanup_delay: float = 0.0
    pop3_folders: str = "account"  # account | merge: where a POP3 account's folders go

    def mail_client(self) -> MailClient:
        """The mail client this configuration names."""
        if self.client == "thunderbird":
            return Thunderbird(profile_dir=self.profile, profile_name=self.profile_name,
                               profiles_ini=self.profiles_ini, archives=self.archives,
                               pop3_folders=self.pop3_folders)
        if self.client != "json" or self.profile is None:
            raise ValueError("client must be 'thunderbird', or 'json' with a profile file")
        return JsonProfile(self.profile, self.local_mail, self.archives)

    def imap_password(self) -> str | None:
        """The user's password on the new system, read when needed (never cached on disk)."""
        if self.imap_password_file is None:
            return None
        try:
            return secretfile.read_file(self.imap_password_file, "IMAP password")
        except secretfile.SecretError as exc:
            log.warning("%s", exc)  # names the file and the problem, never the password
            return None


def _endpoint(value: object, tls: object) -> Endpoint | None:
    """An Endpoint from the task's `host:port` (or {host, port, tls}), None if absent."""
    tls_name = tls if tls in ("none", "starttls", "tls") else "none"
    if isinstance(value, dict):
        host, port = value.get("host"), value.get("port")
        if isinstance(host, str) and isinstance(port, int):
            inner = value.get("tls")
            return Endpoint(host, port, inner if inner in ("none", "starttls", "tls")
                            else str(tls_name))
        return None
    if isinstance(value, str) and value:
        try:
            host, port = checks.parse_hostport(value)
        except ValueError:
            return None
        return Endpoint(host, port, str(tls_name))
    return None


def target_of(migration: dict[str, Any]) -> Target:
    """The task's target system (see docs/station-api.md, `target`)."""
    info = migration.get("target")
    info = info if isinstance(info, dict) else {}
    return Target(system=str(migration.get("target_system") or ""),
                  mailbox=str(migration.get("target_mailbox") or ""),
                  smtp=_endpoint(info.get("submission"), info.get("submission_tls")),
                  imap=_endpoint(info.get("imap"), None))


@dataclass
class CycleResult:
    """What one poll-and-act cycle did; `pending` reports are still in the outbox."""

    reached_api: bool = False
    action: str | None = None
    pending: int = 0
    errors: list[str] = field(default_factory=list)


class Memory:
    """What the agent finished and what it last reported, kept across runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.finished: dict[str, str] = {}
        self.last_problems: dict[str, list[str]] = {}
        self.cleanups: dict[str, dict[str, Any]] = {}  # key -> {"migration", "due"}
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                self.finished = dict(data.get("finished", {}))
                self.last_problems = dict(data.get("last_problems", {}))
                self.cleanups = dict(data.get("cleanups", {}))
            except (OSError, json.JSONDecodeError, AttributeError) as exc:
                # Losing this memory only means redoing idempotent work: warn, carry on.
                log.warning("agent state %s unreadable (%s): starting afresh", path, exc)

    def save(self) -> None:
        payload = {"finished": self.finished, "last_problems": self.last_problems,
                   "cleanups": self.cleanups}
        atomic_write(self.path, json.dumps(payload, indent=1, sort_keys=True).encode("utf-8"))

    def finish(self, key: str, outcome: str) -> None:
        self.finished[key] = outcome
        self.last_problems.pop(key, None)
        self.save()


class Agent:
    """One station's agent: `run_once` is one cycle, `run_forever` polls with jitter."""

    def __init__(self, config: AgentConfig, client: StationApiClient | None = None, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.client = client or StationApiClient(config.api, config.station, config.token,
                                                 timeout=config.timeout)
        self.outbox = Outbox(config.state_dir)
        self.memory = Memory(config.state_dir / "agent-state.json")
        self.mail_client = config.mail_client()
        self.task_address = ""  # the station's address, as the last task named it
        self.sleep = sleep

    # -- reporting ----------------------------------------------------------------------
    def report(self, migration_id: int | None, kind: str, ok: bool,
               detail: dict[str, Any]) -> None:
        """Write the report to the outbox, then try to deliver everything pending."""
        self.outbox.put(migration_id, kind, ok, detail)
        log.info("report %s %s for migration %s", kind, "ok" if ok else "NOT ok", migration_id)
        self.outbox.flush(self.client)

    # -- the cycle ----------------------------------------------------------------------
    def run_once(self) -> CycleResult:
        """Flush the outbox, fetch the task, act on it, flush again."""
        result = CycleResult()
        self.outbox.flush(self.client)
        self._due_cleanups()  # local work: done even while the reconciler is unreachable
        try:
            task = self.client.get_task()
            result.reached_api = True
            migration = task.get("migration")
            if not isinstance(migration, dict):
                log.debug("no migration for %s: nothing to do", task.get("address"))
            else:
                self.task_address = str(task.get("address") or "")
                result.action = self._act(migration)
        except ApiUnreachable as exc:
            log.warning("cannot reach the reconciler: %s (will retry)", exc)
            result.errors.append(str(exc))
        except ApiRefused as exc:
            if exc.status in (401, 403):
                log.error("the reconciler refuses this station (%s): check --station and the "
                          "token file; re-enrol the station if the token was replaced", exc)
            else:
                log.error("the reconciler refused a request: %s", exc)
            result.errors.append(str(exc))
        flushed = self.outbox.flush(self.client)
        result.pending = flushed.pending
        return result

    def run_forever(self) -> None:
        """Poll every `interval` seconds +- 20 % (jitter spreads a fleet's polls)."""
        while True:
            self.run_once()
            self.sleep(self.config.interval * random.uniform(0.8, 1.2))

    def _act(self, migration: dict[str, Any]) -> str | None:
        action = migration.get("action")
        mid = migration.get("id")
        if migration.get("failed"):
            log.info("migration %s is failed on the reconciler: waiting for an admin", mid)
            return None
        if action is None:
            log.debug("migration %s (state %s): nothing for this station to do now", mid,
                      migration.get("state"))
            return None
        key = f"{mid}:{action}:{migration.get('action_since')}"
        if key in self.memory.finished:
            log.debug("%s for migration %s already finished (%s)", action, mid,
                      self.memory.finished[key])
            return str(action)
        if action in ("check1", "check2"):
            self._check(migration, str(action), key)
        elif action == "local-migrate":
            self._local_migrate(migration, key)
        else:
            log.warning("unknown action %r for migration %s: this agent may be too old", action,
                        mid)
        return str(action)

    # -- E20-E23 ------------------------------------------------------------------------
    def _address(self) -> str:
        """The migrating address: the configured one, else the one the API names."""
        return self.config.address or self.task_address

    def _check(self, migration: dict[str, Any], action: str, key: str) -> None:
        target = target_of(migration)
        outcome = checks.run_checks(
            state_dir=self.config.state_dir, client=self.mail_client,
            address=self._address(), target=target,
            imap_password=self.config.imap_password(), min_free_mb=self.config.min_free_mb,
            ca_file=self.config.ca_file)
        mid = migration["id"]
        if outcome.ok:
            log.info("%s for migration %s passed: %d MB free, mail client closed, new servers "
                     "reachable, local mail %d bytes", action, mid, outcome.free_mb,
                     outcome.local_bytes)
        else:
            log.warning("%s for migration %s FAILED: %s", action, mid,
                        "; ".join(outcome.problems))
            if self.memory.last_problems.get(key) == outcome.problems:
                log.info("same problems as already reported: not reporting again")
                return
        self.report(mid, action, outcome.ok, outcome.detail())
        if outcome.ok:
            self.memory.finish(key, "ok")
        else:
            self.memory.last_problems[key] = list(outcome.problems)
            self.memory.save()

    # -- E30-E33 ------------------------------------------------------------------------
    def _imap_account(self, target: Target, address: str) -> imapupload.ImapAccount | None:
        """The user's login on the target's IMAP server, if it has one and we have it."""
        if target.imap is not None and self.config.imap_oauth2 is not None:
            return imapupload.ImapAccount(
                target.imap.host, target.imap.port, target.imap.tls,
                self.config.imap_user or address, "", self.config.ca_file,
                oauth=tokens_for(self.config.imap_oauth2, where="IMAP login: "))
        password = self.config.imap_password()
        if target.imap is None or not password:
            return None
        return imapupload.ImapAccount(target.imap.host, target.imap.port, target.imap.tls,
                                      self.config.imap_user or address, password,
                                      self.config.ca_file)

    def _messages(self) -> Iterator[localdata.LocalMessage | tuple[str, str]]:
        for root, prefix in self.mail_client.local_roots(self._address()):
            yield from localdata.iter_messages(root, prefix)

    def _upload(self, mid: int, imap: imapupload.ImapAccount | None) -> dict[str, Any]:
        """E30: send every local message not yet acknowledged (IMAP, else the API)."""
        manifest = localdata.Manifest(self.config.state_dir, mid)
        if imap is not None:
            progress = imapupload.Progress(checks.local_size(self.mail_client,
                                                             self._address()))
            return imapupload.upload(imap, self._messages(), manifest, progress)
        counts = {"messages": 0, "uploaded": 0, "present": 0, "skipped": 0, "expunged": 0,
                  "bytes_uploaded": 0}
        folders: set[str] = set()
        for item in self._messages():
            if isinstance(item, tuple):
                counts["expunged"] += 1
                continue
            folders.add(item.folder)
            counts["messages"] += 1
            if (item.sha256, item.folder) in manifest:
                counts["skipped"] += 1
                continue
            appended = self.client.post_message(item.folder, item.data, flags=item.flags,
                                                internal_date=item.internal_date)
            manifest.add(item.sha256, item.folder)
            if appended:
                counts["uploaded"] += 1
                counts["bytes_uploaded"] += len(item.data)
            else:
                counts["present"] += 1
            if counts["messages"] % 100 == 0:
                log.info("local mail upload: %d message(s) so far, now in %s",
                         counts["messages"], item.folder)
        detail: dict[str, Any] = dict(counts)
        detail["folders"] = sorted(folders)
        detail["via"] = "station-api"
        return detail

    def _e31_test(self, target: Target, address: str,
                  imap: imapupload.ImapAccount | None) -> tuple[bool, str, dict[str, Any]]:
        """E31: SMTP as the switched client sends, IMAP login as it reads."""
        assert target.smtp is not None  # the switch refused a target without one
        password = self.config.imap_password()
        smtp = checks.try_submission(target.smtp, address,
                                     user=self.config.imap_user or address,
                                     password=password, ca_file=self.config.ca_file)
        detail: dict[str, Any] = smtp.detail()
        if not smtp.ok:
            return False, smtp.describe(), detail
        if self.mail_client.uses_imap:
            if imap is None:
                return False, "no IMAP login to test (password file missing?)", detail
            ok, text = imapupload.login_test(imap)
            detail["imap"] = text
            if not ok:
                return False, text, detail
            return True, f"{smtp.describe()}; {text}", detail
        return True, smtp.describe(), detail

    def _local_migrate(self, migration: dict[str, Any], key: str) -> None:
        mid = int(migration["id"])
        target = target_of(migration)
        address = self._address()
        imap = self._imap_account(target, address)
        attempts = self.config.retries + 1
        last_error = ""
        for attempt in range(1, attempts + 1):
            # A running client writes the mbox files we read and would overwrite the switched
            # profile when it exits: wait for a later poll (not a failed attempt).
            running = self.mail_client.running()
            if running is not None:
                problems = [running]
                log.warning("local migration waits: %s; ask the user to close the mail "
                            "client, the agent retries on its next poll", running)
                if self.memory.last_problems.get(key) != problems:
                    self.report(mid, "local-data", False, {"problems": problems})
                    self.memory.last_problems[key] = problems
                    self.memory.save()
                return
            # E30: the local data (nothing is sent twice: manifest + the target's own check).
            try:
                uploaded = self._upload(mid, imap)
            except ApiUnreachable as exc:
                log.warning("upload of local mail interrupted (%s): it resumes on the next "
                            "run", exc)
                return
            except ApiRefused as exc:
                log.error("the reconciler refused local mail (%s): not switching the profile",
                          exc.message)
                return
            except imapupload.ImapError as exc:
                # Like an unreachable API: resumable, so not a failed attempt; said once.
                problems = [f"upload to the new IMAP server failed: {exc}"]
                log.warning("%s (it resumes on the next run)", problems[0])
                if self.memory.last_problems.get(key) != problems:
                    self.report(mid, "local-data", False, {"problems": problems})
                    self.memory.last_problems[key] = problems
                    self.memory.save()
                return
            except (OSError, ClientError) as exc:
                last_error = f"local mail unreadable: {exc}"
                log.error("%s", last_error)
                self.report(mid, "local-data", False, {"error": last_error})
                return
            log.info("local mail for migration %s: %d message(s), %d uploaded, %d already "
                     "there, %d sent before", mid, uploaded["messages"], uploaded["uploaded"],
                     uploaded["present"], uploaded["skipped"])
            self.report(mid, "local-data", True, uploaded)

            # The switch (E30, end).
            try:
                old, new = self.mail_client.switch(address, target,
                                                   self.config.imap_user or address)
            except (ClientError, OSError) as exc:
                last_error = f"profile switch failed: {exc}"
                log.error("%s", last_error)
                self.report(mid, "switch", False, {"error": last_error, "attempt": attempt})
            else:
                log.info("mail client switched from %s to %s", old, new)
                self.report(mid, "switch", True, {
                    "from": old, "to": new, "backup": str(self.mail_client.backup_path()),
                    "attempt": attempt})
                # E31: test the new parameterization.
                ok, text, detail = self._e31_test(target, address, imap)
                self.report(mid, "test", ok, {**detail, "attempt": attempt})
                if ok:
                    log.info("profile test passed: %s", text)
                    self._finish(mid, key, uploaded, new)
                    return
                last_error = f"profile test failed: {text}"
                log.warning("%s", last_error)

            # E32: back to the old parameterization, then try again after a pause.
            try:
                restored = self.mail_client.rollback()
                rollback_error = None
            except (OSError, ClientError) as exc:
                restored, rollback_error = False, str(exc)
            log.warning("rolled back to the old profile (attempt %d of %d)%s", attempt,
                        attempts, f": ROLLBACK FAILED: {rollback_error}" if rollback_error
                        else "")
            self.report(mid, "rollback", rollback_error is None, {
                "error": last_error, "attempt": attempt, "restored": restored,
                **({"rollback_error": rollback_error} if rollback_error else {})})
            if attempt < attempts:
                delay = backoff(attempt, self.config.retry_delay, jitter=False)
                log.info("retrying local migration in %.1f s", delay)
                self.sleep(delay)
        log.error("local migration for migration %s FAILED after %d attempt(s): %s; the old "
                  "profile is in place, an admin must look at it", mid, attempts, last_error)
        self.report(mid, "failed", False, {"attempts": attempts, "last_error": last_error})
        self.memory.finish(key, "failed")

    def _finish(self, mid: int, key: str, uploaded: dict[str, Any],
                new: dict[str, Any]) -> None:
        """E33: delete the old parameterization now (or after the delay), report done."""
        done = {"uploaded": uploaded["uploaded"], "messages": uploaded["messages"], **new}
        address = self._address()
        if self.config.cleanup_delay <= 0:
            self._cleanup(mid, address)
            self.report(mid, "done", True, done)
            self.memory.finish(key, "done")
            return
        due = time.time() + self.config.cleanup_delay
        log.info("old settings kept in %s until %s (cleanup delay)",
                 self.mail_client.backup_path(),
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(due)))
        self.report(mid, "done", True, {**done, "cleanup_after": due})
        self.memory.cleanups[key] = {"migration": mid, "due": due, "address": address}
        self.memory.finish(key, "done")

    def _cleanup(self, mid: int, address: str) -> None:
        """E33: the old account's folder (IMAP cache, POP3 mbox files), then the backup."""
        backup = self.mail_client.backup_path()
        # The folder first: the backup is what names it (a crash in between repeats this).
        folders, kept = self.mail_client.remove_old_data(address) if address else ([], None)
        if kept:
            log.warning("old mail folder kept: %s", kept)
        for folder in folders:
            log.info("old account folder %s removed", folder)
        removed = self.mail_client.remove_backup()
        log.info("old settings %s removed", backup)
        detail: dict[str, Any] = {"removed": str(backup), "existed": removed,
                                  "old_folders": [str(f) for f in folders]}
        if kept:
            detail["old_folder_kept"] = kept
        self.report(mid, "cleanup", True, detail)

    def _due_cleanups(self) -> None:
        """E33 after the delay: remove the old settings of every migration now due."""
        now = time.time()
        for key, item in sorted(self.memory.cleanups.items()):
            if float(item.get("due", 0)) > now:
                continue
            try:
                self._cleanup(int(item["migration"]),
                              str(item.get("address") or self._address()))
            except (OSError, ClientError) as exc:
                log.error("cannot remove the old settings yet (%s): retrying next poll", exc)
                continue
            del self.memory.cleanups[key]
            self.memory.save()
