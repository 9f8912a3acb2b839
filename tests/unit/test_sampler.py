"""The sampler's shaping of broker answers (labkit/sampler.py), against answers recorded from the real brokers.

``sampler_answers.json`` holds what each backend's read methods answered while ``labkit serve`` ran one worker per
backend with three bookings completed, one dead-lettered after three attempts and two slow ones in flight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from labkit.liveview import panel_html
from labkit.sampler import SHOWN, STATES, WORDS, Sample, bullmq_sample, kafka_sample, streams_sample, with_throughput

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


def test_a_notebook_panel_shows_the_words_and_greys_out_after_three_missed_samples() -> None:
    sample = sample_of("kafka")
    fresh = panel_html("kafka", sample, sample, 1.0, now=sample.at + 1)
    assert "consumer lag" in fresh and "bookings/2" in fresh and "opacity" not in fresh.split(">")[0]
    assert DEAD_REASON in fresh
    down = Sample(backend="kafka", at=sample.at + 5, ok=False, error="Kafka is not answering")
    stale = panel_html("kafka", sample, down, 1.0, now=sample.at + 5)
    assert stale.startswith("<div style='opacity:0.45'>") and "Kafka is not answering" in stale
