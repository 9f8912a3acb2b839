"""A notebook executed as a learner's `jupyter nbconvert --execute` would reads right without widgets.

A labkit progress bar is a widget while the cell runs; the saved copy must not keep tqdm's plain-text
copy of it taken at 0 %, but the bar's final line. Executed here with papermill (nbclient, as nbconvert),
in a kernel of this interpreter, with this checkout's labkit on its path; no stack is needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
CELL = """
import time
from labkit.progress import progress
with progress(total=4, desc="bookings settled", unit="booking") as bar:
    for _ in range(4):
        time.sleep(0.05)
        bar.update(1)
for point in progress(range(3), desc="points", unit="point"):
    pass
"""


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_saved_notebook_shows_each_progress_bar_as_it_ended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import papermill

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    kernel = {"name": "python3", "display_name": "Python 3", "language": "python"}
    source, executed = tmp_path / "bars.ipynb", tmp_path / "bars-run.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(CELL)], metadata={"kernelspec": kernel}),
                   source)  # fmt: skip
    papermill.execute_notebook(str(source), str(executed), kernel_name="python3", progress_bar=False, cwd=str(tmp_path))

    outputs = nbformat.read(executed, as_version=4).cells[0].outputs
    texts = [o["data"]["text/plain"] for o in outputs if o["output_type"] == "display_data"]
    assert len(texts) == 2, outputs
    assert texts[0].startswith("bookings settled: 4/4 bookings in ") and texts[0].endswith(" s")
    assert texts[1].startswith("points: 3/3 points in ")
    assert not any("0%" in t for t in texts)
    assert all("application/vnd.jupyter.widget-view+json" not in o.get("data", {}) for o in outputs)
