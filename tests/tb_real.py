"""Thunderbird profiles made by the real `thunderbird` binary, headless (this file holds no tests).

Why the real binary. tests/tb_kit.py writes profiles the way we believe Thunderbird writes
them; the profile of a real installation is what Thunderbird itself wrote: the prefs it adds
on its first run (`directory` and `directory-rel` of every server, `mail.root.*`,
`storeContractID`, the default tags `$label1`..`$label5`), the folders it creates
(`ImapMail/<host>/INBOX.msf`, `Mail/<pop server>/Inbox`, Trash, Unsent Messages) and the
`profiles.ini` of `-CreateProfile`. And only the real binary can tell whether a switched
profile stays switched once Thunderbird has run on it again and rewritten prefs.js.

How. `thunderbird --headless -CreateProfile NAME` makes the profile and its `profiles.ini`
entry; the accounts a user would set up in the wizard (an IMAP one, a POP3 one, Local
Folders, tags, junk settings as the Junk Settings page writes them) go into a `user.js`;
Thunderbird is started headless on the profile until it has loaded every account and
written prefs.js itself, then stopped by its PID (its process group) and the `user.js`
removed -- it would otherwise override the switch at every start. The kit then puts mail
into the mbox files the way Thunderbird stores it (X-Mozilla-Status, X-Mozilla-Keys padded
with spaces); fetching it for real would need a POP3 server and a stored password.

Without the binary (`thunderbird`, installed by `bootstrap.sh test`) the tests skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from station_agent.thunderbird.prefs import Prefs, PrefsError
from station_agent.thunderbird.profiles import read_profiles_ini

START_TIMEOUT = 120.0  # Thunderbird's first start on a loaded 2-core machine


def available() -> str | None:
    """Why real Thunderbird cannot run here, or None."""
    if shutil.which("thunderbird") is None:
        return "thunderbird not installed (bootstrap.sh test installs it)"
    return None


def skip_unless_available() -> None:
    reason = available()
    if reason:
        pytest.skip(reason)


def env(home: Path) -> dict[str, str]:
    """Thunderbird's environment: its own HOME, headless, no crash reporter, no safe mode
    after being stopped in the middle of a start."""
    out = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    out.update(HOME=str(home), MOZ_HEADLESS="1", MOZ_CRASHREPORTER_DISABLE="1",
               MOZ_DISABLE_AUTO_SAFE_MODE="1", XDG_CONFIG_HOME=str(home / ".config"),
               XDG_CACHE_HOME=str(home / ".cache"), TMPDIR=str(home / "tmp"))
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    return out


def create_profile(home: Path, name: str) -> tuple[Path, Path]:
    """`thunderbird --headless -CreateProfile NAME`: (profiles.ini, the profile folder)."""
    home.mkdir(parents=True, exist_ok=True)
    subprocess.run(["thunderbird", "--headless", "-CreateProfile", name], env=env(home),
                   check=True, capture_output=True, timeout=60)
    ini = home / ".thunderbird" / "profiles.ini"
    entries, _ = read_profiles_ini(ini)
    [entry] = [e for e in entries if e.name == name]
    return ini, entry.path


def run_until(home: Path, profile: Path, done: Callable[[], bool], what: str,
              timeout: float = START_TIMEOUT) -> None:
    """Run Thunderbird headless on `profile` until `done()` holds, then stop it by PID.

    Bounded: AssertionError (with Thunderbird's output) if `done()` does not hold in time.
    """
    log = home / f"thunderbird-{time.monotonic_ns()}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["thunderbird", "--headless", "--profile", str(profile)],
                                env=env(home), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not done():
            if proc.poll() is not None:
                raise AssertionError(f"Thunderbird exited ({proc.returncode}) before {what}: "
                                     f"{log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"Thunderbird did not {what} in {timeout:.0f} s: "
                                     f"{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.25)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """TERM Thunderbird's process group (ours: start_new_session), KILL after 20 s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
    # Its content processes are in the same group; none may outlive the test.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def prefs(profile: Path) -> Prefs | None:
    """prefs.js as Thunderbird last wrote it (None while absent or half written)."""
    try:
        return Prefs.load(profile / "prefs.js")
    except PrefsError:
        return None


def has_prefs(profile: Path, *keys: str) -> Callable[[], bool]:
    """A `done` for run_until: prefs.js holds every key."""
    def check() -> bool:
        current = prefs(profile)
        return current is not None and all(k in current for k in keys)
    return check


# A user's setup: jean's work mail on IMAP (the old server 127.0.0.2), marie's on POP3 (the
# old server 127.0.0.3) on the same workstation, Local Folders; junk of both accounts is
# moved into jean's Junk (the bare server URI and a folder URI, as the Junk Settings write
# them); a user tag of its own beside the five default ones.
IMAP_USER, POP_USER = "jean.dupont@corp.example", "marie.curie@corp.example"
OLD_IMAP, OLD_POP = "127.0.0.2", "127.0.0.3"
JEAN_URI = f"imap://jean.dupont%40corp.example@{OLD_IMAP}"
USER_JS = f"""// written by tests/tb_real.py; removed after the first start
user_pref("app.update.enabled", false);
user_pref("datareporting.policy.dataSubmissionEnabled", false);
user_pref("mail.account.account1.identities", "id1");
user_pref("mail.account.account1.server", "server1");
user_pref("mail.account.account2.identities", "id2");
user_pref("mail.account.account2.server", "server2");
user_pref("mail.account.account3.server", "server3");
user_pref("mail.accountmanager.accounts", "account1,account2,account3");
user_pref("mail.accountmanager.defaultaccount", "account1");
user_pref("mail.accountmanager.localfoldersserver", "server3");
user_pref("mail.identity.id1.fullName", "Jean Dupönt");
user_pref("mail.identity.id1.smtpServer", "smtp1");
user_pref("mail.identity.id1.useremail", "{IMAP_USER}");
user_pref("mail.identity.id1.fcc_folder", "{JEAN_URI}/Sent");
user_pref("mail.identity.id1.draft_folder", "{JEAN_URI}/Drafts");
user_pref("mail.identity.id2.fullName", "Marie Curie");
user_pref("mail.identity.id2.smtpServer", "smtp2");
user_pref("mail.identity.id2.useremail", "{POP_USER}");
user_pref("mail.identity.id2.fcc_folder", "mailbox://marie@{OLD_POP}/Sent");
user_pref("mail.server.server1.hostname", "{OLD_IMAP}");
user_pref("mail.server.server1.name", "{IMAP_USER}");
user_pref("mail.server.server1.port", 143);
user_pref("mail.server.server1.type", "imap");
user_pref("mail.server.server1.userName", "{IMAP_USER}");
user_pref("mail.server.server1.spamLevel", 100);
user_pref("mail.server.server1.moveOnSpam", true);
user_pref("mail.server.server1.moveTargetMode", 0);
user_pref("mail.server.server1.spamActionTargetAccount", "{JEAN_URI}");
user_pref("mail.server.server2.hostname", "{OLD_POP}");
user_pref("mail.server.server2.name", "Marie POP");
user_pref("mail.server.server2.port", 110);
user_pref("mail.server.server2.type", "pop3");
user_pref("mail.server.server2.userName", "marie");
user_pref("mail.server.server2.leave_on_server", true);
user_pref("mail.server.server2.moveOnSpam", true);
user_pref("mail.server.server2.moveTargetMode", 1);
user_pref("mail.server.server2.spamActionTargetFolder", "{JEAN_URI}/Junk");
user_pref("mail.server.server3.hostname", "Local Folders");
user_pref("mail.server.server3.name", "Local Folders");
user_pref("mail.server.server3.type", "none");
user_pref("mail.server.server3.userName", "nobody");
user_pref("mail.shell.checkDefaultClient", false);
user_pref("mail.smtp.defaultserver", "smtp1");
user_pref("mail.smtpserver.smtp1.hostname", "{OLD_IMAP}");
user_pref("mail.smtpserver.smtp1.port", 587);
user_pref("mail.smtpserver.smtp1.username", "{IMAP_USER}");
user_pref("mail.smtpserver.smtp2.hostname", "{OLD_POP}");
user_pref("mail.smtpserver.smtp2.port", 25);
user_pref("mail.smtpserver.smtp2.username", "marie");
user_pref("mail.smtpservers", "smtp1,smtp2");
user_pref("mailnews.start_page.enabled", false);
user_pref("mailnews.tags.projet_x.color", "#00AA00");
user_pref("mailnews.tags.projet_x.tag", "Projet X");
user_pref("toolkit.telemetry.enabled", false);
"""

PAD = b" " * 60  # Thunderbird reserves room in X-Mozilla-Keys to rewrite it in place


def _message(sender: str, when: str, status: str, keys: str, subject: str, mid: str) -> bytes:
    return (f"From {sender} {when}\n".encode()
            + f"X-Mozilla-Status: {status}\nX-Mozilla-Status2: 00000000\n".encode()
            + b"X-Mozilla-Keys: " + keys.encode() + PAD + b"\n"
            + f"From: {sender}\nSubject: {subject}\nMessage-ID: {mid}\n"
              f"Date: {when}\n\n{subject}\n\n".encode())


LOCAL = {  # Local Folders' mbox file -> its messages
    "Archive": [_message("a@x.example", "Mon Jan  2 10:00:00 2023", "0001", "$label1 projet_x",
                         "archived", "<real-a1@x.example>"),
                _message("b@x.example", "Tue Jan  3 10:00:00 2023", "0009", "",
                         "expunged", "<real-b1@x.example>")],
    "Archive.sbd/2019": [_message("c@x.example", "Fri Mar  1 09:30:00 2019", "0005", "$label4",
                                  "from 2019", "<real-c1@x.example>")],
}
POP = {  # marie's POP3 folder Mail/127.0.0.3/ -> its messages
    "Inbox": [_message("d@y.example", "Mon Feb  5 08:00:00 2018", "0001", "$label2",
                       "popped", "<real-d1@y.example>"),
              _message("e@y.example", "Tue Feb  6 08:00:00 2018", "0000", "",
                       "unread", "<real-e1@y.example>")],
    "Inbox.sbd/Projets": [_message("f@y.example", "Wed Feb  7 08:00:00 2018", "0001",
                                   "projet_x", "projet", "<real-f1@y.example>")],
    "Sent": [_message("marie@corp.example", "Thu Feb  8 08:00:00 2018", "0001", "",
                      "sent", "<real-g1@corp.example>")],
}
# Where each must arrive (pop3_folders = "account": under the account's name)
EXPECTED_JEAN = {"Local Folders/Archive": {"<real-a1@x.example>"},
                 "Local Folders/Archive/2019": {"<real-c1@x.example>"}}
EXPECTED_MARIE = {"Marie POP/Inbox": {"<real-d1@y.example>", "<real-e1@y.example>"},
                  "Marie POP/Inbox/Projets": {"<real-f1@y.example>"},
                  "Marie POP/Sent": {"<real-g1@corp.example>"}}


def make_profile(home: Path) -> tuple[Path, Path]:
    """A profile Thunderbird made and wrote, with jean's IMAP and marie's POP3 account and
    local mail in both Local Folders and marie's POP3 folder: (profiles.ini, profile)."""
    skip_unless_available()
    ini, profile = create_profile(home, "work")
    (profile / "user.js").write_text(USER_JS, encoding="utf-8")
    servers = [f"mail.server.server{n}.directory-rel" for n in (1, 2, 3)]
    run_until(home, profile, has_prefs(profile, *servers), "load the accounts")
    (profile / "user.js").unlink()
    for root, folders in ((profile / "Mail" / "Local Folders", LOCAL),
                          (profile / "Mail" / OLD_POP, POP)):
        assert root.is_dir(), f"Thunderbird did not create {root}"
        for name, messages in folders.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"".join(messages))
    return ini, profile
