"""What separates labkit's BullMQ worker from BullMQ's raw loop: the raw loop again, recording each completion.

labkit's worker records every completion in Redis before BullMQ acknowledges the job (so that a
redelivery is counted as a duplicate, and the counts reconcile after a crash). BullMQ's Python
worker hands over one job per processor call and acknowledges it with its own script, so that
record is a round trip BullMQ knows nothing of. This drains the same no-op backlog three ways, one
worker process each, interleaved so that the machine's drift hits all three alike:

- ``raw``: ``raw_clients.py``, the processor only encodes the job's data;
- ``raw + record``: the same loop, its processor also doing one SADD per job before it returns;
- ``labkit``: ``labkit worker --workflow noop``, which validates, writes the event lines, and records
  the completions of each batch of jobs in one script call.

    python benchmarks/bullmq_gap.py --repeat 3

It needs the stack (`labkit up`); it uses its own namespaces and leaves no data behind.
"""

from __future__ import annotations

import argparse
import statistics
import uuid

from throughput import BACKLOG, labkit_rate, raw_rate

from labkit.config import Config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=BACKLOG["bullmq"], help="jobs per drain")
    parser.add_argument("--concurrency", type=int, default=16, help="BullMQ worker concurrency, all three loops")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median is shown")
    args = parser.parse_args()
    loops = {
        "raw": lambda config: raw_rate("bullmq", config, args.count, 1, args.concurrency),
        "raw + record": lambda config: raw_rate("bullmq", config, args.count, 1, args.concurrency, ["--record"]),
        "labkit": lambda config: labkit_rate("bullmq", config, args.count, 1, args.concurrency, "noop"),
    }
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.repeat):
        for name, drain in loops.items():
            rates[name].append(drain(Config.from_env(namespace=f"gap{uuid.uuid4().hex[:6]}-")))
    print(f"BullMQ, 1 worker, {args.count} no-op jobs, concurrency {args.concurrency}; median of {args.repeat}")
    print(f"{'loop':14} {'jobs/s':>8} {'/ raw':>6}  (min-max of the round's ratio)")
    for name, values in rates.items():
        ratios = [value / raw for value, raw in zip(values, rates["raw"], strict=True)]
        print(
            f"{name:14} {statistics.median(values):8.0f} {statistics.median(ratios):6.2f}"
            f"  ({min(ratios):.2f}-{max(ratios):.2f})"
        )


if __name__ == "__main__":
    main()
