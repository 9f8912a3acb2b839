"""The fidelity matrix of docs/embedded-kafka.md: every probe of labkit.backends.kafka.fidelity on both brokers.

Each broker runs in a private stack of its own (free ports, a temporary state folder; Apache Kafka from the lab's
jars), so nothing a learner runs is touched. Prints one Markdown table, a row per probe, a column per broker.

    python benchmarks/kafka_fidelity.py                    # both brokers (Apache Kafka needs Java 17 and Maven)
    python benchmarks/kafka_fidelity.py --broker embedded  # one of them
"""

from __future__ import annotations

import argparse
import sys
import time

from labkit.backends.kafka import fidelity
from labkit.config import KAFKA_BROKERS, Config
from labkit.stack import PrivateStack


def measure(broker: str, probes: list[str]) -> dict[str, fidelity.Finding]:
    """Run ``probes`` (and the restart probe) against a private broker of kind ``broker``."""
    stack = PrivateStack(with_kafka=True, namespace="fid-", lab_config=Config.from_env(kafka=broker))
    try:
        stack.up(timeout=180)
        found = {}
        for name in probes:
            started = time.monotonic()
            found[name] = fidelity.PROBES[name](stack.config)
            print(f"  {broker:<8} {name:<30} {found[name].text} ({time.monotonic() - started:.0f} s)", file=sys.stderr)

        def crash_and_start() -> None:
            stack.stop_service("kafka", hard=True)
            stack.up(timeout=180)

        found["restart_durability"] = fidelity.restart_durability(stack.config, crash_and_start)
        print(f"  {broker:<8} restart_durability             {found['restart_durability'].text}", file=sys.stderr)
        return found
    finally:
        stack.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=[*KAFKA_BROKERS, "both"], default="both")
    parser.add_argument("--probe", action="append", choices=list(fidelity.PROBES), help="repeatable [default: all]")
    args = parser.parse_args()
    brokers = list(KAFKA_BROKERS) if args.broker == "both" else [args.broker]
    probes = args.probe or list(fidelity.PROBES)
    results = {broker: measure(broker, probes) for broker in brokers}
    names = {"embedded": "embedded (Tansu)", "apache": "Apache Kafka"}
    print("| probe | " + " | ".join(names[b] for b in brokers) + " |")
    print("| --- |" + " --- |" * len(brokers))
    for probe in [*probes, "restart_durability"]:
        cells = []
        for broker in brokers:
            finding = results[broker][probe]
            cells.append(("" if finding.kafka_like else "**differs:** ") + finding.text)
        print(f"| `{probe}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
