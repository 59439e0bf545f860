"""Delivery into a hosted target: fed next to Postfix, both relaying to the same provider
stand-in over STARTTLS with SMTP AUTH.

Why: a hosted target (Microsoft 365, Google) takes fed's deliveries only over TLS and often
only from an authenticated client; that is a TLS handshake and an AUTH per connection on top
of an ordinary relay. The peer is what an admin would otherwise put there: a Postfix relay
with `relayhost` = the provider, `smtp_tls_security_level = encrypt` and
`smtp_sasl_auth_enable`. Both get the same messages from the same clients (one SMTP session
per client, C clients at once) and relay them to the same `tests/hosted.py` provider
(Postfix + Dovecot, TLS on every hop, AUTH required); the time is from the first message
sent to the last one the provider's Postfix handed to its Dovecot (its maillog's `status=sent`
lines to the LMTP port). fed verifies the provider's certificate (mailferry/mail/tls.py);
Postfix's `encrypt` does not (a little less work for the peer).

    sudo .venv/bin/python bench/hosted_delivery.py [--messages 400] [--clients "1 10"]
         [--runs 3] [--mailboxes 20]

The last line is

    hosted delivery: fed A msg/s, postfix B msg/s at C clients (ratio A/B), ...

Needs root and the Debian packages of the tests (./bootstrap.sh test installs them).
"""

from __future__ import annotations

import argparse
import shutil
import smtplib
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import mail
from hosted import HostedHost
from pfdovecot import MailHost, make_root
from pfworld import PfWorld
from world import placement, policy

RELAY_CF = """\
# the peer: a Postfix relay to the provider (bench/hosted_delivery.py)
relay_domains = corp.example
relayhost = [127.0.0.1]:{port}
smtp_tls_security_level = encrypt
smtp_tls_CAfile = {ca}
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = texthash:{root}/sasl_passwd
smtp_sasl_security_options = noanonymous
smtp_sasl_tls_security_options = noanonymous
"""


def delivered(host: HostedHost) -> int:
    """Messages the provider's Postfix handed to its Dovecot so far."""
    needle = f"relay=127.0.0.1[127.0.0.1]:{host.lmtp_port}"
    return sum(1 for line in host.maillog().splitlines()
               if needle in line and "status=sent" in line)


def blast(port: int, rcpts: list[str], count: int, clients: int, tag: str) -> None:
    """`count` messages over `clients` sessions at once, to `rcpts` in turn."""
    errors: list[BaseException] = []
    body = "\r\n".join(["x" * 70] * 28)  # 2 KB in SMTP-sized lines

    def client(k: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                for n in range(k, count, clients):
                    rcpt = rcpts[n % len(rcpts)]
                    smtp.sendmail("x@outside.example", [rcpt], mail.message(
                        f"{tag} {n}", f"<{tag}.{n}@outside.example>", body, to=rcpt))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if errors:
        raise RuntimeError(f"{tag}: {errors[0]!r}")


def timed(host: HostedHost, port: int, rcpts: list[str], count: int, clients: int,
          tag: str) -> float:
    """Messages per second, first sent to last handed to the provider's Dovecot."""
    before = delivered(host)
    start = time.monotonic()
    blast(port, rcpts, count, clients, tag)
    deadline = time.monotonic() + 300
    while delivered(host) - before < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{tag}: only {delivered(host) - before} of {count} delivered")
        time.sleep(0.02)
    return count / (time.monotonic() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=400)
    p.add_argument("--clients", default="1 10")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--mailboxes", type=int, default=20)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mailferry-hosted-bench-"))
    world = PfWorld(root, hosts=lambda fed_port: {
        "hosted": HostedHost("hosted", make_root("mailferry-hosted-"), fed_port)})
    host = world.hosts["hosted"]
    assert isinstance(host, HostedHost)
    relay = MailHost("relay", make_root("mailferry-relay-"), world.fed_port)
    try:
        rcpts = [f"u{n:03}@corp.example" for n in range(args.mailboxes)]
        for rcpt in rcpts:
            host.provision(rcpt)
        specs = world.write(root / "specs", [policy("p", diary=False), placement(
            "hosted", "hosted", [{"address": a} for a in rcpts], policy_name="p")])
        engine = world.engine(specs, f"sqlite:///{root / 'state.db'}")
        report = engine.apply()
        if report.errors or engine.plan().pending:
            raise RuntimeError(f"setup: {report.errors}")
        relay.write_config()
        (relay.root / "sasl_passwd").write_text(
            f"[127.0.0.1]:{host.smtp_port} {host.smtp_user}:"
            f"{host.smtp_password_file.read_text().strip()}\n")
        with (relay.postfix_dir / "main.cf").open("a") as main_cf:
            main_cf.write(RELAY_CF.format(port=host.smtp_port, ca=host.ca, root=relay.root))
        relay.start_postfix()
        fed_port = engine.specs.fed.smtp.port
        for name, port in (("fed", fed_port), ("postfix", relay.smtp_port)):  # warm-up
            timed(host, port, rcpts, 20, 2, f"warm.{name}")
        figures: dict[int, dict[str, list[float]]] = {}
        for run in range(args.runs):
            for clients in (int(c) for c in args.clients.split()):
                order = [("fed", fed_port), ("postfix", relay.smtp_port)]
                for name, port in order if run % 2 == 0 else order[::-1]:
                    rate = timed(host, port, rcpts, args.messages, clients,
                                 f"r{run}.c{clients}.{name}")
                    figures.setdefault(clients, {}).setdefault(name, []).append(rate)
                    print(f"run {run + 1} clients {clients:>3} {name:<8} {rate:8.1f} msg/s",
                          flush=True)
        parts = []
        for clients, by in figures.items():
            fed = sorted(by["fed"])[len(by["fed"]) // 2]
            peer = sorted(by["postfix"])[len(by["postfix"]) // 2]
            ratios = " / ".join(f"{f / q:.2f}" for f, q in zip(by["fed"], by["postfix"],
                                                                  strict=True))
            parts.append(f"fed {fed:.0f} msg/s, postfix {peer:.0f} msg/s at {clients} "
                         f"clients (medians; ratio per run {ratios})")
        print("hosted delivery: " + "; ".join(parts))
        return 0
    finally:
        relay.stop()
        world.stop()
        shutil.rmtree(relay.root, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
