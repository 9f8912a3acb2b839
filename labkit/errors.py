"""The lab's small exception hierarchy.

Every error a learner can meet says what went wrong and how to fix it, in one line,
so that the CLI can print ``str(error)`` and exit non-zero without a traceback.
"""

from __future__ import annotations


class LabkitError(Exception):
    """Base class of every error labkit raises on purpose."""


class ConfigError(LabkitError, ValueError):
    """A setting (environment variable, URL, argument) is malformed."""


class BackendError(LabkitError):
    """A queue backend could not do what was asked."""


class BrokerUnavailable(BackendError):
    """A broker does not answer at its configured address."""


class StackError(LabkitError):
    """The local stack (Redis, Kafka-protocol broker) could not be started or stopped."""


class BadMessage(LabkitError):
    """A message is not a valid booking; it is dead-lettered with ``reason`` and never retried.

    Args:
        reason: one human-readable line saying which rule the message broke.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
