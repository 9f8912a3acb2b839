"""The question kinds, the outcome of a check, and the progress kept in the state folder.

A question states what to predict, set or write; ``check(answer)`` runs a real experiment on the answer, in a
fresh namespace of its own that is emptied afterwards, and says what happened:

- **Correct**: what was measured and why it comes out so;
- **Incorrect**: what ran and what was observed, without giving a prediction's right value away (``solution()``
  does that), and where to look (``hint()``);
- **Not attempted**: the placeholder ``____`` is still there;
- **Your code raised**: the learner's code raised; the exception and the input are quoted;
- **Inconclusive**: anything that is not the learner's doing: a broker down, a worker that did not start, a
  timeout, a machine too loaded to judge a timing. Never reported as Incorrect.

``check`` never raises: every failure becomes one of these outcomes. It shows the outcome (markdown in a
notebook, plain text elsewhere) and returns it. Every outcome is saved in ``<LABKIT_HOME>/exercises/progress.json``,
so ``progress()`` and ``labkit exercises`` show it after a kernel restart.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import tempfile
import textwrap
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkit import stack
from labkit.config import Config
from labkit.errors import LabkitError
from labkit.lab import reset, run

if TYPE_CHECKING:
    import pandas as pd


class Placeholder:
    """The ``____`` a learner replaces; an answer that is, or contains, it is not attempted yet."""

    _instance: Placeholder | None = None

    def __new__(cls) -> Placeholder:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "____"


____ = Placeholder()


class Kind(StrEnum):
    PREDICT = "Predict"
    CONFIGURE = "Configure"
    WRITE_CODE = "Write code"
    INSPECT = "Inspect"


class Verdict(StrEnum):
    CORRECT = "Correct"
    INCORRECT = "Incorrect"
    NOT_ATTEMPTED = "Not attempted"
    RAISED = "Your code raised"
    INCONCLUSIVE = "Inconclusive"


class Inconclusive(Exception):
    """The experiment could not judge the answer, through no fault of the learner (e.g. a loaded machine)."""


class BadAnswer(Exception):
    """The answer is not of the form the question asks for (a word for a number, a choice not offered)."""


def as_number(answer: Any) -> float:
    """The answer as a number, or :class:`BadAnswer`."""
    try:
        return float(answer)
    except (TypeError, ValueError):
        raise BadAnswer(f"answer a number, not {answer!r}.") from None


def as_choice(answer: Any, choices: Sequence[str]) -> str:
    """The answer as one of ``choices`` (case and spaces ignored), or :class:`BadAnswer`."""
    text = str(answer).strip().lower()
    if text not in choices:
        raise BadAnswer(f"answer one of {', '.join(repr(c) for c in choices)}, not {answer!r}.")
    return text


class LearnerCodeRaised(Exception):
    """The learner's code raised; ``args[0]`` says with which input."""


@dataclass(frozen=True)
class Wrong:
    """A typical wrong answer, and the words its Incorrect must contain (tests check both, on the real stack).

    ``says`` is what tells this mistake apart, e.g. ``"charged more than once"``: never the right value.
    """

    answer: Any
    says: str


@dataclass(frozen=True)
class Judged:
    """What a question's experiment concluded: right or not, the sentence to show, and what was measured."""

    correct: bool
    message: str
    measured: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """The result of one ``check()``: shown in a notebook as markdown, as plain text elsewhere."""

    question: str
    verdict: Verdict
    message: str
    measured: Mapping[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    _shown: bool = field(default=False, repr=False, compare=False)

    def __bool__(self) -> bool:
        return self.verdict is Verdict.CORRECT

    def __str__(self) -> str:
        return f"{self.question}: {self.verdict.value}. {self.message}"

    def _repr_markdown_(self) -> str:
        marks = {Verdict.CORRECT: "✅", Verdict.INCORRECT: "❌", Verdict.NOT_ATTEMPTED: "✏️",
                 Verdict.RAISED: "💥", Verdict.INCONCLUSIVE: "❔"}  # fmt: skip
        return f"{marks[self.verdict]} **{self.question}: {self.verdict.value}.** {self.message}"

    def _ipython_display_(self) -> None:
        if self._shown:  # check() showed it already; the cell's own display of the returned value is skipped once
            self._shown = False
            return
        _show(self)


def _in_kernel() -> bool:
    from labkit.progress import _in_kernel as in_kernel

    return in_kernel()


def _show(outcome: Outcome) -> None:
    if _in_kernel():
        from IPython.display import Markdown, display  # type: ignore[attr-defined]

        display(Markdown(outcome._repr_markdown_()))  # type: ignore[no-untyped-call]
    else:
        print(outcome)


def _show_text(title: str, text: str) -> None:
    if _in_kernel():
        from IPython.display import Markdown, display  # type: ignore[attr-defined]

        display(Markdown(f"**{title}** {text}"))  # type: ignore[no-untyped-call]
    else:
        print(f"{title} {text}")


# -- learner code ------------------------------------------------------------------------------------


def is_placeholder(answer: Any) -> bool:
    """True for ``____`` itself, a container holding it, or a function whose source still contains it."""
    if answer is ____:
        return True
    if isinstance(answer, Mapping):
        return any(is_placeholder(v) for v in answer.values())
    if isinstance(answer, (list, tuple)):
        return any(is_placeholder(v) for v in answer)
    if callable(answer) and not isinstance(answer, type):
        with contextlib.suppress(OSError, TypeError):
            return "____" in inspect.getsource(answer)
    return False


def source_of(function: Callable[..., Any]) -> str:
    """The source of a learner's function (a notebook cell's too: IPython keeps cells where inspect finds them)."""
    try:
        return textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError) as e:
        raise LearnerCodeRaised(f"could not read the source of {function!r}: define it with def in a cell") from e


