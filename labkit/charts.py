"""Figures the lessons draw. Each takes data (and ``ax=None``) and returns the Axes."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes

WORKFLOW_STEPS = (
    ("validate", "schema of\nCONTRACT.md"),
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
