"""Shared fixtures: the real lab stack on test ports, and a fresh namespace for every test.

The stack runs on its own ports (``LABKIT_TEST_REDIS_PORT``, default 16379, and ``LABKIT_TEST_KAFKA_PORT``, default
19092) with a temporary state folder, so the suite never touches a learner's ``~/.labkit`` or servers on 6379/9092.
If the stack cannot start, the session fails loudly instead of skipping: a skipped integration test hides a broken lab.

Which Kafka-protocol broker the stack runs is ``--kafka`` (or ``LABKIT_KAFKA``): ``embedded`` (the default, Tansu;
the whole suite runs) or ``apache`` (Apache Kafka; only the Kafka part runs, i.e. tests marked ``kafka`` that do not
stand for another backend, so that the README's second command adds what the first cannot measure). Tests marked
``apache_kafka`` need Apache Kafka itself and run only then: they are deselected, not skipped, on the embedded broker.

Tests marked ``browser`` drive the dashboard in a real headless Chromium (Debian's ``chromium`` with Playwright for
Python, the ``browser`` extra): they run only with ``--browser`` (whichever broker), and are deselected without it,
so that the first README command keeps passing on a machine with nothing but Python.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from uuid import uuid4

import pytest

from labkit.config import (
    BACKENDS,
    DEFAULT_KAFKA_BOOTSTRAP,
    DEFAULT_REDIS_URL,
    KAFKA_BROKERS,
    Config,
    parse_bootstrap,
    parse_redis_url,
)
from labkit.errors import LabkitError
from labkit.stack import Stack

TEST_REDIS_PORT = int(os.environ.get("LABKIT_TEST_REDIS_PORT", "16379"))
TEST_KAFKA_PORT = int(os.environ.get("LABKIT_TEST_KAFKA_PORT", "19092"))

# Exported for the session so that CLI tests and worker subprocesses find the test stack; the namespace is not,
# because each test picks its own.
_EXPORTED = ("LABKIT_REDIS_URL", "LABKIT_KAFKA_BOOTSTRAP", "LABKIT_HOME", "LABKIT_KAFKA")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kafka",
        choices=KAFKA_BROKERS,
        default=os.environ.get("LABKIT_KAFKA") or "embedded",
        help="the Kafka-protocol broker of the test stack: embedded (Tansu, the whole suite) or apache "
        "(Apache Kafka from its jars: only the Kafka part of the suite) [default: $LABKIT_KAFKA or embedded]",
    )
    parser.addoption(
        "--browser",
        action="store_true",
        default=False,
        help="also run the dashboard's tests in headless Chromium (needs `apt-get install chromium` and the "
        "`browser` extra); deselected without it",
    )


def kafka_broker(config: pytest.Config) -> str:
    broker: str = config.getoption("--kafka")
    return broker


def _stands_for_another_backend(item: pytest.Item) -> bool:
    """A test parametrised by ``backend`` (or ``backends``) whose value here names no Kafka."""
    params = getattr(item, "callspec", None)
    if params is None:
        return False
    chosen = [v for k, v in params.params.items() if k in ("backend", "backends", "source_backend")]
    values = [x for v in chosen for x in (v if isinstance(v, (list, tuple)) else [v])]
    return bool(values) and all(v in BACKENDS and v != "kafka" for v in values)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect what the chosen broker does not run (see the module docstring): deselected, never skipped."""
    apache = kafka_broker(config) == "apache"
    browser = bool(config.getoption("--browser"))
    keep, drop = [], []
    for item in items:
        if item.get_closest_marker("browser") is not None:
            wanted = browser
        elif apache:
            wanted = item.get_closest_marker("kafka") is not None and not _stands_for_another_backend(item)
        else:
            wanted = item.get_closest_marker("apache_kafka") is None
        (keep if wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def lab_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
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
        kafka=kafka_broker(request.config),
    )
    stack = Stack(config)
    try:
        stack.up(timeout=180 if config.kafka == "apache" else 30)  # a first Apache start may fetch its jars
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
