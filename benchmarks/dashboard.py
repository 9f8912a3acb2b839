"""The dashboard's figures (docs/dashboard.md): what its sampler costs the brokers, the CPU the service uses while
pages are open, and the screenshot under load.

    python -m labkit up
    python benchmarks/dashboard.py sampler --seconds 30              # Redis commands/s of one Sampler
    python benchmarks/dashboard.py cpu --seconds 30                  # the service's CPU with 0, 1 and 3 pages
    python benchmarks/dashboard.py screenshot --out docs/dashboard.png

``sampler`` runs one :class:`labkit.sampler.Sampler` of the three backends in this process on a namespace of its
own and counts the Redis commands it causes from ``INFO commandstats`` before and after (run it with nothing else
using the lab's Redis): once idle, once while bookings arrive (``--rate`` a second through the service's own
producer path, so that they are recent bookings whose status the sampler reads). ``cpu`` starts ``labkit serve``
(one worker per backend, idle) and reads its process's CPU time from ``/proc/<pid>/stat`` over ``--seconds`` with
no page, one and three pages open in headless Chromium (Debian's ``chromium``, the ``browser`` extra).
``screenshot`` starts the service with ``--step-ms 20``, posts about 40 bookings a second (one in 25 poison) for
``--load-seconds``, adds a second Kafka worker from the page half-way, and saves the whole page at 1280 px wide.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

import labkit as lk  # noqa: E402
from labkit.lessons.service import BookingService, free_port  # noqa: E402
from labkit.sampler import Sampler  # noqa: E402
from labkit.service.browser import headless_chromium  # noqa: E402

BOOKING = {"user_id": "user-1", "hotel_id": "hotel-1", "check_in": "2027-03-01", "check_out": "2027-03-04",
           "guests": 2, "amount_cents": 12_000}  # fmt: skip


def _commands(client: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in client.info("commandstats").items()}


def sampler_cost(config: lk.Config, seconds: float) -> str:
    """Redis commands a second while one Sampler runs on an idle lab, command by command."""
    client = redis.Redis.from_url(config.redis_url)

    async def measure() -> tuple[dict[str, int], dict[str, int], float]:
        async with Sampler(config):
            await asyncio.sleep(3)  # connected, the servers' names known
            before, started = _commands(client), time.monotonic()
            await asyncio.sleep(seconds)
            return before, _commands(client), time.monotonic() - started

    before, after, took = asyncio.run(measure())
    diff = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    diff["info"] = diff.get("info", 0) - 1  # this script's own INFO
    shown = ", ".join(f"{k} {v / took:.1f}" for k, v in sorted(diff.items(), key=lambda kv: -kv[1]) if v > 0)
    return f"{sum(diff.values()) / took:.1f} Redis commands/s over {took:.0f} s ({shown})"


def sampler_cost_under_load(config: lk.Config, seconds: float, rate: float) -> str:
    """The same, with and without a Sampler, while ``rate`` bookings a second arrive through the booking service:
    the difference is the sampler's."""
    client = redis.Redis.from_url(config.redis_url)
    with BookingService(config, free_port(), workers=1, step_ms=20).start() as service:
        service.warm_up()
        stop = threading.Event()

        def post() -> None:
            started, sent = time.monotonic(), 0
            while not stop.is_set():
                due = started + sent / rate
                time.sleep(max(0.0, due - time.monotonic()))
                service.book(**BOOKING)
                sent += 1

        poster = threading.Thread(target=post, daemon=True)
        poster.start()
        try:
            time.sleep(3)
            without = _rate(client, seconds)

            async def with_sampler() -> float:
                async with Sampler(config):
                    await asyncio.sleep(3)
                    return await asyncio.to_thread(_rate, client, seconds)

            within = asyncio.run(with_sampler())
        finally:
            stop.set()
            poster.join()
    return (f"while {rate:g} bookings/s arrive through the service: {without:.0f} Redis commands/s without the "
            f"sampler, {within:.0f} with it: the sampler's share {within - without:.0f}/s")  # fmt: skip


def _rate(client: redis.Redis, seconds: float) -> float:
    before, started = sum(_commands(client).values()), time.monotonic()
    time.sleep(seconds)
    return (sum(_commands(client).values()) - before - 1) / (time.monotonic() - started)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_page(browser: Any, url: str, height: int = 1600) -> Any:
    page = browser.new_page(viewport={"width": 1280, "height": height})
    page.goto(f"{url}/dashboard")
    page.wait_for_function("() => Object.keys(window.labkitDashboard.lastGood).length === 3", timeout=30_000)
    return page


def service_cpu(config: lk.Config, seconds: float) -> str:
    """The service process's CPU (its sampler and its pages' streams; not its workers) with 0, 1 and 3 pages."""
    lines = []
    with BookingService(config, free_port(), workers=1).start() as service, headless_chromium() as browser:
        service.warm_up()
        assert service.proc is not None
        pages: list[Any] = []
        for wanted in (0, 1, 3):
            while len(pages) < wanted:
                pages.append(open_page(browser, service.url))
            time.sleep(3)
            before, started = _cpu_seconds(service.proc.pid), time.monotonic()
            time.sleep(seconds)
            share = (_cpu_seconds(service.proc.pid) - before) / (time.monotonic() - started)
            lines.append(f"{wanted} page(s) open: {share * 100:.1f} % of a core")
    return f"the service's CPU over {seconds:g} s each: " + "; ".join(lines)


def screenshot(config: lk.Config, out: Path, seconds: float) -> str:
    """The page at 1280 px under load: ~40 bookings/s, one in 25 poison, a Kafka worker added half-way."""
    with BookingService(config, free_port(), workers=1, step_ms=20).start() as service, headless_chromium() as browser:
        service.warm_up()
        page = open_page(browser, service.url)
        started, sent = time.monotonic(), 0
        added = False
        while time.monotonic() - started < seconds:
            due = started + sent / 40
            time.sleep(max(0.0, due - time.monotonic()))
            fault = {"poison": True} if sent % 25 == 24 else {}
            service.book(**BOOKING, **({"fault": fault} if fault else {}))
            sent += 1
            if not added and time.monotonic() - started > seconds / 2:
                page.click("#backend-kafka button[data-scale='1']")
                added = True
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out), full_page=True)
    return f"{out}: {sent} bookings posted over {seconds:g} s, a Kafka worker added at {seconds / 2:g} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["sampler", "cpu", "screenshot"])
    parser.add_argument("--seconds", type=float, default=30.0, help="each measurement's length")
    parser.add_argument("--load-seconds", type=float, default=120.0, help="screenshot: how long the load runs")
    parser.add_argument("--rate", type=float, default=20.0, help="sampler: bookings/s of the loaded measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = parser.parse_args()
    config = lk.setup(namespace=f"dash{uuid.uuid4().hex[:6]}-")
    if args.what == "sampler":
        print("idle:", sampler_cost(config, args.seconds))
        print(sampler_cost_under_load(config, args.seconds, args.rate))
    elif args.what == "cpu":
        print(service_cpu(config, args.seconds))
    else:
        print(screenshot(config, args.out, args.load_seconds))


if __name__ == "__main__":
    try:
        main()
    except lk.LabkitError as e:
        sys.exit(f"Error: {e}")
