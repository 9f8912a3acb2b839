"""Progress bars for long work that read right afterwards, too: live in JupyterLab, final in a saved notebook.

A tqdm bar in a notebook is an ipywidget. Its output also carries a plain-text copy for front ends without
widgets (GitHub, nbviewer, an HTML export, CI's executed copies), but that copy is taken when the bar is first
shown: every saved bar reads ``0%| | 0/6``. :func:`progress` shows the same widget while the work runs and,
when the bar closes, replaces its output by one plain line with the final count and the time taken
(``bullmq settled: 6/6 bookings in 3.2 s``), so every executed copy says how the work ended. Outside a kernel
it is plain tqdm on stderr.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from tqdm.std import tqdm as plain_tqdm


def _in_kernel() -> bool:
    """True inside a Jupyter kernel (an IPython shell that has a kernel: notebooks, papermill, nbval)."""
    try:
        from IPython.core.getipython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()  # type: ignore[no-untyped-call]  # IPython ships no type hints for it
    return shell is not None and getattr(shell, "kernel", None) is not None


def summary_line(desc: str, n: float, total: float | None, unit: str, seconds: float) -> str:
    """The line a closed bar leaves behind: ``<desc>: <n>/<total> <unit>s in <seconds> s``."""
    count = f"{n:,.0f}/{total:,.0f}" if total else f"{n:,.0f}"
    return f"{desc}: {count} {unit}{'' if n == 1 and not total else 's'} in {seconds:.1f} s"


def _notebook_bar_class() -> type[plain_tqdm]:
    from IPython.display import display
    from tqdm.notebook import tqdm as notebook_tqdm

    class SavedBar(notebook_tqdm):  # type: ignore[misc]  # tqdm's classes are untyped
        """tqdm's notebook bar, shown under a display id so that closing it can replace it by its final line."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["display"] = False
            super().__init__(*args, **kwargs)
            self._started = time.monotonic()
            self._handle = None if self.disable else display(self.container, display_id=True)  # type: ignore[no-untyped-call]

        def close(self) -> None:
            handle, self._handle = self._handle, None
            super().close()
            if handle is None:
                return
            seconds = time.monotonic() - self._started
            line = summary_line(self.desc or "done", self.n, self.total, self.unit, seconds) if self.leave else ""
            handle.update({"text/plain": line}, raw=True)
            self.container.close()  # the widget is gone from the page: free its model in the kernel

    return SavedBar


def progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> plain_tqdm:
    """A tqdm bar (same arguments: ``total``, ``desc``, ``unit``, ``disable``, ``leave`` ...) that ends as one line.

    In a kernel the live bar is a widget and its output becomes :func:`summary_line` when it closes (use it in a
    ``with`` block, or exhaust the iterable and ``close()`` it); elsewhere it is plain tqdm.
    """
    bar_class = _notebook_bar_class() if _in_kernel() else plain_tqdm
    return bar_class(iterable, **kwargs)


__all__ = ["progress", "summary_line"]
