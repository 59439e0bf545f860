"""`reconcile`: the command admins and CI run.

    reconcile --plan  [--json] [--at TIME] [--out FILE]  dry run: exit 0 same, 2 pending, 1 error
    reconcile --apply [--json] [--allow-dirty]           everything due now, then exit: 0 done,
                                                         1 error, 2 a manual step waits
    reconcile --apply FILE                               exactly a saved plan, or "stale plan"
    reconcile --watch [--interval S] [--station-api H:P] apply continuously
    reconcile status [--placement P] [--system S] [--state N|failed|...]
    reconcile suspend PLACEMENT | resume PLACEMENT | retry ADDRESS
    reconcile events ADDRESS                             the event history of one address
    reconcile --apply --workers                          data steps queued for the workers
    reconcile worker [--concurrency N]                   take data steps from the queue
    reconcile prestage [--all] [--workers]               bulk copies before the cutover
    reconcile serve | demo | station enrol NAME --address ADDR
    reconcile web [--listen 127.0.0.1:8027]              the read-only status page
    reconcile init DIR [--systemd] [--force]             a new specs repository
    reconcile adopt [--check] SYSTEM                     take over an admin's Postfix + Dovecot
    reconcile import SYSTEM [--out FILE]                 MailboxPlacement specs of what it holds
    reconcile release SYSTEM [--force]                   remove what mailferry added to it
    reconcile completion bash|zsh|fish                   shell completion script

Every option is common (`--specs DIR`, `--state URL`); `docs/gitops.md` describes the
saved plans, the lease, the JSON Lines format, the guard rails and the watch loop.

The whole spec set is validated before anything else happens: a bad spec prints every
problem with its file and line and exits 1 without opening the state store or calling a
server (invariant 5).
"""

from __future__ import annotations

import getpass
import json
import signal
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import click
from click.shell_completion import get_completion_class
from sqlalchemy import select

from mailferry import __version__
from mailferry.mail.addresses import address_key
from mailferry.service import notify_ready, private_files
from reconciler import savedplan
from reconciler import status as levers
from reconciler.api.enrolment import write_station_kit
from reconciler.build import build_engine as build_engine  # re-exported: tests, bench
from reconciler.build import state_url
from reconciler.demo import run_demo
from reconciler.drivers.registry import make_drivers  # already loaded by build
from reconciler.embedded import start_embedded
from reconciler.errors import MailferryError, SpecError
from reconciler.lease import Lease, LeaseHeld, current_holder
from reconciler.liveprogress import for_output
from reconciler.output import plan_jsonl, print_plan
from reconciler.run import Applier, Output, dirty_refusal
from reconciler.scaffold import init_repo, install_commands
from reconciler.spec.gitinfo import describe
from reconciler.spec.loader import load_specs
from reconciler.spec.model import SpecSet
from reconciler.state.model import Event, utcnow
from reconciler.state.store import open_store
from reconciler.status import jobs_records, jobs_table, status_jobs, status_rows, table
from reconciler.watch import Watcher, WatchOptions

EXIT_OK, EXIT_ERROR, EXIT_PENDING = 0, 1, 2


def _load(specs_dir: str) -> SpecSet:
    return load_specs(specs_dir, long_lived=True)  # this process plans with them


def _parse_at(value: str | None) -> datetime | None:
    if value is None:
        return None
    when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_ERROR)


def _load_or_exit(specs_dir: str) -> SpecSet:
    """The spec set, or every problem printed and exit 1 (nothing opened, nothing applied)."""
    try:
        return _load(specs_dir)
    except SpecError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        click.echo(f"error: {len(exc.problems)} problem(s) in {specs_dir}; nothing applied",
                   err=True)
        sys.exit(EXIT_ERROR)


@click.group(invoke_without_command=True)
@click.version_option(__version__, "--version", prog_name="reconcile (mailferry)",
                      message="%(prog)s %(version)s")
@click.option("--specs", "specs_dir", default="specs", show_default=True,
              help="Folder of YAML specs.")
@click.option("--state", default=None, envvar="MAILFERRY_STATE",
              help="State store: SQLAlchemy URL or SQLite file (default ./var/state.db).")
