"""A pytest plugin for the single nbval run of a lesson (``-p nbval_plugin``), loaded by test_notebooks.py.

nbval executes each code cell of the notebook in one kernel and compares the cells tagged
``nbval-check-output`` with their stored outputs; it writes nothing. This plugin adds the two
things CI needs from that same single execution:

- ``--executed-copy PATH``: the executed notebook, every output included (charts too), written
  to PATH, outside the source tree, for a person to open when a run fails;
- at the last cell, while the kernel still runs: no worker process the notebook started may still
  be alive (every ``WorkerPool`` must have been stopped by its ``with`` block). Processes are found
  by the run's marker variable (``--run-marker NAME=VALUE``), which every child inherits.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import nbformat
import pytest
from notebook_checks import processes_with

_counter = itertools.count(1)
_notebooks: dict[int, Any] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lesson notebooks")
    group.addoption("--executed-copy", default=None, help="write the executed notebook here")
    group.addoption("--run-marker", default=None, help="NAME=VALUE in the environment of this run's processes")


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    """After nbval ran (and compared) a cell, keep what it printed in the notebook for the executed copy."""
    outputs = getattr(item, "test_outputs", None)
    if call.when != "call" or outputs is None:
        return
    cell = item.cell  # type: ignore[attr-defined]  # nbval's IPyNbCell
    cell.outputs = [nbformat.from_dict(dict(output)) for output in outputs]
    cell.execution_count = next(_counter)
    _notebooks[id(item.parent)] = item.parent.nb  # type: ignore[union-attr]  # nbval's IPyNbFile


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """At the notebook's last cell, before nbval stops the kernel: no worker process may be running."""
    marker = item.config.getoption("--run-marker")
    if marker is None or (nextitem is not None and nextitem.parent is item.parent):
        return
    left = {pid: command for pid, command in processes_with(marker).items() if " -m workers." in command}
    if left:
        running = "\n".join(f"{pid}: {command}" for pid, command in left.items())
        pytest.fail(f"worker processes still running at the end of the notebook (use `with WorkerPool`):\n{running}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    destination = session.config.getoption("--executed-copy")
    if destination is None:
        return
    for notebook in _notebooks.values():
        nbformat.write(notebook, Path(destination))
