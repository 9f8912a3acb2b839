"""``lk.dashboard()``: the dashboard's panels inside a notebook, from the same sampler as ``/dashboard``.

Live (``live=True``), the view is built once from ipywidgets and a task on the lab's helper loop thread sets the
widgets' values after each sample (never writing into an Output widget from a thread, which loses output). That
task must stay cheap, because every other lab call of the kernel (``lk.reset``, ``lk.produce``, a pool's stats,
starting a worker) runs on the same loop: the live charts are small SVG lines built as text (about a millisecond),
not matplotlib figures, which took 0.4-1 s of CPU each (3-9 s on a loaded machine) and held the loop (and the GIL)
that long every time; a lesson cell that waited on the loop slowed to a crawl while the view was live.

Under papermill and nbval there is no front end to draw widgets, so a lesson passes its ``LIVE`` parameter: with
``live=False`` the view only samples, and ``snapshot()`` after the experiment shows what it saw as plain HTML
tables and a PNG of the charts, the same in an executed copy as on screen (in both modes). One view per kernel:
starting another stops the one before; ``stop()``, the context manager, the pools it was given (``pool=``) when
they stop, and interpreter exit (a kernel shutdown or restart) stop it.
"""

from __future__ import annotations

import atexit
import contextlib
import html
import io
import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from labkit.config import BACKENDS, Config
from labkit.lab import loop_thread
from labkit.sampler import BOOKING_WORDS, BROKERS, STATES, WORDS, Sample, Sampler

if TYPE_CHECKING:
    from labkit.pool import WorkerPool

log = logging.getLogger(__name__)

TITLES = {"bullmq": "BullMQ", "streams": "Redis Streams", "kafka": "Kafka"}
BROKER_TITLES = {"redis": "Redis", "kafka": "Kafka"}
#: The longest ``stop()`` waits for the sampler to end (it closes its connections); at interpreter exit the kernel
#: manager allows about 5 s for everything, the pools' warm stop first.
STOP_TIMEOUT_S = 5.0
EXIT_STOP_TIMEOUT_S = 1.5
_current: LiveView | None = None
_current_lock = threading.Lock()


class _Markup(str):
    """A table cell that is HTML already (a progress bar), not text to escape."""


def _cell(value: Any) -> str:
    if isinstance(value, _Markup):
        return str(value)
    return html.escape("–" if value is None else str(value))