@click.option("--plan", "do_plan", is_flag=True, help="Show what would change (dry run).")
@click.option("--out", "out_file", default=None, metavar="FILE",
              help="--plan: also save the plan to FILE, for --apply FILE.")
@click.option("--apply", "apply_file", is_flag=False, flag_value="", default=None,
              metavar="[FILE]",
              help="Run everything due now, then exit; with FILE, exactly that saved plan.")
@click.option("--watch", "do_watch", is_flag=True, help="Apply continuously.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines output for machines.")
@click.option("--at", "at", default=None, help="Plan as it will stand at this ISO time.")
@click.option("-v", "--verbose", is_flag=True, help="Also list mailboxes already in sync.")
@click.option("--allow-dirty", is_flag=True,
              help="Apply even though the specs have uncommitted changes.")
@click.option("--lease-timeout", default=60.0, show_default=True,
              help="--apply: seconds to wait for another reconciler's lease.")
@click.option("--lease-ttl", default=30.0, show_default=True,
              help="Seconds a lease lasts without renewal before another may take it over.")
@click.option("--reports", "reports_dir", default="var/reports", show_default=True,
              help="Folder for the wave reports of finished placements.")
@click.option("--interval", default=60.0, show_default=True,
              help="--watch: longest sleep when nothing is due.")
@click.option("--station-api", default=None, metavar="HOST:PORT",
              help="--watch: also serve the station API here (e.g. 127.0.0.1:8026).")
@click.option("--web", default=None, metavar="HOST:PORT",
              help="--watch: also serve the status page here (e.g. 127.0.0.1:8027).")
@click.option("--web-token-file", default=None, metavar="FILE",
              help="--web: the page's bearer token (needed beyond 127.0.0.1).")
@click.option("--workers", "use_workers", is_flag=True,
              help="--apply/--watch: queue the data steps for `reconcile worker` processes "
                   "(PostgreSQL state store).")
@click.pass_context
def main(ctx: click.Context, specs_dir: str, state: str | None, do_plan: bool,
         out_file: str | None, apply_file: str | None, do_watch: bool, as_json: bool,
         at: str | None, verbose: bool, allow_dirty: bool, lease_timeout: float,
         lease_ttl: float, reports_dir: str, interval: float, station_api: str | None,
         web: str | None, web_token_file: str | None, use_workers: bool) -> None:
    """mailferry's reconciler: move mailboxes as the specs say, losing nothing."""
    ctx.ensure_object(dict)
    ctx.obj.update(specs=specs_dir, state=state)
    if ctx.invoked_subcommand not in ("init", "completion"):
        # The state store, reports, the embedded systems' mail and logs: owner only. (`init`
        # writes a repository a team shares, with the user's own umask.)
        private_files()
    if ctx.invoked_subcommand is not None:
        return
    do_apply = apply_file is not None
    if sum((do_plan, do_apply, do_watch)) != 1 or (out_file and not do_plan):
        click.echo(ctx.get_help())
        sys.exit(EXIT_ERROR if (do_plan or do_apply or do_watch) else EXIT_OK)
    specs = _load_or_exit(specs_dir)
    try:
        if do_plan:
            engine = build_engine(specs, state, read_only=True)
            sys.exit(_plan(engine, specs, as_json=as_json, at=_parse_at(at), verbose=verbose,
                           out_file=out_file))
        refusal = dirty_refusal(specs, allow_dirty)
        if refusal:
            _fail(f"{refusal}; nothing applied")
        engine = build_engine(specs, state)
        if use_workers:  # imported here: the embedded default runs without procrastinate
            from reconciler.workers.queue import Queue

            engine.jobs = Queue(engine.store, notice=lambda line: click.echo(line, err=True),
                                max_wait=None if do_apply else 5.0)
        if do_apply:
            sys.exit(_apply(engine, as_json=as_json, saved=apply_file or None,
                            lease_timeout=lease_timeout, lease_ttl=lease_ttl,
                            reports_dir=reports_dir))
        options = WatchOptions(specs_dir=specs_dir, state_url=engine.store.url,
                               interval=interval, allow_dirty=allow_dirty,
                               reports_dir=reports_dir, lease_ttl=lease_ttl,
                               station_api=station_api, web=web,
                               web_token_file=web_token_file)
        sys.exit(Watcher(engine, options, Output(click.echo, as_json), build_engine).run())
    except MailferryError as exc:
        _fail(str(exc))