def write_step(function: Callable[..., Any], folder: Path) -> str:
    """Write ``function`` into a module of its own in ``folder``; returns the ``--handler`` spec that loads it.

    The workers import that file (``labkit worker --handler file.py:name``), so the learner's code runs in the
    real worker processes, on their event loop, exactly where the lab's own payment step runs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"learner_step_{uuid.uuid4().hex[:8]}.py"
    header = '"""A learner\'s payment step, written by labkit.exercises for the workers to import."""\n\n'
    imports = (
        "from __future__ import annotations\n\nimport asyncio\nimport time\n\n"
        "from labkit.workflow import PaymentContext\n"
    )
    path.write_text(f"{header}{imports}\n\n{source_of(function)}", encoding="utf-8")
    return f"{path}:{function.__name__}"


def call_learner(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run the learner's function in the kernel; what it raises becomes :class:`LearnerCodeRaised`.

    An ``async def`` is awaited on the lab's helper loop (labkit.lab.run), where the clients it is given
    (a ``bullmq.Queue``) run too, so it works the same in a notebook, whose own loop is busy running the cell.
    """
    try:
        result = function(*args, **kwargs)
        return run(result) if inspect.iscoroutine(result) else result
    except Exception as e:  # noqa: BLE001 - anything the learner's code raises is reported, not raised
        shown = ", ".join([*map(_short, args), *(f"{k}={_short(v)}" for k, v in kwargs.items())])
        line = traceback.format_exception_only(type(e), e)[-1].strip()
        raise LearnerCodeRaised(f"`{function.__name__}({shown})` raised `{line}`") from e


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- progress ----------------------------------------------------------------------------------------


def progress_path(config: Config | None = None) -> Path:
    return (config or Config.from_env()).home / "exercises" / "progress.json"


def load_progress(config: Config | None = None) -> dict[str, dict[str, Any]]:
    """Every question's record: ``attempts``, ``outcome`` (the last), ``correct`` (ever), ``when``, ``seconds``."""
    try:
        data = json.loads(progress_path(config).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record(outcome: Outcome, config: Config | None = None) -> None:
    """Add one outcome to the saved progress (written whole to a temporary file, then renamed: never half)."""
    path = progress_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = load_progress(config)
    entry = data.get(outcome.question, {"attempts": 0, "correct": False})
    attempted = outcome.verdict is not Verdict.NOT_ATTEMPTED
    entry.update(
        attempts=int(entry.get("attempts", 0)) + int(attempted),
        outcome=outcome.verdict.value,
        correct=bool(entry.get("correct")) or bool(outcome),
        when=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    if attempted:
        entry["seconds"] = round(outcome.seconds, 2)  # how long the last real experiment took
    data[outcome.question] = entry
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


#: Set by ``ready(reference_answers=...)``: a check of the placeholder judges the reference answer instead, so
#: CI can run a notebook with every solution filled in (its ``REFERENCE_ANSWERS`` parameter): True for every
#: question, a server's name (``"kafka"``) for only the questions whose experiment uses that server.
_reference_answers: bool | str = False

#: Every question of every exercise module, in order, by id (``ex07.q2``); filled as the modules are imported.
REGISTRY: dict[str, Question] = {}

PROGRESS_COLUMNS = ["notebook", "question", "kind", "title", "attempted", "outcome", "correct", "when"]


def progress_frame(questions: Sequence[Question], config: Config | None = None) -> pd.DataFrame:
    """One row per question: attempted, the last outcome, correct (ever), when."""
    import pandas as pd

    saved = load_progress(config)
    rows = []
    for q in questions:
        entry = saved.get(q.id, {})
        rows.append({
            "notebook": q.id.split(".")[0], "question": q.id.split(".")[1], "kind": q.kind.value, "title": q.title,
            "attempted": int(entry.get("attempts", 0)) > 0,
            "outcome": entry.get("outcome", Verdict.NOT_ATTEMPTED.value),
            "correct": bool(entry.get("correct", False)), "when": entry.get("when", ""),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=PROGRESS_COLUMNS)


# -- the question ------------------------------------------------------------------------------------

#: A judge: runs the experiment on the answer in the given (fresh) lab and says what it found.
Judge = Callable[[Any, Config], Judged]


@dataclass
class Question:
    """One question of an exercise notebook.

    Args:
        id: ``exNN.qM``.
        kind: Predict, Configure, Write code or Inspect.
        title: one line, for the progress table.
        judge: runs the experiment on an answer in a fresh namespace and returns a :class:`Judged`; it raises
            :class:`Inconclusive` (or any error of the lab) when it cannot judge, :class:`LearnerCodeRaised`
            when the learner's code raised.
        hints: from a nudge to nearly the answer; ``hint()`` shows the next one each time.
        solution: the reference answer, as text to show.
        reference: the reference answer itself (tests check that it is judged Correct).
        wrong: typical wrong answers by name, each with what its Incorrect says (tests check every one).
        backends: the backends the experiment uses: each is emptied after the check.
        servers: the lab's servers the experiment talks to (``redis``, ``kafka``); a check first asks each one
            (as ``labkit status`` does) and is Inconclusive at once if one does not answer. Default: Redis, and
            Kafka too when ``kafka`` is among the backends (its workers keep their ledger in Redis).
        confusion: which of the ten common confusions (docs/exercises.md) the question is about, if any.
        reference_for: the reference answer on a given lab, when it depends on the broker (a timing measured on
            each broker and recorded, labkit/lessons/recorded.json); else ``reference`` holds everywhere.
    """

    id: str
    kind: Kind
    title: str
    judge: Judge
    hints: Sequence[str]
    solution_text: str
    reference: Any
    wrong: Mapping[str, Wrong] = field(default_factory=dict)
    backends: Sequence[str] = ()
    servers: Sequence[str] | None = None
    confusion: int | None = None
    reference_for: Callable[[Config], Any] | None = None
    _hints_shown: int = field(default=0, repr=False)
    last: Outcome | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.servers is None:
            self.servers = ("redis", "kafka") if "kafka" in self.backends else ("redis",)
        REGISTRY[self.id] = self

    @property
    def uses(self) -> tuple[str, ...]:
        """The servers the experiment talks to (see ``servers``)."""
        return tuple(self.servers or ())

    def reference_answer(self, config: Config) -> Any:
        """The reference answer on ``config``'s lab (its Kafka broker may matter)."""
        return self.reference if self.reference_for is None else self.reference_for(config)

    @property
    def handle(self) -> str:
        """How a notebook names the question: ``ex.q3``."""
        return f"ex.{self.id.split('.')[1]}"

    def check(self, answer: Any = ____, show: bool = True) -> Outcome:
        """Judge ``answer`` with a real experiment; shows and returns the outcome, and never raises."""
        started = time.monotonic()
        if is_placeholder(answer) and (_reference_answers is True or _reference_answers in self.uses):
            answer = self.reference_answer(Config.from_env())
        if is_placeholder(answer):
            outcome = Outcome(self.id, Verdict.NOT_ATTEMPTED, "Replace `____` with your answer, then run the check.")
        else:
            outcome = self._judge(answer)
        outcome.seconds = time.monotonic() - started
        self.last = outcome
        with contextlib.suppress(OSError):  # a read-only state folder must not break the check
            record(outcome)
        if show:
            _show(outcome)
            outcome._shown = True
        return outcome

    def _judge(self, answer: Any) -> Outcome:
        silent = not_answering(Config.from_env(), self.uses)
        if silent:
            return Outcome(
                self.id, Verdict.INCONCLUSIVE,
                f"{'; '.join(silent)}. This says nothing about your answer: check again once it answers.",
            )  # fmt: skip
        try:
            with fresh_lab(self.id, self.backends) as config:
                judged = self.judge(answer, config)
        except BadAnswer as e:
            return Outcome(self.id, Verdict.INCORRECT, f"{e} `{self.handle}.hint()`")
        except LearnerCodeRaised as e:
            return Outcome(self.id, Verdict.RAISED, f"{e.args[0]}. Fix it and check again; `{self.handle}.hint()`.")
        except Inconclusive as e:
            return Outcome(self.id, Verdict.INCONCLUSIVE, f"{e} This says nothing about your answer: check again.")
        except Exception as e:  # noqa: BLE001 - a broker down, a timeout: the lab's problem, never the learner's
            line = traceback.format_exception_only(type(e), e)[-1].strip()
            return Outcome(
                self.id, Verdict.INCONCLUSIVE,
                f"the experiment could not run: `{line}`. Is the stack up (`labkit status`)? Check again.",
            )  # fmt: skip
        verdict = Verdict.CORRECT if judged.correct else Verdict.INCORRECT
        message = judged.message if judged.correct else f"{judged.message} `{self.handle}.hint()`"
        return Outcome(self.id, verdict, message, dict(judged.measured))

    def hint(self) -> None:
        """Show the next hint (several levels, from a nudge to nearly the answer)."""
        level = min(self._hints_shown, len(self.hints) - 1)
        self._hints_shown += 1
        _show_text(f"Hint {level + 1}/{len(self.hints)}:", self.hints[level])

    def solution(self) -> None:
        """Show the reference answer (and the last run's measurement, if there was one)."""
        measured = ""
        if self.last is not None and self.last.measured:
            measured = " Last run measured: " + ", ".join(f"{k} = {v}" for k, v in self.last.measured.items()) + "."
        code = ""
        if callable(self.reference):
            code = f"\n\n```python\n{source_of(self.reference)}```"
        _show_text("Solution:", self.solution_text + measured + code)


def not_answering(config: Config, servers: Sequence[str]) -> list[str]:
    """One line for each of ``servers`` that does not answer, from the probe of ``labkit status`` (real clients).

    A stopped server is a closed port: the connection is refused at once, so this costs milliseconds, where
    the experiment itself would wait out its clients' timeouts (librdkafka retries a refused broker for ever).
    """
    if not servers:
        return []
    statuses = stack.Stack(config, services=servers).status()
    return [f"{s.service} at {s.address}: {s.detail or 'not healthy'}" for s in statuses if not s.healthy]


@contextlib.contextmanager
def fresh_lab(question_id: str, backends: Sequence[str]) -> Iterator[Config]:
    """The lab with a namespace of its own for one check run; its backends are emptied afterwards."""
    config = Config.from_env(namespace=f"{question_id}-{uuid.uuid4().hex[:6]}-")
    try:
        yield config
    finally:
        for backend in backends:
            with contextlib.suppress(Exception):  # cleaning up must not turn a verdict into an error
                reset(backend, config)


def progress() -> pd.DataFrame:
    """Every question of every exercise notebook (the same table as ``labkit exercises``)."""
    from labkit.exercises import progress as all_progress

    return all_progress()


def ready(reference_answers: bool | str = False, config: Config | None = None) -> None:
    """The setup cell: start the stack if it is not answering, and say what is ready.

    Args:
        reference_answers: judge the reference answer wherever the placeholder is still there (CI does); a
            server's name (``"kafka"``): only in the questions whose experiment uses it (CI's run on Apache
            Kafka), the others stay Not attempted.
    """
    global _reference_answers
    _reference_answers = reference_answers
    config = config or Config.from_env()
    try:
        statuses = stack.Stack(config).up()
    except LabkitError as e:
        _show_text("Stack NOT ready:", f"{e} Every check will say Inconclusive until `labkit up` works.")
        return
    lines = [f"- {s.service}: {s.kind} at {s.address}, {'ready' if s.healthy else 'NOT ready'}" for s in statuses]
    _show_text("Stack:", "\n" + "\n".join(lines) + "\n\nEvery check runs its experiment on these servers.")


def wait_with_bar(desc: str, seconds: float, done: Callable[[], bool] | None = None, poll_s: float = 0.25) -> bool:
    """Wait up to ``seconds`` (until ``done()`` is true, if given) behind a progress bar counting the seconds.

    For the checks that wait on something other than bookings settling (a timer, a slow handler), so that a
    check longer than a few seconds always shows that it is working. Returns whether ``done()`` came true.
    """
    from labkit.progress import progress as progress_bar

    started = time.monotonic()
    with progress_bar(total=math.ceil(seconds), desc=desc, unit="second") as bar:
        while not (done is not None and done()):
            elapsed = time.monotonic() - started
            bar.update(min(int(elapsed), bar.total) - bar.n)
            if elapsed >= seconds:
                return False
            time.sleep(min(poll_s, seconds - elapsed))
        return True


def nearest(value: float, choices: Mapping[str, float], margin: float = 0.15) -> str | None:
    """The choice whose figure is nearest ``value`` on a log scale, or None when two are too close to call."""
    ranked = sorted(choices, key=lambda c: abs(math.log(value / choices[c])))
    if len(ranked) > 1:
        first, second = (abs(math.log(value / choices[c])) for c in ranked[:2])
        if second - first < margin:
            return None
    return ranked[0]
