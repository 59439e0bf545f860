"""``fed queue``: postqueue/postsuper for fed, over the control API.

An admin on call knows ``postqueue -p``, ``postqueue -f``, ``postsuper -h/-H/-d``; this
is the same vocabulary for fed (``list``, ``flush``, ``hold``, ``release``, ``delete``, plus
``show`` for one message), so it works from any host that reaches the control API and
never touches fed's files behind its back. The token comes from ``--token-file`` or
``--token-env``, as for ``fed serve``; ``delete`` asks for confirmation unless ``--yes``.

Exit codes: 0 done, 1 fed refused (unknown queue id, bad token, ...), 2 fed unreachable or
bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, TextIO


class QueueCtlError(Exception):
    """fed answered with an error (exit 1) or could not be reached (exit 2)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def call(base: str, token: str, method: str, path: str, timeout: float = 30.0) -> Any:
    """One control API request; the decoded JSON answer."""
    req = urllib.request.Request(base + path, method=method, data=b"" if method == "POST"
                                 else None, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("error", exc.reason)
        except (ValueError, AttributeError):
            reason = exc.reason
        raise QueueCtlError(f"fed: {exc.code} {reason}", 1) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise QueueCtlError(f"fed: cannot reach {base}: {exc}", 2) from exc


def _rcpt_line(r: dict[str, Any]) -> str:
    state = r["status"]
    if r.get("held"):
        state += ", address held"
    if r.get("attempts"):
        state += f", {r['attempts']} attempts"
    line = f"        {r['rcpt']}  -> {r['destination']}  ({state})"
    if r.get("last_error"):
        line += f"\n          {r['last_error']}"
    return line


def print_list(messages: list[dict[str, Any]], out: TextIO) -> None:
    """postqueue -p style: one block per message, '!' marks an admin hold."""
    out.write(f"{'-Queue ID-':<22} {'-Size-':>9} {'-Age-':>9}  -Sender/Recipient-\n")
    for m in messages:
        mark = "!" if m["admin_hold"] else " "
        age = f"{m['age_seconds']:.0f}s"
        out.write(f"{m['queue_id']}{mark} {m['size']:>9} {age:>9}  {m['from'] or '<>'}\n")
        for r in m["recipients"]:
            if r["status"] == "pending":
                out.write(_rcpt_line(r) + "\n")
        out.write("\n")
    total = sum(m["size"] for m in messages)
    out.write(f"-- {total} bytes in {len(messages)} messages.\n" if messages
              else "Mail queue is empty\n")


def print_show(m: dict[str, Any], out: TextIO) -> None:
    """Everything about one message."""
    out.write(f"queue id:    {m['queue_id']}\n")
    out.write(f"received:    {m['received_at']} ({m['age_seconds']:.0f}s ago)\n")
    out.write(f"sender:      <{m['from']}>\nsize:        {m['size']}\n")
    out.write(f"message-id:  {m['message_id']}\n")
    out.write(f"admin hold:  {m['admin_hold'] or 'no'}\nrecipients:\n")
    for r in m["recipients"]:
        out.write(_rcpt_line(r) + "\n")
    out.write("\n" + m.get("headers", "").replace("\r\n", "\n") + "\n")


def run(args: argparse.Namespace, token: str, out: TextIO = sys.stdout,
        confirm: Callable[[str], str] = input) -> int:
    """Execute one ``fed queue`` action; the exit code."""
    base = f"http://{args.control[0]}:{args.control[1]}"
    action = args.action
    qid = urllib.parse.quote(args.queue_id or "", safe="")
    try:
        if action == "list":
            messages = call(base, token, "GET", "/v1/queue/messages")["messages"]
            if args.json:
                out.write(json.dumps(messages, indent=2) + "\n")
            else:
                print_list(messages, out)
        elif action == "show":
            message = call(base, token, "GET", f"/v1/queue/messages/{qid}")
            if args.json:
                out.write(json.dumps(message, indent=2) + "\n")
            else:
                print_show(message, out)
        elif action == "flush":
            answer = call(base, token, "POST", "/v1/queue/flush")
            out.write(f"flushed: {answer['flushed']} recipients due now\n")
        elif action in ("hold", "release"):
            answer = call(base, token, "POST", f"/v1/queue/messages/{qid}/{action}")
            done = answer.get("held", answer.get("released"))
            out.write(f"{answer['queue_id']}: {action}" + ("" if done else " (was not held)")
                      + "\n")
        elif action == "delete":
            if not args.yes:
                reply = confirm(f"delete {args.queue_id} from the queue for good? [y/N] ")
                if reply.strip().lower() not in ("y", "yes"):
                    out.write("not deleted\n")
                    return 1
            answer = call(base, token, "DELETE", f"/v1/queue/messages/{qid}")
            out.write(f"{answer['queue_id']}: deleted "
                      f"({answer['recipients_dropped']} pending recipients dropped)\n")
    except QueueCtlError as exc:
        print(str(exc), file=sys.stderr)
        return exc.code
    except EOFError:
        out.write("not deleted\n")
        return 1
    return 0
