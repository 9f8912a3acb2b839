"""Short versions of the reliability drills (docs/drills.md), against real brokers and real worker processes.

Each test fails on any lost booking, crashed worker or (with idempotency on) double effect. The
full-length runs are ``benchmarks/drills.py``. Process hygiene (the pool's parent SIGKILLed) is
tests/integration/test_pool.py::test_workers_die_with_their_parent, not repeated here.
The whole file takes about 4 minutes on 2 cores; the drills run one at a time.
"""

from __future__ import annotations

import pytest

from labkit import drills
from labkit.config import Config

pytestmark = [pytest.mark.integration]


def assert_kept_its_promise(result: drills.DrillResult) -> None:
    print(result.summary())
    assert result.lost == 0, result.detail
    assert result.worker_crashes == 0
    assert result.completed + result.dead_lettered == result.produced
    assert result.ok, result.summary()


@pytest.mark.redis
@pytest.mark.kafka
@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend", ["bullmq", "streams", "kafka"])
def test_worker_kills_lose_nothing_and_double_nothing(lab_config: Config, backend: str) -> None:
    seconds = 15 if backend == "kafka" else 10
    result = drills.worker_kills(backend, seconds=seconds, workers=3, rate=30, config=lab_config, seed=7)
    assert_kept_its_promise(result)
    assert result.detail["kills"] >= 1
    assert result.produced == seconds * 30
    assert result.double_effects == 0
    if backend == "kafka" and lab_config.kafka == "apache":
        # The embedded broker's repairs stay idle on Apache Kafka: its group recovers from kills by itself.
        assert set(result.detail["broker_repairs"].values()) == {0}, result.detail["broker_repairs"]


@pytest.mark.redis
@pytest.mark.kafka
@pytest.mark.apache_kafka
@pytest.mark.timeout(150)
def test_apache_kafka_needs_none_of_the_embedded_brokers_repairs(lab_config: Config) -> None:
    """With the group repairs off, Apache Kafka alone hands a killed worker's partitions over: 0 lost."""
    result = drills.worker_kills(
        "kafka", seconds=15, workers=3, rate=30, config=lab_config, seed=11, broker_repairs=False
    )
    assert_kept_its_promise(result)
    assert result.detail["kills"] >= 1 and result.detail["broker_repairs_on"] is False
    assert set(result.detail["broker_repairs"].values()) == {0}
    assert result.recovery_s is not None and result.recovery_s < 20


@pytest.mark.redis
@pytest.mark.kafka
@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["bullmq", "streams", "kafka"])
def test_bad_input_is_all_dead_lettered_with_a_reason(lab_config: Config, backend: str) -> None:
    result = drills.bad_input(backend, valid=100, config=lab_config)
    assert_kept_its_promise(result)
    corpus = len(drills.fuzz_corpus())
    assert result.detail["distinct_dead_letters"] == corpus
    assert result.detail["repeated_dead_letters"] == 0
    assert result.detail["without_reason"] == 0
    assert result.detail["valid_in_dlq"] == 0
    assert result.completed == 100
    assert result.detail["independent"] >= 50


@pytest.mark.redis
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("backend", "hard"), [("bullmq", False), ("streams", False), ("bullmq", True)])
def test_workers_ride_out_a_redis_restart(backend: str, hard: bool) -> None:
    """SIGTERM, or SIGKILL (``hard``: the AOF already written survives in the page cache); nothing acked is lost."""
    result = drills.redis_restart(backend, seconds=8, rate=30, hard=hard)
    assert_kept_its_promise(result)
    assert result.detail["hard"] is hard
    assert result.detail["aof"]["appendonly"] == "yes"
    assert result.detail["down_s"] >= 1.0
    assert result.recovery_s is not None and result.recovery_s < 10


@pytest.mark.redis
@pytest.mark.kafka
@pytest.mark.timeout(150)
def test_workers_and_producer_ride_out_a_kafka_broker_restart_and_report_what_it_lost(lab_stack: object) -> None:
    """Everything sent after the restart must still be processed; before it, the memory-only broker loses what it
    held and Apache Kafka (durable) loses nothing.

    Neither the workers nor the producer are restarted, and nobody recreates the topics for them.
    """
    result = drills.kafka_restart(seconds=16, rate=20, settle_timeout=30)
    print(result.summary(), result.detail)
    assert result.worker_crashes == 0
    assert result.produced == 320  # the producer recovered (a fresh client after a fatal error) and sent everything
    assert result.detail["acked_after_restart"] > 0
    assert result.detail["lost_after_restart"] == 0
    # What the old broker held and nobody had processed is gone, and reported as lost, not hidden.
    assert result.detail["lost_in_broker"] == result.lost
    assert result.lost <= result.detail["unsettled_at_stop"]
    assert result.completed + result.dead_lettered + result.lost == result.produced
    assert result.detail["acked_before_restart"] + result.detail["acked_after_restart"] == result.produced
    assert result.recovery_s is not None  # workers completed bookings after the restart without being restarted
    if result.detail["durable"]:
        assert result.lost == 0, "Apache Kafka keeps every acknowledged booking across a crash"
    assert result.ok, result.summary()


@pytest.mark.redis
@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_a_slow_kafka_worker_is_kept_by_max_poll_interval_and_duplicated_below_it(lab_config: Config) -> None:
    """A worker slower than max.poll.interval.ms leaves the group mid-booking and another runs the booking again."""
    protected = drills.slow_consumer("kafka", protected=True, config=lab_config)
    unprotected = drills.slow_consumer("kafka", protected=False, config=lab_config)
    print(protected.summary(), unprotected.summary(), sep="\n")
    assert protected.duplicates == 0 and protected.detail["left_group"] == 0
    assert unprotected.duplicates > 0 and unprotected.detail["left_group"] > 0
    for result in (protected, unprotected):
        assert result.lost == 0 and result.worker_crashes == 0
        assert result.completed == result.produced == 6
        assert result.double_effects == 0  # idempotency absorbs the duplicates
        assert result.ok, result.summary()


@pytest.mark.redis
@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["streams", "bullmq"])
def test_a_slow_handler_is_kept_by_heartbeat_or_lock_renewal_and_duplicated_without(
    lab_config: Config, backend: str
) -> None:
    """Streams: the heartbeat re-claims a long entry; BullMQ: lock renewal runs while the handler awaits."""
    protected = drills.slow_consumer(backend, protected=True, count=4, config=lab_config)
    unprotected = drills.slow_consumer(backend, protected=False, count=4, config=lab_config)
    print(protected.summary(), unprotected.summary(), sep="\n")
    assert protected.duplicates == 0 and protected.lost == 0
    assert unprotected.duplicates > 0 and unprotected.lost == 0
    assert protected.double_effects == unprotected.double_effects == 0  # idempotency absorbs the duplicates
    assert protected.ok and unprotected.ok
