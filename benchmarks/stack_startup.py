"""How long `labkit up` takes from cold (nothing running) to both servers healthy, on each Kafka broker.

Runs on its own ports and a throw-away state folder, so a running lab is not touched. Apache Kafka starts from
jars already cached (the lab's, or fetched once before the clock starts): its first start in a new state folder
also formats the log, every later one opens the log it left.

    python benchmarks/stack_startup.py --repeat 5                 # embedded broker, then Apache Kafka
    python benchmarks/stack_startup.py --repeat 5 --kafka apache
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

from labkit import apache_kafka
from labkit.config import KAFKA_BROKERS, Config
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


def measure_apache(repeat: int, kafka_port: int) -> dict[str, list[float]]:
    """Apache Kafka alone: the first start in a new state folder (it formats the log), then ``repeat`` starts."""
    found: dict[str, list[float]] = {"first": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="labkit-bench-") as home:
        config = Config(kafka_bootstrap=f"127.0.0.1:{kafka_port}", home=Path(home), kafka="apache")
        lab = Config.from_env()
        if apache_kafka.locate(lab) is None:
            apache_kafka.fetch(lab)  # before the clock starts
        apache_kafka.share_jars(lab, config)
        stack = Stack(config, services=["kafka"])
        for kind, runs in (("first", 1), ("warm", repeat)):
            for _ in range(runs):
                started = time.perf_counter()
                stack.up(timeout=180)
                found[kind].append(time.perf_counter() - started)
                stack.down()
    return found


def _report(what: str, seconds: list[float]) -> None:
    runs = " ".join(f"{s:.2f}" for s in seconds)
    low, high = min(seconds), max(seconds)
    print(f"{what}: median {statistics.median(seconds):.2f} s (min {low:.2f}, max {high:.2f}, runs {runs})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--redis-port", type=int, default=16590)
    parser.add_argument("--kafka-port", type=int, default=19590)
    parser.add_argument("--kafka", choices=[*KAFKA_BROKERS, "both"], default="both")
    args = parser.parse_args()
    if args.kafka in ("embedded", "both"):
        _report("Stack.up(), cold to healthy", measure(args.repeat, args.redis_port, args.kafka_port))
        _report(
            "`python -m labkit up` (also creates the destinations)",
            measure_cli(args.repeat, args.redis_port, args.kafka_port),
        )
    if args.kafka in ("apache", "both"):
        apache = measure_apache(args.repeat, args.kafka_port)
        _report("Apache Kafka, first start in a new state folder (formats the log)", apache["first"])
        _report("Apache Kafka, cold to healthy (jars cached, log in place)", apache["warm"])


if __name__ == "__main__":
    main()
