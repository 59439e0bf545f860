"""How `reconcile --plan` scales: 10,000 and 100,000 mailboxes; and how fast --watch reacts.

Why: the plan runs on every CI push and on every watch pass; an admin team with 100,000
mailboxes must get it in seconds, and its cost must grow linearly (a quadratic corner
would surface only in production). So this generates, for each size N:

- a spec set on disk: two maildir systems, fed, a window, a policy, and N mailboxes in
  placements of 10,000 (one file each), three quarters placed on s2, the rest on s1;
- a SQLite state store with migrations in assorted states (0, 1, 4, 6, 8, 10, 13, one in
  fifty failed) for most of the s2 mailboxes;
- fed's directory: every address at its physical address on s1 or s2.

and measures, each in a fresh process (so peak RSS is that size's own):

1. **plan path** (in-process): load and validate the specs, read the state store, make the
   pure plan against a directory snapshot, render it as JSON Lines; time of each phase and
   peak RSS. Run for 10,000 and 100,000.
2. **the real CLI end to end**: `reconcile --plan --json` as a subprocess against a real fed
   (started from the specs, its directory filled by an up-sync) for 10,000 mailboxes (and
   100,000 with `--full`): wall time and the child's peak RSS.
3. **watch reaction**: a `reconcile --watch` subprocess on a small spec set; the time from
   saving an edited spec file to the first step recorded in the state store (3 saves).
4. with `--postgres`: the same state store on SQLite and on a private PostgreSQL
   (`tests/pgutil.py`): the plan's read of every migration, the pure plan, and the store's
   part of an apply (2,000 steps, each a transition and its event in one transaction).
5. with `--postgres` (or alone with `--wave N`): a wave of N mailboxes about to start (all
   on s1 in fed's directory, placed on s2, an empty state store), on SQLite and on the
   private PostgreSQL in turn, `--runs` times each (3), with fed and both systems running:
   the real `reconcile --plan --json` (wall and the process's CPU), then the first pass of
   the apply in a new process -- the engine `--apply` builds, one `apply_pass`: the plan,
   then E1 for every mailbox (fed asked for its physical address, the source system for its
   account, the migration row and its event committed in one transaction each); checked
   afterwards: N rows, N E1 events. A whole move of 100,000 mailboxes (E2 creates each new
   mailbox on s2, about 50 ms a mailbox here, then the hold, flip and copies) is hours on
   these two cores: not a bench run.

Usage: `python bench/plan_scale.py [--sizes 10000,100000] [--full] [--keep DIR] [--postgres]
[--runs 3]` or `python bench/plan_scale.py --wave 100000 [--runs 3]` (phase 5 alone).
The last line reads `plan 100000 mailboxes: X.XX s` (the plan path, phase 1).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

PER_FILE = 10_000
STATES = (0, 1, 4, 6, 8, 10, 13)


def _docs(root: Path) -> list[dict[str, Any]]:
    from world import base_documents, policy

    return [*base_documents(root), policy("bench", deleteSource={"after": "7d",
                                                                 "consent": True})]


def generate(root: Path, n: int, state_url: str | None = None, *, wave: bool = False
             ) -> tuple[Path, Path, dict[str, str]]:
    """(specs folder, state file, directory) for `n` mailboxes (the state store at
    `state_url` instead of the file, when given). `wave`: a wave about to start instead --
    every mailbox on s1 (fed's directory), placed on s2 by the specs, no migration yet."""
    from sqlalchemy import insert

    from reconciler.drivers.base import mailbox_id_for, physical_address
    from reconciler.spec.modes import Modes
    from reconciler.state.model import Migration
    from reconciler.state.store import open_store

    specs = root / "specs"
    specs.mkdir(parents=True)
    (specs / "base.yaml").write_text(yaml.safe_dump_all(_docs(root), sort_keys=False))
    addresses = [f"user{i:06d}@corp.example" for i in range(n)]
    on_s2 = set(addresses) if wave else {a for i, a in enumerate(addresses) if i % 4 != 0}
    for k in range(0, n, PER_FILE):
        chunk = addresses[k:k + PER_FILE]
        lines = [f"# placement {k // PER_FILE}", "apiVersion: mailferry/v1",
                 "kind: MailboxPlacement", f"metadata: {{name: wave-{k // PER_FILE}}}",
                 "spec:", f"  system: {'s2'}", "  window: always", "  policy: bench",
                 "  mailboxes:"]
        for a in chunk:
            if a in on_s2:
                lines.append(f"    - address: {a}")
                lines.append(f"      aliases: [{a.replace('user', 'u.')}]")
        (specs / f"wave-{k // PER_FILE:03d}.yaml").write_text("\n".join(lines) + "\n")
    home = [a for a in addresses if a not in on_s2]
    if home:
        (specs / "home.yaml").write_text("\n".join(
            ["apiVersion: mailferry/v1", "kind: MailboxPlacement", "metadata: {name: home}",
             "spec:", "  system: s1", "  mailboxes:"] + [f"    - address: {a}" for a in home])
            + "\n")

    state = root / "state.db"
    modes = Modes(policy="bench", delete_source_after=timedelta(days=7),
                  retention=timedelta(days=30))
    store = open_store(state_url or f"sqlite:///{state}")
    now = datetime.now(UTC)
    rows = []
    directory: dict[str, str] = {}
    for i, a in enumerate(addresses):
        box = mailbox_id_for(a)
        # some s2 mailboxes have no migration yet (a wave: none has)
        migrated = not wave and a in on_s2 and i % 8 != 1
        st = STATES[i % len(STATES)] if migrated else None
        system = "s2" if st is not None and st >= 6 else "s1"
        directory[a] = physical_address(system, box)
        if st is None:
            continue
        rows.append({
            "address": a, "aliases": [], "source_system": "s1", "target_system": "s2",
            "source_mailbox": box, "target_mailbox": box, "placement": f"wave-{i // PER_FILE}",
            "window": "always", "modes": modes,
            "station": None, "state": st, "state_since": now - timedelta(hours=i % 200),
            "failed_reason": "bench failure" if i % 50 == 3 else None,
            "attempts": 0, "suspended": False, "purged": False, "created_at": now,
        })
    with store.engine.begin() as conn:
        for k in range(0, len(rows), 5000):
            conn.execute(insert(Migration), rows[k:k + 5000])
    store.close()
    return specs, state, directory


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plan_path(n: int, keep: Path | None) -> dict[str, Any]:
    """Phase 1 in this process: generate, then time load / read state / plan / render."""
    from reconciler.engine import read_migrations
    from reconciler.output import plan_jsonl
    from reconciler.plan import make_plan
    from reconciler.spec.loader import load_specs
    from reconciler.state.store import open_store

    root = keep / f"n{n}" if keep else Path(tempfile.mkdtemp(prefix=f"mf-bench-{n}-"))
    specs_dir, state, directory = generate(root, n)
    rss_before = _rss_mb()
    cpu0 = time.process_time()  # on a shared machine wall time also counts others' load
    t0 = time.perf_counter()
    specs = load_specs(specs_dir, long_lived=True)  # as the CLI loads them
    desired = specs.desired()
    t1 = time.perf_counter()
    store = open_store(f"sqlite:///{state}")
    migrations = read_migrations(store)
    t2 = time.perf_counter()
    plan = make_plan(desired, migrations, directory, datetime.now(UTC))
    t3 = time.perf_counter()
    lines = plan_jsonl(plan, commit=specs.commit)
    t4 = time.perf_counter()
    cpu = time.process_time() - cpu0
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return {"n": n, "load_s": t1 - t0, "state_s": t2 - t1, "plan_s": t3 - t2,
            "render_s": t4 - t3, "total_s": t4 - t0, "cpu_s": cpu, "lines": len(lines),
            "pending": plan.counts()["due now"], "rss_mb": _rss_mb(),
            "rss_before_mb": rss_before}


def upsync_generated(specs: Any, directory: dict[str, str]) -> None:
    """Tell the running fed where `generate`'s mailboxes live (s1 and s2)."""
    from reconciler.fedclient import FedClient
    from reconciler.secrets import resolve

    fed = FedClient(specs.fed.control_url, resolve(specs.fed.token, what="fed token"),
                    timeout=900)  # 100,000 addresses at load 20: more than 120 s
    for system in ("s1", "s2"):
        fed.upsync(system, {p: [a] for a, p in directory.items()
                            if p.endswith(f"@{system}.invalid")})


def cli_end_to_end(n: int, keep: Path | None) -> dict[str, Any]:
    """Phase 2: `reconcile --plan --json` against a real fed holding the directory."""
    from reconciler.embedded import start_embedded
    from reconciler.spec.loader import load_specs

    root = keep / f"cli{n}" if keep else Path(tempfile.mkdtemp(prefix=f"mf-cli-{n}-"))
    specs_dir, state, directory = generate(root, n)
    specs = load_specs(specs_dir)
    with start_embedded(specs, log_dir=root / "logs"):
        upsync_generated(specs, directory)
        began = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "--specs", str(specs_dir), "--state",
             str(state), "--plan", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=root)
        out, err = proc.communicate(timeout=600)
        wall = time.perf_counter() - began
        # The reconcile process is this process's only reaped child (fed and the systems
        # still run): RUSAGE_CHILDREN's peak is its own.
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if proc.returncode not in (0, 2):
            raise SystemExit(f"reconcile --plan failed: {err.decode()[-2000:]}")
        summary = json.loads(out.decode().splitlines()[-1])
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return {"n": n, "wall_s": wall, "children_rss_mb": rss, "mailboxes": summary["mailboxes"]}


