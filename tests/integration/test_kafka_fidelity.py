"""The fidelity matrix of docs/embedded-kafka.md stays true: each row's probe, on the broker of this run.

Apache Kafka must behave as Kafka (every probe ``kafka_like``); the embedded broker must still differ where the
matrix says it does, so that a Tansu upgrade that fixes (or breaks) something fails here and the docs get updated.
The slowest probe (a group whose members all left at once: more than 45 s on the embedded broker) is measured by
``python benchmarks/kafka_fidelity.py``, not here; on Apache Kafka it takes a fraction of a second and runs here.
"""

from __future__ import annotations

import pytest

from labkit.backends.kafka import fidelity
from labkit.config import Config
from labkit.stack import PrivateStack

pytestmark = [pytest.mark.integration, pytest.mark.kafka]


@pytest.mark.timeout(120)
def test_group_timing_rows(lab_config: Config) -> None:
    join = fidelity.first_join(lab_config)
    pause = fidelity.rebalance_pause(lab_config)
    recovery = fidelity.sigkill_recovery(lab_config)
    print(join, pause, recovery, sep="\n")
    assert recovery.figure is not None and recovery.kafka_like, recovery  # both hand over within 10 s
    if lab_config.kafka == "apache":
        assert join.kafka_like and pause.kafka_like, (join, pause)
        leave = fidelity.all_members_leave(lab_config)
        assert leave.kafka_like, leave
    else:
        # The embedded broker holds each JoinGroup for half the session timeout (3 s of 6).
        assert join.figure is not None and join.figure >= 2.5 and not join.kafka_like, join
        assert pause.figure is not None and pause.figure >= 2.5, pause


@pytest.mark.timeout(90)
def test_log_and_admin_rows(lab_config: Config) -> None:
    findings = [
        fidelity.list_offsets_after_batches(lab_config),
        fidelity.read_committed_hides_aborted(lab_config),
        fidelity.partition_increase(lab_config),
        fidelity.retention(lab_config, wait_s=12),
    ]
    print(*findings, sep="\n")
    if lab_config.kafka == "apache":
        assert all(f.kafka_like for f in findings), findings
    else:
        offsets, transactions, partitions, retention = findings
        assert offsets.figure == 21  # the base offset of the newest batch + 1
        assert transactions.text == "10 seen, 5 of them aborted"
        assert partitions.figure == 3 and partitions.text.startswith("refused")
        assert retention.figure == 10
        assert not any(f.kafka_like for f in findings)


@pytest.mark.timeout(240)
def test_restart_durability_row(lab_config: Config) -> None:
    stack = PrivateStack(with_kafka=True, namespace="fid-", lab_config=lab_config)
    try:
        stack.up(timeout=180)

        def crash_and_start() -> None:
            stack.stop_service("kafka", hard=True)
            stack.up(timeout=180)

        finding = fidelity.restart_durability(stack.config, crash_and_start)
    finally:
        stack.close()
    print(finding)
    assert finding.kafka_like is (lab_config.kafka == "apache"), finding
    assert finding.figure == (20 if lab_config.kafka == "apache" else 0)
