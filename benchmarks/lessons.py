"""How long a learner waits: every lesson notebook run top to bottom at its default parameters.

    python benchmarks/lessons.py                       # every lesson, against the stack of the LABKIT_* variables
    python benchmarks/lessons.py 07 08 --out /tmp/lessons
    python benchmarks/lessons.py --record              # ... and record the figures and times (see below)
    LABKIT_KAFKA=apache python benchmarks/lessons.py --record

Each lesson runs as a learner's `jupyter nbconvert --execute` would: papermill, a fresh kernel, the
parameters cell as committed (nothing injected), against the running stack (started first if nothing
answers, so no lesson pays for it). The baseline, measured in the same run, is the fixed cost of any
lesson: a notebook that only starts a kernel, imports labkit and calls ``lk.setup``.

Printed per lesson: the wall time against its budget (08 five minutes, every other lesson three), its
cells of 10 s or more, each with what a learner sees before and after it (a sentence saying how long
it takes, a progress bar's final line), and whether every check cell printed its stored conclusion.
Exit 1 if a lesson failed, a check disagreed, a lesson went over its budget or a long cell lacks its
sentence or its progress bar.

``--record`` keeps what the run measured as the documented run of the broker that answered
(labkit.lessons.figures): every figure the lessons stated, with the lesson's wall time, the date and
this command, go into ``labkit/lessons/recorded.json``; docs/embedded-kafka.md ("Figures from the
lessons") and docs/lessons.md are rewritten from it. Lessons not run keep what was recorded before.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# This checkout's labkit, in this process and in every kernel it starts (not another checkout's editable install).
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from labkit.lessons import figures  # noqa: E402  # after the path: this checkout's labkit

#: Cells at least this long must say how long they take, and show a progress bar.
LONG_CELL_S = 10.0
#: A sentence that says how long the next cell takes ("takes about 40 s", "about a minute").
DURATION_SENTENCE = re.compile(r"\babout (?:a |\d+ |three |four |two )?(?:minutes?|s\b|seconds?)|\d+ s\b", re.I)
#: The line a closed progress bar leaves (labkit.progress.summary_line).
PROGRESS_LINE = re.compile(r": [\d,]+(?:/[\d,]+)? \S+ in [\d.]+ s$")
CHECK_TAG = "check"
DOCS = {"figures": ROOT / "docs" / "embedded-kafka.md", "times": ROOT / "docs" / "lessons.md"}


@dataclass
class LongCell:
    index: int
    seconds: float
    says_how_long: bool
    progress_bar: bool

    def __str__(self) -> str:
        missing = [w for w, ok in (("no sentence on how long", self.says_how_long),
                                   ("no progress bar", self.progress_bar)) if not ok]  # fmt: skip
        return f"cell {self.index}: {self.seconds:.0f} s" + (f" ({', '.join(missing)})" if missing else "")


@dataclass
class LessonRun:
    """One lesson's run: wall seconds, its long cells, its checks, and the figures it stated."""

    name: str
    seconds: float
    long_cells: list[LongCell] = field(default_factory=list)
    checks_held: bool = True
    error: str = ""
    stated: dict[str, Any] = field(default_factory=dict)

    @property
    def number(self) -> str:
        return self.name[:2]

    @property
    def budget_s(self) -> float:
        return figures.BUDGET_S.get(self.number, figures.DEFAULT_BUDGET_S)

    @property
    def ok(self) -> bool:
        cells_ok = all(c.says_how_long and c.progress_bar for c in self.long_cells)
        return not self.error and self.checks_held and self.seconds <= self.budget_s and cells_ok


def lessons(selected: list[str]) -> list[Path]:
    """The lesson notebooks whose number or name starts with one of ``selected`` (all when empty)."""
    every = sorted(NOTEBOOKS.glob("[0-9][0-9]-*.ipynb"))
    if not selected:
        return every
    unknown = [s for s in selected if not any(p.stem.startswith(s) for p in every)]
    if unknown:
        raise SystemExit(f"no lesson starts with {', '.join(unknown)}; choose from {', '.join(p.stem for p in every)}")
    return [p for p in every if any(p.stem.startswith(s) for s in selected)]


def baseline_notebook(folder: Path) -> Path:
    """A lesson with nothing in it: kernel start, ``import labkit``, ``lk.setup`` (the fixed cost of every lesson)."""
    cells = [nbformat.v4.new_code_cell("import labkit as lk"),
             nbformat.v4.new_code_cell('cfg = lk.setup(namespace="bench-baseline-")')]  # fmt: skip
    kernel = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / "baseline.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": kernel}), path)
    return path


def execute(source: Path, executed: Path) -> tuple[float, str]:
    """Run ``source`` with papermill at its defaults; returns the wall seconds and the error (empty if none)."""
    import papermill

    started = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(source), str(executed), cwd=str(executed.parent), kernel_name="python3", progress_bar=False
        )
    except papermill.PapermillExecutionError as e:
        return time.perf_counter() - started, f"cell {e.exec_count}: {e.ename}: {e.evalue}"
    return time.perf_counter() - started, ""


