"""No-op bookings per second through labkit workers, against the raw client loop, in the same run.

For each backend and worker count: the same N bookings are produced first (a backlog),
then drained once by labkit worker processes (``workflow=noop``: validate, record
completion, acknowledge) and once by the raw loops of ``raw_clients.py``. Throughput is
N divided by the time from the first message received to the last one acknowledged, so
process start-up and group joins are not counted against either side.

    python benchmarks/throughput.py --count 20000 --workers 1 2
    python benchmarks/throughput.py --count 10000 --workers 1 --workflow booking   # the five steps, real effects

It needs the stack (`labkit up`); it uses its own namespaces and leaves no data behind.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import labkit as lk
from labkit.config import Config
from labkit.pool import WorkerPool

ROOT = Path(__file__).resolve().parents[1]


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


def raw_rate(backend: str, config: Config, count: int, workers: int, concurrency: int) -> float:
    """Bookings/s of `workers` raw client loops draining a backlog of `count`."""
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
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--backends", nargs="+", default=list(lk.BACKENDS))
    parser.add_argument("--concurrency", type=int, default=16, help="in-process concurrency (labkit and raw BullMQ)")
    parser.add_argument(
        "--workflow",
        choices=["noop", "booking"],
        default="noop",
        help="labkit's side: validate-and-ack, or the five steps with their real effects (no step delay)",
    )
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; {args.count} {args.workflow} bookings per run; concurrency {args.concurrency}")
    print(f"{'backend':8} {'workers':>7} {'labkit/s':>10} {'raw/s':>10} {'ratio':>6}")
    for backend in args.backends:
        for workers in args.workers:
            config = Config.from_env(namespace=f"bench{uuid.uuid4().hex[:6]}-")
            ours = labkit_rate(backend, config, args.count, workers, args.concurrency, args.workflow)
            theirs = raw_rate(backend, config, args.count, workers, args.concurrency)
            print(f"{backend:8} {workers:7d} {ours:10.0f} {theirs:10.0f} {ours / theirs:6.2f}", flush=True)


if __name__ == "__main__":
    main()
