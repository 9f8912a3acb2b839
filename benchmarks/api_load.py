"""Load on the booking service's POST /api/bookings, per backend, against a bare uvicorn endpoint in the same run.

    python -m labkit up
    python benchmarks/api_load.py --seconds 10 --connections 8 --rate 1000

For each target (a bare uvicorn endpoint that reads the body and answers 202, then the service with
``backend`` set to bullmq, streams and kafka) a load generator in its own process posts bookings for a
fixed time over several keep-alive connections, twice: open loop at ``--rate`` bookings/s (latency counted
from each request's intended send time, so a stall is not hidden) and closed loop flat out (each
connection sends its next booking when the last is answered). It prints accepted bookings/s and the
p50/p99/p99.9 of the 202s, and the ratio to the bare endpoint. The service runs with ``--no-workers`` while
it is measured (the workers would share the two cores); afterwards two workers per backend drain what was
accepted, and every accepted booking must be completed (the ledger's counts in a fresh namespace).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import labkit as lk  # noqa: E402
from labkit.lessons.service import BookingService, free_port  # noqa: E402

BOOKING = {"user_id": "user-1", "hotel_id": "hotel-1", "check_in": "2027-03-01", "check_out": "2027-03-04",
           "guests": 2, "amount_cents": 12_000}  # fmt: skip


# -- the bare endpoint: what uvicorn alone costs ---------------------------------------------------


async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body, answers 202 with a small JSON body: HTTP and nothing else."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    body = b'{"booking_id":"bare","accepted":{}}'
    await send(
        {
            "type": "http.response.start",
            "status": 202,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def run_bare(port: int) -> None:
    import uvicorn

    uvicorn.run(bare_app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")


# -- the load generator: its own process, a minimal keep-alive HTTP/1.1 client ----------------------


async def _connection(port: int, body_of: Any, deadline: float, interval: float | None, offset: float,
                      latencies: list[float], statuses: dict[int, int], accepted: list[str]) -> None:  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    due = time.monotonic() + offset
    while True:
        now = time.monotonic()
        if interval is not None:
            if due > now:
                await asyncio.sleep(due - now)
            start, due = due, due + interval
        else:
            start = now
        if start >= deadline:
            break
        body = body_of()
        writer.write(b"POST /api/bookings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = next(int(line[15:]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
        answer = await reader.readexactly(length)
        statuses[status] = statuses.get(status, 0) + 1
        if status == 202:
            latencies.append(time.monotonic() - start)
            accepted.append(json.loads(answer).get("booking_id", ""))
    writer.close()


async def _load(port: int, backend: str | None, seconds: float, connections: int, rate: float) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    accepted: list[str] = []
    run = uuid.uuid4().hex[:6]
    counter = iter(range(10**9))

    def body_of() -> bytes:
        booking = {**BOOKING, "booking_id": f"load-{run}-{next(counter)}"}
        if backend is not None:
            booking["backend"] = backend
        return json.dumps(booking).encode()

    interval = connections / rate if rate else None
    start = time.monotonic()
    deadline = start + seconds
    await asyncio.gather(*(
        _connection(port, body_of, deadline, interval, (interval or 0) * i / connections, latencies, statuses, accepted)
        for i in range(connections)
    ))  # fmt: skip
    elapsed = time.monotonic() - start
    return {"latencies": latencies, "statuses": statuses, "accepted": len(accepted), "elapsed": elapsed}


def _generate(port: int, backend: str | None, seconds: float, connections: int, rate: float, out: Any) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out.put(asyncio.run(_load(port, backend, seconds, connections, rate)))


def measure(port: int, backend: str | None, seconds: float, connections: int, rate: float) -> dict[str, Any]:
    """One load run in a process of its own; the figures of its 202s."""
    import numpy as np

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_generate, args=(port, backend, seconds, connections, rate, queue))
    process.start()
    result = queue.get(timeout=seconds + 120)
    process.join(30)
    lat = np.array(result["latencies"]) * 1000
    p50, p99, p999 = (np.percentile(lat, q) if len(lat) else float("nan") for q in (50, 99, 99.9))
    return {"accepted/s": result["accepted"] / result["elapsed"], "accepted": result["accepted"],
            "p50 ms": p50, "p99 ms": p99, "p99.9 ms": p999, "max ms": lat.max() if len(lat) else float("nan"),
            "other answers": {k: v for k, v in result["statuses"].items() if k != 202}}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="each run's length")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rate", type=float, default=1000.0, help="the open-loop run's bookings/s")
    parser.add_argument("--backends", nargs="+", default=list(lk.BACKENDS))
    parser.add_argument("--bare-server", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        run_bare(args.bare_server)
        return 0

    config = lk.Config.from_env(namespace=f"load{uuid.uuid4().hex[:6]}-")
    lk.setup(namespace=config.namespace)
    bare_port = free_port()
    bare = subprocess.Popen([sys.executable, __file__, "--bare-server", str(bare_port)])
    rows: list[dict[str, Any]] = []
    try:
        with BookingService(config, workers=0, serve_args=["--no-workers"]).start() as service:
            time.sleep(1)
            for backend in args.backends:  # the first produce of each backend connects and makes its topics
                service.book(**BOOKING, backend=backend)
            targets: list[tuple[str, int, str | None]] = [("bare uvicorn", bare_port, None)]
            targets += [(backend, service.port, backend) for backend in args.backends]
            for mode, rate in (("open loop", args.rate), ("closed loop", 0.0)):
                for label, port, backend in targets:
                    figures = measure(port, backend, args.seconds, args.connections, rate)
                    rows.append({"target": label, "mode": f"{mode} {rate:g}/s" if rate else mode, **figures})
                    f = figures
                    print(f"{rows[-1]['mode']:>18} {label:<13} {f['accepted/s']:>8,.0f} accepted/s"
                          f"  p50 {f['p50 ms']:6.2f}  p99 {f['p99 ms']:6.2f}  p99.9 {f['p99.9 ms']:7.2f} ms"
                          f"  {f['other answers'] or ''}",
                          flush=True)  # fmt: skip
    finally:
        bare.terminate()
        bare.wait(10)
    print_table(rows)
    return reconcile(config, args.backends, rows)


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| mode | target | accepted/s | p50 ms | p99 ms | p99.9 ms | ratio to bare (accepted/s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        bare = next(r for r in rows if r["mode"] == row["mode"] and r["target"] == "bare uvicorn")
        ratio = row["accepted/s"] / bare["accepted/s"]
        print(f"| {row['mode']} | {row['target']} | {row['accepted/s']:,.0f} | {row['p50 ms']:.2f} | "
              f"{row['p99 ms']:.2f} | {row['p99.9 ms']:.2f} | {ratio:.2f} |")  # fmt: skip


def reconcile(config: lk.Config, backends: list[str], rows: list[dict[str, Any]]) -> int:
    """Two workers per backend drain what the service accepted; every accepted booking must complete."""
    failed = 0
    for backend in backends:
        expected = 1 + sum(r["accepted"] for r in rows if r["target"] == backend)  # + the warm-up booking
        started = time.monotonic()
        with lk.WorkerPool(backend, config, lk.WorkerSettings(concurrency=32)).start(2) as pool:
            stats = pool.wait_until_drained(timeout=600, expected=expected)
        settled = stats["completed"] + stats["dead_lettered"]
        ok = stats["completed"] == expected and settled == expected
        failed += not ok
        print(f"reconciled {backend}: accepted {expected}, completed {stats['completed']}, dead-lettered "
              f"{stats['dead_lettered']}, lost {expected - settled}, drained in {time.monotonic() - started:.0f} s"
              f" -- {'ok' if ok else 'FAILED'}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
