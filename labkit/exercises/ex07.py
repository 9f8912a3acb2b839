"""Exercise 07, crashes: a payment step that survives redelivery, the settings that hand a killed job back in
time, a step that blocks the event loop, and Kafka's ``max.poll.interval.ms`` (lesson 07-crashes-and-redelivery).

The learner's payment steps run inside real worker processes: :func:`~labkit.exercises.questions.write_step`
writes the function to a module in the check's folder and the workers load it with ``labkit worker --handler``,
the path every lesson's worker takes (labkit.workflow.BookingHandler calls it where it would charge the card).
A step gets a :class:`labkit.workflow.PaymentContext`: ``ctx.booking``, ``ctx.attempt``, ``ctx.redis`` (the
worker's asyncio Redis connection), ``ctx.key(...)`` (a key in the check's namespace) and ``await ctx.charge()``
(charge the card once more: the real effect, counted per booking).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Any

from labkit.backends.kafka.settings import SESSION_TIMEOUT_MS
from labkit.booking import BookingGenerator
from labkit.config import Config
from labkit.exercises.questions import (
    Inconclusive,
    Judged,
    Kind,
    Question,
    Wrong,
    ____,
    as_number,
    progress,
    ready,
    wait_with_bar,
    write_step,
)
from labkit.lab import new_run, produce
from labkit.lessons import crashes, groups
from labkit.pool import WorkerPool
from labkit.workflow import PaymentContext, WorkerSettings

__all__ = ["____", "progress", "q1", "q2", "q3", "q4", "ready"]

#: q2's target: the killed job is back within this many seconds of the kill.
TARGET_S = 3.0
#: Slack on that target for a loaded machine; beyond it, settings that should have made it are Inconclusive.
TARGET_SLACK_S = 0.5
#: q2 runs its experiment only for settings whose worst case is within this many seconds (the check's budget).
LONGEST_WAIT_S = 12.0
#: q3: how long the payment gateway takes, and the BullMQ lock it must live with.
GATEWAY_S = 2.5
BLOCKING_LOCK_MS = 1000
#: q4: how long each Kafka booking's handler takes.
SLOW_HANDLER_S = 8.0


# -- q1: charge once, however often the booking is delivered ------------------------------------------------


async def charge_once(ctx: PaymentContext) -> None:
    """The reference: claim the booking's charge with SET NX first; only the first claim charges."""
    if await ctx.redis.set(ctx.key("charged", ctx.booking.booking_id), 1, nx=True):
        await ctx.charge()


async def charge_always(ctx: PaymentContext) -> None:
    """A typical wrong answer: charge on every delivery."""
    await ctx.charge()


async def charge_then_mark(ctx: PaymentContext) -> None:
    """Another: look, charge, then mark; a crash between the charge and the mark charges again."""
    key = ctx.key("charged", ctx.booking.booking_id)
    if not await ctx.redis.exists(key):
        await ctx.charge()
        await asyncio.sleep(0.5)  # the gateway's answer takes a while to be recorded
        await ctx.redis.set(key, 1)


def _judge_idempotent(answer: Any, config: Config) -> Judged:
    spec = write_step(answer, new_run("ex07-step", config))
    run = crashes.kill_after_payment(
        config, backends=["streams"], n_bookings=8, idempotent=False, step_ms=150, claim_idle_ms=1000,
        timeout=25, handler=spec,
    )  # fmt: skip
    payments = run.effects["streams"]["payments"]
    twice = sorted(b for b in run.bookings if payments.get(b, 0) > 1)
    never = sorted(b for b in run.bookings if payments.get(b, 0) == 0)
    raised = run.events[run.events["event"] == "handler_error"]
    measured = {"bookings": len(run.bookings), "charged_twice": len(twice), "never_charged": len(never)}
    ran = (f"ran {len(run.bookings)} bookings (one sent twice) on 2 Streams workers with your step, "
           f"killed {run.kills['streams'].worker} right after the payment of {run.victim}")  # fmt: skip
    if len(raised):
        return Judged(False, f"{ran}: your step raised `{raised['error'].iloc[0]}`.", measured)
    if twice:
        return Judged(
            False,
            f"{ran}: {len(twice)} booking(s) were charged more than once ({', '.join(twice)}). "
            "Your step charges before it knows whether this booking was charged already.",
            measured,
        )
    if never:
        return Judged(False, f"{ran}: {len(never)} booking(s) were never charged.", measured)
    return Judged(True, f"{ran}: the victim was delivered again and every booking was charged exactly once. "
                  "Delivery is at-least-once; a guard set atomically before the effect makes the effect once.",
                  measured)  # fmt: skip


# -- q2: BullMQ settings that hand a killed job back within 3 s ---------------------------------------------


