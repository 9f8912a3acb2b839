"""The dashboard of ``labkit serve`` (``/dashboard``) in a real headless Chromium, against the real stack.

Posted bookings move the counts and the charts (and the delay from a booking completing to its count changing on
the page is measured), a posted booking shows in every column's recent bookings with its state and progress until
it completes, "+1 worker" shows the new worker (Kafka: it takes partitions), a dead letter's Replay button sends it
again and it completes, and a stopped broker shows as not answering in the broker health and greys the other
panels of its column (on a private stack, never the shared test stack). Debian's ``chromium`` driven by Playwright
for Python; run with ``pytest --browser``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from labkit.config import BACKENDS
from labkit.errors import LabkitError
from labkit.lessons.service import BookingService, free_port
from labkit.service.browser import headless_chromium
from labkit.stack import PrivateStack

pytestmark = [pytest.mark.integration, pytest.mark.redis, pytest.mark.kafka, pytest.mark.browser]

BOOKING = {"user_id": "u-dash", "hotel_id": "h-dash", "check_in": "2027-03-01", "check_out": "2027-03-03",
           "guests": 1, "amount_cents": 20_000}  # fmt: skip
#: The page must show a completed booking within this long (the sampler samples once a second).
UPDATE_BOUND_S = 5.0


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Debian's Chromium under Playwright; a missing one fails loudly with what to install."""
    try:
        with headless_chromium() as browser:
            yield browser
    except LabkitError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def service(lab_stack: Any) -> Iterator[BookingService]:
    config = lab_stack.config.with_(namespace=f"t{uuid.uuid4().hex[:8]}-")
    serve_args = ["--backoff-ms", "50", "--max-attempts", "2"]
    with BookingService(config, free_port(), workers=1, step_ms=20, serve_args=serve_args).start() as running:
        running.warm_up()
        yield running


def open_dashboard(chromium: Any, url: str) -> Any:
    page = chromium.new_page(viewport={"width": 1280, "height": 1600})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{url}/dashboard")
    page.wait_for_function("() => Object.keys(window.labkitDashboard.lastGood).length === 3", timeout=20_000)
    page.errors = errors
    return page


def count(page: Any, backend: str, state: str) -> int:
    return int(page.inner_text(f"#backend-{backend} [data-count={state}]"))


def wait_count(page: Any, backend: str, state: str, value: int, timeout_s: float) -> None:
    page.wait_for_function(
        "([b, s, v]) => { const c = document.querySelector(`#backend-${b} [data-count=${s}]`);"
        " return c && Number(c.textContent) >= v; }",
        arg=[backend, state, value],
        timeout=timeout_s * 1000,
    )


def test_posted_bookings_move_the_counts_and_the_charts(chromium: Any, service: BookingService) -> None:
    page = open_dashboard(chromium, service.url)
    n = 20
    before = {b: count(page, b, "completed") for b in BACKENDS}
    points = page.evaluate("() => Object.fromEntries(Object.entries(window.labkitDashboard.columns)"
                           ".map(([b, c]) => [b, c.series.at.length]))")  # fmt: skip
    # The page notes the moment each backend's completed count reaches its target.
    page.evaluate(
        """(targets) => { window.reached = {};
        for (const [b, v] of Object.entries(targets)) {
          const watch = () => { const c = document.querySelector(`#backend-${b} [data-count=completed]`);
            if (!window.reached[b] && c && Number(c.textContent) >= v) window.reached[b] = Date.now() / 1000; };
          new MutationObserver(watch).observe(document.getElementById(`backend-${b}`),
                                              {subtree: true, childList: true, characterData: true});
        } }""",
        {b: before[b] + n for b in BACKENDS},
    )
    ids = [service.book(**BOOKING)["booking_id"] for _ in range(n)]
    settled = service.wait_settled(ids, timeout=60)
    for backend in BACKENDS:
        wait_count(page, backend, "completed", before[backend] + n, 30)
    reached = page.evaluate("() => window.reached")
    delays = {}
    for backend in BACKENDS:
        done_at = max(settled[i][backend]["updated_at"] for i in ids)
        delays[backend] = reached[backend] - done_at
    print("page update delay after the last booking completed (s):", {b: round(d, 2) for b, d in delays.items()})
    assert all(0 <= d < UPDATE_BOUND_S for d in delays.values()), delays
    charts = page.evaluate(
        "() => Object.fromEntries(Object.entries(window.labkitDashboard.columns).map(([b, c]) =>"
        " [b, {points: c.series.at.length, peak: Math.max(...c.series.throughput)}]))"
    )
    for backend in BACKENDS:
        assert charts[backend]["points"] > points[backend]
        assert charts[backend]["peak"] > 0, f"{backend}: the throughput chart never rose"
    assert not page.errors
    page.close()