def watch_reaction(saves: int = 3) -> list[float]:
    """Phase 3: seconds from saving a spec edit to the first step recorded (E1)."""
    from sqlalchemy import func, select

    from reconciler.embedded import start_embedded
    from reconciler.spec.loader import load_specs
    from reconciler.state.model import Event
    from reconciler.state.store import open_store

    from world import base_documents, placement, policy

    root = Path(tempfile.mkdtemp(prefix="mf-watch-"))
    specs_dir = root / "specs"
    specs_dir.mkdir()
    base = base_documents(root)
    keep = policy("keep", deleteSource="never")
    boxes = [{"address": f"w{i}@corp.example"} for i in range(saves)]
    (specs_dir / "base.yaml").write_text(yaml.safe_dump_all([*base, keep], sort_keys=False))
    wanted = specs_dir / "wanted.yaml"
    wanted.write_text(yaml.safe_dump(placement("home", "s1", boxes)))
    state = root / "state.db"
    times: list[float] = []
    with start_embedded(load_specs(specs_dir), log_dir=root / "logs"):
        log = (root / "watch.log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", "reconciler", "--specs", str(specs_dir),
                                 "--state", str(state), "--watch", "--interval", "60"],
                                cwd=root, stdout=log, stderr=subprocess.STDOUT)
        try:
            store = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # wait for the three creations
                if state.exists():
                    store = store or open_store(f"sqlite:///{state}")
                    with store.session() as s:
                        if s.scalar(select(func.count()).where(Event.step == "create")) == saves:
                            break
                time.sleep(0.1)
            assert store is not None
            for i in range(saves):
                time.sleep(1.0)
                moved = [placement("home", "s1", boxes[i + 1:]),
                         placement("wave", "s2", boxes[:i + 1], policy_name="keep")]
                with store.session() as s:
                    before = s.scalar(select(func.count()).where(Event.step == "E1")) or 0
                wanted.write_text(yaml.safe_dump_all(moved, sort_keys=False))
                saved = time.perf_counter()
                while time.perf_counter() - saved < 30:
                    with store.session() as s:
                        if (s.scalar(select(func.count()).where(Event.step == "E1")) or 0) \
                                > before:
                            times.append(time.perf_counter() - saved)
                            break
                    time.sleep(0.005)
        finally:
            proc.terminate()
            proc.wait(30)
    shutil.rmtree(root, ignore_errors=True)
    return times


