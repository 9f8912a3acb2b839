"""Guided exercises: one module per exercise notebook (``from labkit.exercises import ex07 as ex``).

Each module holds its notebook's questions (``ex.q1`` ...), each with ``check(answer)``, ``hint()`` and
``solution()``; the kinds, the outcome and the saved progress are in :mod:`labkit.exercises.questions`.
The checks run real experiments with the lesson drivers (labkit.lessons) and the engine's worker processes.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

import click

from labkit.config import Config
from labkit.exercises.questions import REGISTRY, Question, progress_frame

if TYPE_CHECKING:
    import pandas as pd

#: The exercise notebooks' modules, in order: ex01 ... ex08.
MODULES = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith("ex"))


def all_questions() -> list[Question]:
    """Every question of every exercise module, in notebook order."""
    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}")
    return sorted(REGISTRY.values(), key=lambda q: (q.id.split(".")[0], int(q.id.split(".q")[1])))


def progress(config: Config | None = None) -> pd.DataFrame:
    """Every question of every exercise notebook: attempted, the last outcome, correct (ever), when."""
    return progress_frame(all_questions(), config)


@click.command("exercises")
def exercises_command() -> None:
    """Print your progress through the exercise notebooks (saved in $LABKIT_HOME/exercises)."""
    import pandas as pd

    frame = progress()
    with pd.option_context("display.max_rows", None, "display.width", 160, "display.max_colwidth", 60):
        click.echo(frame.to_string(index=False))
    done = int(frame["correct"].sum())
    click.echo(f"{done} of {len(frame)} questions correct, {int(frame['attempted'].sum())} attempted")
