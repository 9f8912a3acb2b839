"""labkit.charts on synthetic frames: what each figure draws (bars, lines, scales, labels), with the Agg backend."""

from __future__ import annotations

import functools

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.container import ErrorbarContainer
from matplotlib.patches import Rectangle

from labkit import charts, latency

LABELS = {
    "bullmq": "BullMQ on Valkey 9.1.2",
    "streams": "Redis Streams on Valkey 9.1.2",
    "kafka": "Kafka on Tansu 0.6.0-510f3e2 (embedded, memory only)",
}
BACKENDS = list(LABELS)


@pytest.fixture(autouse=True)
def close_figures() -> None:
    plt.close("all")


def summary() -> pd.DataFrame:
    """Three backends x three repetitions; throughput (median, min, max): bullmq 100/90/120, streams 200/150/210,
    kafka 300/300/300."""
    throughput = {"bullmq": [120.0, 100.0, 90.0], "streams": [150.0, 210.0, 200.0], "kafka": [300.0, 300.0, 300.0]}
    rows = [
        {"backend": b, "repetition": r + 1, "throughput_per_s": v, "label": LABELS[b], "workload": "steady"}
        for b in BACKENDS
        for r, v in enumerate(throughput[b])
    ]
    return pd.DataFrame(rows)


@functools.cache
def _spectrum(count: int, scales: tuple[float, ...]) -> pd.DataFrame:
    """Real spectra (labkit.latency) of exponential latencies; repetition r of backend i has mean (i + 1) * scale ms."""
    rng = np.random.default_rng(8)
    parts = []
    for i, backend in enumerate(BACKENDS):
        for r, scale in enumerate(scales, start=1):
            values = rng.exponential((i + 1) * scale, count) + 0.01
            parts.append(latency.spectrum(latency.histogram(values)).assign(backend=backend, repetition=r))
    return pd.concat(parts, ignore_index=True)


def spectrum(count: int = 20_000, scales: tuple[float, ...] = (1.0, 2.0, 3.0)) -> pd.DataFrame:
    return _spectrum(count, scales).copy()


def timeline(repetitions: int = 3) -> pd.DataFrame:
    """12 seconds per run; backlog rises from second 4 to 7 (the pause), faster for later repetitions."""
    rows = []
    for b in BACKENDS:
        for r in range(1, repetitions + 1):
            for second in range(12):
                backlog = 100 * r * (second - 3) if 4 <= second <= 7 else 0
                p99 = float("nan") if 4 <= second <= 6 else 10.0 * r
                rows.append(
                    {"backend": b, "repetition": r, "second": second, "backlog": backlog, "p99_ms": p99,
                     "consumed": 0 if 4 <= second <= 6 else 200, "produced": 200}
                )  # fmt: skip
    return pd.DataFrame(rows)


# -- throughput bars ------------------------------------------------------------------------------------