APPLY_STEPS = 2000  # transitions recorded one transaction each, as the engine records steps


def state_store_figures(url: str, n: int, directory: dict[str, str], desired: Any
                        ) -> dict[str, float]:
    """On the store at `url` (holding `generate`'s rows): the plan's read of every migration
    and the pure plan, then the store's part of an apply: `APPLY_STEPS` steps, each its
    migration's transition and event in their own transaction, as `Engine._run_change`
    commits them (the mail systems and fed are not part of it)."""
    from sqlalchemy import select

    from reconciler.engine import read_migrations
    from reconciler.plan import make_plan
    from reconciler.state.model import Migration
    from reconciler.state.store import open_store, record_transition

    store = open_store(url)
    t0 = time.perf_counter()
    migrations = read_migrations(store)
    t1 = time.perf_counter()
    make_plan(desired, migrations, directory, datetime.now(UTC))
    t2 = time.perf_counter()
    with store.session() as session:
        ids = list(session.scalars(select(Migration.id).where(Migration.state == 0)
                                   .order_by(Migration.id).limit(APPLY_STEPS)))
    t3 = time.perf_counter()
    for mid in ids:
        with store.session() as session:
            m = session.get(Migration, mid)
            assert m is not None
            record_transition(session, m, "E2", 1, detail={"bench": True})
    t4 = time.perf_counter()
    store.close()
    return {"read_s": t1 - t0, "plan_s": t2 - t1, "steps": len(ids),
            "step_ms": (t4 - t3) / max(1, len(ids)) * 1000, "rows": len(migrations)}


