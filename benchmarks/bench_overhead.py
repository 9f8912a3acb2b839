"""Harness overhead: the highest rate through ``labkit bench`` against the raw client loops, in the same run.

For each backend, the same shape twice: one producer sending as fast as the broker
acknowledges for ``--seconds``, and ``--consumers`` consumer processes draining at the
same time. Once through the harness (the ``max-rate`` workload: open-loop producer with
intended times, ``consume_batches``, latency noted per message) and once with the plain
loops of ``raw_clients.py``. The rate is the messages consumed per second after the
warm-up; the issue's target is harness / raw >= 0.8.

    python benchmarks/bench_overhead.py --seconds 20 --consumers 2 --repeat 3

It needs the stack (``labkit up``) and uses namespaces of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np

from labkit import bench
from labkit.config import BACKENDS, Config
from labkit.lab import with_backend

ROOT = Path(__file__).resolve().parents[1]


def raw_rate(backend: str, base: Config, seconds: float, warmup: float, consumers: int) -> float:
    """Messages/s the raw loops consume while the raw producer sends flat out."""
    config = dataclasses.replace(base, namespace=f"{base.namespace}raw{uuid.uuid4().hex[:6]}-")
    with_backend(backend, lambda b: b.setup(), config)
    env = {**os.environ, **config.to_env(), "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "benchmarks" / "raw_clients.py")

    def spawn(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, script, "--backend", backend, *args], env=env, stdout=subprocess.PIPE, text=True
        )

    readers = [spawn("--role", "consume", "--name", f"raw-{i}", "--idle", "3") for i in range(consumers)]
    writer = spawn("--role", "produce", "--seconds", str(seconds))
    try:
        produced = json.loads(writer.communicate(timeout=seconds + 120)[0])
        results = [json.loads(r.communicate(timeout=seconds + 180)[0]) for r in readers]
    finally:
        for process in (*readers, writer):
            process.kill()
        with_backend(backend, lambda b: b.purge(), config)
    start = produced["marks"][0][0]
    window = (start + warmup, start + seconds)
    consumed = 0.0
    for result in results:
        if result["marks"]:
            times, counts = zip(*result["marks"], strict=True)
            low, high = np.interp(window, times, counts, left=0)
            consumed += high - low
    return consumed / (seconds - warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--consumers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    args = parser.parse_args()
    config = Config.from_env()
    workload = bench.WORKLOADS["max-rate"].replace(
        duration_s=args.seconds, warmup_s=args.warmup, consumers=args.consumers, message_bytes=256
    )
    found = bench.servers(config)
    print(
        f"{os.cpu_count()} cores, clients and brokers on this machine; Redis: {found['redis']}; Kafka: {found['kafka']}"
    )
    print(f"{args.seconds:g} s per run ({args.warmup:g} s warm-up), {args.consumers} consumers, ~256 B messages")
    print(
        f"{'backend':8} {'harness/s':>10} {'raw/s':>10} {'ratio':>6}   (median of {args.repeat}; min-max of the ratio)"
    )
    for backend in args.backends:
        ours, theirs = [], []
        for _ in range(args.repeat):
            ours.append(bench.run_once(backend, workload, config)[0]["throughput_per_s"])
            theirs.append(raw_rate(backend, config, args.seconds, args.warmup, args.consumers))
        ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
        print(
            f"{backend:8} {statistics.median(ours):10.0f} {statistics.median(theirs):10.0f} "
            f"{statistics.median(ratios):6.2f}   ({min(ratios):.2f}-{max(ratios):.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
