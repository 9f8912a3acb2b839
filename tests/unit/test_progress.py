"""Progress bars that read right in a saved notebook: the line a closed bar leaves, and CI's copies keeping it.

A notebook's tqdm bar is a widget whose plain-text copy is taken when it is first shown (``0%``);
labkit.progress replaces the bar's output by one line when it closes, and tests/nbval_plugin.py
applies that replacement to the executed copies CI writes (nbval itself ignores it).
"""

from __future__ import annotations

from labkit.progress import progress, summary_line


def test_a_closed_progress_bar_leaves_one_plain_line() -> None:
    assert summary_line("bullmq settled", 6, 6, "booking", 3.21) == "bullmq settled: 6/6 bookings in 3.2 s"
    assert summary_line("points", 1, None, "point", 0.04) == "points: 1 point in 0.0 s"


def test_ci_executed_copies_keep_a_progress_bar_as_it_ended() -> None:
    """tests/nbval_plugin.py applies the ``update_display_data`` messages nbval ignores, and only the cell's own."""
    from nbval_plugin import with_display_updates

    run = {"msg_id": "cell-1"}

    def message(kind: str, content: dict[str, object]) -> dict[str, object]:
        return {"msg_type": kind, "parent_header": run, "content": content}

    messages = [
        message("execute_input", {}),
        message("display_data", {"data": {"text/plain": "chart"}, "metadata": {}, "transient": {}}),
        message("display_data", {"data": {"text/plain": "0%| | 0/6"}, "metadata": {},
                                 "transient": {"display_id": "bar"}}),  # fmt: skip
        message("update_display_data", {"data": {"text/plain": "settled: 6/6 bookings in 3.2 s"}, "metadata": {},
                                        "transient": {"display_id": "bar"}}),  # fmt: skip
        {"msg_type": "update_display_data", "parent_header": {"msg_id": "another cell"},
         "content": {"data": {"text/plain": "not ours"}, "metadata": {}, "transient": {"display_id": "bar"}}},
    ]  # fmt: skip
    outputs = [{"output_type": "display_data", "data": {"text/plain": "chart"}, "metadata": {}},
               {"output_type": "display_data", "data": {"text/plain": "0%| | 0/6"}, "metadata": {}},
               {"output_type": "stream", "name": "stdout", "text": "done\n"}]  # fmt: skip
    updated = with_display_updates(outputs, messages)
    assert [o.get("data", {}).get("text/plain") for o in updated] == ["chart", "settled: 6/6 bookings in 3.2 s", None]


def test_outside_a_kernel_it_is_plain_tqdm() -> None:
    with progress(total=3, desc="points", unit="point") as bar:
        bar.update(3)
    assert type(bar).__module__ == "tqdm.std"
