"""Every lesson runs top to bottom, headless, against the real test stack, with small parameters.

Executed copies go to a temporary folder, never into ``notebooks/``; after each run no worker
process started by the notebook may be left.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import nbformat
import papermill
import pytest

from labkit.config import Config

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"



def _worker_processes(home: Path) -> list[str]:
    """Command lines of live worker processes that belong to the test stack's state folder."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        line = b" ".join(args).decode(errors="replace")
        if "workers." in line and str(home) in line:
            found.append(f"{entry.name}: {line}")
    return found


def _check_lines(executed: Path) -> list[str]:
    """Printed lines of the cells tagged ``check``: the lesson's conclusions, e.g. ``no booking lost: True``."""
    notebook = nbformat.read(executed, as_version=4)
    lines = []
    for cell in notebook.cells:
        if "check" in cell.get("metadata", {}).get("tags", []):
            for output in cell.get("outputs", []):
                lines += [line.strip() for line in output.get("text", "").splitlines() if line.strip()]
    return lines


@pytest.mark.integration
@pytest.mark.redis
@pytest.mark.kafka
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]-*.ipynb")))
def test_notebook_runs_top_to_bottom(name: str, lab_stack: Any, tmp_path: Path) -> None:
    source = NOTEBOOKS / f"{name}.ipynb"
    # Small parameters for CI live in the notebook's metadata; a learner runs the parameters cell's defaults.
    ci_parameters = nbformat.read(source, as_version=4).metadata["labkit"]["ci_parameters"]
    parameters = {"NAMESPACE": f"nb{uuid.uuid4().hex[:6]}-", **ci_parameters}
    executed = tmp_path / f"{name}.ipynb"
    papermill.execute_notebook(
        str(source),
        str(executed),
        parameters=parameters,
        cwd=str(NOTEBOOKS),
        kernel_name="python3",
        progress_bar=False,
    )
    checks = _check_lines(executed)
    assert checks, f"{name} has no cell tagged 'check' stating its conclusion"
    assert not [line for line in checks if line.endswith("False")], checks
    assert _worker_processes(Config.from_env().home) == []
    assert not any(p.name.startswith(name) and p != NOTEBOOKS / f"{name}.ipynb" for p in NOTEBOOKS.iterdir())
    assert os.environ.get("LABKIT_HOME"), "the lab_stack fixture must point notebooks at the test stack"
