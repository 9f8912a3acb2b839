"""How long `labkit up` takes from cold (nothing running) to both servers healthy, on each Kafka broker.

Runs on its own ports and a throw-away state folder, so a running lab is not touched. Apache Kafka starts from
jars already cached (the lab's, or fetched once before the clock starts): its first start in a new state folder
also formats the log, every later one opens the log it left and maps the class-data-sharing archive that the
first clean shutdown wrote; a start without that archive shows what the archive saves.

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
    """Apache Kafka alone: the first start (formats the log), warm starts, and starts without the CDS archive."""
    found: dict[str, list[float]] = {"first": [], "warm": [], "no_archive": []}
    lab = Config.from_env()
    with tempfile.TemporaryDirectory(prefix="labkit-bench-") as home:
        config = Config(kafka_bootstrap=f"127.0.0.1:{kafka_port}", home=Path(home), kafka="apache")
        jars = apache_kafka.locate(lab) or apache_kafka.fetch(lab)  # fetched before the clock starts
        apache_kafka.cache_dir(config).parent.mkdir(parents=True)
        apache_kafka.cache_dir(config).symlink_to(jars.libs, target_is_directory=True)
        stack = Stack(config, services=["kafka"])
        java = apache_kafka.find_java()
        for kind, runs in (("first", 1), ("warm", repeat), ("no_archive", repeat)):
            for _ in range(runs):
                if kind == "no_archive":
                    apache_kafka.cds_archive(config, java, jars).unlink(missing_ok=True)
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
        _report("Apache Kafka, cold to healthy (log and CDS archive in place)", apache["warm"])
        _report("Apache Kafka, cold to healthy without the CDS archive", apache["no_archive"])


if __name__ == "__main__":
    main()
