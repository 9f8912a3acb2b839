"""Full-length reliability drills: the figures of docs/drills.md.

Runs the drills one after another (never two at once: each starts real worker processes) and
prints each one's summary line, then a table of all of them; ``--csv`` keeps the table.

    python benchmarks/drills.py                         # every drill, full length (about 40 minutes)
    python benchmarks/drills.py --seconds 60 --only worker-kills redis-restart

It needs the stack (`labkit up`) for the drills that run in a namespace of their own
(worker-kills, bad-input, slow-consumer, process-hygiene); the restart drills start a private
stack on free ports. No data is left behind.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from labkit import drills

#: The issue's full run: a producer for 10 minutes while workers are killed.
FULL_SECONDS = 600.0


def plan(seconds: float) -> list[tuple[str, Callable[[], drills.DrillResult]]]:
    """Every drill, in the order the docs list them, as (name, thunk)."""
    runs: list[tuple[str, Callable[[], drills.DrillResult]]] = []
    for backend in ("bullmq", "streams", "kafka"):
        runs.append(("worker-kills", lambda b=backend: drills.worker_kills(b, seconds=seconds)))
    runs.append(("worker-kills", lambda: drills.worker_kills("bullmq", seconds=min(seconds, 60), idempotent=False)))
    for backend in ("bullmq", "streams"):
        for hard in (False, True):
            runs.append(("redis-restart", lambda b=backend, h=hard: drills.redis_restart(b, seconds=60, hard=h)))
    runs.append(("kafka-restart", lambda: drills.kafka_restart(seconds=60)))
    for backend in ("bullmq", "streams", "kafka"):
        runs.append(("bad-input", lambda b=backend: drills.bad_input(b, valid=1000)))
    for backend in ("bullmq", "streams", "kafka"):
        for protected in (True, False):
            runs.append(("slow-consumer", lambda b=backend, p=protected: drills.slow_consumer(b, protected=p)))
    for backend in ("bullmq", "streams", "kafka"):
        runs.append(("process-hygiene", lambda b=backend: drills.process_hygiene(b)))
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=FULL_SECONDS, help="worker-kills producer run time")
    parser.add_argument("--only", nargs="*", choices=drills.DRILLS, help="run only these drills")
    parser.add_argument("--csv", type=Path, default=None, help="write the results table here")
    args = parser.parse_args()
    results = []
    for name, run in plan(args.seconds):
        if args.only and name not in args.only:
            continue
        result = run()
        print(result.summary(), flush=True)
        results.append(result)
    frame = drills.results_frame(results)
    columns = ["drill", "backend", "seconds", "produced", "completed", "dead_lettered", "lost", "duplicates",
               "double_effects", "recovery_s", "worker_crashes", "ok"]  # fmt: skip
    print(frame[columns].to_string(index=False))
    if args.csv:
        frame.to_csv(args.csv, index=False)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
