"""A mail host reached over SSH: the `Host` seam on another machine, through the OpenSSH client.

Why the OpenSSH client and not a Python SSH library: it is what the admin already uses and
trusts, with their keys, agent, ``~/.ssh/config`` and ``known_hosts``, and nothing new to
install or audit. How it is used:

- **One connection per host.** The first use starts a control master (``ssh -M -N``) as a
  child of this process, with its socket in a private 0700 folder; every command then runs
  as a multiplexed session over it (``ControlMaster=no``: a command never becomes a master
  itself), so a step that runs thirty commands pays for one TCP + SSH handshake. The master
  is our child, known by its PID: `close` (also at interpreter exit) asks it to exit with
  ``ssh -O exit`` and ends it by PID if it does not. ``ControlPersist`` is not used: it would
  fork the master away from us (no PID to stop, a socket outliving the reconciler).
- **Strict and non-interactive.** ``BatchMode=yes`` (never a password or passphrase prompt)
  and ``StrictHostKeyChecking=yes`` with ``UpdateHostKeys=no``: a host whose key is not in
  known_hosts, or differs from it, is refused before any command runs, and mailferry never
  writes known_hosts. ``ServerAliveInterval`` notices a dead connection within ~15 s.
- **Commands** are quoted with `shlex.join` for the remote POSIX shell (``sh -c``); the
  remote user needs the rights the local driver would (run postconf/postmap/doveadm/postfix
  reload, write the tables folder and main.cf, remove a mailbox's home). With ``sshSudo``
  (a non-root user) every `run` is ``sudo -n -- ARGV`` (never a prompt), a home is removed
  with ``sudo -n -u MAILUSER rm -rf -- HOME``, the tables are written as the user itself
  (its own ``tablesDir``), and `refused` asks ``sudo -n -l ARGV`` before a change.
- **Atomic writes** remotely, in one round trip: the bytes go on stdin into a temporary file
  beside the target (``cat >``), its size is checked (a connection dropped mid-transfer
  leaves a short temporary file that is never renamed), ``chmod``/``chown``, ``sync FILE``
  (fsync), ``postmap`` of the temporary, the ``.db`` then the source renamed into place with
  a later-second mtime (see `hosts.newer_than`), ``sync FOLDER``.

Errors: `HostError` naming the ``ssh://`` URL and the command. SSH's own failure (exit 255:
refused host key, unreachable, connection dropped) says so, and the next command opens a
fresh master: the engine's retry is the recovery.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from reconciler.drivers.hosts import HostError, command_text, failure
from reconciler.spec.model import SshTarget

SSH = "ssh"
SSH_FAILED = 255  # the OpenSSH client's own failure (not the remote command's)
ABSENT = 44  # read_file's "no such file" (a code no tool here uses)


def _connect_log_tail(log: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines()
                 if ln.strip() and not ln.startswith(" ")]  # not ssh's indented hints
        return " / ".join(lines[-2:])[:300]
    return ""


class SshHost:
    """Postfix and Dovecot on another machine, reached with the OpenSSH client."""

    def __init__(self, target: SshTarget, *, connect_timeout: float = 10.0) -> None:
        self.target = target
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._dir: Path | None = None
        self._master: subprocess.Popen[bytes] | None = None
        atexit.register(self.close)

    @property
    def label(self) -> str:
        return self.target.url

    # -- the connection -------------------------------------------------------------------
    def _options(self) -> list[str]:
        assert self._dir is not None
        t = self.target
        opts = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", "UpdateHostKeys=no", "-o", f"ConnectTimeout={int(self.connect_timeout)}",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
                "-o", f"ControlPath={self._dir / 'control'}", "-p", str(t.port)]
        if t.user:
            opts += ["-l", t.user]
        if t.identity_file:
            opts += ["-i", t.identity_file, "-o", "IdentitiesOnly=yes"]
        if t.known_hosts_file:
            opts += ["-o", f"UserKnownHostsFile={t.known_hosts_file}",
                     "-o", "GlobalKnownHostsFile=/dev/null"]
        return opts

    def _ensure_master(self) -> None:
        """Start the control master unless it is running (caller holds the lock)."""
        if self._master is not None and self._master.poll() is None:
            return
        self._drop_master()
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="mf-ssh-"))  # 0700, short: socket path
        log = self._dir / "master.log"
        with open(log, "wb") as err:
            self._master = subprocess.Popen(
                [SSH, "-M", "-N", "-o", "ControlMaster=yes", "-o", "ControlPersist=no",
                 *self._options(), self.target.hostname],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True)  # not killed by the terminal's ^C before we close it
        socket = self._dir / "control"
        deadline = time.monotonic() + self.connect_timeout + 5
        while not socket.exists():
            if self._master.poll() is not None or time.monotonic() > deadline:
                said = _connect_log_tail(log)
                self._drop_master()
                raise HostError(f"{self.label}: ssh connection failed: "
                                f"{said or 'no answer within the connect timeout'}")
            time.sleep(0.02)

    def _drop_master(self) -> None:
        """End our master (by its PID) and forget it."""
        master, self._master = self._master, None
        if master is None:
            return
        if master.poll() is None and self._dir is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run([SSH, "-o", f"ControlPath={self._dir / 'control'}", "-O", "exit",
                                self.target.hostname], capture_output=True, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            master.wait(3)
        if master.poll() is None:
            master.kill()
            master.wait(5)
        if self._dir is not None:
            with contextlib.suppress(FileNotFoundError):
                (self._dir / "control").unlink()

    def close(self) -> None:
        with self._lock:
            self._drop_master()
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    def master_pid(self) -> int | None:
        """The control master's PID (tests drop the connection by it)."""
        master = self._master
        return master.pid if master is not None and master.poll() is None else None

    def _exec(self, script: str, what: Sequence[str], *, stdin: bytes | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        """Run a POSIX shell script on the host over the master; SSH's own failure raised."""
        with self._lock:
            self._ensure_master()
            argv = [SSH, "-T", "-o", "ControlMaster=no", *self._options(),
                    self.target.hostname, "--", shlex.join(["sh", "-c", script])]
        try:
            result = subprocess.run(argv, input=stdin if stdin is not None else b"",
                                    capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise HostError(f"{self.label}: {command_text(what)}: no answer within "
                            f"{timeout:.0f} s") from exc
        except OSError as exc:
            raise HostError(f"{self.label}: {command_text(what)}: {exc}") from exc
        if result.returncode == SSH_FAILED:
            with self._lock:  # the connection is gone or unusable: the next call reconnects
                self._drop_master()
            said = result.stderr.decode("utf-8", "replace").strip()[:300]
            raise HostError(f"{self.label}: ssh connection lost running "
                            f"{command_text(what)}: {said or 'no message'}")
        return result

    # -- the Host protocol ----------------------------------------------------------------
    def _privileged(self, argv: Sequence[str], as_user: str | None = None) -> list[str]:
        if not self.target.sudo:
            return list(argv)
        return ["sudo", "-n", *(["-u", as_user] if as_user else []), "--", *argv]

    def sudoers_line(self, argv: Sequence[str], as_user: str | None = None) -> str:
        """The rule that allows `argv` (its program by absolute path, as sudo wants)."""
        return f"{self.target.user or 'USER'} ALL=({as_user or 'root'}) NOPASSWD: " \
            f"{command_text(argv)}"

    def run(self, argv: Sequence[str], *, stdin: bytes | None = None,
            timeout: float = 60) -> str:
        full = self._privileged(argv)
        result = self._exec(shlex.join(full), argv, stdin=stdin, timeout=timeout)
        out = result.stdout.decode("utf-8", "replace")
        if result.returncode != 0:
            err = result.stderr.decode("utf-8", "replace")
            if self.target.sudo and err.startswith("sudo:"):
                raise HostError(f"{self.label}: sudo refused {command_text(argv)}: "
                                f"{err.strip()[:200]}; the host's sudoers needs a rule like: "
                                f"{self.sudoers_line(argv)}")
            raise failure(self.label, argv, err, out)
        return out

    def refused(self, argvs: Sequence[Sequence[str]]) -> list[str]:
        """One round trip: ``sudo -n -l ARGV`` for each (exit 0: allowed); nothing runs.
        Each refused command comes back with the sudoers line that would allow it, its
        program resolved on the host (``command -v``, what sudo's secure_path finds)."""
        if not self.target.sudo or not argvs:
            return []
        script = "".join(
            f'if sudo -n -l -- {shlex.join(list(a))} >/dev/null 2>&1; then echo ok; '
            f'else echo "no $(command -v {shlex.quote(a[0])} || echo {shlex.quote(a[0])})"; fi\n'
            for a in argvs)
        result = self._exec(script, ["sudo", "-n", "-l", "..."])
        lines = result.stdout.decode("utf-8", "replace").splitlines()
        out = []
        for argv, line in zip(argvs, lines, strict=False):
            if line != "ok":
                program = line.removeprefix("no ").strip() or argv[0]
                out.append(f"{command_text(argv)} (sudoers: "
                           f"{self.sudoers_line([program, *argv[1:]])})")
        return out

    def read_file(self, path: str) -> bytes | None:
        q = shlex.quote(path)
        result = self._exec(f"test -e {q} || exit {ABSENT}; exec cat -- {q}", ["cat", path])
        if result.returncode == ABSENT:
            return None
        if result.returncode != 0:
            raise failure(self.label, ["cat", path], result.stderr.decode("utf-8", "replace"))
        return result.stdout

    def exists(self, path: str) -> bool:
        result = self._exec(f"test -e {shlex.quote(path)}", ["test", "-e", path])
        return result.returncode == 0

    def read_files(self, paths: Sequence[str]) -> dict[str, bytes | None]:
        return self.snapshot(paths, ())[0]

    def existing(self, paths: Sequence[str]) -> set[str]:
        return self.snapshot((), paths)[1]

    def snapshot(self, read: Sequence[str], exist: Sequence[str]
                 ) -> tuple[dict[str, bytes | None], set[str]]:
        """One round trip: for each path to read a line "<size>" or "-" (absent), then its
        bytes (copied first, so that size and bytes are of the same version of the file);
        then for each path to test a line "1" or "0"."""
        if not read and not exist:
            return {}, set()
        script = 'set -e\nt=$(mktemp)\ntrap \'rm -f "$t"\' EXIT\n' + "".join(
            f'if [ -e {q} ]; then cat -- {q} > "$t"; wc -c < "$t"; cat "$t"; else echo -; fi\n'
            for q in map(shlex.quote, read)) + "".join(
            f"if [ -e {q} ]; then echo 1; else echo 0; fi\n" for q in map(shlex.quote, exist))
        what = ["cat", *read, *(f"(test -e {p})" for p in exist)]
        result = self._exec(script, what)
        if result.returncode != 0:
            raise failure(self.label, what, result.stderr.decode("utf-8", "replace"))
        out, at = result.stdout, 0
        found: dict[str, bytes | None] = {}
        for path in read:
            end = out.index(b"\n", at)
            head, at = out[at:end].strip(), end + 1
            if head == b"-":
                found[path] = None
                continue
            size = int(head)
            found[path], at = out[at:at + size], at + size
        flags = out[at:].split()
        return found, {path for path, flag in zip(exist, flags, strict=True) if flag == b"1"}

    def replace_file(self, path: str, data: bytes, *, mode: int = 0o644,
                     owner: tuple[int, int] | None = None,
                     postmap_config: str | None = None) -> None:
        folder, name = os.path.split(path)
        p, tmp, d = shlex.quote(path), shlex.quote(f"{folder}/.{name}.tmp"), shlex.quote(folder)
        steps = [
            # `newer NEW OLD`: NEW's mtime in a later second than OLD's (hosts.newer_than)
            'newer() { [ -e "$2" ] || return 0; o=$(stat -c %Y -- "$2"); '
            'n=$(stat -c %Y -- "$1"); [ "$n" -gt "$o" ] || touch -m -d "@$((o + 1))" -- "$1"; }',
            f"cat > {tmp}",
            f'[ "$(wc -c < {tmp})" -eq {len(data)} ] || {{ rm -f -- {tmp}; '
            f'echo "short write: the connection dropped mid-transfer" >&2; exit 1; }}',
            f"chmod {mode:o} {tmp}",
        ]
        if owner is not None:
            steps.append(f"chown {owner[0]}:{owner[1]} {tmp}")
        steps.append(f"sync -- {tmp}")
        if postmap_config is not None:
            steps += [f"postmap -c {shlex.quote(postmap_config)} hash:{tmp}",
                      f"newer {tmp}.db {p}.db", f"mv -f -- {tmp}.db {p}.db"]
        steps += [f"newer {tmp} {p}", f"mv -f -- {tmp} {p}", f"sync -- {d}"]
        what = ["replace", path]
        result = self._exec("set -e\n" + "\n".join(steps), what, stdin=data)
        if result.returncode != 0:
            raise failure(self.label, what, result.stderr.decode("utf-8", "replace"))

    def remove_file(self, path: str) -> None:
        self.run(["rm", "-f", "--", path])

    def remove_tree(self, path: str, *, as_user: str | None = None) -> None:
        if not path.startswith("/") or path.rstrip("/") == "":
            raise HostError(f"{self.label}: refusing to remove {path!r} (not an absolute "
                            "folder below /)")
        argv = ["rm", "-rf", "--", path]
        result = self._exec(shlex.join(self._privileged(argv, as_user)), argv)
        if result.returncode != 0:
            err = result.stderr.decode("utf-8", "replace")
            if self.target.sudo and err.startswith("sudo:"):
                rule = self.sudoers_line(["/bin/rm", "-rf", "--",
                                          path.rsplit("/", 1)[0] + "/*"], as_user)
                raise HostError(f"{self.label}: sudo refused {command_text(argv)} as "
                                f"{as_user or 'root'}: {err.strip()[:200]}; the host's sudoers "
                                f"needs: {rule}")
            raise failure(self.label, argv, err)

    def user_ids(self, user: str) -> tuple[int, int] | None:
        result = self._exec(f"getent passwd {shlex.quote(user)}", ["getent", "passwd", user])
        if result.returncode == 2:  # getent: no such key
            return None
        if result.returncode != 0:
            raise failure(self.label, ["getent", "passwd", user],
                          result.stderr.decode("utf-8", "replace"))
        fields = result.stdout.decode("utf-8", "replace").strip().split(":")
        return int(fields[2]), int(fields[3])


_SHARED: dict[SshTarget, SshHost] = {}
_SHARED_LOCK = threading.Lock()


def shared_host(target: SshTarget) -> SshHost:
    """The one `SshHost` of this process for `target`: every driver and engine built for the
    same host (the watcher rebuilds engines when specs change) shares one connection."""
    with _SHARED_LOCK:
        host = _SHARED.get(target)
        if host is None:
            host = _SHARED[target] = SshHost(target)
        return host


def close_shared_hosts() -> None:
    """Close every shared connection (at exit this happens anyway; a test or a service that
    stops its hosts' sshd first calls this)."""
    with _SHARED_LOCK:
        hosts = list(_SHARED.values())
        _SHARED.clear()
    for host in hosts:
        host.close()