def test_a_posted_booking_shows_in_recent_bookings_with_its_progress(chromium: Any, service: BookingService) -> None:
    page = open_dashboard(chromium, service.url)
    # The page notes every (state, progress) it shows for the booking, in each column, as it changes.
    page.evaluate(
        """() => { window.seen = {bullmq: [], streams: [], kafka: []};
        for (const b of Object.keys(window.seen)) {
          const watch = () => { const id = window.watched; if (!id) return;
            const cell = document.querySelector(`#backend-${b} [data-booking='${id}']`);
            if (!cell) return;
            const row = cell.closest("tr");
            const shown = row.querySelector("[data-state]").textContent + " " + row.querySelector("progress").value;
            const list = window.seen[b];
            if (list[list.length - 1] !== shown) list.push(shown); };
          new MutationObserver(watch).observe(document.getElementById(`backend-${b}`),
                                              {subtree: true, childList: true, characterData: true, attributes: true});
        } }"""
    )
    booking_id = f"bk-slow-{uuid.uuid4().hex[:8]}"
    page.evaluate("(id) => { window.watched = id; }", booking_id)
    service.book(**BOOKING, booking_id=booking_id, fault={"slow_ms": 2500})  # 2.5 s at its first step
    page.wait_for_function(
        "() => Object.values(window.seen).every(list => list[list.length - 1] === 'completed 100')", timeout=40_000
    )
    seen = page.evaluate("() => window.seen")
    print("what the recent bookings showed of the booking:", seen)
    for backend in BACKENDS:
        assert "active 0" in seen[backend], seen[backend]  # at validate while it waited, then done
        newest = page.inner_text(f"#backend-{backend} [data-panel=bookings] tbody tr >> nth=0")
        assert newest.startswith(booking_id[:12]) and "100 %" in newest, newest
    assert not page.errors
    page.close()


def test_plus_one_worker_shows_the_new_worker_and_its_partitions(chromium: Any, service: BookingService) -> None:
    page = open_dashboard(chromium, service.url)
    column = "#backend-kafka"
    assert page.locator(f"{column} [data-panel=workers] tbody tr").count() == 1
    page.click(f"{column} button[data-scale='1']")
    page.wait_for_selector(f"{column} [data-panel=workers] .note:has-text('kafka-w2')", timeout=40_000)
    page.wait_for_selector(f"{column} [data-panel=workers] td:text-is('kafka-w2')", timeout=20_000)
    # The group rebalances: the newcomer owns some of the work topic's partitions (the embedded broker takes a while).
    page.wait_for_function(
        """() => { const owners = window.labkitDashboard.lastGood.kafka.partitions.map(p => p.owner);
           return owners.includes('kafka-w2') && owners.includes('kafka-w1'); }""",
        timeout=60_000,
    )
    page.click(f"{column} button[data-scale='-1']")
    page.wait_for_selector(f"{column} [data-panel=workers] .note:text-is('workers: kafka-w1')", timeout=30_000)
    assert not page.errors
    page.close()


def test_replay_button_sends_a_dead_letter_again(chromium: Any, service: BookingService) -> None:
    page = open_dashboard(chromium, service.url)
    before = count(page, "streams", "completed")
    booking_id = service.book(**BOOKING, backend="streams", fault={"poison": True})["booking_id"]
    button = f"#backend-streams button[data-replay='{booking_id}']"
    page.wait_for_selector(button, timeout=30_000)
    page.click(button)
    page.wait_for_selector("#backend-streams [data-panel=dead-letters] .note:has-text('replayed 1')", timeout=10_000)
    wait_count(page, "streams", "completed", before + 1, 30)
    assert not page.errors
    page.close()


def test_a_stopped_broker_greys_its_panels_and_the_others_stay_live(chromium: Any, lab_stack: Any) -> None:
    stack = PrivateStack(with_kafka=True, namespace="dash-", lab_config=lab_stack.config)
    try:
        stack.up()
        with BookingService(stack.config, free_port(), workers=0).start() as running:
            page = open_dashboard(chromium, running.url)
            assert page.get_attribute("#backend-kafka", "data-stale") == "false"
            for backend in BACKENDS:
                assert page.inner_text(f"#backend-{backend} [data-answers=redis]") == "yes"
            assert page.inner_text("#backend-kafka [data-answers=kafka]") == "yes"
            stack.stop_service("kafka", hard=True)
            page.wait_for_selector("#backend-kafka[data-stale='true']", timeout=30_000)
            # Every panel of the column greys out but the broker health, which says which broker is down.
            data_panels = "#backend-kafka .panel:not([data-panel=health])"
            assert page.locator(f"{data_panels}.stale").count() == page.locator(data_panels).count() > 0
            page.wait_for_selector("#backend-kafka [data-answers=kafka].down:has-text('not answering')", timeout=30_000)
            assert page.inner_text("#backend-kafka [data-answers=redis]") == "yes"  # its bookkeeping is on Redis
            for backend in ("bullmq", "streams"):  # on Redis, still answering
                assert page.get_attribute(f"#backend-{backend}", "data-stale") == "false"
            page.wait_for_selector("#backend-kafka [data-broker]:has-text('not answering')", timeout=30_000)
            assert not page.errors
            page.close()
    finally:
        stack.close()