def test_throughput_bars_draw_each_backends_median_with_min_max_error_bars() -> None:
    ax = charts.throughput_bars(summary())

    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert [b.get_height() for b in bars] == [100.0, 200.0, 300.0]
    (errorbars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    _, _, (segments,) = errorbars.lines
    spans = [tuple(seg[:, 1]) for seg in segments.get_segments()]
    assert spans == [(90.0, 120.0), (150.0, 210.0), (300.0, 300.0)]
    assert [t.get_text() for t in ax.texts] == ["100", "200", "300"]


def test_throughput_bars_name_the_server_never_just_kafka() -> None:
    ax = charts.throughput_bars(summary())

    ticks = [t.get_text().replace("\n", " ") for t in ax.get_xticklabels()]
    assert ticks == list(LABELS.values())
    assert "Kafka" not in ticks
    assert ax.get_ylabel() == "messages per second"
    assert "steady" in ax.get_title() and "median of 3" in ax.get_title()


def test_throughput_bars_draw_on_the_axes_given_or_a_new_figure() -> None:
    _, given = plt.subplots()
    assert charts.throughput_bars(summary(), ax=given) is given
    made = charts.throughput_bars(summary(), column="throughput_per_s")
    assert isinstance(made, Axes) and made is not given


def test_throughput_bars_without_label_column_use_product_names() -> None:
    ax = charts.throughput_bars(summary().drop(columns=["label", "workload"]))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["BullMQ", "Redis Streams", "Kafka"]


# -- latency spectrum ----------------------------------------------------------------------------------


def test_latency_spectrum_is_log_log_with_percentile_ticks_and_max() -> None:
    ax = charts.latency_spectrum(spectrum())

    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["50%", "90%", "99%", "99.9%", "99.99%", "max"]
    assert list(ax.get_xticks()[:5]) == [2.0, 10.0, 100.0, 1000.0, 10000.0]
    assert ax.get_xticks()[-1] == pytest.approx(20_000 * charts.MAX_TICK_FACTOR)


def test_latency_spectrum_draws_the_median_run_bold_and_the_others_faint() -> None:
    ax = charts.latency_spectrum(spectrum(), labels=LABELS)

    lines = ax.get_lines()
    assert len(lines) == 9  # 3 backends x 3 repetitions
    bold = [line for line in lines if line.get_linewidth() == 2]
    assert [line.get_label() for line in bold] == list(LABELS.values())
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(LABELS.values())
    assert all(line.get_alpha() == pytest.approx(0.3) for line in lines if line not in bold)
    # the median repetition (scale 2) of bullmq: its p99 lies between the others'
    p99 = {line.get_ydata()[-1] for line in lines if line.get_color() == bold[0].get_color()}
    assert sorted(p99)[1] == bold[0].get_ydata()[-1]


def test_latency_spectrum_ends_every_line_at_its_max_on_the_max_tick() -> None:
    frame = spectrum(count=800, scales=(1.0,))
    ax = charts.latency_spectrum(frame)

    edge = ax.get_xticks()[-1]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["50%", "90%", "99%", "max"]  # 800 measured: no 99.9%
    for line, (backend, curve) in zip(ax.get_lines(), frame.groupby("backend", sort=False), strict=True):
        xs, ys = line.get_xdata(), line.get_ydata()
        assert xs[-1] == edge and ys[-1] == curve["latency_ms"].max()
        assert (np.asarray(xs[:-1]) < 800).all(), f"{backend}: percentiles finer than one in 800 resolve to the max"
        assert (np.diff(xs) > 0).all() and (np.diff(ys) >= 0).all()


# -- timelines -------------------------------------------------------------------------------------------


def test_backlog_timeline_draws_one_median_line_per_backend_and_shades_the_pause() -> None:
    ax = charts.backlog_timeline(timeline(), pause=(4.0, 7.0), labels=LABELS)

    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == list(LABELS.values())
    assert list(lines[0].get_ydata()[4:8]) == [200.0, 400.0, 600.0, 800.0]  # the median run, repetition 2
    assert ax.get_ylim()[0] == 0 and ax.get_ylabel() == "messages waiting (backlog)"
    assert ax.get_xlabel() == "seconds since the producer started"
    (shade,) = [p for p in ax.patches if p.get_label() == "consumers stopped"]
    assert shade.get_x() == 4.0 and shade.get_width() == 3.0
    assert "consumers stopped" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(ax.collections) == 3  # min-max bands of the three repetitions


def test_backlog_timeline_of_one_repetition_has_no_band_and_no_pause_unless_given() -> None:
    ax = charts.backlog_timeline(timeline(repetitions=1), column="consumed")

    assert len(ax.get_lines()) == 3 and not ax.collections and not ax.patches
    assert [line.get_label() for line in ax.get_lines()] == ["BullMQ", "Redis Streams", "Kafka"]
    assert ax.get_ylabel() == "messages processed in that second"


def test_latency_timeline_is_log_with_gaps_where_nothing_finished() -> None:
    ax = charts.latency_timeline(timeline(), pause=(4.0, 7.0))

    assert ax.get_yscale() == "log"
    ys = ax.get_lines()[0].get_ydata()
    assert np.isnan(ys[4:7]).all() and ys[0] == 20.0
    assert ax.get_title().startswith("p99 latency")
