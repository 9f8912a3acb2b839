"""Exercise 08, comparison: which backend hands a killed booking back first, and what "exactly once" costs.

The checks SIGKILL a real worker right after a booking's payment (labkit.lessons.crashes.kill_after_payment,
lesson 07's driver) on the backends they compare, with lesson 07's settings, and judge the learner's choice by
what happened. Confusion 2: every backend here is at-least-once; without an idempotent effect the card is
charged again.
"""

from __future__ import annotations

from typing import Any

from labkit.config import Config
from labkit.exercises.questions import Judged, Kind, Question, ____, as_choice, as_number, progress, ready
from labkit.lessons import crashes

__all__ = ["____", "progress", "q1", "q2", "ready"]

RACE = ("bullmq", "streams")


def _judge_first(answer: Any, config: Config) -> Judged:
    choice = as_choice(answer, RACE)
    run = crashes.kill_after_payment(config, backends=list(RACE), n_bookings=4, timeout=25)
    back = run.recovery()["handed_back_s"]
    first = str(back.idxmin())
    measured = {b: round(float(back[b]), 2) for b in RACE}
    ran = ("killed one worker per backend right after a payment, with lesson 07's settings (BullMQ lock 5 s, "
           "stalled check every 2 s; Streams claim idle 2 s)")  # fmt: skip
    if choice == first:
        return Judged(True, f"{ran}: handed back after {measured} s. Streams' reclaimer claims an entry as "
                      "soon as it has been idle 2 s; BullMQ waits for the lock to expire and then for a stalled "
                      "check.", measured)  # fmt: skip
    return Judged(False, f"{ran}: {choice} was not the first to hand the booking back.", measured)


def _judge_charges(answer: Any, config: Config) -> Judged:
    run = crashes.kill_after_payment(config, backends=["streams"], n_bookings=4, idempotent=False,
                                     claim_idle_ms=1000, timeout=25)  # fmt: skip
    charged = run.effects["streams"]["payments"].get(run.victim, 0)
    measured = {"victim_charged": charged}
    ran = "killed a Streams worker right after a booking's payment, effects not idempotent"
    if as_number(answer) == charged:
        return Judged(True, f"{ran}: the card was charged {charged} times. The broker redelivered the booking "
                      "(at-least-once), and the payment step ran again. Exactly-once effects need an idempotent "
                      "step (exercise 07).", measured)  # fmt: skip
    return Judged(False, f"{ran}: the payments ledger does not show {answer} charges for it.", measured)


q1 = Question(
    "ex08.q1", Kind.PREDICT, "which backend hands a killed booking back first", _judge_first,
    hints=["Each backend has its own rule for deciding a worker is gone: a lock, an idle time.",
           "BullMQ: lock 5 s, then a stalled check; Streams: idle 2 s, then the next reclaim."],
    solution_text='"streams": about 2 s against BullMQ\'s 5-9 s with these settings.',
    reference="streams", wrong={"bullmq": "bullmq"}, backends=RACE,
)  # fmt: skip
q2 = Question(
    "ex08.q2", Kind.PREDICT, "how many times the killed booking's card is charged", _judge_charges,
    hints=["The worker died after the charge and before the acknowledgement. What does the broker know?",
           "The broker redelivers; the new worker runs every step again."],
    solution_text="2: at-least-once delivery runs the payment again; only an idempotent step makes it once.",
    reference=2, wrong={"exactly once": 1}, backends=("streams",), confusion=2,
)  # fmt: skip
