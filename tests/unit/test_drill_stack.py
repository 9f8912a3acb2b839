"""The private stack (drills, the fidelity matrix): which servers it manages and what it refuses (none started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from labkit.config import Config
from labkit.errors import StackError
from labkit.stack import SERVICES, PrivateStack, Stack


def test_a_redis_drill_stack_manages_redis_only_and_removes_its_folder() -> None:
    stack = PrivateStack(with_kafka=False, namespace="drill-")
    both = PrivateStack(with_kafka=True, namespace="drill-")
    assert stack.services == ("redis",)
    assert both.services == SERVICES
    assert stack.home.is_dir()
    for private in (stack, both):
        private.close()  # nothing was started: down() stops nothing
        assert not private.home.exists()


def test_a_stack_refuses_unknown_services(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown service"):
        Stack(Config(home=tmp_path), services=("redis", "postgres"))


def test_stop_service_refuses_a_server_this_stack_did_not_start(tmp_path: Path) -> None:
    stack = Stack(Config(home=tmp_path), services=("redis",))
    with pytest.raises(StackError, match="not started by this stack"):
        stack.stop_service("redis")
    with pytest.raises(StackError, match="not started by this stack"):
        stack.stop_service("kafka")  # not one of this stack's services
