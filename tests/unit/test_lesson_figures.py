"""The figures the lessons state: printed from the measurement, kept as data, and the docs' tables equal to them.

No kernel and no broker: the functions of labkit.lessons.figures on known values, the figure keys the
committed notebooks use, and the recorded runs (``labkit/lessons/recorded.json``) against the tables in
docs/embedded-kafka.md and docs/lessons.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

from labkit.config import Config
from labkit.lessons import figures

ROOT = Path(__file__).resolve().parents[2]
LESSONS = sorted((ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb"))
#: A figure key written in a notebook's code: ``"07.handed_back_kafka_s"``.
KEY_IN_CODE = re.compile(r"[\"'](\d\d\.[a-z0-9_]+)[\"']")


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """A recorded-runs file: lesson 07 on both brokers."""
    path = tmp_path / "recorded.json"
    record = {"lesson": "07-crashes-and-redelivery", "command": "python benchmarks/lessons.py --record",
              "seconds": 101.0, "baseline_s": 2.0}  # fmt: skip
    path.write_text(json.dumps({
        "embedded": {"07": {**record, "kind": "Tansu 0.6.0 (embedded, memory only)", "date": "2026-12-02",
                            "figures": {"07.handed_back_kafka_s": 9.93, "07.aborted_delivered": 1}}},
        "apache": {"07": {**record, "kind": "Apache Kafka 4.1.1 (KRaft, durable)", "date": "2026-12-03",
                          "command": "LABKIT_KAFKA=apache python benchmarks/lessons.py --record", "seconds": 89.0,
                          "figures": {"07.handed_back_kafka_s": 5.51, "07.aborted_delivered": 0}}},
    }))  # fmt: skip
    return path


def test_say_prints_the_figures_and_keeps_them_as_data() -> None:
    said = figures.say("back after {handed_back_kafka_s}, {n} bookings", {"07.handed_back_kafka_s": 9.934}, n=31)
    assert said.text == "back after 9.9 s, 31 bookings"
    data, metadata = said._repr_mimebundle_()
    assert data["text/markdown"] == said.text
    assert metadata == {"labkit": {"figures": {"07.handed_back_kafka_s": 9.934}}}


def test_a_figure_nobody_registered_cannot_be_stated() -> None:
    with pytest.raises(KeyError, match="register it"):
        figures.say("{nothing}", {"07.nothing": 1})


def test_numbers_from_numpy_and_nan_are_kept_as_json_can() -> None:
    import numpy as np

    said = figures.say("{handed_back_kafka_s}", {"07.handed_back_kafka_s": np.float64("nan")})
    assert said.text == "n/a" and said.figures == {"07.handed_back_kafka_s": None}
    assert figures.say("{aborted_delivered}", {"07.aborted_delivered": np.int64(2)}).figures == {
        "07.aborted_delivered": 2
    }


@pytest.mark.parametrize(("kind", "other"), [("Tansu 0.6.0 (embedded, memory only)", "Apache Kafka 4.1.1"),
                                             ("Apache Kafka 4.1.1 (KRaft, durable)", "Tansu 0.6.0")])  # fmt: skip
def test_compare_shows_this_run_and_the_other_brokers_recorded_figure(
    runs: Path, monkeypatch: pytest.MonkeyPatch, kind: str, other: str
) -> None:
    monkeypatch.setattr(figures, "_kafka_kind", lambda bootstrap, redis_url: kind)
    box = figures.compare(Config(), {"07.aborted_delivered": 3}, path=runs)
    assert f"**3** in this run, on {kind}" in box.text
    recorded = "**0** on Apache Kafka" if other.startswith("Apache") else "**1** on Tansu"
    assert recorded in box.text and "(recorded 2026-12-0" in box.text
    assert box.figures == {"07.aborted_delivered": 3}


def test_compare_says_when_the_other_broker_was_never_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(figures, "_kafka_kind", lambda bootstrap, redis_url: "Tansu 0.6.0")
    box = figures.compare(Config(), {"07.aborted_delivered": 1}, path=tmp_path / "none.json")
    assert "not recorded yet on Apache Kafka" in box.text


def test_collect_reads_the_figures_an_executed_lesson_stated() -> None:
    said = figures.say("{aborted_delivered}", {"07.aborted_delivered": 1})
    data, metadata = said._repr_mimebundle_()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [nbformat.v4.new_output("display_data", data=data, metadata=metadata),
                    nbformat.v4.new_output("stream", name="stdout", text="plain\n")]  # fmt: skip
    assert figures.collect(nbformat.v4.new_notebook(cells=[cell])) == {"07.aborted_delivered": 1}


def test_the_tables_show_both_brokers_side_by_side(runs: Path) -> None:
    table = figures.figures_table(runs)
    assert "Tansu 0.6.0 (embedded, memory only) | Apache Kafka 4.1.1 (KRaft, durable) |" in table
    assert "| 07 | Kafka: a killed member's partition assigned again after | 9.9 s | 5.5 s |" in table
    assert "| 02 | Kafka rebalance after a worker joined (first revoked to last assigned) | n/a | n/a |" in table
    assert "Recorded on the embedded broker on 2026-12-02 with `python benchmarks/lessons.py --record`;" in table
    times = figures.times_table(runs)
    assert "| `07-crashes-and-redelivery` | 101 s | 89 s | 180 s |" in times


def test_a_section_is_replaced_between_its_two_lines() -> None:
    begin, end = figures.SECTIONS["times"]
    doc = f"intro\n{begin}\nold\n{end}\nafter\n"
    new = figures.with_section(doc, "times", "| new |")
    assert new == f"intro\n{begin}\n| new |\n{end}\nafter\n" and figures.section(new, "times") == "| new |"
    with pytest.raises(ValueError, match="no section"):
        figures.with_section("no markers", "times", "x")


# -- the committed lessons and the recorded runs -------------------------------------------------------------


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_every_figure_a_lesson_states_is_registered_under_its_number(path: Path) -> None:
    code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    for key in KEY_IN_CODE.findall(code):
        assert key in figures.FIGURES, f"{path.name} states {key!r}, which labkit.lessons.figures does not know"
        assert key.startswith(path.name[:2] + "."), f"{path.name} states another lesson's figure {key!r}"


def test_the_recorded_runs_hold_only_registered_figures_and_each_lessons_broker_figures() -> None:
    for broker, lessons in figures.recorded().items():
        assert broker in figures.BROKERS
        for lesson, run in lessons.items():
            assert {"lesson", "kind", "date", "command", "seconds", "baseline_s", "figures"} <= set(run)
            assert set(run["figures"]) <= set(figures.FIGURES), (broker, lesson)
            boxes = {k for k, spec in figures.FIGURES.items() if spec.broker and k.startswith(f"{lesson}.")}
            assert boxes <= set(run["figures"]), f"{broker} run of lesson {lesson} lacks {boxes - set(run['figures'])}"


@pytest.mark.parametrize(("doc", "name"), [("docs/embedded-kafka.md", "figures"), ("docs/lessons.md", "times")])
def test_the_docs_tables_are_the_recorded_runs(doc: str, name: str) -> None:
    text = (ROOT / doc).read_text()
    expected = figures.figures_table() if name == "figures" else figures.times_table()
    assert figures.section(text, name) == expected, f"run `python benchmarks/lessons.py --record` to rewrite {doc}"
