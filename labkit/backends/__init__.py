"""The three queue technologies behind one interface, looked up by name.

Clients are imported lazily, so that ``import labkit`` stays fast and a missing client
only matters to the backend that needs it.
"""

from __future__ import annotations

import importlib

from labkit.backends.base import Backend
from labkit.config import BACKENDS, check_backend

_CLASSES = {
    "bullmq": ("labkit.backends.bullmq", "BullMQBackend"),
    "streams": ("labkit.backends.streams", "StreamsBackend"),
    "kafka": ("labkit.backends.kafka", "KafkaBackend"),
}
_FIX = {
    "bullmq": "bullmq",
    "streams": "redis",
    "kafka": "confluent-kafka",
}


def get_backend(name: str) -> type[Backend]:
    """The backend class called ``name``.

    Raises:
        ConfigError: ``name`` is not one of ``bullmq``, ``streams``, ``kafka``.
        ImportError: its client library is missing, with the command that installs it.
    """
    module_name, class_name = _CLASSES[check_backend(name)]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(
            f"{_FIX[name]} is missing ({e}); install the lab with `pip install -e .` "
            "or `conda env update -f environment.yml`"
        ) from e
    backend: type[Backend] = getattr(module, class_name)
    return backend


__all__ = ["BACKENDS", "Backend", "get_backend"]