def postgres_vs_sqlite(n: int) -> dict[str, Any]:
    """Phase 4: the same state on SQLite and on a private PostgreSQL (tests/pgutil.py)."""
    from reconciler.spec.loader import load_specs

    from pgutil import PrivatePostgres

    root = Path(tempfile.mkdtemp(prefix=f"mf-pg-{n}-"))
    pg = PrivatePostgres().start()
    try:
        result: dict[str, Any] = {"n": n}
        for name, url in (("sqlite", None), ("postgresql", pg.url)):
            here = root / name
            specs_dir, state, directory = generate(here, n, url)
            desired = load_specs(specs_dir).desired()
            result[name] = state_store_figures(url or f"sqlite:///{state}", n, directory,
                                               desired)
        return result
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


def _timed(argv: list[str], cwd: Path) -> tuple[float, float, str]:
    """Run `argv` to its end: (wall s, its own CPU s, its stdout); SystemExit when it fails."""
    def children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    before = children_cpu()  # fed and the systems still run: the one child reaped is argv
    began = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    out, err = proc.communicate(timeout=3600)
    wall = time.perf_counter() - began
    if proc.returncode not in (0, 2):
        raise SystemExit(f"{argv[2:5]} failed ({proc.returncode}): {err.decode()[-3000:]}")
    return wall, children_cpu() - before, out.decode()


def apply_first_pass(specs_dir: str, url: str) -> dict[str, Any]:
    """`--apply-pass` child: the engine `reconcile --apply` builds, its first pass over the
    wave (every mailbox's E1: its plan, the source system asked for the account, the
    migration row and its event committed together, one transaction a mailbox), then what
    the store holds."""
    from sqlalchemy import func, select

    from reconciler.cli import build_engine
    from reconciler.engine import ApplyReport
    from reconciler.spec.loader import load_specs
    from reconciler.state.model import Event, Migration

    cpu0, t0 = time.process_time(), time.perf_counter()
    engine = build_engine(load_specs(specs_dir, long_lived=True), url)
    engine.register_systems()
    cpu1, t1 = time.process_time(), time.perf_counter()
    report = ApplyReport(passes=1)
    engine.apply_pass(report)
    cpu2, t2 = time.process_time(), time.perf_counter()
    with engine.store.session() as session:
        rows = session.scalar(select(func.count()).select_from(Migration))
        events = session.scalar(select(func.count()).where(Event.step == "E1"))
    engine.store.close()
    return {"start_s": t1 - t0, "start_cpu_s": cpu1 - cpu0, "pass_s": t2 - t1,
            "pass_cpu_s": cpu2 - cpu1, "ok": report.applied, "errors": len(report.errors),
            "first_error": report.errors[0].message if report.errors else "",
            "rows": rows, "events": events}


