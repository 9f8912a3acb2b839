"""One real worker process: ``labkit worker --backend kafka`` or ``python -m workers.kafka``.

The process connects, announces itself as ready in its event log, and processes
bookings until SIGTERM or SIGINT. The first signal is a warm stop: messages in flight
are finished and acknowledged, then the process exits 0. A second signal is a cold
stop: the process exits at once and its unacknowledged messages are delivered again
to another worker, which is what at-least-once promises.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import click

from labkit.backends import get_backend
from labkit.config import BACKENDS, Config
from labkit.errors import BrokerUnavailable, LabkitError
from labkit.events import EventLog
from labkit.latency import LatencyRecorder
from labkit.workflow import BookingHandler, WorkerSettings, load_payment_step

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CONFIG = 2  # bad argument or setting
EXIT_CONNECT = 3  # a broker is unreachable
EXIT_COLD_STOP = 4  # second signal: stopped without finishing in-flight work


def default_worker_id(backend: str) -> str:
    return f"{backend}-{socket.gethostname()}-{os.getpid()}"


async def run_worker(
    backend_name: str,
    config: Config,
    settings: WorkerSettings,
    run_dir: Path,
    worker_id: str,
) -> int:
    """Process bookings until a signal arrives; returns the process exit code."""
    events = EventLog(run_dir, worker_id, backend_name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def request_stop(signum: int) -> None:
        if stop.is_set():
            log.warning(
                "%s: second %s, stopping now without finishing in-flight work", worker_id, signal.Signals(signum).name
            )
            events.emit("stopped", cold=True, signal=signal.Signals(signum).name)
            os._exit(EXIT_COLD_STOP)
        log.info("%s: finishing current bookings; signal again to force", worker_id)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop, signum)

    backend = get_backend(backend_name)(config, settings)
    try:
        async with backend:
            await backend.setup()
            if settings.workflow == "bench":
                async with LatencyRecorder(run_dir, worker_id, settings) as recorder:
                    events.emit("ready", concurrency=settings.concurrency, settings=settings.__dict__)
                    await backend.consume_batches(recorder, stop, worker_id)
            else:
                handler = BookingHandler(backend.ledger, events, settings, run_dir)
                if settings.handler:
                    handler.payment_step = load_payment_step(settings.handler)
                if settings.track_status:
                    handler.status = backend.status_recorder(worker_id)
                events.emit("ready", concurrency=settings.concurrency, settings=settings.__dict__)
                await backend.consume(handler, stop)
            events.emit("stopped", cold=False)
    except LabkitError as e:
        events.emit("stopped", cold=False, error=str(e))
        raise
    finally:
        events.close()
    return EXIT_OK


def _parse_options(values: tuple[str, ...]) -> dict[str, str]:
    options = {}
    for value in values:
        key, sep, setting = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not key=value", param_hint="--option")
        options[key] = setting
    return options


@click.command("worker")
@click.option("--backend", "-b", type=click.Choice(BACKENDS), required=True, help="Which queue to serve.")
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(1, 1000),
    default=1,
    show_default=True,
    help="Bookings processed at once inside this process.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(1, 100),
    default=3,
    show_default=True,
    help="Deliveries of a failing booking before it is dead-lettered.",
)
@click.option(
    "--backoff-ms",
    type=click.IntRange(0, 600_000),
    default=200,
    show_default=True,
    help="Delay before the first retry (BullMQ and Kafka double it per retry; Streams: claim idle time).",
)
@click.option(
    "--idempotent/--no-idempotent",
    default=True,
    show_default=True,
    help="Apply each booking's effects once, however often it is delivered.",
)
@click.option(
    "--workflow",
    type=click.Choice(["booking", "noop", "bench"]),
    default="booking",
    show_default=True,
    help="The five booking steps; only validate-and-ack; or the comparison harness's consumer (labkit bench).",
)
@click.option(
    "--step-ms",
    type=click.FloatRange(0, 60_000),
    default=0.0,
    show_default=True,
    help="Simulated I/O time of each workflow step.",
)
@click.option(
    "--cpu-ms", type=click.FloatRange(0, 60_000), default=0.0, show_default=True, help="CPU-bound work per booking."
)
@click.option(
    "--option",
    "-o",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Backend tuning, e.g. -o lock_duration_ms=5000 (BullMQ), -o max_poll_interval_ms=10000 (Kafka).",
)
@click.option(
    "--track-status/--no-track-status",
    default=False,
    show_default=True,
    help="Record each booking's state, step and progress for the booking service (labkit serve does).",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run folder for the event log and effects [default: $LABKIT_HOME/runs/current].",
)
@click.option(
    "--handler",
    default="",
    metavar="MODULE:FUNCTION",
    help="A payment step to run instead of the built-in charge: module:function or file.py:function "
    "(an exercise's learner code; it gets a labkit.workflow.PaymentContext).",
)
@click.option("--worker-id", default=None, help="Name in the event log [default: backend-host-pid].")
def worker_command(
    backend: str,
    concurrency: int,
    max_attempts: int,
    backoff_ms: int,
    idempotent: bool,
    workflow: str,
    step_ms: float,
    cpu_ms: float,
    options: tuple[str, ...],
    track_status: bool,
    run_dir: Path | None,
    handler: str,
    worker_id: str | None,
) -> None:
    """Run one booking worker in the foreground until SIGTERM (warm stop) or a second signal (cold stop)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        config = Config.from_env()
    except LabkitError as e:
        raise click.ClickException(str(e)) from None
    settings = WorkerSettings(
        concurrency=concurrency,
        max_attempts=max_attempts,
        backoff_ms=backoff_ms,
        idempotent=idempotent,
        workflow=workflow,
        step_ms=step_ms,
        cpu_ms=cpu_ms,
        options=_parse_options(options),
        track_status=track_status,
        handler=handler,
    )
    if handler:
        try:
            load_payment_step(handler)  # a bad one is a bad argument, said before any connection is made
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--handler") from None
    try:
        code = asyncio.run(
            run_worker(
                backend,
                config,
                settings,
                run_dir or config.runs_dir / "current",
                worker_id or default_worker_id(backend),
            )
        )
    except LabkitError as e:
        error = click.ClickException(str(e))
        error.exit_code = EXIT_CONNECT if isinstance(e, BrokerUnavailable) else EXIT_CONFIG
        raise error from None
    sys.exit(code)


def main(backend: str) -> None:
    """Entry point of ``python -m workers.<backend>``: the worker command with the backend fixed."""
    worker_command.main(args=["--backend", backend, *sys.argv[1:]], prog_name=f"python -m workers.{backend}")
