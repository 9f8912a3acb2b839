"""Exercise 05, ordering: a Kafka key keeps one booking's events in order, until a retry (lesson 05-ordering).

Each check sends bookings as three events each (created → modified → cancelled, keyed by booking) to real Kafka
workers through labkit.lessons.ordering and judges the order from the workers' event logs. Confusion 10: a
retry topic takes the failed event out of its partition, so the booking's later events overtake it.
"""

from __future__ import annotations

from typing import Any

from labkit.config import Config
from labkit.exercises.questions import Judged, Kind, Question, Wrong, ____, as_choice, as_number, progress, ready
from labkit.lessons import ordering

__all__ = ["____", "progress", "q1", "q2", "q3", "ready"]

BOOKINGS = 4
RETRIED = 2
SETUP = ordering.Setup("kafka, 2 workers", "kafka", workers=2, concurrency=1)


def _run(config: Config, retried: int) -> Any:
    messages = ordering.booking_events(BOOKINGS, seed=5, retried=retried)
    events = ordering.run_setup(SETUP, config, messages, step_ms=5, backoff_ms=1000, timeout=25)
    return ordering.order_report(events)


def _judge_in_order(answer: Any, config: Config) -> Judged:
    report = _run(config, retried=0)
    found = ordering.violations(report, SETUP.label)
    measured = {"violations": found}
    ran = f"sent {BOOKINGS} bookings x 3 events, keyed by booking, to 2 Kafka workers, no failures"
    if as_number(answer) == found:
        return Judged(True, f"{ran}: {found} order violations. Same key, same partition, and a partition is "
                      "processed by one member one record at a time.", measured)  # fmt: skip
    return Judged(False, f"{ran}: the event logs do not show {answer} violations.", measured)


def _judge_retried(answer: Any, config: Config) -> Judged:
    report = _run(config, retried=RETRIED)
    key = (SETUP.label, ordering.RETRIED)
    wrong = int(report.loc[key, "wrong_state"]) if key in report.index else 0
    measured = {"wrong_state": wrong, "retried_bookings": RETRIED}
    ran = (f"sent {BOOKINGS} bookings x 3 events, keyed by booking, to 2 Kafka workers; the `created` event of "
           f"{RETRIED} of them failed once and went to the retry topic (1 s backoff)")  # fmt: skip
    if as_number(answer) == wrong:
        return Judged(True, f"{ran}: {wrong} booking(s) ended in the wrong state: `created` applied after "
                      "`cancelled`. The retry topic let the later events overtake the failed one. Keeping order "
                      "means retrying in place (blocking the partition) or parking the key's later events too.",
                      measured)  # fmt: skip
    return Judged(False, f"{ran}: {answer} is not how many ended in the wrong state.", measured)


STREAMS_ONE = ordering.Setup("streams, 1 worker", "streams", workers=1, concurrency=1)
CHOICES = ("in order", "out of order")


def _judge_streams_retry(answer: Any, config: Config) -> Judged:
    choice = as_choice(answer, CHOICES)
    messages = ordering.booking_events(BOOKINGS, seed=6, retried=1)
    events = ordering.run_setup(STREAMS_ONE, config, messages, step_ms=5, backoff_ms=1000, timeout=25)
    report = ordering.order_report(events)
    key = (STREAMS_ONE.label, ordering.RETRIED)
    wrong = int(report.loc[key, "wrong_state"]) if key in report.index else 0
    happened = "out of order" if wrong else "in order"
    measured = {"wrong_state": wrong}
    ran = ("sent 4 bookings x 3 events to ONE Streams worker processing one at a time; one booking's `created` "
           "failed once and waited 1 s in the pending list for its retry")  # fmt: skip
    if choice == happened:
        return Judged(True, f"{ran}: that booking was applied {happened} ({wrong} in the wrong state). Even one "
                      "consumer reorders when a retry waits while the next entries are read.", measured)  # fmt: skip
    return Judged(False, f"{ran}: the retried booking was not applied {choice}.", measured)


q1 = Question(
    "ex05.q1", Kind.PREDICT, "order violations with Kafka keys and no retries", _judge_in_order,
    hints=["Where does a keyed record go, and who reads that place?",
           "One partition per key, one consumer per partition, one record at a time."],
    solution_text="0: a booking's events share a key, so a partition, read in order by one member.",
    reference=0, wrong={"some race anyway": Wrong(3, "do not show 3 violations")}, backends=("kafka",), confusion=10,
)  # fmt: skip
q2 = Question(
    "ex05.q2", Kind.PREDICT, "bookings in the wrong state after a retry topic", _judge_retried,
    hints=["While the failed `created` waits 1 s in the retry topic, is its partition blocked?",
           "The booking's `modified` and `cancelled` are processed at once; `created` comes back a second later."],
    solution_text=f"{RETRIED}: every booking whose `created` was retried ends with `created` applied last.",
    reference=RETRIED,
    wrong={"keys keep order": Wrong(0, "0 is not how many ended in the wrong state")},
    backends=("kafka",), confusion=10,
)  # fmt: skip
q3 = Question(
    "ex05.q3", Kind.PREDICT, "a single Streams consumer with a retry: in order?", _judge_streams_retry,
    hints=["While the failed entry waits to be claimed again, does the consumer stop reading new entries?",
           "The retry comes back from the pending list a second later, after its booking's later events."],
    solution_text='"out of order": the later events are read and applied while the failed one waits.',
    reference="out of order",
    wrong={"one consumer keeps order": Wrong("in order", "was not applied in order")},
    backends=("streams",), confusion=10,
)  # fmt: skip