def _judge_lock(answer: Any, config: Config) -> Judged:
    if not isinstance(answer, dict):
        return Judged(False, 'answer a dict: {"lock_duration_ms": ..., "stalled_interval_ms": ...}.')
    lock, stalled = as_number(answer.get("lock_duration_ms")), as_number(answer.get("stalled_interval_ms"))
    if lock < 200 or stalled < 200:
        return Judged(False, "a lock or stalled interval under 200 ms: healthy jobs would stall whenever a worker "
                      "is a little late to renew. Keep both at 200 ms or more.")  # fmt: skip
    worst_s = (lock + 2 * stalled) / 1000
    if worst_s > LONGEST_WAIT_S:
        return Judged(False, f"with lock {lock:g} ms and stalled interval {stalled:g} ms a killed job may wait up to "
                      f"{worst_s:g} s (lockDuration + 2 x stalledInterval), far past {TARGET_S:g} s; this check runs "
                      "the experiment only for settings that can be back within the check's time.")  # fmt: skip
    run = crashes.kill_after_payment(
        config, backends=["bullmq"], n_bookings=4, step_ms=200, lock_duration_ms=int(lock),
        stalled_interval_ms=int(stalled), timeout=25,
    )  # fmt: skip
    back = float(run.recovery().loc["bullmq", "handed_back_s"])
    measured = {"handed_back_s": round(back, 2)}
    ran = f"killed a BullMQ worker after a payment with lock {lock:g} ms and stalled interval {stalled:g} ms"
    if math.isnan(back):
        raise Inconclusive("the killed job was not seen handed back within the run.")
    if back <= TARGET_S + TARGET_SLACK_S:
        return Judged(True, f"{ran}: the job was back in `wait` {back:.1f} s after the kill. It is back within "
                      "lockDuration + 2 x stalledInterval of its last lock renewal.", measured)  # fmt: skip
    if lock + 2 * stalled <= TARGET_S * 1000:
        raise Inconclusive(
            f"{ran}: the job came back after {back:.1f} s although these settings allow "
            f"{(lock + 2 * stalled) / 1000:g} s at most; the machine is too busy to judge."
        )
    return Judged(False, f"{ran}: the job came back {back:.1f} s after the kill, later than {TARGET_S:g} s.", measured)


# -- q3: a slow gateway, waited for without blocking the event loop -----------------------------------------


async def wait_without_blocking(ctx: PaymentContext) -> None:
    """The reference: await the slow gateway, so the worker's lock renewals keep running meanwhile."""
    await asyncio.sleep(2.5)
    await ctx.charge()


async def wait_blocking(ctx: PaymentContext) -> None:
    """A typical wrong answer: time.sleep in a coroutine holds the whole event loop, lock renewal included."""
    time.sleep(2.5)
    await ctx.charge()


def _judge_blocking(answer: Any, config: Config) -> Judged:
    spec = write_step(answer, new_run("ex07-gateway", config))
    options = {"lock_duration_ms": str(BLOCKING_LOCK_MS), "stalled_interval_ms": str(BLOCKING_LOCK_MS)}
    settings = WorkerSettings(concurrency=1, idempotent=False, options=options, handler=spec)
    bookings = BookingGenerator(seed=7, prefix="ex07g").bookings(2)
    with WorkerPool("bullmq", config, settings) as pool:
        pool.start(2)
        produce("bullmq", bookings, config)
        # A blocked worker's job may end dead-lettered or still running: the starts below tell.
        with contextlib.suppress(TimeoutError):
            pool.wait_until_drained(timeout=25, expected=len(bookings), progress=True)
        time.sleep(2 * BLOCKING_LOCK_MS / 1000)  # a stalled check that comes late still shows
        events = pool.events()
    raised = events[events["event"] == "handler_error"]
    starts = events[events["event"] == "started"].groupby("booking_id").size()
    again = int((starts > 1).sum())
    measured = {"bookings": len(bookings), "started_more_than_once": again}
    ran = (f"ran {len(bookings)} bookings on 2 BullMQ workers (lock {BLOCKING_LOCK_MS} ms), each payment "
           f"waiting {GATEWAY_S:g} s in your step")  # fmt: skip
    if len(raised):
        return Judged(False, f"{ran}: your step raised `{raised['error'].iloc[0]}`.", measured)
    if again:
        return Judged(False, f"{ran}: {again} booking(s) were started again by the other worker while the first "
                      "was still running: the lock was not renewed in time, so the job was declared stalled.",
                      measured)  # fmt: skip
    if starts.size < len(bookings):
        raise Inconclusive(f"{ran}: only {starts.size} of {len(bookings)} bookings started in time.")
    return Judged(True, f"{ran}: each booking started once, no stall. While a coroutine awaits, the event loop "
                  "keeps renewing the job's lock.", measured)  # fmt: skip


# -- q4: max.poll.interval.ms for a 4 s handler ------------------------------------------------------------


