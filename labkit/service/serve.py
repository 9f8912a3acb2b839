"""``labkit serve``: the booking service on uvicorn, with worker processes of its own for each backend.

The workers are a ``WorkerPool`` per backend, so they are owned the way a notebook's are: each dies
with this process (``PR_SET_PDEATHSIG``, even on SIGKILL), and Ctrl-C, SIGTERM or SIGHUP stop the
HTTP server first (requests in flight are answered), then warm-stop every worker (bookings in flight
are finished and acknowledged). The port is bound before any worker starts, so a busy port costs
nothing but one line.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType

import click

from labkit.config import BACKENDS, Config
from labkit.errors import LabkitError
from labkit.pool import WorkerPool
from labkit.workflow import WorkerSettings

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
#: How long stopping waits for each worker to finish its bookings before it is killed.
STOP_TIMEOUT_S = 10.0


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a busy port is one line before anything else starts.

    Raises:
        LabkitError: the address is taken or cannot be bound.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LabkitError(f"cannot listen on {host}:{port} ({e.strerror}); choose another with --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def start_pools(config: Config, settings: WorkerSettings, workers: int, run_dir: Path) -> list[WorkerPool]:
    """One pool of ``workers`` processes per backend, started side by side; all stopped again if one fails."""
    pools = [WorkerPool(name, config, settings, run_dir) for name in BACKENDS]
    if workers == 0:
        return pools
    with ThreadPoolExecutor(len(pools)) as threads:
        futures = [threads.submit(pool.start, workers) for pool in pools]
        errors = [f.exception() for f in futures]
    failure = next((e for e in errors if e is not None), None)
    if failure is not None:
        stop_pools(pools)
        raise failure
    return pools


def stop_pools(pools: list[WorkerPool]) -> None:
    """Warm-stop every pool at once (each worker finishes and acknowledges its bookings)."""
    with ThreadPoolExecutor(max(len(pools), 1)) as threads:
        list(threads.map(lambda pool: pool.stop(STOP_TIMEOUT_S), pools))


class _Stop(Exception):
    """A stop signal arrived before or after uvicorn was serving (it handles the ones in between)."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def serve(
    config: Config,
    host: str,
    port: int,
    workers: int,
    settings: WorkerSettings,
    run_dir: Path,
    access_log: bool = False,
) -> None:
    """Bind, start the workers, serve until a signal, then stop the server and the workers.

    Raises:
        LabkitError: the port is taken, or a worker could not start (a broker is down).
    """
    import uvicorn

    from labkit.service.app import create_app

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_stop)
    sock = bind(host, port)
    pools: list[WorkerPool] = []
    try:
        pools = start_pools(config, settings, workers, run_dir)
        for pool in pools:
            names = ", ".join(w.worker_id for w in pool.workers) or "none: run your own with --track-status"
            click.echo(f"{pool.backend:<8} workers: {names}")
        app = create_app(config, settings, {pool.backend: pool for pool in pools})
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=access_log, lifespan="on"))
        app.state.exiting = lambda: server.should_exit  # an open dashboard's event stream ends, so the stop goes on
        # uvicorn handles SIGINT and SIGTERM while it serves; SIGHUP (the terminal closed) stops it the same way.
        signal.signal(signal.SIGHUP, lambda signum, frame: server.handle_exit(signal.SIGTERM, frame))
        click.echo(
            f"serving the booking service on http://{host}:{port} (API docs at /docs, live view at /dashboard); "
            f"run folder {run_dir}; Ctrl-C stops it and its workers"
        )
        server.run(sockets=[sock])
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # the stop below must not be cut short
        sock.close()
        if pools:
            stop_pools(pools)
            click.echo(f"stopped the booking service and its {sum(len(p.workers) for p in pools)} workers")


@click.command("serve")
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True)
@click.option(
    "--workers", "-w", type=click.IntRange(0, 16), default=1, show_default=True, help="Worker processes per backend."
)
@click.option(
    "--no-workers", is_flag=True, help="Start no workers: run them yourself with `labkit worker --track-status`."
)
@click.option("--concurrency", "-c", type=click.IntRange(1, 1000), default=8, show_default=True,
              help="Bookings each worker processes at once.")  # fmt: skip
@click.option("--step-ms", type=click.FloatRange(0, 60_000), default=0.0, show_default=True,
              help="Simulated I/O time of each workflow step, so progress can be watched.")  # fmt: skip
@click.option("--max-attempts", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--backoff-ms", type=click.IntRange(0, 600_000), default=200, show_default=True)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run folder of the workers' event logs and effects [default: $LABKIT_HOME/runs/service-<time>].",
)
@click.option("--access-log", is_flag=True, help="Log every request (costs throughput).")
def serve_command(
    host: str,
    port: int,
    workers: int,
    no_workers: bool,
    concurrency: int,
    step_ms: float,
    max_attempts: int,
    backoff_ms: int,
    run_dir: Path | None,
    access_log: bool,
) -> None:
    """Serve the booking service: POST /api/bookings sends a booking to BullMQ, Redis Streams and Kafka, and
    GET /api/bookings/ID shows where it is on each, step by step.

    Starts --workers worker processes per backend, owned by the service: Ctrl-C or SIGTERM stops the server,
    then the workers (they finish their bookings first). Needs the stack (`labkit up`).
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    config = Config.from_env()
    settings = WorkerSettings(
        concurrency=concurrency, max_attempts=max_attempts, backoff_ms=backoff_ms, step_ms=step_ms, track_status=True
    )
    folder = run_dir or config.runs_dir / f"service-{time.strftime('%Y%m%d-%H%M%S')}"
    serve(config, host, port, 0 if no_workers else workers, settings, folder, access_log)