def _printed(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def _shows_final_progress(cell: nbformat.NotebookNode) -> bool:
    for output in cell.get("outputs", []):
        text = output.get("data", {}).get("text/plain", "") if "data" in output else output.get("text", "")
        if any(PROGRESS_LINE.search(line) for line in str(text).splitlines()):
            return True
    return False


def measure(source: Path, out: Path) -> LessonRun:
    executed = out / source.name
    seconds, error = execute(source, executed)
    committed, ran = nbformat.read(source, as_version=4), nbformat.read(executed, as_version=4)
    run = LessonRun(source.stem, seconds, error=error, stated=figures.collect(ran))
    by_id = {cell.get("id"): cell for cell in ran.cells}  # papermill adds a cell at the top when one fails
    before = ""
    for index, mine in enumerate(committed.cells):
        theirs = by_id.get(mine.get("id"), nbformat.v4.new_code_cell())
        if mine.cell_type == "markdown":
            before = mine.source
            continue
        duration = float(theirs.get("metadata", {}).get("papermill", {}).get("duration") or 0.0)
        if duration >= LONG_CELL_S:
            says = bool(DURATION_SENTENCE.search(before))
            run.long_cells.append(LongCell(index, duration, says, _shows_final_progress(theirs)))
        if CHECK_TAG in mine.get("metadata", {}).get("tags", []):
            run.checks_held &= _printed(mine) == _printed(theirs)
    run.checks_held &= not error
    return run


def broker() -> tuple[str, str]:
    """Start the stack if nothing answers; return the Kafka broker that answers, as ``(name, kind)``."""
    from labkit.config import Config
    from labkit.stack import Stack

    config = Config.from_env()
    Stack(config).up(timeout=180 if config.kafka == "apache" else 30)
    return figures.kafka_broker(config)


def report(results: list[LessonRun], baseline_s: float, kind: str) -> str:
    lines = [
        f"broker: {kind}",
        "| lesson | at its defaults | budget | cells of 10 s or more | checks |",
        "| --- | --- | --- | --- | --- |",
        f"| baseline: a kernel, `import labkit`, `lk.setup` | {baseline_s:.0f} s | | | |",
    ]
    for r in results:
        verdict = "failed: " + r.error if r.error else ("held" if r.checks_held else "DIFFER")
        over = "" if r.seconds <= r.budget_s else " (over)"
        cells = ", ".join(str(c) for c in r.long_cells) or "-"
        lines.append(f"| `{r.name}` | {r.seconds:.0f} s{over} | {r.budget_s:.0f} s | {cells} | {verdict} |")
    return "\n".join(lines)


def record(results: list[LessonRun], baseline_s: float, name: str, kind: str, command: str) -> None:
    """Keep the run's figures and times as the documented run of broker ``name``, and rewrite the docs' tables."""
    data = figures.recorded()
    mine = data.setdefault(name, {})
    today = time.strftime("%Y-%m-%d")
    for r in results:
        if r.error or not r.checks_held:
            print(f"not recorded: {r.name} ({r.error or 'a check disagreed'})", file=sys.stderr)
            continue
        mine[r.number] = {"lesson": r.name, "kind": kind, "date": today, "command": command,
                          "seconds": round(r.seconds, 1), "baseline_s": round(baseline_s, 1),
                          "figures": dict(sorted(r.stated.items()))}  # fmt: skip
    data[name] = dict(sorted(mine.items()))
    figures.RECORDED.write_text(json.dumps(dict(sorted(data.items())), indent=1, ensure_ascii=False) + "\n")
    for section, doc in DOCS.items():
        body = figures.figures_table() if section == "figures" else figures.times_table()
        doc.write_text(figures.with_section(doc.read_text(), section, body))
    docs = ", ".join(str(doc.relative_to(ROOT)) for doc in DOCS.values())
    print(f"recorded in {figures.RECORDED.relative_to(ROOT)}; rewrote {docs}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lessons", nargs="*", help="lesson numbers or names (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="keep the executed copies here")
    parser.add_argument("--record", action="store_true", help="record the figures and times (see the docstring)")
    args = parser.parse_args()
    chosen = lessons(args.lessons)
    name, kind = broker()
    print(f"broker: {kind}", flush=True)
    with tempfile.TemporaryDirectory(prefix="labkit-lessons-") as scratch:
        out = args.out or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        baseline_s, error = execute(baseline_notebook(Path(scratch)), Path(scratch) / "baseline-run.ipynb")
        if error:
            print(f"the baseline notebook failed: {error}", file=sys.stderr)
            return 1
        results = []
        for source in chosen:
            results.append(measure(source, out))
            print(f"{results[-1].name}: {results[-1].seconds:.1f} s", flush=True)
        print(report(results, baseline_s, kind))
        if args.out:
            print(f"executed copies in {out}")
    if args.record:
        if name not in figures.BROKERS:
            print(f"not recorded: {kind} is neither of the lab's brokers", file=sys.stderr)
            return 1
        variable = "LABKIT_KAFKA=apache " if name == "apache" else ""
        command = (
            variable + "python benchmarks/lessons.py --record" + "".join(f" {shlex.quote(a)}" for a in args.lessons)
        )
        record(results, baseline_s, name, kind, command)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
