"""Dead-letter queues: what ends there and why, how to fix and replay it, and the books that must balance (lesson 04).

Every backend sends a message that can never succeed to its dead-letter destination with
a reason: a bad message (not JSON, a rule of docs/contract.md broken) at once, a poison booking
after ``max_attempts``. This module reads the three destinations into one DataFrame,
applies the fixes a support engineer would (drop the fault, correct the guests, swap
backwards dates), replays the fixed bookings into the work destination, and reconciles
what was produced against what ended completed or dead-lettered, before and after.

A dead letter is not deleted by the replay. A DLQ is the record of what failed: BullMQ and
Streams could delete the entry, but a Kafka topic is an append-only log (records leave only
by retention), so for the same bookkeeping on all three the final outcome of a booking is
read from labkit's ledger: a booking that was dead-lettered and then completed counts once,
as completed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from labkit.booking import encode, parse_booking
from labkit.charts import PRODUCTS
from labkit.config import Config, check_backend
from labkit.errors import BadMessage, BrokerUnavailable
from labkit.lab import dead_letters, produce, run
from labkit.lessons.figures import Statement, say

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes

#: What a dead letter's reason starts with, and the kind of failure it names.
KINDS = (
    ("bad message", "malformed"),
    ("poison", "poison"),
    ("attempts exhausted", "attempts exhausted"),
)


def booking(booking_id: str, **fields: Any) -> dict[str, Any]:
    """A valid booking with a chosen id; ``fields`` override or add (e.g. ``guests="2"`` to break it)."""
    base: dict[str, Any] = {
        "booking_id": booking_id,
        "user_id": "user-00042",
        "hotel_id": "hotel-007",
        "check_in": "2027-03-01",
        "check_out": "2027-03-04",
        "guests": 2,
        "amount_cents": 42_000,
    }
    return {**base, **fields}


def bad_messages(prefix: str = "bad") -> dict[str, str | dict[str, Any]]:
    """One message for each way a producer can break the contract (docs/contract.md), by what is wrong with it.

    Two can be fixed without asking anyone (guests sent as text, dates swapped); the torn
    JSON and the 12 guests cannot: only the producer (or the guest) knows what was meant.
    """
    return {
        "torn JSON": f'{{"booking_id": "{prefix}-torn", "guests": ',
        "guests as text": booking(f"{prefix}-guests-text", guests="2"),
        "check_out before check_in": booking(f"{prefix}-backwards", check_in="2027-05-10", check_out="2027-05-07"),
        "12 guests": booking(f"{prefix}-crowd", guests=12),
    }


def raw_message(backend: str) -> dict[str, Any]:
    """A booking without its ``hotel_id``, sent by :func:`send_raw` with the broker's own client."""
    message = booking(f"raw-{backend}")
    del message["hotel_id"]
    return message


def send_raw(backend: str, config: Config, message: Mapping[str, Any]) -> str:
    """Send one message with the broker's own client, not through labkit, to show the contract binds any producer.

    - Streams: redis-py ``XADD <stream> * booking <json>``.
    - Kafka: a plain confluent-kafka ``Producer`` (librdkafka's defaults; key = ``booking_id``).
    - BullMQ: the official ``bullmq.Queue.add("booking", data)``, with none of labkit's job options.

    Returns:
        where it landed: the entry id, ``topic/partition/offset`` or the job id.

    Raises:
        BrokerUnavailable: the broker did not acknowledge the message.
    """
    check_backend(backend)
    text = json.dumps(dict(message))
    names = config.names
    if backend == "streams":
        import redis

        client = redis.Redis.from_url(config.redis_url, decode_responses=True)
        try:
            return str(client.xadd(names.stream, {"booking": text}))
        finally:
            client.close()
    if backend == "kafka":
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": config.kafka_bootstrap, "message.timeout.ms": 10_000})
        landed: list[str] = []
        key = message.get("booking_id")
        producer.produce(
            names.topic,
            text.encode(),
            str(key).encode() if key else None,
            on_delivery=lambda err, msg: landed.append(
                f"{msg.topic()}/{msg.partition()}/{msg.offset()}" if err is None else ""
            ),
        )
        producer.flush(15)
        if not landed or not landed[0]:
            raise BrokerUnavailable(f"Kafka at {config.kafka_bootstrap} did not acknowledge the raw message")
        return landed[0]

    async def add_job() -> str:
        from bullmq import Queue

        queue = Queue(names.bullmq_queue, {"connection": config.redis_url})
        try:
            job = await queue.add("booking", dict(message))
            return str(job.id)
        finally:
            await queue.close()

    return run(add_job())


