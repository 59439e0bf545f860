"""`reconcile`: the command admins and CI run.

    reconcile --plan  [--specs DIR] [--json] [--at TIME]  dry run: exit 0 same, 2 pending, 1 error
    reconcile --apply [--specs DIR] [--json]              everything due now, then exit
    reconcile --watch [--specs DIR]                       apply continuously
    reconcile serve                                       the embedded default (fed + systems)
    reconcile demo                                        the end-to-end demonstration
    reconcile station enrol NAME --address ADDR           a station's token (printed once)
    reconcile events ADDRESS                              the event history of one address

The whole spec set is validated before anything else happens: a bad spec prints every
problem with its file and line and exits 1 without opening the state store or calling a
server (invariant 5).
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import click

from reconciler.errors import MailferryError, SpecError
from reconciler.spec.model import SpecSet

EXIT_OK, EXIT_ERROR, EXIT_PENDING = 0, 1, 2


def _load(specs_dir: str) -> SpecSet:
    from reconciler.spec.loader import load_specs

    return load_specs(specs_dir)


def _state_url(state: str | None) -> str:
    if state:
        return state if "://" in state else f"sqlite:///{Path(state).resolve()}"
    path = Path("var/state.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _parse_at(value: str | None) -> datetime | None:
    if value is None:
        return None
    when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def build_engine(specs: SpecSet, state: str | None):  # type: ignore[no-untyped-def]
    """The engine for a spec set: state store, fed client, drivers."""
    from reconciler.drivers.registry import make_drivers
    from reconciler.engine import Engine
    from reconciler.fedclient import FedClient
    from reconciler.secrets import resolve
    from reconciler.state.store import open_store

    token = resolve(specs.fed.token, what=f"fed {specs.fed.name} token")
    fed = FedClient(specs.fed.control_url, token)
    return Engine(specs, open_store(_state_url(state)), fed, make_drivers(specs))


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_ERROR)


@click.group(invoke_without_command=True)
@click.option("--specs", "specs_dir", default="specs", show_default=True,
              help="Folder of YAML specs.")
@click.option("--state", default=None, envvar="MAILFERRY_STATE",
              help="State store: SQLAlchemy URL or SQLite file (default ./var/state.db).")
@click.option("--plan", "do_plan", is_flag=True, help="Show what would change (dry run).")
@click.option("--apply", "do_apply", is_flag=True, help="Run everything due now, then exit.")
@click.option("--watch", "do_watch", is_flag=True, help="Apply continuously.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines output for machines.")
@click.option("--at", "at", default=None, help="Plan as it will stand at this ISO time.")
@click.option("-v", "--verbose", is_flag=True, help="Also list mailboxes already in sync.")
@click.option("--interval", default=5.0, show_default=True, help="--watch: seconds per pass.")
@click.option("--station-api", default=None, metavar="HOST:PORT",
              help="--watch: also serve the station API here (e.g. 127.0.0.1:8026).")
@click.pass_context
def main(ctx: click.Context, specs_dir: str, state: str | None, do_plan: bool, do_apply: bool,
         do_watch: bool, as_json: bool, at: str | None, verbose: bool, interval: float,
         station_api: str | None) -> None:
    """mailferry's reconciler: move mailboxes as the specs say, losing nothing."""
    ctx.ensure_object(dict)
    ctx.obj.update(specs=specs_dir, state=state)
    if ctx.invoked_subcommand is not None:
        return
    if sum((do_plan, do_apply, do_watch)) != 1:
        click.echo(ctx.get_help())
        sys.exit(EXIT_ERROR if (do_plan or do_apply or do_watch) else EXIT_OK)
    try:
        specs = _load(specs_dir)
    except SpecError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        click.echo(f"error: {len(exc.problems)} problem(s) in {specs_dir}; nothing applied",
                   err=True)
        sys.exit(EXIT_ERROR)
    try:
        engine = build_engine(specs, state)
        if do_plan:
            sys.exit(_plan(engine, specs, as_json=as_json, at=_parse_at(at), verbose=verbose))
        if do_apply:
            sys.exit(_apply(engine, as_json=as_json))
        _watch(engine, specs_dir, interval, as_json=as_json, station_api=station_api)
    except MailferryError as exc:
        _fail(str(exc))


def _plan(engine, specs: SpecSet, *, as_json: bool, at: datetime | None,  # type: ignore[no-untyped-def]
          verbose: bool) -> int:
    from reconciler.output import plan_jsonl, print_plan

    plan = engine.plan(at)
    if as_json:
        for line in plan_jsonl(plan, commit=specs.commit):
            click.echo(line)
    else:
        commit = specs.commit[:10] if specs.commit else "not in git"
        dirty = " (uncommitted changes)" if specs.dirty else ""
        header = (f"mailferry plan: specs {specs.root} @ {commit}{dirty}, "
                  f"at {plan.at:%Y-%m-%dT%H:%M:%SZ}\n")
        print_plan(plan, click.echo, color=sys.stdout.isatty(), verbose=verbose, header=header)
    return EXIT_PENDING if plan.pending else EXIT_OK


