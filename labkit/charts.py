"""Figures the lessons draw. Each takes data (and ``ax=None``) and returns the Axes.

The workflow figure of lesson 00, and the comparison harness's figures (lesson 08, ``labkit bench``):
throughput bars, the latency percentile spectrum, and per-second timelines of a run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes

WORKFLOW_STEPS = (
    ("validate", "schema of\ndocs/contract.md"),
    ("charge\npayment", "Redis: payments"),
    ("write\nconfirmation", "file in the\nrun folder"),
    ("send\nemail", "file in the\nlocal outbox"),
    ("update\ninventory", "Redis: inventory\nper hotel"),
)


def workflow_diagram(ax: Axes | None = None) -> Axes:
    """The five booking steps as boxes and arrows, each with the effect it leaves behind."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if ax is None:
        _, ax = plt.subplots(figsize=(11, 2.4))
    for i, (step, effect) in enumerate(WORKFLOW_STEPS):
        x = i * 2.2
        ax.add_patch(Rectangle((x, 0.55), 1.8, 0.8, facecolor="#dbe9f6", edgecolor="#2b5d8a"))
        ax.text(x + 0.9, 0.95, step, ha="center", va="center", fontsize=10, weight="bold")
        ax.text(x + 0.9, 0.2, effect, ha="center", va="center", fontsize=8, color="#444444")
        if i:
            ax.annotate("", xy=(x, 0.95), xytext=(x - 0.4, 0.95), arrowprops={"arrowstyle": "->"})
    ax.set_xlim(-0.2, len(WORKFLOW_STEPS) * 2.2 - 0.2)
    ax.set_ylim(-0.2, 1.6)
    ax.set_title("One booking: the workflow every backend runs, and the effect of each step")
    ax.axis("off")
    return ax


# -- the comparison harness (labkit.bench): lesson 08 and `labkit bench` results ---------------------

#: Percentile ticks of a spectrum's x axis: ``one_in`` (1 / (1 - percentile)) and the label.
PERCENTILE_TICKS = (
    (2.0, "50%"),
    (10.0, "90%"),
    (100.0, "99%"),
    (1_000.0, "99.9%"),
    (10_000.0, "99.99%"),
    (100_000.0, "99.999%"),
    (1_000_000.0, "99.9999%"),
)
#: A spectrum's max is drawn this many times further right than the most ``one_in`` any line measured.
MAX_TICK_FACTOR = 3.0
#: How a timeline column is named on the y axis.
TIMELINE_LABELS = {
    "backlog": "messages waiting (backlog)",
    "outstanding": "sent, not yet processed",
    "consumed": "messages processed in that second",
    "produced": "messages sent in that second",
    "p50_ms": "p50 latency (ms) of that second",
    "p99_ms": "p99 latency (ms) of that second",
}
PRODUCTS = {"bullmq": "BullMQ", "streams": "Redis Streams", "kafka": "Kafka"}


#: The colour every lesson gives a backend.
BACKEND_COLORS = {"bullmq": "#d62728", "streams": "#1f77b4", "kafka": "#2ca02c"}


def backend_color(backend: str) -> str:
    """The colour every lesson gives a backend."""
    return BACKEND_COLORS.get(backend, "#777777")


def _labels(frame: pd.DataFrame, labels: Mapping[str, str] | None = None) -> dict[str, str]:
    """Backend -> what to call it: ``labels`` if given, else the frame's ``label`` column, else the product."""
    found = dict(labels or {})
    if "label" in frame.columns:
        for backend, label in frame.groupby("backend", sort=False)["label"].first().items():
            found.setdefault(str(backend), str(label))
    for backend in dict.fromkeys(frame["backend"]):
        found.setdefault(str(backend), PRODUCTS.get(str(backend), str(backend)))
    return found


def _legend_below(ax: Axes) -> None:
    """The legend under the axes, where it hides no line (labels naming the server are long)."""
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)