def _table(caption: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], empty: str = "none") -> str:
    head = "".join(f"<th scope='col'>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    if not rows:
        body = f"<tr><td colspan='{len(headers)}'><i>{html.escape(empty)}</i></td></tr>"
    return (
        f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def _stale(sample: Sample | None, every_s: float, now: float) -> bool:
    """Three missed samples: older than three sampling periods (and a little slack)."""
    return sample is None or now - sample.at > 3 * every_s + 0.5


def _ago(seconds: float) -> str:
    return "now" if seconds < 1 else f"{seconds:.0f} s ago"


def _health_html(backend: str, latest: Sample | None, every_s: float, now: float) -> str:
    """The broker health table, from the newest sample (good or not: a broker that is down is news)."""
    if latest is None:
        return ""
    words = dict(BROKERS[backend])
    rows = [
        (BROKER_TITLES.get(b["broker"], b["broker"]), "yes" if b["answers"] else "NO", b["server"],
         "–" if b["round_trip_ms"] is None else f"{b['round_trip_ms']:.1f} ms", words.get(b["broker"]))
        for b in latest.brokers
    ]  # fmt: skip
    table = _table(f"Broker health (updated {_ago(now - latest.at)})", ["broker", "answers", "server", "round trip",
                                                                          "holds"], rows)  # fmt: skip
    return f"<div style='opacity:0.45'>{table}</div>" if _stale(latest, every_s, now) else table


def _progress(row: dict[str, Any]) -> _Markup:
    percent = int(row.get("progress") or 0)
    step = f" {html.escape(row['step'])}" if row.get("step") else ""
    return _Markup(f"<progress max='100' value='{percent}'>{percent} %</progress> {percent} %{step}")


def _short(booking_id: str) -> str:
    return booking_id if len(booking_id) <= 14 else booking_id[:12] + "…"


def _bookings_html(backend: str, sample: Sample, now: float) -> str:
    words = BOOKING_WORDS[backend]
    rows = [
        (_short(b["booking_id"]), f"{b['state'] or 'expired'} ({words.get(b['state'] or '', 'no status record')})",
         _progress(b), _ago(now - b["updated_at"]))
        for b in sample.bookings
    ]  # fmt: skip
    empty = "none yet: bookings sent through the booking service (labkit serve) show here with their progress"
    return _table("Recent bookings", ["booking", "state (its word)", "progress", "changed"], rows, empty)


def panel_html(
    backend: str, sample: Sample | None, latest: Sample | None, every_s: float, now: float, charts: str = ""
) -> str:
    """One backend's panels as HTML: its broker health (from the newest sample, ``latest``), then from the last good
    ``sample`` its states with the system's words, ``charts`` (HTML), workers, partitions or pending list, recent
    bookings and dead letters, saying how old the data is and greyed out after three missed samples."""
    title = f"<h3>{TITLES.get(backend, backend)}</h3>"
    health = _health_html(backend, latest, every_s, now)
    if sample is None:
        why = f": {latest.error}" if latest is not None and latest.error else ""
        return f"<div>{title}<p>no sample yet{html.escape(why)}</p>{health}</div>"
    stale = _stale(sample, every_s, now)
    note = f"updated {now - sample.at:.0f} s ago" + (
        f"; broker not answering: {latest.error}" if latest and not latest.ok else ""
    )
    words = WORDS[backend]
    parts = [
        f"<p><b>{html.escape(note)}</b></p>" if stale else f"<p>{html.escape(note)}</p>",
        _table("States", ["state", "count", "its word"],
               [(s, sample.states.get(s), words[s]) for s in STATES if words[s] is not None]),
        charts,
        _table("Workers", ["worker", "last seen", "detail"],
               [(w["id"], _ago(now - w["last_seen"]), w["detail"]) for w in sample.workers]),
    ]  # fmt: skip
    if backend == "kafka":
        rows = [(p["partition"], p["owner"] or "nobody", p["lag"]) for p in sample.partitions]
        parts.append(_table("Partitions", ["partition", "owner", "lag"], rows))
    if backend == "streams":
        rows = [(e["id"], e["consumer"], e["idle_ms"], e["deliveries"]) for e in sample.pending]
        parts.append(_table("Pending entries", ["entry", "consumer", "idle ms", "deliveries"], rows))
    parts.append(_bookings_html(backend, sample, now))
    rows = [(d["booking_id"], d["reason"]) for d in sample.dead_letters[-5:]]
    parts.append(_table(f"Dead letters ({sample.dead_letter_count})", ["booking", "reason"], rows))
    style = " style='opacity:0.45'" if stale else ""
    return f"<div>{title}{health}<div{style}>{''.join(parts)}</div></div>"


def svg_chart(label: str, ago: Sequence[float], values: Sequence[float], color: str, span_s: float) -> str:
    """A small line chart of ``values`` over the last ``span_s`` seconds, as inline SVG text (cheap enough to build
    after every sample on the helper loop), labelled with its latest and highest value for screen readers too."""
    width, height = 300, 56
    top = max(max(values, default=0), 1e-9)
    points = " ".join(
        f"{width * (1 + a / span_s):.1f},{height - 4 - (height - 8) * v / top:.1f}"
        for a, v in zip(ago, values, strict=True)
    )
    latest = f"{values[-1]:g}" if values else "–"
    text = f"{label}: latest {latest}, highest {max(values, default=0):g}, over {span_s / 60:.0f} min"
    return (
        f"<svg role='img' aria-label='{html.escape(text)}' viewBox='0 0 {width} {height}' width='100%' "
        f"height='{height}' style='background:#fafafa'><title>{html.escape(text)}</title>"
        f"<polyline fill='none' stroke='{color}' stroke-width='1.5' points='{points}'/>"
        f"<text x='4' y='12' font-size='10' fill='#444'>{html.escape(text)}</text></svg>"
    )


def _series(sampler: Sampler, name: str, now: float) -> tuple[list[float], list[float], list[float]]:
    good = [s for s in sampler.history(name) if s.ok]
    return [s.at - now for s in good], [s.throughput or 0 for s in good], [s.backlog or 0 for s in good]


def charts_png(sampler: Sampler) -> bytes:
    """Throughput and backlog over the buffer, one column per backend, as PNG bytes (no pyplot: thread-safe).

    A fixed layout, not matplotlib's constrained one: a third of the CPU time (0.35 s against 1 s here)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.2 * len(sampler.backends), 3.6), dpi=90)
    FigureCanvasAgg(figure)
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.92, wspace=0.3, hspace=0.15)
    axes = figure.subplots(2, len(sampler.backends), squeeze=False, sharex=True)
    now = time.time()
    for i, name in enumerate(sampler.backends):
        ago, throughput, backlog = _series(sampler, name, now)
        axes[0][i].plot(ago, throughput, color="#1f7a4d")
        axes[0][i].set_title(TITLES.get(name, name), fontsize=10)
        axes[1][i].plot(ago, backlog, color="#b45309")
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
        pool: the worker pool(s) the view watches: it stops when the last of them stops (None: only ``stop()``,
            ``snapshot()``, the next view and interpreter exit stop it).
    """

    def __init__(
        self,
        config: Config | None = None,
        live: bool = True,
        backends: Sequence[str] = BACKENDS,
        every_s: float = 1.0,
        pool: WorkerPool | Sequence[WorkerPool] | None = None,
    ) -> None:
        self.config = config or Config.from_env()
        self.live = live
        self.sampler = Sampler(self.config, every_s=every_s, backends=backends)
        self.widget: Any = None
        self.running = False
        self._updater: Any = None
        self._pools = [] if pool is None else [pool] if not isinstance(pool, Sequence) else list(pool)
        self._pools_running = len(self._pools)

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
        self.running = True
        if self.live:
            self._build()
            self._updater = thread.run(self._start_updating())
        for pool in self._pools:
            pool.on_stop(self._pool_stopped)
        return self

    def _pool_stopped(self) -> None:
        self._pools_running -= 1
        if self._pools_running <= 0:
            self.stop()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop sampling and updating (waiting at most ``timeout`` seconds); the last values stay on screen."""
        self.running = False
        thread = loop_thread()
        if self._updater is not None:
            updater, self._updater = self._updater, None
            thread.loop.call_soon_threadsafe(updater.cancel)
        try:
            thread.run(self.sampler.stop(), timeout=timeout)
        except TimeoutError:
            log.warning("the dashboard's sampler did not stop within %.1f s; left to the interpreter's exit", timeout)

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

    def _panel(self, name: str, now: float, charts: str = "") -> str:
        latest = self.sampler.latest(name)
        return panel_html(name, self.sampler.last_good(name), latest, self.sampler.every_s, now, charts)

    def _live_charts(self, name: str, now: float) -> str:
        ago, throughput, backlog = _series(self.sampler, name, now)
        span = self.sampler.every_s * (self.sampler.buffers[name].maxlen or 1)
        return svg_chart("completed/s", ago, throughput, "#1f7a4d", span) + svg_chart(
            "backlog", ago, backlog, "#b45309", span
        )

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
        row = [widgets.Box([p], layout=widgets.Layout(flex="1", min_width="0")) for p in self._panels.values()]
        self.widget = widgets.HBox(row)

    async def _start_updating(self) -> Any:
        import asyncio

        return asyncio.create_task(self._update_forever())

    async def _update_forever(self) -> None:
        """After each sample (at least every second, for the ages): each panel's HTML, charts included."""
        seen = 0
        while True:
            seen = await self.sampler.wait_for_new(seen, timeout=1.0)
            now = time.time()
            for name, panel in self._panels.items():
                panel.value = self._panel(name, now, self._live_charts(name, now))


def dashboard(
    config: Config | None = None,
    live: bool = True,
    backends: Sequence[str] = BACKENDS,
    pool: WorkerPool | Sequence[WorkerPool] | None = None,
) -> LiveView:
    """Show the three queues live in the notebook (``live=False``: a static snapshot); see :class:`LiveView`.

    Put it at the end of a cell (or ``display`` it); ``.snapshot()`` stops it and shows what it saw as HTML and a
    PNG, ``.stop()`` only stops it; the next ``dashboard()`` stops it too, and so does the end of the ``pool``
    (or pools) it is given.
    """
    return LiveView(config, live, backends, pool=pool).start()


@atexit.register
def _stop_current() -> None:
    """Interpreter exit (a kernel shutdown or restart): stop the view, briefly; the pools' workers stop first."""
    if _current is not None and _current.running:
        with contextlib.suppress(Exception):  # the interpreter is exiting; nothing to tell
            _current.stop(timeout=EXIT_STOP_TIMEOUT_S)
