"""Short versions of the reliability drills (docs/drills.md), against real brokers and real worker processes.

Each test fails on any lost booking, crashed worker or (with idempotency on) double effect. The
full-length runs are ``benchmarks/drills.py``. Process hygiene (the pool's parent SIGKILLed) is
tests/integration/test_pool.py::test_workers_die_with_their_parent, not repeated here.
The whole file takes about 3 minutes on 2 cores; the drills run one at a time.
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
@pytest.mark.parametrize("backend", ["bullmq", "streams"])
def test_workers_ride_out_a_redis_restart(backend: str) -> None:
    result = drills.redis_restart(backend, seconds=8, rate=30)
    assert_kept_its_promise(result)
    assert result.detail["aof"]["appendonly"] == "yes"
    assert result.detail["down_s"] >= 1.0
    assert result.recovery_s is not None and result.recovery_s < 10


@pytest.mark.redis
@pytest.mark.kafka
@pytest.mark.timeout(150)
def test_a_kafka_broker_restart_is_reported_in_full() -> None:
    """The embedded broker loses its data on restart: the drill must account for every booking, not hide it."""
    result = drills.kafka_restart(seconds=10, rate=20, settle_timeout=20)
    print(result.summary(), result.detail)
    assert result.worker_crashes == 0
    assert result.produced == 200  # the producer recovered with a fresh client and sent everything
    assert result.completed + result.dead_lettered + result.lost == result.produced
    assert result.detail["lost_in_broker"] + result.detail["lost_after_restart"] == result.lost
    assert result.detail["acked_before_restart"] + result.detail["acked_after_restart"] == result.produced
    assert result.recovery_s is not None  # workers completed bookings after the restart without being restarted


@pytest.mark.redis
@pytest.mark.timeout(90)
def test_a_slow_streams_handler_is_kept_by_its_heartbeat_and_duplicated_without_it(lab_config: Config) -> None:
    protected = drills.slow_consumer("streams", protected=True, count=4, config=lab_config)
    unprotected = drills.slow_consumer("streams", protected=False, count=4, config=lab_config)
    assert protected.duplicates == 0 and protected.lost == 0
    assert unprotected.duplicates > 0 and unprotected.lost == 0
    assert protected.double_effects == unprotected.double_effects == 0  # idempotency absorbs the duplicates
    assert protected.ok and unprotected.ok