def throughput_bars(summary: pd.DataFrame, ax: Axes | None = None, column: str = "throughput_per_s") -> Axes:
    """Messages per second per backend: the median over repetitions, the error bar from min to max.

    Args:
        summary: one row per backend and repetition (``BenchResult.summary``): ``backend``, ``column``,
            and ``label`` (the server measured: the x labels say "Kafka on Tansu ...", never just "Kafka").
        ax: where to draw; a new figure when None.
        column: the figure to draw (``produced_per_s`` shows what the producer managed).
    """
    import textwrap

    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.8))
    grouped = summary.groupby("backend", sort=False)[column]
    median, low, high = grouped.median(), grouped.min(), grouped.max()
    names = _labels(summary)
    positions = list(range(len(median)))
    ax.bar(
        positions,
        median.to_numpy(),
        yerr=[(median - low).to_numpy(), (high - median).to_numpy()],
        capsize=6,
        color=[backend_color(str(b)) for b in median.index],
        alpha=0.85,
    )
    for x, top, value in zip(positions, high, median, strict=True):  # above the error bar, where it can be read
        ax.annotate(f"{value:,.0f}", (x, top), xytext=(0, 4), textcoords="offset points", ha="center", fontsize=9)
    ax.set_xticks(positions, [textwrap.fill(names[str(b)], 26) for b in median.index], fontsize=8)
    ax.set_ylabel("messages per second")
    runs = int(grouped.size().max()) if len(median) else 0
    workload = f"{summary['workload'].iloc[0]}: " if "workload" in summary.columns and len(summary) else ""
    what = "processed" if column == "throughput_per_s" else column
    ax.set_title(f"{workload}messages {what} per second (median of {runs} run(s); bar: min to max)", fontsize=10)
    ax.set_ylim(0, max(ax.get_ylim()[1], float(high.max()) * 1.15 if len(high) else 1.0))
    return ax


