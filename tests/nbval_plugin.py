"""A pytest plugin for the single nbval run of notebooks (``-p nbval_plugin``), loaded by test_notebooks.py.

nbval executes each code cell of a notebook in one kernel (a kernel per notebook, one notebook after
the other when a run has several) and compares the cells tagged ``nbval-check-output`` with their
stored outputs; it writes nothing. This plugin adds the two things CI needs from that same single
execution:

- ``--executed-dir DIR``: each executed notebook, every output included (charts too), written
  to DIR under its own name, outside the source tree, for a person (or a test reading what the
  cells showed) to open after the run. Outputs that the cell
  updated in place (``update_display_data``: a progress bar that closes into its final line, see
  labkit/progress.py) are saved as they ended, as papermill and nbconvert save them; nbval itself
  ignores those updates;
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
#: Each notebook nbval ran, by file name.
_notebooks: dict[str, Any] = {}
#: The kernel's iopub messages seen while nbval ran the current cell, in order.
_messages: list[dict[str, Any]] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lesson notebooks")
    group.addoption("--executed-dir", default=None, help="write each executed notebook into this folder")
    group.addoption("--run-marker", default=None, help="NAME=VALUE in the environment of this run's processes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """Keep a copy of every kernel message nbval reads for this cell (nbval keeps only what it compares)."""
    notebook = item.parent
    read = getattr(notebook, "get_kernel_message", None)
    if read is not None and not getattr(read, "recording", False):

        def recording(*args: Any, **kwargs: Any) -> dict[str, Any]:
            message: dict[str, Any] = read(*args, **kwargs)
            _messages.append(message)
            return message

        recording.recording = True  # type: ignore[attr-defined]
        notebook.get_kernel_message = recording  # type: ignore[union-attr]
    _messages.clear()
    yield


def with_display_updates(outputs: list[Any], messages: list[dict[str, Any]]) -> list[Any]:
    """``outputs`` (nbval's, in message order) with every ``update_display_data`` of the cell applied.

    nbval drops the display id of a ``display_data`` message; the messages give it back: the k-th
    ``display_data`` output is the k-th ``display_data`` message of the cell's execution.
    """
    cell_id = next((m["parent_header"].get("msg_id") for m in messages if m["msg_type"] == "execute_input"), None)
    mine = [m for m in messages if cell_id and m["parent_header"].get("msg_id") == cell_id]
    shown = [m["content"].get("transient", {}).get("display_id") for m in mine if m["msg_type"] == "display_data"]
    displays = [o for o in outputs if o.get("output_type") == "display_data"]
    by_id = {display_id: o for display_id, o in zip(shown, displays, strict=False) if display_id}
    for update in (m for m in mine if m["msg_type"] == "update_display_data"):
        target = by_id.get(update["content"].get("transient", {}).get("display_id"))
        if target is not None:
            target["data"], target["metadata"] = update["content"]["data"], update["content"]["metadata"]
    return outputs


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    """After nbval ran (and compared) a cell, keep what it printed in the notebook for the executed copy."""
    outputs = getattr(item, "test_outputs", None)
    if call.when != "call" or outputs is None:
        return
    cell = item.cell  # type: ignore[attr-defined]  # nbval's IPyNbCell
    outputs = with_display_updates([dict(output) for output in outputs], _messages)
    cell.outputs = [nbformat.from_dict(output) for output in outputs]
    cell.execution_count = next(_counter)
    _notebooks[Path(item.parent.path).name] = item.parent.nb  # type: ignore[union-attr]  # nbval's IPyNbFile


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
    destination = session.config.getoption("--executed-dir")
    if destination is None:
        return
    Path(destination).mkdir(parents=True, exist_ok=True)
    for name, notebook in _notebooks.items():
        nbformat.write(notebook, Path(destination) / name)