def wave_on_both(n: int, runs: int, done: Callable[[str, int, dict[str, Any]], None],
                 stores: tuple[str, ...] = ("sqlite", "postgresql")
                 ) -> dict[str, list[dict[str, Any]]]:
    """Phase 5: a fresh wave of `n` mailboxes (all on s1, placed on s2), its real `reconcile
    --plan --json` and the first pass of its apply (`apply_first_pass`), on SQLite and on
    a private PostgreSQL (tests/pgutil.py, fsync off as in the tests), alternating, each
    run on a new, empty store, with fed and both systems running (directory up-synced)."""
    from reconciler.embedded import start_embedded
    from reconciler.spec.loader import load_specs

    from pgutil import PrivatePostgres, pg_bindir

    pg = PrivatePostgres().start()
    found: dict[str, list[dict[str, Any]]] = {"sqlite": [], "postgresql": []}
    try:
        for run in range(runs):
            for name in stores:
                root = Path(tempfile.mkdtemp(prefix=f"mf-wave-{name}-"))
                if name == "sqlite":
                    url = f"sqlite:///{root / 'state.db'}"
                else:
                    subprocess.run([str(pg_bindir() / "createdb"), "-h", "127.0.0.1", "-p",
                                    str(pg.port), "-U", "postgres", f"wave{run}"], check=True,
                                   capture_output=True, timeout=60)
                    url = pg.url.rsplit("/", 1)[0] + f"/wave{run}"
                specs_dir, _, directory = generate(root, n, url, wave=True)
                specs = load_specs(specs_dir)
                with start_embedded(specs, log_dir=root / "logs"):
                    upsync_generated(specs, directory)
                    load = os.getloadavg()[0]
                    wall, cpu, out = _timed([sys.executable, "-m", "reconciler", "--specs",
                                             str(specs_dir), "--state", url, "--plan",
                                             "--json"], root)
                    summary = json.loads(out.splitlines()[-1])
                    if (summary["mailboxes"], summary["due_now"]) != (n, n):
                        raise SystemExit(f"unexpected plan of the wave: {summary['text']}")
                    a_wall, a_cpu, a_out = _timed([sys.executable, __file__, "--apply-pass",
                                                   str(specs_dir), url], root)
                    applied = json.loads(a_out.strip().splitlines()[-1])
                if (applied["ok"], applied["rows"], applied["events"]) != (n, n, n):
                    raise SystemExit(f"the first pass did not record every E1: {applied}")
                found[name].append({"plan_s": wall, "plan_cpu_s": cpu, "apply_s": a_wall,
                                    "apply_cpu_s": a_cpu, "load": load, **applied})
                done(name, run, found[name][-1])
                shutil.rmtree(root, ignore_errors=True)
        return found
    finally:
        pg.stop()