def _median_repetition(curves: pd.DataFrame) -> Any:
    """The repetition whose p99 (read off its spectrum) is the median of the backend's runs (the lower one if even)."""
    p99 = {
        repetition: float(curve.loc[curve["percentile"] <= 99.0, "latency_ms"].max())
        for repetition, curve in curves.groupby("repetition")
    }
    ordered = sorted(p99, key=lambda r: (p99[r], r))
    return ordered[(len(ordered) - 1) // 2]


def _spectrum_points(curve: pd.DataFrame, edge: float) -> tuple[list[float], list[float]]:
    """A spectrum's points to draw: each percentile it resolves, then its max at ``edge``.

    The max row's ``one_in`` is the count of latencies measured; percentiles closer to 100 than
    one in that many resolve to the max itself, so they are left out.
    """
    ordered = curve.sort_values("percentile")
    top = ordered[ordered["percentile"] >= 100.0]
    count = float(top["one_in"].iloc[0]) if len(top) else float("inf")
    points = ordered[(ordered["percentile"] < 100.0) & (ordered["one_in"] < count)]
    xs, ys = list(points["one_in"].astype(float)), list(points["latency_ms"].astype(float))
    if len(top):
        xs.append(edge)
        ys.append(float(top["latency_ms"].iloc[0]))
    return xs, ys


def latency_spectrum(spectrum: pd.DataFrame, ax: Axes | None = None, labels: Mapping[str, str] | None = None) -> Axes:
    """The percentile spectrum, as HdrHistogram users draw it: latency against percentile, both on log axes.

    The x axis is ``one_in`` (1 / (1 - percentile)), so 90%, 99%, 99.9% ... sit at equal steps: each
    step is a latency ten times rarer. Every line ends in its max, drawn at the tick ``max``. One
    bold line per backend (its median repetition, by p99) and the other repetitions faint.

    Args:
        spectrum: ``BenchResult.spectrum``: ``backend, repetition, percentile, latency_ms, one_in``.
        ax: where to draw; a new figure when None.
        labels: backend -> legend label, e.g. the summary's ``label`` (the server measured).
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.2))
    names = _labels(spectrum, labels)
    counts = spectrum.loc[spectrum["percentile"] >= 100.0, "one_in"]
    most = float(counts.max()) if len(counts) else 10.0
    edge = most * MAX_TICK_FACTOR
    for backend, curves in spectrum.groupby("backend", sort=False):
        color = backend_color(str(backend))
        middle = _median_repetition(curves)
        for repetition, curve in curves.groupby("repetition"):
            xs, ys = _spectrum_points(curve, edge)
            if repetition == middle:
                ax.plot(xs, ys, color=color, linewidth=2, label=names[str(backend)])
            else:
                ax.plot(xs, ys, color=color, linewidth=1, alpha=0.3)
    ticks = [(x, label) for x, label in PERCENTILE_TICKS if x <= most] + [(edge, "max")]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks([x for x, _ in ticks], [label for _, label in ticks])
    ax.set_xlim(1.0, edge * 1.5)
    ax.set_xlabel("percentile (each step to the right: ten times rarer)")
    ax.set_ylabel("latency (ms), intended send → processed")
    ax.set_title("Latency percentile spectrum (bold: median run; faint: the other runs)", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    _legend_below(ax)
    return ax


def _timeline(
    timeline: pd.DataFrame,
    ax: Axes | None,
    column: str,
    pause: tuple[float, float] | None,
    labels: Mapping[str, str] | None,
) -> Axes:
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.6))
    if pause is not None:
        ax.axvspan(pause[0], pause[1], color="#999999", alpha=0.25, label="consumers stopped")
    names = _labels(timeline, labels)
    for backend, rows in timeline.groupby("backend", sort=False):
        runs = rows.pivot_table(index="second", columns="repetition", values=column, aggfunc="first", dropna=False)
        color = backend_color(str(backend))
        # markers: a second standing alone between gaps (no message finished around it) is still seen
        ax.plot(runs.index, runs.median(axis=1), color=color, marker="o", markersize=3, label=names[str(backend)])
        if runs.shape[1] > 1:
            ax.fill_between(runs.index, runs.min(axis=1), runs.max(axis=1), color=color, alpha=0.15, linewidth=0)
    ax.set_xlabel("seconds since the producer started")
    ax.set_ylabel(TIMELINE_LABELS.get(column, column))
    return ax


def backlog_timeline(
    timeline: pd.DataFrame,
    ax: Axes | None = None,
    column: str = "backlog",
    pause: tuple[float, float] | None = None,
    labels: Mapping[str, str] | None = None,
) -> Axes:
    """A per-second figure of each backend over the run: the backlog unless ``column`` says otherwise.

    One line per backend, the median over repetitions, with their min to max shaded when there
    are several; ``pause`` (start and end, seconds since the producer started) is shaded grey: the
    backlog-drain scenario's consumers were stopped then.

    Args:
        timeline: ``BenchResult.timeline``: ``backend, repetition, second`` and the figures.
        ax: where to draw; a new figure when None.
        column: ``backlog`` (as the broker reported it), ``outstanding`` (sent and not yet processed, from
            :func:`labkit.comparison.with_outstanding`), ``consumed``, ``produced``, ``p50_ms`` or ``p99_ms``.
        pause: the window in which the consumers were stopped, if any.
        labels: backend -> legend label (the server measured).
    """
    ax = _timeline(timeline, ax, column, pause, labels)
    titles = {"backlog": "Backlog over the run, as each broker reported it", "outstanding": "Backlog over the run"}
    ax.set_title(titles.get(column, f"{column} over the run"), fontsize=10)
    ax.set_ylim(bottom=0)
    _legend_below(ax)
    return ax


def latency_timeline(
    timeline: pd.DataFrame,
    ax: Axes | None = None,
    column: str = "p99_ms",
    pause: tuple[float, float] | None = None,
    labels: Mapping[str, str] | None = None,
) -> Axes:
    """The p99 latency of the messages finished in each second, per backend, on a log axis.

    Seconds in which a backend finished nothing (its consumers stopped) leave a gap. Arguments
    as for :func:`backlog_timeline`.
    """
    ax = _timeline(timeline, ax, column, pause, labels)
    ax.set_yscale("log")
    ax.set_title(f"{column.removesuffix('_ms')} latency, second by second", fontsize=10)
    _legend_below(ax)
    return ax
