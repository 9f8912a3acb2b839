"""The ``labkit`` command: the notebook steps, runnable from a terminal.

Every failure is one line on stderr and a non-zero exit code, never a traceback: learners read the line, not a stack.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from labkit import apache_kafka, lab
from labkit.backends import Backend
from labkit.booking import BookingGenerator
from labkit.config import BACKENDS, KAFKA_BROKERS, Config
from labkit.errors import LabkitError
from labkit.stack import ServiceStatus, Stack
from labkit.worker import worker_command

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
#: Commands that live in a layer above the engine, loaded by name only when asked for (click's lazy
#: subcommands): the engine never imports them, so `labkit worker` does not load FastAPI.
LAZY_COMMANDS = {
    "serve": "labkit.service.serve:serve_command",
    "exercises": "labkit.exercises:exercises_command",
}
#: The lab's Jupyter settings for `labkit lab` (see :func:`jupyter_lab_command`).
JUPYTER_CONFIG = Path(__file__).resolve().parent / "resources" / "jupyter"


class _LabkitGroup(click.Group):
    """A click group whose every failure is one line on stderr and a non-zero exit, never a traceback.

    A :class:`LabkitError` (broker down, bad setting) becomes ``Error: <line>``; a bad argument
    becomes ``Error: <what was wrong> (see labkit <command> --help)`` instead of click's usage block.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS:
            module, _, attribute = LAZY_COMMANDS[cmd_name].partition(":")
            command: click.Command = getattr(importlib.import_module(module), attribute)
            return command
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LabkitError as e:
            raise click.ClickException(str(e)) from None

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.UsageError as e:
            command = e.ctx.command_path if e.ctx else "labkit"
            message = " ".join(e.format_message().split())  # click wraps long choice lists over lines
            click.echo(f"Error: {message} (see {command} --help)", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"Error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)


@click.group(cls=_LabkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Booking Queue Lab: compare BullMQ, Redis Streams and Kafka on one booking workload.

    The brokers are found at LABKIT_REDIS_URL and LABKIT_KAFKA_BOOTSTRAP (default: the local stack that
    `labkit up` starts on 127.0.0.1).
    """


def _line(s: ServiceStatus) -> str:
    health = "healthy" if s.healthy else "NOT HEALTHY"
    started_by = f", started by {s.started_by}" if s.started_by else ""
    detail = f": {s.detail}" if s.detail else ""
    return f"{s.service:<6} {s.address:<21} {s.kind}{started_by} -- {health}{detail}"


def _after_up(config: Config) -> None:
    """Create docs/contract.md's queues, streams, topics and groups, so work sent before any worker starts waits."""
    for backend in BACKENDS:
        lab.with_backend(backend, lambda b: b.setup(), config)
    click.echo(
        f"created the destinations of {', '.join(BACKENDS)}"
        + (f" in namespace {config.namespace!r}" if config.namespace else "")
    )


_backend_option = click.option(
    "--backend", "-b", type=click.Choice(BACKENDS), required=True, help="bullmq, streams or kafka."
)


_kafka_option = click.option(
    "--kafka",
    "kafka",
    type=click.Choice(KAFKA_BROKERS),
    default=None,
    help="The Kafka-protocol broker to start: embedded (Tansu, memory only) or apache (Apache Kafka, KRaft, "
    "durable; needs Java 17 and Maven or LABKIT_KAFKA_HOME) [default: $LABKIT_KAFKA or embedded].",
)


def _config(kafka: str | None) -> Config:
    return Config.from_env(**({"kafka": kafka} if kafka else {}))


@cli.command()
@_kafka_option
@click.option("--timeout", default=None, type=float, help="Seconds to wait for both servers [default: 30, apache 120].")
def up(kafka: str | None, timeout: float | None) -> None:
    """Start the local Redis and Kafka-protocol broker, unless healthy servers already answer at the configured
    addresses, and return when both are healthy.

    The servers keep running after this command ends; `labkit down` stops them. The embedded broker keeps
    everything in memory: after a restart its topics are gone. Apache Kafka (--kafka apache) keeps its log in
    the state folder, so its topics, offsets and groups survive `down` and `up`.
    """
    config = _config(kafka)
    if config.kafka == "apache" and apache_kafka.locate(config) is None:
        [broker] = Stack(config, services=["kafka"]).status()
        if not broker.healthy:  # a Kafka already answering needs no jars
            _fetch_jars(config)
    for s in Stack(config).up(timeout if timeout is not None else (120 if config.kafka == "apache" else 30)):
        click.echo(_line(s))
    _after_up(config)


def _fetch_jars(config: Config) -> apache_kafka.Distribution:
    """Fetch Apache Kafka's jars with Maven, showing one progress line that rewrites itself on a terminal."""
    apache_kafka.find_java()  # what is missing is said before anything starts
    apache_kafka.find_maven()
    tty = sys.stderr.isatty()
    click.echo(f"fetching Apache Kafka {apache_kafka.KAFKA_VERSION} with Maven (once; about 45 MB)...", err=True)

    def progress(line: str) -> None:
        if tty:
            click.echo(f"\r\033[K{line}", err=True, nl=False)

    dist = apache_kafka.fetch(config, progress)
    if tty:
        click.echo("\r\033[K", err=True, nl=False)
    click.echo(f"Apache Kafka {dist.version} jars ready: {dist.source}", err=True)
    return dist


@cli.group("kafka")
def kafka_group() -> None:
    """Apache Kafka beside the embedded broker: fetch its jars, see where they are."""


@kafka_group.command("fetch")
def kafka_fetch() -> None:
    """Fetch Apache Kafka's jars with Maven into the state folder (what `labkit up --kafka apache` does first).

    Skipped when LABKIT_KAFKA_HOME points at an unpacked Apache Kafka, or the jars are already there.
    """
    config = Config.from_env()
    dist = apache_kafka.locate(config) or _fetch_jars(config)
    click.echo(f"Apache Kafka {dist.version}: {dist.source}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help='Print {"redis": {...}, "kafka": {...}} instead of lines.')
def status(as_json: bool) -> None:
    """Show each server: address, kind and version, healthy or not, and who started it.

    Exits with code 1 if any server is not healthy, so scripts can wait on it.
    """
    statuses = Stack(Config.from_env()).status()
    if as_json:
        click.echo(json.dumps({s.service: s.to_dict() for s in statuses}, indent=2))
    else:
        for s in statuses:
            click.echo(_line(s))
    sick = [s for s in statuses if not s.healthy]
    if sick:
        raise click.ClickException("; ".join(f"{s.service} at {s.address} is not healthy: {s.detail}" for s in sick))


@cli.command()
def down() -> None:
    """Stop the servers `labkit up` started, and nothing else: a system Redis or the docker compose stack keep
    running.

    Redis data survives (it is saved to disk); the embedded broker's topics do not.
    """
    stopped = Stack(Config.from_env()).down()
    for s in stopped:
        click.echo(f"stopped {s.service} at {s.address} ({s.kind}, pid {s.pid})")
    if not stopped:
        click.echo("nothing to stop: labkit started no server with this LABKIT_HOME")


@cli.command()
@_backend_option
def reset(backend: str) -> None:
    """Empty a backend's work and dead-letter destinations, its counters and its effects.

    Stop that backend's workers first: a Kafka consumer must not be running while its topics are deleted.
    """
    lab.reset(backend)
    click.echo(f"{backend}: emptied work, retry and dead-letter destinations, counters and effects")


@cli.command()
@_backend_option
@click.option("--count", "-n", type=click.IntRange(0, 10_000_000), required=True, help="Valid bookings to send.")
@click.option(
    "--rate",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Bookings per second [default: as fast as the broker takes them].",
)
@click.option(
    "--fault-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Share of bookings whose payment fails twice before it succeeds.",
)
@click.option(
    "--poison",
    type=click.IntRange(0, 1_000_000),
    default=0,
    show_default=True,
    help="Poison bookings to send as well: they fail every attempt and end in the dead-letter queue.",
)
@click.option("--seed", type=int, default=None, help="Random seed, to send the same bookings again [default: time].")
@click.option(
    "--delay-ms",
    type=click.IntRange(0, 7 * 24 * 3600 * 1000),
    default=0,
    show_default=True,
    help="No worker starts a booking before this long after it was sent (BullMQ: delayed jobs; Streams and "
    "Kafka: the lab's delayed set and delay topic).",
)
def produce(
    backend: str, count: int, rate: float | None, fault_rate: float, poison: int, seed: int | None, delay_ms: int
) -> None:
    """Send COUNT valid bookings (plus --poison ones) to a backend, and say when the broker acknowledged them."""
    generator = BookingGenerator(seed=seed if seed is not None else int(time.time()), fault_rate=fault_rate)
    bookings = generator.bookings(count, poison)
    started = time.monotonic()
    lab.with_backend(backend, lambda b: _send_paced(b, bookings, rate, delay_ms))
    elapsed = time.monotonic() - started
    delayed = f", each due {delay_ms} ms after it was sent" if delay_ms else ""
    click.echo(f"{backend}: sent {len(bookings)} bookings ({count} valid, {poison} poison) in {elapsed:.2f} s{delayed}")


async def _send_paced(backend: Backend, bookings: list[dict[str, Any]], rate: float | None, delay_ms: int) -> None:
    """Send in batches; with a rate, each batch leaves on its schedule (a slow send does not lower the rate)."""
    batch = max(1, min(1000, int(rate / 20))) if rate else 1000  # with a rate: 20 batches a second
    started = time.monotonic()
    for sent in range(0, len(bookings), batch):
        if rate:
            await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))
        await backend.produce(bookings[sent : sent + batch], delay_ms=delay_ms)


cli.add_command(worker_command)


@cli.command()
@_backend_option
@click.option("--json", "as_json", is_flag=True, help="Print the counters as JSON.")
def stats(backend: str, as_json: bool) -> None:
    """Show a backend's counters: completed, dead_lettered, retried, duplicates, in_flight, backlog."""
    numbers = lab.stats(backend)
    if as_json:
        click.echo(json.dumps(numbers, indent=2, default=str))
        return
    for key, value in numbers.items():
        click.echo(f"{key:<16} {value}")


def jupyter_lab_command(extra: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of `labkit lab`: JupyterLab on the lessons, with the lab's defaults.

    The lab's own Jupyter config folder (``labkit/resources/jupyter``) goes first on ``JUPYTER_CONFIG_PATH``: its
    ``labconfig/default_setting_overrides.json`` answers JupyterLab's "get notified about Jupyter news?" question
    (no), so the first lesson opens without a pop-up over it. These are defaults: a learner's own JupyterLab
    settings still win, and nothing is written to the learner's ``~/.jupyter``.
    """
    args = [sys.executable, "-m", "jupyter", "lab", str(NOTEBOOKS), *extra]
    if hasattr(os, "geteuid") and os.geteuid() == 0 and "--allow-root" not in args:
        args.append("--allow-root")  # containers and CI run as root; Jupyter refuses otherwise
    paths = [str(JUPYTER_CONFIG), os.environ.get("JUPYTER_CONFIG_PATH", "")]
    return args, {**os.environ, "JUPYTER_CONFIG_PATH": os.pathsep.join(p for p in paths if p)}


@cli.command("lab", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@_kafka_option
@click.pass_context
def open_lab(ctx: click.Context, kafka: str | None) -> None:
    """Start the stack (as `labkit up`) and open JupyterLab on the lessons; extra arguments go to JupyterLab."""
    ctx.invoke(up, kafka=kafka)
    if kafka:
        os.environ["LABKIT_KAFKA"] = kafka  # the kernels' labkit then knows which broker it runs on
    args, env = jupyter_lab_command(ctx.args)
    os.execve(sys.executable, args, env)


@cli.group()
def drill() -> None:
    """Reliability drills: inject a fault into a real run and audit every booking (see docs/drills.md).

    Each drill prints one summary line and exits 1 if the lab broke its promise (a lost booking, a crashed worker,
    a double effect with idempotency on). Run one drill at a time: they start real worker processes.
    """


_csv_option = click.option(
    "--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Append the result here."
)


def _report(result: Any, csv_path: Path | None) -> None:
    """Print the summary line (and the detail), append to the CSV, and fail the command if the drill failed."""
    from labkit.drills import results_frame

    click.echo(result.summary())
    click.echo(f"detail: {json.dumps(result.detail, default=str, sort_keys=True)}")
    if csv_path is not None:
        results_frame([result]).to_csv(csv_path, mode="a", header=not csv_path.exists(), index=False)
    if not result.ok:
        raise click.ClickException(f"drill {result.drill} on {result.backend} failed: {result.summary()}")


@drill.command("worker-kills")
@_backend_option
@click.option("--seconds", type=click.FloatRange(5, 3600), default=20.0, show_default=True, help="Producer run time.")
@click.option("--workers", type=click.IntRange(1, 16), default=3, show_default=True)
@click.option("--rate", type=click.FloatRange(1, 5000), default=40.0, show_default=True, help="Bookings per second.")
@click.option("--idempotent/--no-idempotent", default=True, show_default=True, help="Guard effects per booking.")
@click.option(
    "--repairs/--no-repairs",
    default=True,
    show_default=True,
    help="Kafka: the embedded broker's group repairs (labkit/backends/kafka/quirks.py); off, the broker alone.",
)
@click.option("--seed", type=int, default=None, help="Seed of the kill schedule.")
@_csv_option
def drill_worker_kills(
    backend: str,
    seconds: float,
    workers: int,
    rate: float,
    idempotent: bool,
    repairs: bool,
    seed: int | None,
    csv_path: Path | None,
) -> None:
    """SIGKILL random workers (and replace them) while a producer runs; 0 lost, double effects counted."""
    from labkit import drills

    result = drills.worker_kills(backend, seconds, workers, rate, idempotent, seed=seed, broker_repairs=repairs)
    _report(result, csv_path)


@drill.command("redis-restart")
@click.option("--backend", "-b", type=click.Choice(["bullmq", "streams"]), required=True, help="bullmq or streams.")
@click.option("--seconds", type=click.FloatRange(4, 3600), default=16.0, show_default=True, help="Producer run time.")
@click.option("--hard", is_flag=True, help="SIGKILL Redis (a crash) instead of SIGTERM.")
@_csv_option
def drill_redis_restart(backend: str, seconds: float, hard: bool, csv_path: Path | None) -> None:
    """Restart a private Redis (AOF on, own ports and folder) mid-run; workers must carry on, 0 lost."""
    from labkit import drills

    _report(drills.redis_restart(backend, seconds, hard=hard), csv_path)


@drill.command("kafka-restart")
@click.option("--seconds", type=click.FloatRange(4, 3600), default=30.0, show_default=True, help="Producer run time.")
@_csv_option
def drill_kafka_restart(seconds: float, csv_path: Path | None) -> None:
    """Restart a private embedded broker mid-run and report what its memory-only storage lost."""
    from labkit import drills

    _report(drills.kafka_restart(seconds), csv_path)


@drill.command("bad-input")
@_backend_option
@_csv_option
def drill_bad_input(backend: str, csv_path: Path | None) -> None:
    """Send 200+ malformed messages between valid bookings; each must be dead-lettered with a reason."""
    from labkit import drills

    _report(drills.bad_input(backend), csv_path)


@drill.command("slow-consumer")
@_backend_option
@click.option("--unprotected", is_flag=True, help="Turn the protection off to see the duplicates it prevents.")
@_csv_option
def drill_slow_consumer(backend: str, unprotected: bool, csv_path: Path | None) -> None:
    """Handlers slower than the lock, claim idle time or max.poll.interval.ms: duplicates with and without help."""
    from labkit import drills

    _report(drills.slow_consumer(backend, protected=not unprotected), csv_path)


@drill.command("process-hygiene")
@_backend_option
@_csv_option
def drill_process_hygiene(backend: str, csv_path: Path | None) -> None:
    """SIGKILL a pool's parent process (a kernel restart); its workers must be gone within 5 s."""
    from labkit import drills

    _report(drills.process_hygiene(backend), csv_path)


@cli.command()
@click.option(
    "--workload",
    "-w",
    default="smoke",
    show_default=True,
    metavar="NAME|FILE.yaml",
    help="A named workload (see --list) or a YAML file of Workload fields.",
)
@click.option(
    "--backend",
    "-b",
    "backends",
    multiple=True,
    type=click.Choice(BACKENDS),
    help="Backend to measure; repeat for several [default: all three].",
)
@click.option("--repetitions", "-r", type=click.IntRange(1, 50), default=3, show_default=True)
@click.option("--rate", type=click.FloatRange(0), default=None, help="Override the workload's msg/s (0: max-rate).")
@click.option("--duration", type=click.FloatRange(1, 3600), default=None, help="Override the run time in seconds.")
@click.option("--warmup", type=click.FloatRange(0, 3600), default=None, help="Override the warm-up in seconds.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the results [default: $LABKIT_HOME/bench/<workload>-<time>].",
)
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet"]), default="csv", show_default=True)
@click.option("--list", "list_workloads", is_flag=True, help="List the named workloads and exit.")
def bench(
    workload: str,
    backends: tuple[str, ...],
    repetitions: int,
    rate: float | None,
    duration: float | None,
    warmup: float | None,
    out: Path | None,
    fmt: str,
    list_workloads: bool,
) -> None:
    """Run one workload on the backends, as lesson 08 does, and save tidy results with their metadata.

    Latency is end to end (intended send time to processing finished, open loop); the table shows the median of
    the repetitions with min-max. Needs the stack (`labkit up`) or docker compose's servers.
    """
    from labkit import bench as harness

    if list_workloads:
        for named in harness.WORKLOADS.values():
            click.echo(f"{named.name:<14} {named.description}")
        return
    chosen = harness.get_workload(workload)
    overrides = {"rate": rate, "duration_s": duration, "warmup_s": warmup}
    chosen = chosen.replace(**{k: v for k, v in overrides.items() if v is not None})
    config = Config.from_env()
    result = harness.run_bench(chosen, backends or BACKENDS, repetitions, config, progress=sys.stderr.isatty())
    folder = out or config.home / "bench" / f"{chosen.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    result.save(folder, fmt)
    table = result.medians()
    columns = ["throughput_per_s", "p50_ms", "p99_ms", "p999_ms", "max_ms", "recovery_s", "server"]
    pace = f"{chosen.rate:g} msg/s" if chosen.rate else "max-rate"
    click.echo(
        f"workload {chosen.name}: {pace} for {chosen.duration_s:g} s ({chosen.warmup_s:g} s warm-up), "
        f"{chosen.consumers} consumers x {chosen.concurrency}, work {chosen.work}; median of {repetitions}"
    )
    click.echo(table[columns].to_string(float_format=lambda v: f"{v:,.1f}"))
    click.echo(f"results: {folder}")