def _apply(engine, *, as_json: bool) -> int:  # type: ignore[no-untyped-def]
    from reconciler.output import plan_jsonl, record_json, record_text

    def show(record) -> None:  # type: ignore[no-untyped-def]
        click.echo(record_json(record) if as_json else record_text(record))

    engine.on_record = show
    report = engine.apply()
    plan = engine.plan()
    if as_json:
        click.echo(plan_jsonl(plan, commit=engine.specs.commit)[-1])
    else:
        click.echo(f"\nApply: {report.applied} steps applied, {len(report.errors)} errors "
                   f"in {report.passes} passes.")
        click.echo(plan.summary())
    return EXIT_ERROR if report.errors else EXIT_OK


def _watch(engine, specs_dir: str, interval: float, *, as_json: bool,  # type: ignore[no-untyped-def]
           station_api: str | None) -> None:
    """A simple watch: apply, then sleep until the interval passes or a spec file changes."""
    import signal
    import threading

    from reconciler.api.wiring import station_api_for

    api = None
    if station_api:
        host, _, port = station_api.rpartition(":")
        api = station_api_for(engine, host=host or "127.0.0.1", port=int(port)).start()
        click.echo(f"station API on {api.url}")

    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    wake = threading.Event()
    stop = threading.Event()
    edited = threading.Event()

    class Changed(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            edited.set()
            wake.set()

    def terminate(*_args: object) -> None:
        stop.set()
        wake.set()

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    observer = Observer()
    observer.schedule(Changed(), specs_dir, recursive=False)
    observer.start()
    try:
        while not stop.is_set():
            if edited.is_set():
                time.sleep(0.2)  # an editor's save fires several events: one pass per save
                edited.clear()
                try:
                    specs = _load(specs_dir)
                    engine = build_engine(specs, engine.store.url)
                except SpecError as exc:
                    for problem in exc.problems:
                        click.echo(problem, err=True)
                    click.echo("error: specs invalid; keeping the last good specs", err=True)
            try:
                _apply(engine, as_json=as_json)
            except MailferryError as exc:  # fed or a system down: say so, try again later
                click.echo(f"error: {exc}", err=True)
            wake.wait(interval)
            wake.clear()
    finally:
        observer.stop()
        observer.join()
        if api is not None:
            api.stop()


@main.command()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Start the embedded default of the specs (fed and every maildir system) until Ctrl-C."""
    import signal

    from reconciler.embedded import start_embedded

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
        click.echo("embedded default running; Ctrl-C stops it")
        while not stop and all(s.process.poll() is None for s in embedded.servers):
            time.sleep(0.5)


@main.command()
@click.option("--workdir", default=None, help="Folder for the demo's files (default: temporary).")
@click.option("--mailboxes", default=20, show_default=True)
@click.option("--old-messages", default=8, show_default=True, help="Old messages per mailbox.")
@click.option("--rate", default=40.0, show_default=True, help="Messages/s sent during the run.")
def demo(workdir: str | None, mailboxes: int, old_messages: int, rate: float) -> None:
    """Migrate 20 mailboxes with mail flowing, then count every message."""
    from reconciler.demo import run_demo

    try:
        ok = run_demo(workdir=workdir, mailboxes=mailboxes, old_messages=old_messages,
                      rate=rate, echo=click.echo)
    except MailferryError as exc:
        _fail(str(exc))
    sys.exit(EXIT_OK if ok else EXIT_ERROR)


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
@click.pass_context
def station_enrol(ctx: click.Context, name: str, address: str, out_dir: str | None, api: str,
                  client: str) -> None:
    """Enrol a station; print its token, or write its token and agent configuration."""
    from reconciler.api.stations import enrol_station
    from reconciler.state.store import open_store

    store = open_store(_state_url(ctx.obj["state"]))
    token = enrol_station(store, name, address.lower())
    if out_dir is None:
        click.echo(token)
        return
    from reconciler.api.enrolment import write_station_kit

    token_path, config_path = write_station_kit(Path(out_dir), api=api, station=name,
                                                address=address.lower(), token=token,
                                                client=client)
    click.echo(f"station {name} enrolled for {address.lower()}\n"
               f"  token:  {token_path} (mode 0600; the only copy)\n"
               f"  config: {config_path}\n"
               f"copy both to the workstation, then run: "
               f"station-agent run --config {config_path.name}")


@main.command()
@click.argument("address")
@click.pass_context
def events(ctx: click.Context, address: str) -> None:
    """The event history of one address."""
    from sqlalchemy import select

    from reconciler.state.model import Event
    from reconciler.state.store import open_store

    store = open_store(_state_url(ctx.obj["state"]))
    with store.session() as session:
        rows = session.scalars(select(Event).where(Event.address == address.lower())
                               .order_by(Event.id))
        for e in rows:
            states = "" if e.to_state is None else f"{e.from_state}->{e.to_state}"
            click.echo(f"{e.at:%Y-%m-%dT%H:%M:%S.%fZ}  {e.step:<8} {states:<6} "
                       f"{(e.specs_commit or '')[:10]:<10} {e.detail}")
