"""`labkit up|status|down` as a learner runs them: real processes, output on stdout, one-line errors on stderr.

Rule for `status`: it prints every service and exits 1 if any is not healthy, with one line on stderr saying which.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import assert_one_line_error, run_labkit

from labkit.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.redis, pytest.mark.kafka]


def test_status_json_lists_both_services(lab_stack: Stack) -> None:
    result = run_labkit("status", "--json")
    assert (result.returncode, result.stderr) == (0, "")
    services = json.loads(result.stdout)
    assert set(services) == {"redis", "kafka"}
    expected = {s.service: s.to_dict() for s in lab_stack.status()}
    assert services == expected


def test_status_exits_1_with_one_line_when_a_service_is_down(lab_stack: Stack) -> None:
    result = run_labkit("status", LABKIT_REDIS_URL="redis://127.0.0.1:1/0")
    line = assert_one_line_error(result)
    assert line.startswith("Error: redis at 127.0.0.1:1 is not healthy: nothing answers")
    assert "kafka" not in line  # the broker is fine
    redis_line, kafka_line = result.stdout.splitlines()
    assert "NOT HEALTHY" in redis_line
    assert kafka_line.startswith(f"kafka  {lab_stack.config.kafka_bootstrap}") and kafka_line.endswith("-- healthy")


def test_up_reuses_the_running_stack(lab_stack: Stack) -> None:
    result = run_labkit("up")
    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()[:2]  # what follows is up to the setup hook
    assert [line.split()[0] for line in lines] == ["redis", "kafka"]
    for line, s in zip(lines, lab_stack.status(), strict=True):
        assert f"started by labkit (pid {s.pid})" in line and line.endswith("-- healthy")


def test_up_for_a_remote_address_fails_with_one_line(lab_stack: Stack) -> None:
    # 127.0.0.2: not an address `labkit up` serves (so treated as remote), yet loopback: no traffic leaves the machine.
    result = run_labkit("up", LABKIT_REDIS_URL="redis://127.0.0.2:6379/0")
    line = assert_one_line_error(result)
    assert "nothing answers at 127.0.0.2:6379 (LABKIT_REDIS_URL)" in line


def test_a_bad_setting_fails_with_one_line(lab_stack: Stack) -> None:
    line = assert_one_line_error(run_labkit("status", LABKIT_KAFKA_BOOTSTRAP="no-port"))
    assert line == "Error: bad LABKIT_KAFKA_BOOTSTRAP 'no-port'; use host:port, e.g. 127.0.0.1:9092"


def test_down_with_another_state_folder_stops_nothing(lab_stack: Stack, tmp_path: Path) -> None:
    result = run_labkit("down", LABKIT_HOME=str(tmp_path))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("nothing to stop")
    assert all(s.healthy for s in lab_stack.status())