def _plan(engine, specs: SpecSet, *, as_json: bool, at: datetime | None,  # type: ignore[no-untyped-def]
          verbose: bool, out_file: str | None) -> int:
    observed = engine.observe(best_effort=True)  # a dry run: what fed says, if reachable
    plan = engine.plan(at, observed=observed, estimates=True)
    if as_json:
        lines = plan_jsonl(plan, commit=specs.commit, dirty=specs.dirty, digest=specs.digest)
        click.echo("\n".join(lines))
    else:
        commit = describe(specs.root, specs.commit)
        dirty = " (uncommitted changes)" if specs.dirty else ""
        header = (f"mailferry plan: specs {specs.root} @ {commit}{dirty}, "
                  f"at {plan.at:%Y-%m-%dT%H:%M:%SZ}\n")
        print_plan(plan, click.echo, color=sys.stdout.isatty(), verbose=verbose, header=header)
        for note in observed.unreached:  # stderr: stdout's last line stays the summary
            click.echo(f"note: {note}", err=True)
    if out_file and observed.unreached:
        _fail("the plan is not saved: a saved plan must be made from fed's directory too")
    if out_file:
        savedplan.save(out_file, plan, specs, observed.migrations, observed.directory,
                       observed.suspended)
        click.echo(f"plan saved to {out_file}: apply exactly this with "
                   f"reconcile --apply {out_file}", err=True)
    return EXIT_PENDING if plan.pending else EXIT_OK


def _apply(engine, *, as_json: bool, saved: str | None,  # type: ignore[no-untyped-def]
           lease_timeout: float, lease_ttl: float, reports_dir: str) -> int:
    out = Output(click.echo, as_json)
    lease = Lease(engine.store, ttl=lease_ttl)
    try:
        lease.acquire(timeout=lease_timeout, on_wait=lambda info: out.notice(
            f"waiting up to {lease_timeout:.0f} s for the lease held by "
            f"{info.describe(engine.clock())}"))
    except LeaseHeld as exc:
        _fail(f"{exc}; nothing applied (try again later, or raise --lease-timeout)")
    if lease.took_over is not None:
        out.notice(f"took over the stale lease of {lease.took_over.holder}")
    engine.should_stop = lease.lost.is_set
    engine.fed.fence = lease.fence  # fed refuses our calls once a newer holder called
    try:
        out.version("apply", engine)
        applier = Applier(out, reports_dir, bars=for_output(as_json))
        if saved is None:
            report, plan = applier.apply(engine)
        else:
            report, plan = _apply_saved(engine, applier, saved)
    finally:
        lease.release()
    if engine.lease_lost is not None:
        out.notice(f"error: stopped, the lease is lost: {engine.lease_lost}")
        return EXIT_ERROR
    if report.errors:
        return EXIT_ERROR
    # A manual step waits (a mailbox only its provider can create): nothing failed, but the
    # wave cannot finish until a person acts -- exit 2, as a plan with changes pending.
    return EXIT_PENDING if plan.counts()["manual"] else EXIT_OK


def _apply_saved(engine, applier: Applier, path: str):  # type: ignore[no-untyped-def]
    """`--apply FILE`: refuse a stale plan, else run exactly its due changes."""
    saved = savedplan.load(path)
    observed = engine.observe()
    plan = engine.plan(observed=observed)
    savedplan.check(saved, engine.specs, plan, observed.migrations, observed.directory,
                    observed.suspended)
    changes, skipped = savedplan.to_apply(saved, plan)
    for note in skipped:
        applier.out.notice(f"skipped: {note}")
    engine.on_record = applier.out.record
    report = engine.apply_changes(changes)
    after = engine.plan()
    applier.finish(engine, after, report)
    return report, after

