"""``fed queue``: postqueue/postsuper for fed, over the control API.

An admin on call knows ``postqueue -p``, ``postqueue -f``, ``postsuper -h/-H/-d``; this
is the same vocabulary for fed (``list``, ``flush``, ``hold``, ``release``, ``delete``, plus
``show`` for one message, and ``quarantine`` / ``requeue`` for the files fed set aside as
unreadable or corrupt, like Mailman's ``bad`` queue), so it works from any host that
reaches the control API and never touches fed's files behind its back. The token comes
from ``--token-file`` or ``--token-env``, as for ``fed serve``; ``delete`` asks for
confirmation unless ``--yes``.

Exit codes: 0 done, 1 fed refused (unknown queue id, bad token, ...), 2 fed unreachable or
bad usage (also: a live node could not be reached; what the others answered is shown).

**Every node.** Each node's queue is its own (its spool is on its disk), so with
``fed serve --processes N`` or several nodes on one shared database the command works on
all of them, wherever it is pointed: it asks that node for ``GET /v1/nodes`` (the shared
``nodes`` table), where every node records the ``HOST:PORT`` its control API is bound to,
and calls each *live* node itself, with the same token (the nodes of a group share it).
``list`` and ``quarantine`` merge the nodes' answers, oldest first, each message labelled
with its node; ``flush`` flushes every node; ``show``, ``hold``, ``release``, ``delete``
and ``requeue`` try the nodes in turn
(the one pointed at first) until one has the queue id (ids are unique; the others answer
404 and change nothing). ``--this-node`` keeps to the node pointed at.

Why fan out in the client rather than a ``?all=1`` route that one node proxies: nothing
new is served (no node calls another, no forwarding of tokens or of deletes), an answer
names the node it came from, and one slow or dead node only costs its own timeout.
Guards: a node's answer must carry the node name its row has (``"node"``), or it is
skipped with a warning (a ``127.0.0.1`` endpoint recorded by a node on another machine
reaches this machine's node of that port); an endpoint bound to a wildcard address
(``0.0.0.0``, ``::``) is reached at the host the command was pointed at. If ``/v1/nodes``
fails (shared database down), the command keeps to the node pointed at, with a warning.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from mailferry.mail.http import HttpClient, HttpError


class QueueCtlError(Exception):
    """fed answered with an error (exit 1) or could not be reached (exit 2)."""

    def __init__(self, message: str, code: int, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status  # the HTTP status fed answered, if it answered


@dataclass(frozen=True)
class Node:
    """A node to call: its name ("" if unknown) and its control API's base URL ("" if the
    node has not recorded one)."""

    name: str
    base: str


def call(base: str, token: str, method: str, path: str, timeout: float = 30.0) -> Any:
    """One control API request; the decoded JSON answer."""
    client = HttpClient(base, name="fed", timeout=timeout)
    try:
        answer = client.request(method, path, b"" if method == "POST" else None,
                                headers={"Authorization": f"Bearer {token}"})
    except HttpError as exc:
        raise QueueCtlError(f"fed: cannot reach {base}: {exc}", 2) from exc
    finally:
        client.close()
    if answer.status >= 400:
        try:
            reason = json.loads(answer.body).get("error", answer.reason)
        except (ValueError, AttributeError):
            reason = answer.reason
        raise QueueCtlError(f"fed: {answer.status} {reason}", 1, answer.status)
    return answer.json()


def _rcpt_line(r: dict[str, Any]) -> str:
    state = r["status"]
    if r.get("in_flight"):
        state += ", being delivered now"
    if r.get("held"):
        state += ", address held"
    if r.get("attempts"):
        state += f", {r['attempts']} attempts"
    line = f"        {r['rcpt']}  -> {r['destination']}  ({state})"
    if r.get("last_error"):
        line += f"\n          {r['last_error']}"
    return line


def print_list(messages: list[dict[str, Any]], out: TextIO) -> None:
    """postqueue -p style: one block per message, '!' marks an admin hold; the node that
    holds it in brackets after the sender."""
    out.write(f"{'-Queue ID-':<22} {'-Size-':>9} {'-Age-':>9}  -Sender/Recipient- [node]\n")
    for m in messages:
        mark = "!" if m["admin_hold"] else " "
        age = f"{m['age_seconds']:.0f}s"
        node = f"  [{m['node']}]" if m.get("node") else ""
        out.write(f"{m['queue_id']}{mark} {m['size']:>9} {age:>9}  {m['from'] or '<>'}"
                  f"{node}\n")
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
    if m.get("node"):
        out.write(f"node:        {m['node']}\n")
    out.write(f"received:    {m['received_at']} ({m['age_seconds']:.0f}s ago)\n")
    out.write(f"sender:      <{m['from']}>\nsize:        {m['size']}\n")
    out.write(f"message-id:  {m['message_id']}\n")
    out.write(f"admin hold:  {m['admin_hold'] or 'no'}\n")
    flying = "yes (a delivery attempt is running now)" if m.get("in_flight") else "no"
    out.write(f"in flight:   {flying}\n")
    out.write("recipients:\n")
    for r in m["recipients"]:
        out.write(_rcpt_line(r) + "\n")
    out.write("\n" + m.get("headers", "").replace("\r\n", "\n") + "\n")


def print_quarantine(messages: list[dict[str, Any]], out: TextIO) -> None:
    """One line per quarantined message: id, when, where it was found, why; then its file."""
    for m in messages:
        node = f"  [{m['node']}]" if m.get("node") else ""
        rcpts = m.get("rcpts")
        out.write(f"{m['queue_id']}  {m.get('at') or '?'}  ({m.get('where') or '?'}){node}\n"
                  f"        {m['reason']}\n        file: {m['path']}\n")
        if rcpts:
            out.write(f"        pending: {', '.join(rcpts)}\n")
    out.write(f"-- {len(messages)} messages in quarantine.\n" if messages
              else "Quarantine is empty\n")


def _base(endpoint: str, asked_host: str) -> str:
    """The base URL of a recorded HOST:PORT; a wildcard host is the host we asked."""
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = asked_host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def nodes(base: str, host: str, token: str, err: TextIO) -> list[Node]:
    """The live nodes to call, the one asked first; only it if /v1/nodes cannot say."""
    try:
        answer = call(base, token, "GET", "/v1/nodes")
    except QueueCtlError as exc:
        if exc.status is None or exc.status < 500:
            raise  # unreachable, bad token: as for any call
        print(f"{exc}; the list of nodes is unavailable: this node only", file=err)
        return [Node("", base)]
    me = str(answer.get("self", ""))
    found = [Node(me, base)]
    for row in answer.get("nodes", []):
        if row["name"] == me or not row.get("alive"):
            continue
        control = row.get("control")
        found.append(Node(str(row["name"]), _base(str(control), host) if control else ""))
    return found


def _ask(node: Node, token: str, method: str, path: str) -> Any:
    """One call to one node; its answer must name that node."""
    if not node.base:
        raise QueueCtlError(f"fed: node {node.name} has not recorded its control endpoint "
                            "(starting, or a fed from before this version)", 2)
    answer = call(node.base, token, method, path)
    said = answer.get("node") if isinstance(answer, dict) else None
    if node.name and said is not None and said != node.name:
        raise QueueCtlError(f"fed: {node.base} answers as node {said!r}, not "
                            f"{node.name!r} (its recorded endpoint is not reachable from "
                            "here)", 2)
    return answer


def run(args: argparse.Namespace, token: str, out: TextIO = sys.stdout,
        confirm: Callable[[str], str] = input, err: TextIO = sys.stderr) -> int:
    """Execute one ``fed queue`` action on every live node; the exit code."""
    host = args.control[0]
    base = f"http://[{host}]:{args.control[1]}" if ":" in host \
        else f"http://{host}:{args.control[1]}"
    action = args.action
    qid = urllib.parse.quote(args.queue_id or "", safe="")
    unreachable = 0

    def each(method: str, path: str) -> list[Any]:
        nonlocal unreachable
        answers = []
        for node in targets:
            try:
                answers.append(_ask(node, token, method, path))
            except QueueCtlError as exc:
                if exc.code != 2:
                    raise
                print(f"{exc} (node {node.name or base})", file=err)
                unreachable += 1
        return answers

    def on_holder(method: str, path: str) -> Any:
        """The answer of the node that has the queue id (404 from all: not queued)."""
        nonlocal unreachable
        missing: QueueCtlError | None = None
        for node in targets:
            try:
                return _ask(node, token, method, path)
            except QueueCtlError as exc:
                if exc.status == 404:
                    missing = exc
                    continue
                if exc.code == 2:
                    print(f"{exc} (node {node.name or base})", file=err)
                    unreachable += 1
                    continue
                raise
        if unreachable:
            raise QueueCtlError(f"fed: {args.queue_id} not found on the nodes reached "
                                f"({unreachable} not reachable)", 2)
        assert missing is not None
        raise missing

    try:
        if action == "delete" and not args.yes:
            reply = confirm(f"delete {args.queue_id} from the queue for good? [y/N] ")
            if reply.strip().lower() not in ("y", "yes"):
                out.write("not deleted\n")
                return 1
        targets = [Node("", base)] if getattr(args, "this_node", False) \
            else nodes(base, host, token, err)
        if action == "list":
            messages = [m for answer in each("GET", "/v1/queue/messages")
                        for m in answer["messages"]]
            messages.sort(key=lambda m: (m["received_at"], m["queue_id"]))
            if args.json:
                out.write(json.dumps(messages, indent=2) + "\n")
            else:
                print_list(messages, out)
        elif action == "quarantine":
            held = [m for answer in each("GET", "/v1/queue/quarantine")
                    for m in answer["messages"]]
            held.sort(key=lambda m: (str(m.get("at") or ""), m["queue_id"]))
            if args.json:
                out.write(json.dumps(held, indent=2) + "\n")
            else:
                print_quarantine(held, out)
        elif action == "requeue":
            answer = on_holder("POST", f"/v1/queue/quarantine/{qid}/requeue")
            out.write(f"{answer['queue_id']}: requeued for {answer['recipients']} recipients"
                      + _on(answer) + "\n")
        elif action == "show":
            message = on_holder("GET", f"/v1/queue/messages/{qid}")
            if args.json:
                out.write(json.dumps(message, indent=2) + "\n")
            else:
                print_show(message, out)
        elif action == "flush":
            answers = each("POST", "/v1/queue/flush")
            flushed = sum(int(a["flushed"]) for a in answers)
            out.write(f"flushed: {flushed} recipients due now"
                      + (f" ({len(answers)} nodes)" if len(answers) > 1 else "") + "\n")
        elif action in ("hold", "release"):
            answer = on_holder("POST", f"/v1/queue/messages/{qid}/{action}")
            done = answer.get("held", answer.get("released"))
            out.write(f"{answer['queue_id']}: {action}" + ("" if done else " (was not held)")
                      + _on(answer) + "\n")
        elif action == "delete":
            answer = on_holder("DELETE", f"/v1/queue/messages/{qid}")
            out.write(f"{answer['queue_id']}: deleted "
                      f"({answer['recipients_dropped']} pending recipients dropped)"
                      + _on(answer) + "\n")
    except QueueCtlError as exc:
        print(str(exc), file=err)
        return exc.code
    except EOFError:
        out.write("not deleted\n")
        return 1
    return 2 if unreachable else 0


def _on(answer: dict[str, Any]) -> str:
    return f" on node {answer['node']}" if answer.get("node") else ""
