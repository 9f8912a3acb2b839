"""The embedded broker's quirks: one table in quirks.py, the same table in docs/embedded-kafka.md, repairs counted."""

from __future__ import annotations

import re

import pytest
from support import ROOT

from labkit.backends.kafka import quirks
from labkit.errors import ConfigError
from labkit.workflow import WorkerSettings


def test_the_docs_list_every_quirk_with_its_kind() -> None:
    text = (ROOT / "docs" / "embedded-kafka.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z-]+)` \| (repair|setting) \|", text, re.M))
    assert rows == {name: "repair" if q.repair else "setting" for name, q in quirks.QUIRKS.items()}


def test_the_repairs_are_the_quirks_that_fire() -> None:
    assert quirks.REPAIRS == ("orphaned-partitions", "topics-lost", "departed-leader", "producer-fenced")
    assert all(quirks.QUIRKS[name].on_apache for name in quirks.REPAIRS)


@pytest.mark.parametrize(("value", "enabled"), [(None, True), ("on", True), ("OFF", False)])
def test_the_repairs_option(value: str | None, enabled: bool) -> None:
    options = {} if value is None else {"broker_repairs": value}
    assert quirks.repairs_enabled(WorkerSettings(options=options)) is enabled


def test_a_bad_repairs_option_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^option broker_repairs='sometimes'; use on or off$"):
        quirks.repairs_enabled(WorkerSettings(options={"broker_repairs": "sometimes"}))


def test_the_group_watch_ends_when_its_member_closes_even_without_a_cancel() -> None:
    # A cancel that lands as the watch's Redis or admin call completes can be lost; the watch must still end,
    # or the worker's warm stop waits for it until SIGKILL.
    import asyncio
    import time
    from types import SimpleNamespace

    async def scenario() -> float:
        member = SimpleNamespace(
            backend=None, events=SimpleNamespace(worker_id="kafka-w1"), closing=asyncio.Event(), left_group=True
        )
        watch = asyncio.create_task(quirks.GroupWatch(member).run())  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        member.closing.set()
        await asyncio.wait_for(watch, timeout=quirks.GROUP_CHECK_EVERY_S * 3)
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 0.5