def _judge_max_poll(answer: Any, config: Config) -> Judged:
    limit = as_number(answer)
    if limit < SESSION_TIMEOUT_MS:
        return Judged(False, f"{limit:g} ms is below session.timeout.ms ({SESSION_TIMEOUT_MS} ms), which the lab's "
                      "Kafka worker refuses; answer milliseconds.")  # fmt: skip
    settings = WorkerSettings(step_ms=SLOW_HANDLER_S * 1000 / 5, options={"max_poll_interval_ms": str(int(limit))})
    bookings = BookingGenerator(seed=8, prefix="ex07p").bookings(1)
    with WorkerPool("kafka", config, settings) as pool:
        pool.start(1, ready_timeout=30)
        groups.wait_for_assignment(pool, 3, timeout=30)
        produce("kafka", bookings, config)

        def finished_or_left() -> bool:
            events = pool.events()
            done = events[events["event"] == "completed"]["booking_id"].nunique()
            return bool(done >= len(bookings) or (events["event"] == "left_group").any())

        wait_with_bar("ex07.q4 slow handler running", len(bookings) * SLOW_HANDLER_S + 8, finished_or_left)
        events = pool.events()
    left = int((events["event"] == "left_group").sum())
    done = events[events["event"] == "completed"]["booking_id"].nunique()
    measured = {"left_group": left, "completed": done}
    ran = f"one Kafka worker, each booking's handler taking {SLOW_HANDLER_S:g} s, max.poll.interval.ms={limit:g}"
    if left:
        return Judged(False, f"{ran}: the worker was thrown out of its group (`left_group`) while a booking was "
                      "still running: its partitions and the uncommitted booking go to another member.",
                      measured)  # fmt: skip
    if done < len(bookings):
        raise Inconclusive(f"{ran}: only {done} of {len(bookings)} bookings completed in time.")
    return Judged(True, f"{ran}: the booking completed and the worker stayed in its group. The limit must "
                  "exceed the longest time between two polls, i.e. the slowest handler, with room to spare.",
                  measured)  # fmt: skip


q1 = Question(
    "ex07.q1", Kind.WRITE_CODE, "a payment step that charges once across a crash", _judge_idempotent,
    hints=["The booking will be delivered again after the kill: your step runs twice for it.",
           "Record that a booking was charged in Redis, and make the check-and-record one atomic step before "
           "the charge.",
           "`if await ctx.redis.set(ctx.key('charged', ctx.booking.booking_id), 1, nx=True): await ctx.charge()`"],
    solution_text="claim the charge with `SET key 1 NX` before charging, charge only if the claim succeeded: "
    "`ex.charge_once`.",
    reference=charge_once, wrong={"charge every time": Wrong(charge_always, "charged more than once"),
           "check, charge, mark": Wrong(charge_then_mark, "charged more than once")},
    backends=("streams",), confusion=2,
)  # fmt: skip
q2 = Question(
    "ex07.q2", Kind.CONFIGURE, "BullMQ settings that hand a killed job back within 3 s", _judge_lock,
    hints=["Two settings decide: how long a lock lives, and how often a survivor looks for stalled jobs.",
           "A job is back within lockDuration + 2 x stalledInterval of its last lock renewal.",
           "e.g. lock 1000 ms and stalled interval 500 ms."],
    solution_text='{"lock_duration_ms": 1000, "stalled_interval_ms": 500}: 1 + 2 x 0.5 = 2 s at most; '
    "shorter locks cost more renewals and risk stalling a slow but healthy job.",
    reference={"lock_duration_ms": 1000, "stalled_interval_ms": 500},
    wrong={"the defaults": Wrong({"lock_duration_ms": 30000, "stalled_interval_ms": 30000}, "may wait up to 90 s"),
           "lesson's settings": Wrong({"lock_duration_ms": 5000, "stalled_interval_ms": 2000}, "later than 3 s")},
    backends=("bullmq",), confusion=1,
)  # fmt: skip
q3 = Question(
    "ex07.q3", Kind.WRITE_CODE, "wait for a slow gateway without stalling the job", _judge_blocking,
    hints=["The worker renews the job's lock from the same event loop your step runs on.",
           "`time.sleep` holds the loop; what lets it run other tasks while you wait?",
           "`await asyncio.sleep(2.5)`"],
    solution_text="`await asyncio.sleep(2.5)` (any awaited I/O): the loop keeps renewing the lock; "
    "`ex.wait_without_blocking`.",
    reference=wait_without_blocking,
    wrong={"time.sleep": Wrong(wait_blocking, "started again by the other worker")},
    backends=("bullmq",), confusion=1,
)  # fmt: skip
q4 = Question(
    "ex07.q4", Kind.CONFIGURE, "max.poll.interval.ms for an 8 s handler", _judge_max_poll,
    hints=["The consumer must poll again within max.poll.interval.ms, and it polls after each booking.",
           "Give the slowest handler room: twice its time is a common choice."],
    solution_text="anything comfortably above 8000 ms, e.g. 20000: the worker polls between bookings, so the "
    "limit must cover the slowest booking.",
    reference=20000,
    wrong={"below the handler": Wrong(6000, "thrown out of its group")},
    backends=("kafka",), confusion=4,
)  # fmt: skip
