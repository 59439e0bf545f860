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
     (idempotent), switch the profile, test it; on a failed test restore the old profile and
     retry with exponential back-off, and after the last retry report `failed`; on success
     delete the old profile (cleanup) and report `done`.
4. send the new reports (each one was written to the outbox before any attempt to send it).

What was finished is remembered in `<state-dir>/agent-state.json`, so a restarted agent does
not redo a finished local migration; an admin who wants it redone makes the engine issue the
action again (a new `action_since`).

Log lines are written for a help desk: what was done, for which migration, and in words what
failed and what the user should do.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from station_agent import checks, localdata, profile
from station_agent.client import ApiRefused, ApiUnreachable, StationApiClient
from station_agent.fsutil import atomic_write
from station_agent.outbox import Outbox

log = logging.getLogger("station_agent")


@dataclass
class AgentConfig:
    """Everything the agent needs to know, from the command line."""

    api: str
    station: str
    token: str
    profile: Path
    local_mail: Path
    state_dir: Path
    interval: float = 30.0
    min_free_mb: int = 100
    retries: int = 3
    retry_delay: float = 30.0
    timeout: float = 30.0


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
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                self.finished = dict(data.get("finished", {}))
                self.last_problems = dict(data.get("last_problems", {}))
            except (OSError, json.JSONDecodeError, AttributeError) as exc:
                # Losing this memory only means redoing idempotent work: warn, carry on.
                log.warning("agent state %s unreadable (%s): starting afresh", path, exc)

    def save(self) -> None:
        payload = {"finished": self.finished, "last_problems": self.last_problems}
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
        try:
            task = self.client.get_task()
            result.reached_api = True
            migration = task.get("migration")
            if not isinstance(migration, dict):
                log.debug("no migration for %s: nothing to do", task.get("address"))
            else:
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
    def _check(self, migration: dict[str, Any], action: str, key: str) -> None:
        target = migration.get("target") or {}
        submission = target.get("submission") if isinstance(target, dict) else None
        outcome = checks.run_checks(
            state_dir=self.config.state_dir, profile_path=self.config.profile,
            local_mail=self.config.local_mail,
            submission=str(submission) if submission else None,
            min_free_mb=self.config.min_free_mb)
        mid = migration["id"]
        if outcome.ok:
            log.info("%s for migration %s passed: %d MB free, mail client closed, %s "
                     "reachable, local mail %d bytes", action, mid, outcome.free_mb,
                     submission, outcome.local_bytes)
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
    def _upload(self, mid: int) -> dict[str, Any]:
        """E30: send every local message not yet acknowledged; raise ApiError to stop."""
        manifest = localdata.Manifest(self.config.state_dir, mid)
        counts = {"messages": 0, "uploaded": 0, "present": 0, "skipped": 0, "expunged": 0,
                  "bytes_uploaded": 0}
        folders: set[str] = set()
        for item in localdata.iter_messages(self.config.local_mail):
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
        detail: dict[str, Any] = dict(counts)
        detail["folders"] = sorted(folders)
        return detail

    def _local_migrate(self, migration: dict[str, Any], key: str) -> None:
        mid = int(migration["id"])
        target = migration.get("target") or {}
        submission = str(target.get("submission") or "") if isinstance(target, dict) else ""
        attempts = self.config.retries + 1
        last_error = ""
        for attempt in range(1, attempts + 1):
            # A running client writes the mbox files we read and would overwrite the switched
            # profile when it exits: wait for a later poll (not a failed attempt).
            lock = profile.client_lock(self.config.profile)
            if lock is not None:
                problems = [f"the mail client is running (lock file {lock})"]
                log.warning("local migration waits: %s; ask the user to close the mail "
                            "client, the agent retries on its next poll", problems[0])
                if self.memory.last_problems.get(key) != problems:
                    self.report(mid, "local-data", False, {"problems": problems})
                    self.memory.last_problems[key] = problems
                    self.memory.save()
                return
            # E30: the local data (nothing is sent twice: manifest + the API's own check).
            try:
                uploaded = self._upload(mid)
            except ApiUnreachable as exc:
                log.warning("upload of local mail interrupted (%s): it resumes on the next "
                            "run", exc)
                return
            except ApiRefused as exc:
                log.error("the reconciler refused local mail (%s): not switching the profile",
                          exc.message)
                return
            except OSError as exc:
                last_error = f"local mail unreadable: {exc}"
                log.error("%s", last_error)
                self.report(mid, "local-data", False, {"error": last_error})
                return
            log.info("local mail for migration %s: %d message(s), %d uploaded, %d already "
                     "there, %d sent before", mid, uploaded["messages"], uploaded["uploaded"],
                     uploaded["present"], uploaded["skipped"])
            self.report(mid, "local-data", True, uploaded)

            # The profile switch (E30, end).
            try:
                if not submission:
                    raise profile.ProfileError("the reconciler gave no submission server for "
                                               "the target system")
                old, new = profile.switch(self.config.profile, smtp=submission,
                                          mailbox=str(migration["target_mailbox"]),
                                          system=str(migration["target_system"]))
            except (profile.ProfileError, OSError) as exc:
                last_error = f"profile switch failed: {exc}"
                log.error("%s", last_error)
                self.report(mid, "switch", False, {"error": last_error, "attempt": attempt})
            else:
                log.info("profile switched from %s (%s) to %s (%s)", old.system, old.smtp,
                         new.system, new.smtp)
                self.report(mid, "switch", True, {
                    "from": {"system": old.system, "smtp": old.smtp, "mailbox": old.mailbox},
                    "to": {"system": new.system, "smtp": new.smtp, "mailbox": new.mailbox},
                    "backup": str(profile.backup_path(self.config.profile)),
                    "attempt": attempt})
                # E31: test the new parameterization.
                test = checks.try_submission(new.smtp, new.address)
                self.report(mid, "test", test.ok, {**test.detail(), "attempt": attempt})
                if test.ok:
                    log.info("profile test passed: %s", test.describe())
                    self._finish(mid, key, uploaded, new)
                    return
                last_error = f"profile test failed: {test.describe()}"
                log.warning("%s", last_error)

            # E32: back to the old parameterization, then try again after a pause.
            try:
                restored = profile.rollback(self.config.profile)
                rollback_error = None
            except OSError as exc:
                restored, rollback_error = False, str(exc)
            log.warning("rolled back to the old profile (attempt %d of %d)%s", attempt,
                        attempts, f": ROLLBACK FAILED: {rollback_error}" if rollback_error
                        else "")
            self.report(mid, "rollback", rollback_error is None, {
                "error": last_error, "attempt": attempt, "restored": restored,
                **({"rollback_error": rollback_error} if rollback_error else {})})
            if attempt < attempts:
                delay = self.config.retry_delay * 2 ** (attempt - 1)
                log.info("retrying local migration in %.1f s", delay)
                self.sleep(delay)
        log.error("local migration for migration %s FAILED after %d attempt(s): %s; the old "
                  "profile is in place, an admin must look at it", mid, attempts, last_error)
        self.report(mid, "failed", False, {"attempts": attempts, "last_error": last_error})
        self.memory.finish(key, "failed")

    def _finish(self, mid: int, key: str, uploaded: dict[str, Any],
                new: profile.Account) -> None:
        """E33: delete the old parameterization, report cleanup and done."""
        backup = profile.backup_path(self.config.profile)
        removed = profile.remove_backup(self.config.profile)
        log.info("old profile %s removed", backup)
        self.report(mid, "cleanup", True, {"removed": str(backup), "existed": removed})
        self.report(mid, "done", True, {"uploaded": uploaded["uploaded"],
                                        "messages": uploaded["messages"],
                                        "system": new.system, "smtp": new.smtp,
                                        "mailbox": new.mailbox})
        self.memory.finish(key, "done")
