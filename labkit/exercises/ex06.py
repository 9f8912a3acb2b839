"""Exercise 06, scaling: how throughput grows with worker processes for I/O-bound work (lesson 06-scaling).

The check drains the same backlog with 1 and with 4 real Streams workers (labkit.lessons.scaling.measure) and
judges the learner's predicted speedup against the measured one; a measurement between two choices is
Inconclusive, not a verdict.
"""

from __future__ import annotations

from typing import Any

from labkit.config import Config
from labkit.exercises.questions import Inconclusive, Judged, Kind, Question, ____, as_choice, nearest, progress, ready
from labkit.lessons import scaling
from labkit.workflow import WorkerSettings

__all__ = ["____", "progress", "q1", "ready"]

BOOKINGS = 40
STEP_MS = 20.0
CHOICES = {"1x": 1.0, "2x": 2.0, "4x": 4.0}


def _judge_speedup(answer: Any, config: Config) -> Judged:
    choice = as_choice(answer, list(CHOICES))
    settings = WorkerSettings(concurrency=1, step_ms=STEP_MS)
    one, _, _ = scaling.measure("streams", config, 1, BOOKINGS, settings, tag="ex06a", timeout=25)
    four, _, _ = scaling.measure("streams", config, 4, BOOKINGS, settings, tag="ex06b", timeout=25)
    speedup = four["throughput"] / one["throughput"]
    measured = {"throughput_1": round(one["throughput"], 1), "throughput_4": round(four["throughput"], 1),
                "speedup": round(speedup, 2)}  # fmt: skip
    ran = (f"drained {BOOKINGS} I/O-bound bookings (5 steps x {STEP_MS:g} ms of awaited I/O) with 1 and then 4 "
           "Streams workers")  # fmt: skip
    closest = nearest(speedup, CHOICES)
    if closest is None:
        raise Inconclusive(f"{ran}: the speedup fell between two choices; the machine is too busy to tell.")
    if choice == closest:
        return Judged(True, f"{ran}: {speedup:.1f}x. Each worker spends its booking waiting, so four workers "
                      "wait side by side: I/O-bound work scales with processes (or concurrency) until the broker "
                      "or the CPU is busy.", measured)  # fmt: skip
    return Judged(False, f"{ran}: the measured speedup is not nearest {choice}.", measured)


q1 = Question(
    "ex06.q1", Kind.PREDICT, "speedup of I/O-bound work from 1 to 4 workers", _judge_speedup,
    hints=["Is the worker busy computing, or waiting, during a booking?",
           "A waiting process leaves the CPU to others: four of them can all wait at once, on two cores."],
    solution_text='"4x": the work is awaited I/O, so four workers do about four times as much.',
    reference="4x", wrong={"capped by two cores": "2x"}, backends=("streams",),
)  # fmt: skip