@main.command()
@click.option("--web", default=None, metavar="HOST:PORT",
              help="Also serve the status page here (e.g. 127.0.0.1:8027).")
@click.option("--web-token-file", default=None, metavar="FILE",
              help="--web: the page's bearer token (needed beyond 127.0.0.1).")
@click.pass_context
def serve(ctx: click.Context, web: str | None, web_token_file: str | None) -> None:
    """Start the embedded default of the specs (fed and every maildir system) until Ctrl-C."""
    try:
        specs = _load(ctx.obj["specs"])
    except SpecError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        sys.exit(EXIT_ERROR)
    stop = False

    def terminate(*_args: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    with start_embedded(specs) as embedded:
        for server in embedded.servers:
            click.echo(f"{server.name}: pid {server.process.pid}: {server.ready_line}")
        page = _status_page(build_engine(specs, ctx.obj["state"], read_only=True), web,
                            web_token_file) if web else None
        click.echo("embedded default running; Ctrl-C stops it")
        notify_ready(f"{len(embedded.servers)} servers running")  # Type=notify
        while not stop and all(s.process.poll() is None for s in embedded.servers):
            time.sleep(0.5)
        if page is not None:
            page.stop()


def _status_page(engine, listen: str, token_file: str | None):  # type: ignore[no-untyped-def]
    """The status page for an engine (or a callable giving the current one), started (its
    URL said), or exit 1 with the reason."""
    from reconciler.web.server import status_page_for  # aiohttp, jinja2: +0.2 s to every start

    try:
        page = status_page_for(engine, listen, token_file=token_file).start()
    except (MailferryError, OSError) as exc:
        _fail(f"status page: {exc}")
    click.echo(f"status page on {page.url}", err=True)
    return page


@main.command()
@click.option("--listen", default="127.0.0.1:8027", show_default=True, metavar="HOST:PORT",
              help="Where to serve the page; beyond 127.0.0.1 only with --token-file.")
@click.option("--token-file", default=None, metavar="FILE",
              help="A bearer token (also the password of HTTP Basic) the page asks for.")
@click.pass_context
def web(ctx: click.Context, listen: str, token_file: str | None) -> None:
    """Serve the read-only status page (waves, mailboxes, fed, failures) until Ctrl-C."""
    from reconciler.web.server import FollowSpecs  # aiohttp, jinja2: +0.2 s to every start

    _load_or_exit(ctx.obj["specs"])
    try:
        follow = FollowSpecs(ctx.obj["specs"], lambda specs: build_engine(
            specs, ctx.obj["state"], read_only=True))
    except MailferryError as exc:
        _fail(str(exc))
    page = _status_page(follow, listen, token_file)
    stop = False

    def terminate(*_args: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    while not stop:
        time.sleep(0.2)
    page.stop()


@main.command()
@click.option("--workdir", default=None, help="Folder for the demo's files (default: temporary).")
@click.option("--mailboxes", default=20, show_default=True)
@click.option("--old-messages", default=8, show_default=True, help="Old messages per mailbox.")
@click.option("--rate", default=40.0, show_default=True, help="Messages/s sent during the run.")
def demo(workdir: str | None, mailboxes: int, old_messages: int, rate: float) -> None:
    """Migrate 20 mailboxes with mail flowing, then count every message."""
    try:
        ok = run_demo(workdir=workdir, mailboxes=mailboxes, old_messages=old_messages,
                      rate=rate, echo=click.echo)
    except MailferryError as exc:
        _fail(str(exc))
    sys.exit(EXIT_OK if ok else EXIT_ERROR)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--systemd", is_flag=True,
              help="Also write hardened systemd units for this folder into DIR/systemd/.")
@click.option("--force", is_flag=True,
              help="Replace files that differ (each old one is kept as FILE~ and named).")
def init(directory: Path, systemd: bool, force: bool) -> None:
    """Make DIR a specs repository: starter specs, schemas, CI, editor settings, git."""
    try:
        result = init_repo(directory, force=force, systemd=systemd)
    except MailferryError as exc:
        _fail(str(exc))
    for path in result.written:
        click.echo(f"  wrote     {path}")
    for replaced in result.replaced:
        click.echo(f"  REPLACED  {replaced}")
    if result.unchanged:
        click.echo(f"  unchanged {len(result.unchanged)} file(s) already as init writes them")
    if result.git_initialised:
        click.echo(f"  git init  {directory} (branch main, nothing committed yet)")
    click.echo(f"\nnext: cd {directory} && git add -A && git commit -m 'mailferry specs' "
               "&& reconcile --specs . --plan   (see its README.md)")
    if systemd:
        click.echo("\nto run the embedded default and the watch loop as services (as root):")
        for command in install_commands(directory.resolve()):
            click.echo(f"  {command}")


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print click's completion script: eval "$(reconcile completion bash)"."""
    cls = get_completion_class(shell)
    if cls is None:  # pragma: no cover - the choices are click's own shells
        _fail(f"no completion for {shell}")
        return
    click.echo(cls(main, {}, "reconcile", "_RECONCILE_COMPLETE").source())


@main.group()
def station() -> None:
    """Stations (user workstations running station-agent)."""


@station.command("enrol")
@click.argument("name")
@click.option("--address", required=True, help="The mailbox address the station acts for.")
@click.option("--out", "out_dir", default=None, metavar="DIR",
              help="Write DIR/station.token and a ready-to-use DIR/station-agent.toml "
                   "instead of printing the token.")
@click.option("--api", default="http://127.0.0.1:8026", show_default=True,
              help="--out: the station API URL the workstation reaches.")
@click.option("--client", type=click.Choice(["thunderbird", "json"]), default="thunderbird",
              show_default=True, help="--out: the workstation's mail client.")
@click.option("--move", is_flag=True,
              help="The address is enrolled for another station: move it here (that "
                   "station is unenrolled, its token stops working).")
@click.pass_context
def station_enrol(ctx: click.Context, name: str, address: str, out_dir: str | None, api: str,
                  client: str, move: bool) -> None:
    """Enrol a station; print its token, or write its token and agent configuration."""
    from reconciler.api.stations import enrol_station  # aiohttp: +0.15 s to every start

    store = open_store(state_url(ctx.obj["state"]))
    address = address_key(address)  # the form the specs and the state store hold
    try:
        token = enrol_station(store, name, address, move=move)
    except ValueError as exc:  # a taken address, a bad name: nothing was changed
        _fail(f"station enrol {name}: {exc}")
        return
    if out_dir is None:
        click.echo(token)
        return

    token_path, config_path = write_station_kit(Path(out_dir), api=api, station=name,
                                                address=address, token=token,
                                                client=client)
    click.echo(f"station {name} enrolled for {address}\n"
               f"  token:  {token_path} (mode 0600; the only copy)\n"
               f"  config: {config_path}\n"
               f"copy both to the workstation, then run: "
               f"station-agent run --config {config_path.name}")


@main.command()
@click.option("--all", "everything", is_flag=True,
              help="Also the migrations whose policy has no prestageCopy.")
@click.option("--workers", "use_workers", is_flag=True,
              help="Queue the copies for `reconcile worker` processes (PostgreSQL).")
@click.pass_context
def prestage(ctx: click.Context, everything: bool, use_workers: bool) -> None:
    """Copy the bulk of the mailboxes of migrations before their cutover (states 1-6)."""
    specs = _load_or_exit(ctx.obj["specs"])
    try:
        store = open_store(state_url(ctx.obj["state"]))
        if use_workers:
            from reconciler.workers.queue import Queue, prestage_on_workers

            queue = Queue(store, notice=lambda line: click.echo(line, err=True))
            failed = prestage_on_workers(queue, store, everything=everything, echo=click.echo)
            queue.close()
            sys.exit(EXIT_ERROR if failed else EXIT_OK)
        from reconciler.mover.prestage import prestage as prestage_here

        reports = prestage_here(store, make_drivers(specs), everything=everything)
        for r in reports:
            click.echo(f"{r.key}: {'prestaged' if r.verified else 'not verified'} "
                       f"({r.copied} copied, {r.present} present)")
        sys.exit(EXIT_OK if all(r.verified for r in reports) else EXIT_ERROR)
    except MailferryError as exc:
        _fail(str(exc))


@main.command()
@click.option("--concurrency", default=4, show_default=True,
              help="Data jobs this worker runs at once.")
@click.option("--heartbeat", default=10.0, show_default=True,
              help="Seconds between two heartbeats of this worker.")
@click.option("--stalled", default=30.0, show_default=True,
              help="Seconds without a heartbeat after which a worker's jobs go to another.")
@click.pass_context
def worker(ctx: click.Context, concurrency: int, heartbeat: float, stalled: float) -> None:
    """Run data steps (copies, verifications) queued by `reconcile --apply --workers`."""
    from reconciler.workers.worker import run_worker  # the extra `workers` (procrastinate)

    specs = _load_or_exit(ctx.obj["specs"])
    try:
        store = open_store(state_url(ctx.obj["state"]))
        click.echo(f"worker: taking data jobs from {store.engine.url.render_as_string()}",
                   err=True)
        notify_ready()
        sys.exit(run_worker(specs, store, concurrency=concurrency, heartbeat=heartbeat,
                            stalled=stalled))
    except MailferryError as exc:
        _fail(str(exc))


@main.command()
@click.argument("address")
@click.pass_context
def events(ctx: click.Context, address: str) -> None:
    """The event history of one address (or of `placement:NAME`: suspend, resume)."""
    store = open_store(state_url(ctx.obj["state"]))
    with store.session() as session:
        rows = session.scalars(select(Event).where(Event.address == address_key(address))
                               .order_by(Event.id))
        for e in rows:
            # A migration's first event has no state before it: "new->0", not "None->0".
            before = "new" if e.from_state is None else e.from_state
            states = "" if e.to_state is None else f"{before}->{e.to_state}"
            click.echo(f"{e.at:%Y-%m-%dT%H:%M:%S.%fZ}  {e.step:<8} {states:<6} "
                       f"{(e.specs_commit or '')[:10]:<10} {e.detail}")


def _engine_for(ctx: click.Context, *,  # type: ignore[no-untyped-def]
                read_only: bool = False):
    return build_engine(_load_or_exit(ctx.obj["specs"]), ctx.obj["state"], read_only=read_only)


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@main.command()
@click.option("--placement", default=None, help="Only this placement's mailboxes.")
@click.option("--system", default=None, help="Only mailboxes moving from or to this system.")
@click.option("--state", "state_filter", default=None, metavar="N|failed|...",
              help="A state number, or failed, suspended, refused, pending, waiting, in-sync.")
@click.option("--json", "as_json", is_flag=True,
              help="JSON Lines: a `status` object per mailbox, then (with workers) one per "
                   "`job`, `queued` pair of systems and `worker`.")
@click.pass_context
def status(ctx: click.Context, placement: str | None, system: str | None,
           state_filter: str | None, as_json: bool) -> None:
    """Where every mailbox stands: state, next step and when, last error."""
    unreached: list[str] = []
    try:
        engine = _engine_for(ctx, read_only=True)
        rows = status_rows(engine, placement=placement, system=system, state=state_filter,
                           unreached=unreached)
        jobs = status_jobs(engine, rows, filtered=bool(placement or system or state_filter),
                           system=system)
        holder = current_holder(engine.store)
    except MailferryError as exc:
        _fail(str(exc))
    for note in unreached:
        click.echo(f"note: {note}", err=True)
    if as_json:
        for row in rows:
            click.echo(json.dumps({"type": "status", **row.as_dict()}))
        for record in jobs_records(jobs):
            click.echo(json.dumps(record))
        return
    for line in table(rows, jobs) + jobs_table(jobs):
        click.echo(line)
    lease = holder.describe(engine.clock()) if holder else "nobody"
    click.echo(f"\n{len(rows)} mailboxes; lease held by {lease}")


def _admin(ctx: click.Context, act) -> None:  # type: ignore[no-untyped-def]
    """Run an admin lever `act(store, specs, by, now) -> message` and print its message."""
    specs = _load_or_exit(ctx.obj["specs"])
    try:
        click.echo(act(open_store(state_url(ctx.obj["state"])), specs, _who(), utcnow()))
    except MailferryError as exc:
        _fail(str(exc))


@main.command()
@click.argument("placement")
@click.option("--reason", default="", help="Why (recorded with the events).")
@click.pass_context
def suspend(ctx: click.Context, placement: str, reason: str) -> None:
    """Suspend a placement: none of its mailboxes takes a step until resumed."""
    _admin(ctx, lambda store, specs, by, now: levers.suspend(
        store, placement, known=set(specs.placements), by=by, reason=reason,
        commit=specs.commit, now=now))


@main.command()
@click.argument("placement")
@click.pass_context
def resume(ctx: click.Context, placement: str) -> None:
    """Resume a suspended placement."""
    _admin(ctx, lambda store, specs, by, now: levers.resume(
        store, placement, by=by, commit=specs.commit, now=now))


@main.command()
@click.argument("address")
@click.pass_context
def retry(ctx: click.Context, address: str) -> None:
    """Retry a failed migration: clear its failure so it resumes at its state."""
    _admin(ctx, lambda store, specs, by, now: levers.retry(
        store, address, by=by, commit=specs.commit, now=now))


@main.command()
@click.argument("system")
@click.option("--check", "dry_run", is_flag=True,
              help="Only list what adoption would add and what blocks it (changes nothing).")
@click.pass_context
def adopt(ctx: click.Context, system: str, dry_run: bool) -> None:
    """Adopt an admin's Postfix + Dovecot system (postfixDovecot.adopt: true)."""
    from reconciler import adoption  # the Postfix + Dovecot driver's modules: +30 ms a start

    specs = _load_or_exit(ctx.obj["specs"])
    try:
        if dry_run:
            found = adoption.check(specs, make_drivers(specs), system)
            for line in found.lines():
                click.echo(line)
            sys.exit(EXIT_OK if found.ok else EXIT_ERROR)
        engine = build_engine(specs, ctx.obj["state"])
        found, count = adoption.adopt(engine, system)
    except MailferryError as exc:
        _fail(f"{exc}; nothing changed on {system}" if dry_run else str(exc))
    for line in found.lines()[:-1]:
        click.echo(line)
    click.echo(f"{system}: adopted; fed knows its {count} mailboxes "
               f"(next: reconcile import {system})")


@main.command("import")
@click.argument("system")
@click.option("--out", "out_file", default=None, metavar="FILE",
              help="Where to write the placement (default SPECS/imported-SYSTEM.yaml).")
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@click.pass_context
def import_(ctx: click.Context, system: str, out_file: str | None, force: bool) -> None:
    """Write MailboxPlacement specs for what an adopted system already holds."""
    from reconciler import adoption  # the Postfix + Dovecot driver's modules: +30 ms a start

    specs = _load_or_exit(ctx.obj["specs"])
    try:
        engine = build_engine(specs, ctx.obj["state"])
        path, count = adoption.import_specs(engine, system,
                                            Path(out_file) if out_file else None, force=force)
    except SpecError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        _fail("the imported placement does not fit the spec set; nothing written")
    except MailferryError as exc:
        _fail(f"{exc}; nothing written")
    click.echo(f"{path}: {count} mailboxes of {system}; reconcile --plan should now say "
               "no changes")


@main.command()
@click.argument("system")
@click.option("--force", is_flag=True,
              help="Also drop the mailboxes mailferry created on the system.")
@click.pass_context
def release(ctx: click.Context, system: str, force: bool) -> None:
    """Remove everything mailferry added to an adopted system; show the diff to adoption."""
    from reconciler import adoption  # the Postfix + Dovecot driver's modules: +30 ms a start

    specs = _load_or_exit(ctx.obj["specs"])
    try:
        engine = build_engine(specs, ctx.obj["state"])
        report = adoption.release(engine, system, force=force)
    except MailferryError as exc:
        _fail(f"{exc}; nothing changed")
    for part in report:
        click.echo(part.rstrip("\n"))
    click.echo(f"{system}: released")
