"""Shared fixtures: the real lab stack on test ports, and a fresh namespace for every test.

The stack runs on its own ports (``LABKIT_TEST_REDIS_PORT``, default 16379, and ``LABKIT_TEST_KAFKA_PORT``, default
19092) with a temporary state folder, so the suite never touches a learner's ``~/.labkit`` or servers on 6379/9092.
If the stack cannot start, the session fails loudly instead of skipping: a skipped integration test hides a broken lab.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from uuid import uuid4

import pytest

from labkit.config import DEFAULT_KAFKA_BOOTSTRAP, DEFAULT_REDIS_URL, Config, parse_bootstrap, parse_redis_url
from labkit.errors import LabkitError
from labkit.stack import Stack

TEST_REDIS_PORT = int(os.environ.get("LABKIT_TEST_REDIS_PORT", "16379"))
TEST_KAFKA_PORT = int(os.environ.get("LABKIT_TEST_KAFKA_PORT", "19092"))

# Exported for the session so that CLI tests and worker subprocesses find the test stack; the namespace is not,
# because each test picks its own.
_EXPORTED = ("LABKIT_REDIS_URL", "LABKIT_KAFKA_BOOTSTRAP", "LABKIT_HOME")


@pytest.fixture(scope="session")
def lab_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The running test stack (``stack.config`` has its addresses); stopped at the end of the session.

    A healthy server already on a test port is reused and left running, like ``labkit up`` does.
    """
    lab_ports = {parse_redis_url(DEFAULT_REDIS_URL)[1], parse_bootstrap(DEFAULT_KAFKA_BOOTSTRAP)[1]}
    if lab_ports & {TEST_REDIS_PORT, TEST_KAFKA_PORT}:
        pytest.fail(f"test ports must not be the lab's own {sorted(lab_ports)}", pytrace=False)
    config = Config(
        redis_url=f"redis://127.0.0.1:{TEST_REDIS_PORT}/0",
        kafka_bootstrap=f"127.0.0.1:{TEST_KAFKA_PORT}",
        home=tmp_path_factory.mktemp("labkit-home"),
    )
    stack = Stack(config)
    try:
        stack.up()
    except LabkitError as e:
        pytest.fail(f"the test stack did not start: {e}", pytrace=False)
    saved = {name: os.environ.get(name) for name in _EXPORTED}
    os.environ.update({name: config.to_env()[name] for name in _EXPORTED})
    try:
        yield stack
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        stack.down()


@pytest.fixture
def lab_config(lab_stack: Stack) -> Config:
    """The test stack's config with a fresh namespace, so each test has its own queues, streams, topics and keys."""
    return lab_stack.config.with_(namespace=f"t{uuid4().hex[:8]}-")