def _child(args: list[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          timeout=1800, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def print_wave(n: int, runs: int, stores: tuple[str, ...] = ("sqlite", "postgresql")) -> None:
    """Phase 5's lines: every run of both stores, then the ratios."""
    print(f"\n5. a wave of {n} mailboxes (s1 -> s2, fresh store) on SQLite and PostgreSQL: "
          "reconcile --plan --json, then the apply's first pass (E1 for every mailbox: a "
          "transaction each)")

    def done(name: str, i: int, r: dict[str, Any]) -> None:  # as each run ends: a long one
        print(f"  run {i + 1} {name:>10} (load {r['load']:.1f}): --plan {r['plan_s']:.2f} s "
              f"(CPU {r['plan_cpu_s']:.2f} s); first apply pass {r['pass_s']:.1f} s "
              f"= {r['pass_s'] / n * 1000:.2f} ms a mailbox (CPU {r['pass_cpu_s']:.1f} s), "
              f"process {r['apply_s']:.1f} s; {r['ok']} E1 recorded", flush=True)

    found = wave_on_both(n, runs, done, stores)
    if len(stores) < 2:
        return
    for key, label in (("plan_s", "--plan"), ("pass_s", "first apply pass")):
        ratios = [p[key] / s[key] for p, s in zip(found["postgresql"], found["sqlite"],
                                                  strict=True)]
        print(f"  postgresql / sqlite, {label}: " + ", ".join(f"x{r:.2f}" for r in ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--full", action="store_true", help="also the CLI at every size")
    parser.add_argument("--keep", default=None, help="keep generated data in this folder")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cli", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pg", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--postgres", action="store_true",
                        help="also phases 4 and 5: the state store on PostgreSQL next to "
                             "SQLite, and a wave's real --plan and first --apply pass on both")
    parser.add_argument("--wave", type=int, default=0, metavar="N",
                        help="phase 5 only: a wave of N mailboxes (--runs times each store)")
    parser.add_argument("--runs", type=int, default=3, help="phase 5: runs per store")
    parser.add_argument("--stores", default="sqlite,postgresql",
                        help="phase 5: which state stores (comma-separated)")
    parser.add_argument("--apply-pass", nargs=2, metavar=("SPECS", "URL"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    keep = Path(args.keep) if args.keep else None
    if args.one:
        print(json.dumps(plan_path(args.one, keep)))
        return
    if args.cli:
        print(json.dumps(cli_end_to_end(args.cli, keep)))
        return
    if args.pg:
        print(json.dumps(postgres_vs_sqlite(args.pg)))
        return
    if args.apply_pass:
        print(json.dumps(apply_first_pass(*args.apply_pass)))
        return
    if args.wave:
        print_wave(args.wave, args.runs, tuple(args.stores.split(",")))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    extra = ["--keep", str(keep)] if keep else []
    print(f"mailferry plan benchmark, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print("\n1. plan path (load + validate specs, read state store, pure plan, JSON Lines)")
    results = []
    for n in sizes:
        r = _child(["--one", str(n), *extra])
        results.append(r)
        print(f"  {n:>7} mailboxes: load {r['load_s']:.2f} s, state {r['state_s']:.2f} s, "
              f"plan {r['plan_s']:.2f} s, render {r['render_s']:.2f} s = {r['total_s']:.2f} s "
              f"(CPU {r['cpu_s']:.2f} s, load {os.getloadavg()[0]:.1f}); "
              f"peak RSS {r['rss_mb']:.0f} MB")
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(f"  growth x{b['n'] / a['n']:.0f} mailboxes: time x{b['total_s'] / a['total_s']:.1f}"
              f", peak RSS x{b['rss_mb'] / a['rss_mb']:.1f} "
              f"({(b['rss_mb'] - a['rss_mb']) / (b['n'] - a['n']) * 1024:.1f} kB per mailbox)")
    print("\n2. reconcile --plan --json end to end (real fed, directory filled by up-sync)")
    for n in (sizes if args.full else sizes[:1]):
        r = _child(["--cli", str(n), *extra])
        print(f"  {n:>7} mailboxes: {r['wall_s']:.2f} s wall, peak RSS of the children "
              f"{r['children_rss_mb']:.0f} MB, {r['mailboxes']} lines")
    print("\n3. watch reaction: spec file saved -> first step (E1) recorded")
    times = watch_reaction()
    print("  " + ", ".join(f"{t:.2f} s" for t in times)
          + (f"; max {max(times):.2f} s" if times else " (no reaction!)"))
    if args.postgres:
        print("\n4. the state store on PostgreSQL next to SQLite (private server, fsync off as"
              " in the tests)")
        n = sizes[-1]
        r = _child(["--pg", str(n)])
        for name in ("sqlite", "postgresql"):
            f = r[name]
            print(f"  {name:>10}, {f['rows']} migrations: plan's read {f['read_s']:.2f} s, "
                  f"pure plan {f['plan_s']:.2f} s; apply's store part {f['step_ms']:.2f} ms "
                  f"per step ({f['steps']} steps, a transaction each: "
                  f"{f['step_ms'] * n / 1000:.0f} s for one step of all {n})")
        pg, lite = r["postgresql"], r["sqlite"]
        print(f"  postgresql / sqlite: read x{pg['read_s'] / lite['read_s']:.2f}, "
              f"step x{pg['step_ms'] / lite['step_ms']:.2f}")
        print_wave(n, args.runs)
    last = next((r for r in results if r["n"] == 100_000), results[-1])
    print(f"plan {last['n']} mailboxes: {last['total_s']:.2f} s")


if __name__ == "__main__":
    main()
