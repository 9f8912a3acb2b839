"""How long `labkit up` takes from cold (nothing running) to both servers healthy.

Runs on its own ports and a throw-away state folder, so a running lab is not touched.

    python benchmarks/stack_startup.py --repeat 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from labkit.config import Config
from labkit.stack import Stack


def measure(repeat: int, redis_port: int, kafka_port: int) -> list[float]:
    """Seconds from `up()` called to both healthy, once per repetition, each followed by `down()`."""
    seconds = []
    with tempfile.TemporaryDirectory(prefix="labkit-bench-") as home:
        config = Config(
            redis_url=f"redis://127.0.0.1:{redis_port}/0",
            kafka_bootstrap=f"127.0.0.1:{kafka_port}",
            home=Path(home),
        )
        stack = Stack(config)
        for _ in range(repeat):
            started = time.perf_counter()
            stack.up()
            seconds.append(time.perf_counter() - started)
            stack.down()
    return seconds


def measure_cli(repeat: int, redis_port: int, kafka_port: int) -> list[float]:
    """The same through the command a learner types, `python -m labkit up`, Python start-up and imports included."""
    seconds = []
    with tempfile.TemporaryDirectory(prefix="labkit-bench-") as home:
        env = {
            **os.environ,
            "LABKIT_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "LABKIT_KAFKA_BOOTSTRAP": f"127.0.0.1:{kafka_port}",
            "LABKIT_HOME": home,
        }
        for _ in range(repeat):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "labkit", "up"], env=env, check=True, capture_output=True)
            seconds.append(time.perf_counter() - started)
            subprocess.run([sys.executable, "-m", "labkit", "down"], env=env, check=True, capture_output=True)
    return seconds


def _report(what: str, seconds: list[float]) -> None:
    runs = " ".join(f"{s:.2f}" for s in seconds)
    low, high = min(seconds), max(seconds)
    print(f"{what}: median {statistics.median(seconds):.2f} s (min {low:.2f}, max {high:.2f}, runs {runs})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--redis-port", type=int, default=16590)
    parser.add_argument("--kafka-port", type=int, default=19590)
    args = parser.parse_args()
    _report("Stack.up(), cold to healthy", measure(args.repeat, args.redis_port, args.kafka_port))
    _report(
        "`python -m labkit up` (also creates the destinations)",
        measure_cli(args.repeat, args.redis_port, args.kafka_port),
    )


if __name__ == "__main__":
    main()