def kind_of(reason: str) -> str:
    """``malformed``, ``poison``, ``attempts exhausted`` or ``worker lost`` (a booking that took its workers down)."""
    for prefix, kind in KINDS:
        if reason.startswith(prefix):
            return kind
    return "worker lost"


def dlq_frame(config: Config, backends: Iterable[str]) -> pd.DataFrame:
    """Every backend's dead-letter destination as one DataFrame.

    Returns:
        ``backend, booking_id, kind, reason, attempts, source, booking``: ``source`` is the
        original message in the backend's words (``job 17``, ``entry 1700000000000-0``,
        ``bookings/2/15``), ``booking`` the original text exactly as it was sent.
    """
    import pandas as pd

    frames = [dead_letters(b, config).assign(backend=b) for b in backends]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    frame["kind"] = [kind_of(str(r)) for r in frame["reason"]]
    return frame[["backend", "booking_id", "kind", "reason", "attempts", "source", "booking"]]


def _source_key(source: str) -> str:
    """A message's source as both the DLQ and the event log name it (Streams' DLQ drops the ``entry`` prefix)."""
    return source.removeprefix("entry ")


def with_deliveries(dlq: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """Add ``deliveries``: how often the workers received each dead letter's message, from the event log.

    The DLQ's ``attempts`` is what the backend wrote; ``deliveries`` counts the workers'
    ``received`` events for the same source, an independent record that must agree.
    """
    received = events[events["event"] == "received"]
    counts = received.groupby([received["backend"], received["source"].map(_source_key)]).size()
    keys = zip(dlq["backend"], dlq["source"].map(_source_key), strict=True)
    return dlq.assign(deliveries=[int(counts.get(key, 0)) for key in keys])


def fix_booking(text: str) -> tuple[dict[str, Any] | None, str]:
    """The fixes a support engineer may apply without asking anyone, checked against docs/contract.md.

    Drops the ``fault`` directive (the poison's cause, once the card issue is solved),
    turns ``guests`` sent as a digit string into a number, and swaps ``check_in`` and
    ``check_out`` when they are backwards. Anything else needs the producer.

    Returns:
        the fixed booking and what was changed, or None and why it cannot be fixed here.
    """
    try:
        obj = json.loads(text)
    except ValueError:
        return None, "not JSON: only its producer knows what it meant"
    if not isinstance(obj, dict):
        return None, "not a JSON object: only its producer knows what it meant"
    fixed, changes = dict(obj), []
    if fixed.pop("fault", None) is not None:
        changes.append("removed the fault")
    guests = fixed.get("guests")
    if isinstance(guests, str) and guests.strip().isdigit():
        fixed["guests"] = int(guests)
        changes.append(f"guests {guests!r} → {fixed['guests']}")
    check_in, check_out = fixed.get("check_in"), fixed.get("check_out")
    if isinstance(check_in, str) and isinstance(check_out, str) and check_out < check_in:
        fixed["check_in"], fixed["check_out"] = check_out, check_in
        changes.append("swapped check_in and check_out")
    try:
        parse_booking(encode(fixed))
    except BadMessage as bad:
        return None, f"needs its producer: {bad.reason}"
    return fixed, "; ".join(changes) or "unchanged: the failure was transient"


def fixes(dlq: pd.DataFrame) -> pd.DataFrame:
    """:func:`fix_booking` applied to every dead letter of :func:`dlq_frame`.

    Returns:
        ``backend, booking_id, kind, source, fixable, change, fixed`` (the fixed booking, or None).
    """
    results = [fix_booking(str(text)) for text in dlq["booking"]]
    frame = dlq[["backend", "booking_id", "kind", "source"]].copy()
    frame["fixable"] = [fixed is not None for fixed, _ in results]
    frame["change"] = [change for _, change in results]
    frame["fixed"] = [fixed for fixed, _ in results]
    return frame.reset_index(drop=True)


def replay(backend: str, config: Config, fixed: pd.DataFrame) -> pd.DataFrame:
    """Send the fixed dead letters of ``backend`` back to its work destination.

    Each booking keeps its ``booking_id`` (so the ledger sees the same booking finish) and
    gains a ``replayed_from`` field naming its dead letter's source: the contract keeps and
    ignores unknown fields, so the trail costs nothing.

    Args:
        fixed: from :func:`fixes`; rows of other backends and unfixable rows are skipped.

    Returns:
        ``booking_id, replayed_from, sent_to``, one row per replayed booking.
    """
    import pandas as pd

    rows = fixed[(fixed["backend"] == backend) & fixed["fixable"]]
    messages = [{**f, "replayed_from": src} for f, src in zip(rows["fixed"], rows["source"], strict=True)]
    where = produce(backend, messages, config) if messages else []
    return pd.DataFrame(
        {"booking_id": [m["booking_id"] for m in messages], "replayed_from": list(rows["source"]), "sent_to": where}
    )


def reconcile(config: Config, produced: Mapping[str, int]) -> pd.DataFrame:
    """Produced = completed + dead-lettered, per backend, from labkit's ledger in Redis.

    A booking that was dead-lettered and later replayed to completion counts once, as
    completed (column ``replayed``); ``dead_lettered`` counts the dead letters still
    unresolved. ``lost`` is what is left over and must be 0.

    Args:
        produced: messages sent to each backend, each with its own booking (or none at all).
    """
    import pandas as pd
    import redis

    rows = {}
    client = redis.Redis.from_url(config.redis_url)
    try:
        for backend, sent in produced.items():
            completed_key, dead_key = config.names.key(backend, "completed"), config.names.key(backend, "dead")
            completed, dead = int(client.scard(completed_key)), int(client.scard(dead_key))
            replayed = len(client.sinter([dead_key, completed_key]))
            unresolved = dead - replayed
            rows[backend] = {
                "produced": sent,
                "completed": completed,
                "dead_lettered": unresolved,
                "replayed": replayed,
                "lost": sent - completed - unresolved,
            }
    finally:
        client.close()
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "backend"
    return frame


def reconciliation_statement(before: pd.DataFrame, after: pd.DataFrame) -> Statement:
    """Both reconciliations in words, one per backend, printed from :func:`reconcile`'s tables."""
    lines, measured = [], {}
    for backend in before.index:
        b, a = before.loc[backend], after.loc[backend]
        words = (
            f"{int(b['produced'])} sent = {int(b['completed'])} completed + {int(b['dead_lettered'])} dead-lettered, "
            f"then {int(a['completed'])} + {int(a['dead_lettered'])} after replaying {int(a['replayed'])}"
        )
        measured[f"04.reconciled_{backend}"] = words
        lost = int(b["lost"]) + int(a["lost"])
        lines.append(f"- {PRODUCTS.get(str(backend), backend)}: {{reconciled_{backend}}}; lost: {lost}.")
    return say("\n".join(lines), measured)


def replay_outcomes(events: pd.DataFrame, replayed: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Did every replayed booking complete, and on which attempt?

    Args:
        events: the replay run's events.
        replayed: :func:`replay`'s answer per backend.

    Returns:
        ``backend, booking_id, replayed_from, completed, attempt``.
    """
    import pandas as pd

    done = events[events["event"] == "completed"].drop_duplicates(["backend", "booking_id"])
    frames = [frame.assign(backend=backend) for backend, frame in replayed.items()]
    if not frames:
        return pd.DataFrame(columns=["backend", "booking_id", "replayed_from", "completed", "attempt"])
    table = pd.concat(frames, ignore_index=True).merge(
        done[["backend", "booking_id", "attempt"]], on=["backend", "booking_id"], how="left"
    )
    table["completed"] = table["attempt"].notna()
    return table[["backend", "booking_id", "replayed_from", "completed", "attempt"]]


def kafka_offsets_for_time(config: Config, topic: str, when: float) -> pd.DataFrame:
    """The broker's answer to "the first offset at or after ``when``" for each partition of ``topic``.

    This is the call behind "replay everything dead-lettered since 9:00". Apache Kafka
    answers the first record's offset at or after the time, or -1 (the end) when there is
    none; the embedded broker answers 0 for every timestamp (docs/embedded-kafka.md), which would
    replay the whole topic. Replay by offset there.

    Args:
        when: Unix time in seconds.
    """
    import pandas as pd
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": config.kafka_bootstrap, "group.id": f"{config.names.kafka_group}.time-probe",
         "enable.auto.commit": False}
    )  # fmt: skip
    try:
        # Metadata of every topic: naming a missing one would make the embedded broker create it.
        metadata = consumer.list_topics(timeout=5)
        if topic not in metadata.topics:
            raise BrokerUnavailable(f"Kafka topic {topic!r} is not there; run lk.setup() first")
        asked = [TopicPartition(topic, p, int(when * 1000)) for p in sorted(metadata.topics[topic].partitions)]
        answers = consumer.offsets_for_times(asked, timeout=5)
    except KafkaException as e:
        raise BrokerUnavailable(f"Kafka at {config.kafka_bootstrap} did not answer: {e.args[0].str()}") from None
    finally:
        consumer.close()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    return pd.DataFrame(
        [{"partition": f"{a.topic}/{a.partition}", "asked_for": stamp, "offset": a.offset} for a in answers]
    )


def answered_offsets(answers: pd.DataFrame) -> str:
    """:func:`kafka_offsets_for_time`'s answer in a few words: ``-1 on every partition``, or each partition's."""
    offsets = [int(o) for o in answers["offset"]]
    if len(set(offsets)) == 1:
        return f"{offsets[0]} on every partition"
    return ", ".join(f"{p}: {o}" for p, o in zip(answers["partition"], offsets, strict=True))


def plot_reconciliation(tables: Mapping[str, pd.DataFrame], ax: Axes | None = None) -> Axes:
    """Produced against completed + dead-lettered, one stacked bar per backend and moment (before/after replay).

    A bar that reaches its black tick exactly means nothing was lost; the hatched part of a
    bar is dead letters replayed to completion. Each part is labelled with its count.

    Args:
        tables: :func:`reconcile` answers by moment, e.g. ``{"before replay": t1, "after replay": t2}``.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 4))
    moments = list(tables)
    backends = list(next(iter(tables.values())).index) if tables else []
    width = 0.8 / max(len(moments), 1)
    ticks: list[tuple[float, str]] = []
    for m, moment in enumerate(moments):
        table = tables[moment].loc[backends]
        xs = [i + (m - (len(moments) - 1) / 2) * width for i in range(len(backends))]
        ticks += [(x, moment.replace(" ", "\n")) for x in xs]
        first_time = table["completed"] - table["replayed"]
        parts: list[tuple[Any, Any, dict[str, Any], str]] = [
            (first_time, 0, {"color": "#2e7d32"}, "completed"),
            (table["replayed"], first_time, {"color": "#66bb6a", "hatch": "//", "edgecolor": "white"},
             "replayed, then completed"),
            (table["dead_lettered"], table["completed"], {"color": "#424242"}, "dead-lettered"),
        ]  # fmt: skip
        for heights, bottom, style, label in parts:
            bars = ax.bar(xs, heights, width * 0.9, bottom=bottom, label=label if m == 0 else None, **style)
            ax.bar_label(bars, labels=[str(h) if h else "" for h in heights], label_type="center",
                         color="white", fontsize=8)  # fmt: skip
        ax.hlines(table["produced"], [x - width / 2 for x in xs], [x + width / 2 for x in xs],
                  color="black", lw=2, label="produced" if m == 0 else "_nolegend_")  # fmt: skip
    ax.set_xticks([x for x, _ in ticks], [label for _, label in ticks], fontsize=8)
    for i, backend in enumerate(backends):
        ax.text(i, -0.16, backend, transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=10)
    ax.set_ylabel("bookings")
    ax.set_title("Produced = completed + dead-lettered, before and after the replay")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return ax
