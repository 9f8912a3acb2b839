"""The sampler's shaping of broker answers (labkit/sampler.py), against answers recorded from the real brokers.

``sampler_answers.json`` holds what each backend's read methods answered while ``labkit serve`` ran one worker per
backend with three bookings completed, one dead-lettered after three attempts and two slow ones in flight, and the
status records of two bookings (the recent bookings panel reads them); a fake backend stands in for the brokers where
the test is about what the sampler asks, not how it shapes the answer.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from labkit.config import Config
from labkit.liveview import panel_html, svg_chart
from labkit.sampler import (
    BOOKING_WORDS,
    BROKERS,
    SHOWN,
    STATES,
    WORDS,
    BackendWatch,
    Sample,
    Sampler,
    booking_row,
    broker_row,
    bullmq_sample,
    kafka_sample,
    streams_sample,
    with_throughput,
)
from labkit.status import STATES as BOOKING_STATES
from labkit.status import BookingStatus, Transition, summarize

ANSWERS: dict[str, Any] = json.loads((Path(__file__).parent / "sampler_answers.json").read_text())
DEAD_REASON = "attempts exhausted: payment gateway timeout (injected: attempt 3 of 9)"


def sample_of(backend: str) -> Sample:
    a = ANSWERS[backend]
    if backend == "bullmq":
        return bullmq_sample(a["at"], a["counts"], a["depths"], a["clients"], a["letters"])
    if backend == "streams":
        return streams_sample(a["at"], a["counts"], a["depths"], a["consumers"], a["pending"], a["letters"], 10_000)
    return kafka_sample(a["at"], a["counts"], a["depths"], a["reports"], a["letters"])


@pytest.mark.parametrize("backend", ["bullmq", "streams", "kafka"])
def test_every_backend_has_the_same_state_names_and_its_own_words(backend: str) -> None:
    sample = sample_of(backend)
    assert tuple(sample.states) == STATES
    assert set(WORDS[backend]) == set(STATES)
    assert sample.states["completed"] == 3 and sample.states["failed"] == 1
    assert (sample.states["prioritized"] is None) == (WORDS[backend]["prioritized"] is None)
    assert sample.dead_letter_count == 1
    assert sample.dead_letters[0]["reason"] == DEAD_REASON
    assert sample.ok and sample.error is None


def test_bullmq_states_are_its_own_job_counts_and_workers_its_named_connections() -> None:
    sample = sample_of("bullmq")
    assert sample.states["active"] == 2 and sample.in_flight == 2
    at = ANSWERS["bullmq"]["at"]
    assert [(w["id"], round(at - w["last_seen"])) for w in sample.workers] == [("bullmq-w1", 2), ("bullmq-w2", 7)]
    assert sample.dead_letters[0]["source"] == "job 4"


def test_streams_pending_list_carries_consumer_idle_and_delivery_count() -> None:
    sample = sample_of("streams")
    assert sample.states["active"] == 2  # the pending entries list
    assert [(e["consumer"], e["deliveries"]) for e in sample.pending] == [("streams-w1", 1), ("streams-w1", 1)]
    assert [e["idle_ms"] for e in sample.pending] == [60, 24]
    assert sample.consumers == [{"name": "streams-w1", "pending": 2, "idle_ms": 23}]
    assert [w["id"] for w in sample.workers] == ["streams-w1"]


def test_streams_consumer_idle_past_the_limit_is_not_a_live_worker() -> None:
    a = ANSWERS["streams"]
    idle = [{**c, "idle": 60_000} for c in a["consumers"]]
    sample = streams_sample(a["at"], a["counts"], a["depths"], idle, a["pending"], a["letters"], 10_000)
    assert sample.workers == [] and sample.consumers[0]["idle_ms"] == 60_000


def test_kafka_partitions_have_their_owner_and_lag_in_topic_order() -> None:
    sample = sample_of("kafka")
    assert [p["partition"] for p in sample.partitions[:3]] == ["bookings/0", "bookings/1", "bookings/2"]
    assert {p["owner"] for p in sample.partitions} == {"kafka-w1"}
    assert sum(p["lag"] for p in sample.partitions) == sample.backlog == 2
    assert sample.states["waiting"] == 2  # Kafka's lag counts what is in flight too
    assert sample.workers[0]["id"] == "kafka-w1"
    assert 0 < ANSWERS["kafka"]["at"] - sample.workers[0]["last_seen"] < 5


def test_kafka_partition_of_no_member_has_no_owner() -> None:
    a = ANSWERS["kafka"]
    sample = kafka_sample(a["at"], a["counts"], a["depths"], {}, a["letters"])
    assert {p["owner"] for p in sample.partitions} == {None} and sample.workers == []


def test_only_the_newest_dead_letters_are_carried_but_all_are_counted() -> None:
    a = ANSWERS["bullmq"]
    letters = [{**a["letters"][0], "booking_id": f"bk-{i}"} for i in range(SHOWN + 5)]
    sample = bullmq_sample(a["at"], a["counts"], a["depths"], a["clients"], letters)
    assert sample.dead_letter_count == SHOWN + 5
    assert [d["booking_id"] for d in sample.dead_letters] == [f"bk-{i}" for i in range(5, SHOWN + 5)]


def test_throughput_is_completed_bookings_per_second_since_the_previous_good_sample() -> None:
    before = sample_of("bullmq")
    after = Sample(**{**before.__dict__, "at": before.at + 2, "counters": {**before.counters, "completed": 13}})
    assert with_throughput(after, before).throughput == 5.0
    assert with_throughput(after, None).throughput is None
    failed = Sample(backend="bullmq", at=before.at + 3, ok=False, error="down")
    assert with_throughput(failed, before).throughput is None
    assert with_throughput(after, failed).throughput is None


RECORDS = ANSWERS["status_records"]
HEALTHY = [broker_row("kafka", "127.0.0.1:9092", "Tansu 0.6.0", 4.2, None),
           broker_row("redis", "redis://127.0.0.1:6379/0", "Valkey 9.1.2", 0.31, None)]  # fmt: skip


def status_of(which: str, first: int | None = None) -> BookingStatus:
    """The status the recorded records lead to (only their ``first`` transitions: the booking earlier on)."""
    transitions = [Transition.from_dict(t) for t in RECORDS[which]["transitions"][:first]]
    status = summarize(transitions)
    assert status is not None
    return status


def test_every_backend_has_a_word_for_each_booking_state_and_names_its_brokers() -> None:
    for backend in ("bullmq", "streams", "kafka"):
        assert tuple(BOOKING_WORDS[backend]) == BOOKING_STATES
        assert [service for service, _ in BROKERS[backend]][-1] == "redis"  # the ledger lives in Redis everywhere
    assert [service for service, _ in BROKERS["kafka"]] == ["kafka", "redis"]


def test_a_recent_booking_row_has_its_state_step_and_progress() -> None:
    booking_id = RECORDS["completed"]["booking_id"]
    running = booking_row(booking_id, 1.0, status_of("completed", first=4))  # queued, validate, charge, write
    assert (running["state"], running["step"], running["progress"], running["attempts"]) == (
        "active", "write_confirmation", 40, 1)  # fmt: skip
    done = booking_row(booking_id, 1.0, status_of("completed"))
    assert (done["state"], done["step"], done["progress"]) == ("completed", None, 100)
    dead = booking_row(RECORDS["dead_lettered"]["booking_id"], 1.0, status_of("dead_lettered"))
    assert dead["state"] == "dead_lettered" and dead["attempts"] == 3 and "poison" in dead["reason"]
    gone = booking_row("bk-expired", 7.0, None)
    assert gone["state"] is None and gone["updated_at"] == 7.0


def test_a_broker_row_says_whether_it_answers_and_how_fast() -> None:
    down = broker_row("kafka", "127.0.0.1:9092", None, None, "Kafka is not answering at 127.0.0.1:9092")
    assert not down["answers"] and down["round_trip_ms"] is None
    assert HEALTHY[1]["answers"] and HEALTHY[1]["round_trip_ms"] == 0.31


class RecordedBackend:
    """A backend whose recent bookings and statuses are the recorded ones; counts what the sampler asks."""

    name = "kafka"

    def __init__(self, statuses: dict[str, BookingStatus]) -> None:
        self.recent: list[tuple[str, float]] = [(m, at) for m, at in RECORDS["recent"]]
        self.statuses = statuses
        self.asked: list[str] = []
        self.redis = None
        self.recent_bookings = self

    async def read(self, redis: Any) -> list[tuple[str, float]]:
        return self.recent

    async def booking_status(self, booking_id: str) -> BookingStatus | None:
        self.asked.append(booking_id)
        return self.statuses.get(booking_id)


def test_a_finished_booking_is_read_once_until_it_is_sent_again() -> None:
    done, dead = RECORDS["completed"]["booking_id"], RECORDS["dead_lettered"]["booking_id"]
    backend = RecordedBackend({done: status_of("completed"), dead: status_of("completed", first=4)})
    watch = BackendWatch(backend, Config())  # type: ignore[arg-type]
    first = asyncio.run(watch.bookings())
    assert [row["booking_id"] for row in first] == [m for m, _ in RECORDS["recent"]]  # newest first
    asyncio.run(watch.bookings())
    everyone = {m for m, _ in RECORDS["recent"]}
    assert backend.asked.count(done) == 1  # completed: remembered
    assert backend.asked.count(dead) == 2  # still running: read every sample
    assert sorted(backend.asked) == sorted([*everyone, dead])  # no record (expired) is for good: read once
    backend.recent[1] = (done, backend.recent[1][1] + 60)  # sent again: a new acceptance time
    backend.statuses[done] = status_of("completed", first=2)
    again = asyncio.run(watch.bookings())
    assert backend.asked.count(done) == 2 and again[1]["state"] == "active"


def test_the_dead_letters_are_read_again_only_when_their_count_changes() -> None:
    reads: list[int] = []

    class Letters:
        async def dead_letters(self) -> list[dict[str, Any]]:
            reads.append(1)
            return [{"booking_id": f"bk-{len(reads)}"}]

    watch = BackendWatch(Letters(), Config())  # type: ignore[arg-type]
    first = asyncio.run(watch.dead_letters({"dead_lettered": 1}))
    again = asyncio.run(watch.dead_letters({"dead_lettered": 1}))
    assert len(reads) == 1 and again == first
    after_reset = asyncio.run(watch.dead_letters({"dead_lettered": 0}))
    assert len(reads) == 2 and after_reset != first


def test_a_notebook_panel_shows_the_words_and_greys_out_after_three_missed_samples() -> None:
    sample = Sample(**{**sample_of("kafka").__dict__, "brokers": HEALTHY})
    fresh = panel_html("kafka", sample, sample, 1.0, now=sample.at + 1)
    assert "consumer lag" in fresh and "bookings/2" in fresh and "opacity" not in fresh
    assert DEAD_REASON in fresh and "Tansu 0.6.0" in fresh and "4.2 ms" in fresh
    kafka_down = broker_row("kafka", "127.0.0.1:9092", None, None, "Kafka is not answering")
    down = Sample(backend="kafka", at=sample.at + 5, ok=False, error="Kafka is not answering",
                  brokers=[kafka_down, HEALTHY[1]])  # fmt: skip
    stale = panel_html("kafka", sample, down, 1.0, now=sample.at + 5)
    health, rest = stale.split("<div style='opacity:0.45'>", 1)
    assert "Broker health (updated now)" in health and "<td>NO</td>" in health  # the newest sample: not greyed
    assert "consumer lag" in rest and "Kafka is not answering" in rest  # the last good data, greyed
    old = panel_html("kafka", sample, down, 1.0, now=sample.at + 10)
    assert old.count("<div style='opacity:0.45'>") == 2  # no sample for three periods: the health too


def test_a_notebook_panel_shows_recent_bookings_with_their_progress_and_words() -> None:
    booking_id = RECORDS["completed"]["booking_id"]
    rows = [booking_row(booking_id, 1.0, status_of("completed", first=4))]
    sample = Sample(**{**sample_of("streams").__dict__, "bookings": rows})
    panel = panel_html("streams", sample, sample, 1.0, now=sample.at)
    assert "<progress max='100' value='40'>40 %</progress> 40 % write_confirmation" in panel
    assert f"active ({BOOKING_WORDS['streams']['active']})" in panel and booking_id[:12] + "…" in panel
    empty = panel_html("streams", sample_of("streams"), None, 1.0, now=sample.at)
    assert "none yet: bookings sent through the booking service" in empty


def test_a_live_chart_is_a_line_over_its_span_labelled_for_screen_readers() -> None:
    chart = svg_chart("backlog", [-600.0, -300.0, 0.0], [0.0, 10.0, 5.0], "#b45309", 600.0)
    assert "points='0.0,52.0 150.0,4.0 300.0,28.0'" in chart
    assert "aria-label='backlog: latest 5, highest 10, over 10 min'" in chart
    assert "latest –" in svg_chart("backlog", [], [], "#b45309", 600.0)


def test_stop_ends_a_task_whose_cancellation_a_library_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancel swallowed inside a sample (as redis-py has done) used to leave stop() waiting for ever."""

    async def swallowing_sample(self: BackendWatch) -> Sample:
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            pass  # lost on its way through a client library
        return Sample(backend=self.backend.name, at=0.0, ok=False, error="down")

    monkeypatch.setattr(BackendWatch, "sample", swallowing_sample)

    async def run() -> int:
        sampler = Sampler(Config(), every_s=0.05, backends=("streams",))
        await sampler.start()
        await asyncio.sleep(0.1)
        await asyncio.wait_for(sampler.stop(), timeout=2)
        return len(sampler.history("streams"))

    assert asyncio.run(run()) >= 1
