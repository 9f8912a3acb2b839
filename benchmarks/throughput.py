"""No-op bookings per second through labkit workers, against the raw client loop, in the same run.

For each backend and worker count: the same N bookings are produced first (a backlog),
then drained once by labkit worker processes (``workflow=noop``: validate, record
completion, acknowledge) and once by the raw loops of ``raw_clients.py``. Throughput is
N divided by the time from the first message received to the last one acknowledged, so
process start-up and group joins are not counted against either side.

The backlog is per backend (``BACKLOG``) unless ``--count`` sets one for all; with ``--repeat``
each figure is the median of the runs, with the ratio's min-max.

    python benchmarks/throughput.py --workers 1 2 --repeat 3
    python benchmarks/throughput.py --count 10000 --workers 1 --workflow booking   # the five steps, real effects

It needs the stack (`labkit up`); it uses its own namespaces and leaves no data behind.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import labkit as lk
from labkit.config import Config
from labkit.pool import WorkerPool

ROOT = Path(__file__).resolve().parents[1]
#: Bookings per run when ``--count`` is not given: enough that the faster side drains for about a second. A raw
#: Kafka consumer empties a backlog of 20,000 in under 0.1 s, while its first fetches are still warming up, and
#: a ratio over so short a window measures start-up rather than throughput.
BACKLOG = {"bullmq": 20_000, "streams": 100_000, "kafka": 200_000}


def produce_backlog(backend: str, config: Config, count: int) -> None:
    lk.reset(backend, config)
    bookings = lk.BookingGenerator(seed=1).bookings(count)
    for start in range(0, count, 5000):
        lk.produce(backend, bookings[start : start + 5000], config)


def labkit_rate(backend: str, config: Config, count: int, workers: int, concurrency: int, workflow: str) -> float:
    """Bookings/s of `workers` labkit worker processes draining a backlog of `count`."""
    produce_backlog(backend, config, count)
    run = lk.new_run(f"bench-{backend}", config)
    with WorkerPool(backend, config, run_dir=run).start(workers, workflow=workflow, concurrency=concurrency) as pool:
        pool.wait_until_drained(timeout=600, expected=count)
    events = lk.load_run(run)
    started = events.loc[events["event"] == "started", "mono"].min()
    finished = events.loc[events["event"] == "completed", "mono"].max()
    completed = events.loc[events["event"] == "completed", "booking_id"].nunique()
    assert completed == count, f"labkit {backend}: {completed} of {count} completed"
    lk.reset(backend, config)
    return count / (finished - started)


def raw_rate(
    backend: str, config: Config, count: int, workers: int, concurrency: int, flags: Sequence[str] = ()
) -> float:
    """Bookings/s of `workers` raw client loops (``raw_clients.py`` with ``flags``) draining a backlog of `count`."""
    produce_backlog(backend, config, count)
    env = {**os.environ, **config.to_env(), "PYTHONPATH": str(ROOT)}
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "raw_clients.py"),
                "--backend",
                backend,
                "--name",
                f"raw-{i}",
                "--concurrency",
                str(concurrency),
                *flags,
            ],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(workers)
    ]
    results = [json.loads(p.communicate(timeout=600)[0]) for p in processes]
    handled = sum(r["count"] for r in results)
    assert handled >= count, f"raw {backend}: {handled} of {count} handled"
    first = min(r["first"] for r in results if r["first"])
    last = max(r["last"] for r in results if r["last"])
    lk.reset(backend, config)
    return count / (last - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, help="bookings per run, for every backend [default: BACKLOG's]")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--backends", nargs="+", default=list(lk.BACKENDS))
    parser.add_argument("--repeat", type=int, default=1, help="runs per figure; the median is shown")
    parser.add_argument("--concurrency", type=int, default=16, help="in-process concurrency (labkit and raw BullMQ)")
    parser.add_argument(
        "--workflow",
        choices=["noop", "booking"],
        default="noop",
        help="labkit's side: validate-and-ack, or the five steps with their real effects (no step delay)",
    )
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; {args.workflow} bookings; concurrency {args.concurrency}; median of {args.repeat}")
    print(f"{'backend':8} {'workers':>7} {'backlog':>8} {'labkit/s':>10} {'raw/s':>10} {'ratio':>6}  (min-max)")
    for backend in args.backends:
        count = args.count or BACKLOG[backend]
        for workers in args.workers:
            ours, theirs = [], []
            for _ in range(args.repeat):
                config = Config.from_env(namespace=f"bench{uuid.uuid4().hex[:6]}-")
                ours.append(labkit_rate(backend, config, count, workers, args.concurrency, args.workflow))
                theirs.append(raw_rate(backend, config, count, workers, args.concurrency))
            ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
            print(
                f"{backend:8} {workers:7d} {count:8d} {statistics.median(ours):10.0f} {statistics.median(theirs):10.0f}"
                f" {statistics.median(ratios):6.2f}  ({min(ratios):.2f}-{max(ratios):.2f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
