"""``lk.dashboard()``: the dashboard's panels inside a notebook, from the same sampler as ``/dashboard``.

Live (``live=True``), the view is built once from ipywidgets and a task on the lab's helper loop thread sets the
widgets' values after each sample (never writing into an Output widget from a thread, which loses output).
Under papermill and nbval there is no front end to draw widgets, so a lesson passes its ``LIVE`` parameter: with
``live=False`` the view only samples, and ``snapshot()`` after the experiment shows what it saw as plain HTML
tables and a PNG of the charts, the same in an executed copy as on screen (in both modes). One view per kernel:
starting another stops the one before; ``stop()``, the context manager and interpreter exit stop it.
"""

from __future__ import annotations

import atexit
import contextlib
import html
import io
import threading
import time
from collections.abc import Sequence
from typing import Any

from labkit.config import BACKENDS, Config
from labkit.lab import loop_thread
from labkit.sampler import STATES, WORDS, Sample, Sampler

TITLES = {"bullmq": "BullMQ", "streams": "Redis Streams", "kafka": "Kafka"}
#: The charts are drawn again this often while live (a PNG costs tens of milliseconds).
CHART_EVERY_S = 5.0
_current: LiveView | None = None
_current_lock = threading.Lock()


def _table(caption: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th scope='col'>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    if not rows:
        body = f"<tr><td colspan='{len(headers)}'><i>none</i></td></tr>"
    return (
        f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def panel_html(backend: str, sample: Sample | None, latest: Sample | None, every_s: float, now: float) -> str:
    """One backend's panels as HTML: its states with the system's words, workers, partitions or pending list,
    dead letters, and how old the data is (greyed out after three missed samples)."""
    title = f"<h3>{TITLES.get(backend, backend)}</h3>"
    if sample is None:
        why = f": {latest.error}" if latest is not None and latest.error else ""
        return f"<div>{title}<p>no sample yet{html.escape(why)}</p></div>"
    age = now - sample.at
    stale = age > 3 * every_s + 0.5
    note = f"updated {age:.0f} s ago" + (f"; broker not answering: {latest.error}" if latest and not latest.ok else "")
    words = WORDS[backend]
    parts = [
        title,
        f"<p><b>{html.escape(note)}</b></p>" if stale else f"<p>{html.escape(note)}</p>",
        _table("States", ["state", "count", "its word"],
               [(s, sample.states.get(s), words[s]) for s in STATES if words[s] is not None]),
        _table("Workers", ["worker", "last seen", "detail"],
               [(w["id"], f"{now - w['last_seen']:.0f} s ago", w["detail"]) for w in sample.workers]),
    ]  # fmt: skip
    if backend == "kafka":
        rows = [(p["partition"], p["owner"] or "nobody", p["lag"]) for p in sample.partitions]
        parts.append(_table("Partitions", ["partition", "owner", "lag"], rows))
    if backend == "streams":
        rows = [(e["id"], e["consumer"], e["idle_ms"], e["deliveries"]) for e in sample.pending]
        parts.append(_table("Pending entries", ["entry", "consumer", "idle ms", "deliveries"], rows))
    rows = [(d["booking_id"], d["reason"]) for d in sample.dead_letters[-5:]]
    parts.append(_table(f"Dead letters ({sample.dead_letter_count})", ["booking", "reason"], rows))
    style = "opacity:0.45" if stale else ""
    return f"<div style='{style}'>{''.join(parts)}</div>"


def charts_png(sampler: Sampler) -> bytes:
    """Throughput and backlog over the buffer, one column per backend, as PNG bytes (no pyplot: thread-safe)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.2 * len(sampler.backends), 3.6), dpi=90, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, len(sampler.backends), squeeze=False, sharex=True)
    now = time.time()
    for i, name in enumerate(sampler.backends):
        good = [s for s in sampler.history(name) if s.ok]
        ago = [s.at - now for s in good]
        axes[0][i].plot(ago, [s.throughput or 0 for s in good], color="#1f7a4d")
        axes[0][i].set_title(TITLES.get(name, name), fontsize=10)
        axes[1][i].plot(ago, [s.backlog or 0 for s in good], color="#b45309")
        axes[1][i].set_xlabel("seconds ago", fontsize=8)
    axes[0][0].set_ylabel("completed/s", fontsize=8)
    axes[1][0].set_ylabel("backlog", fontsize=8)
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


class LiveView:
    """The three backends' panels in a notebook, sampled about once a second.

    Args:
        config: the lab [default: ``Config.from_env()``].
        live: widgets updated in place (a front end is drawing them); False: a static snapshot (papermill, nbval).
        backends: which backends to show.
        every_s: seconds between two samples of one backend.
    """

    def __init__(
        self,
        config: Config | None = None,
        live: bool = True,
        backends: Sequence[str] = BACKENDS,
        every_s: float = 1.0,
    ) -> None:
        self.config = config or Config.from_env()
        self.live = live
        self.sampler = Sampler(self.config, every_s=every_s, backends=backends)
        self.widget: Any = None
        self._updater: Any = None

    def __enter__(self) -> LiveView:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LiveView:
        """Start sampling (and, live, updating the widgets); stops the kernel's previous view first."""
        global _current
        with _current_lock:
            if _current is not None and _current is not self:
                _current.stop()
            _current = self
        thread = loop_thread()
        thread.run(self.sampler.start())
        if self.live:
            self._build()
            self._updater = thread.run(self._start_updating())
        return self

    def stop(self) -> None:
        """Stop sampling and updating; the last values stay on screen."""
        thread = loop_thread()
        if self._updater is not None:
            updater, self._updater = self._updater, None
            thread.loop.call_soon_threadsafe(updater.cancel)
        thread.run(self.sampler.stop())

    def wait_for_samples(self, timeout: float = 15.0) -> None:
        """Wait until every backend has a sample (good or not)."""
        deadline = time.monotonic() + timeout
        while any(self.sampler.latest(b) is None for b in self.sampler.backends) and time.monotonic() < deadline:
            time.sleep(0.1)

    def snapshot_html(self) -> str:
        """Every backend's panels now, as one HTML block of three columns."""
        now = time.time()
        columns = "".join(
            f"<div style='flex:1;min-width:0'>{self._panel(name, now)}</div>" for name in self.sampler.backends
        )
        return f"<div style='display:flex;gap:16px'>{columns}</div>"

    def _panel(self, name: str, now: float) -> str:
        latest = self.sampler.latest(name)
        return panel_html(name, self.sampler.last_good(name), latest, self.sampler.every_s, now)

    def snapshot(self) -> None:
        """Stop, then show the panels and the charts as they are now, as plain HTML and a PNG: what an executed
        notebook keeps, widgets or not (a saved widget does not draw without its kernel)."""
        from IPython.display import HTML, Image, display

        self.wait_for_samples()
        self.stop()
        display(HTML(self.snapshot_html()))
        display(Image(charts_png(self.sampler)))

    def _ipython_display_(self) -> None:
        from IPython.display import display

        if self.live and self.widget is not None:
            display(self.widget)
        else:
            print(f"sampling {', '.join(self.sampler.backends)} in the background; .snapshot() shows what it saw")

    def _build(self) -> None:
        import ipywidgets as widgets

        self._panels = {
            name: widgets.HTML(value=f"<h3>{TITLES.get(name, name)}</h3>") for name in self.sampler.backends
        }
        self._chart = widgets.Image(format="png")
        row = widgets.HBox([widgets.Box([p], layout=widgets.Layout(flex="1")) for p in self._panels.values()])
        self.widget = widgets.VBox([row, self._chart])

    async def _start_updating(self) -> Any:
        import asyncio

        return asyncio.create_task(self._update_forever())

    async def _update_forever(self) -> None:
        seen, charted = 0, 0.0
        while True:
            seen = await self.sampler.wait_for_new(seen, timeout=1.0)
            now = time.time()
            for name, panel in self._panels.items():
                panel.value = self._panel(name, now)
            if now - charted >= CHART_EVERY_S:
                charted = now
                self._chart.value = charts_png(self.sampler)


def dashboard(config: Config | None = None, live: bool = True, backends: Sequence[str] = BACKENDS) -> LiveView:
    """Show the three queues live in the notebook (``live=False``: a static snapshot); see :class:`LiveView`.

    Put it at the end of a cell (or ``display`` it); ``.snapshot()`` stops it and shows what it saw as HTML and a
    PNG, ``.stop()`` only stops it; the next ``dashboard()`` stops it too.
    """
    return LiveView(config, live, backends).start()


@atexit.register
def _stop_current() -> None:
    if _current is not None:
        with contextlib.suppress(Exception):  # the interpreter is exiting; nothing to tell
            _current.stop()
