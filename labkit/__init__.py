"""labkit: the engine behind Booking Queue Lab.

BullMQ, Redis Streams and Kafka doing one hotel-booking job behind one interface, with
real worker processes that lessons start, scale, kill and chart.
"""

from labkit.backends import BACKENDS, Backend, get_backend
from labkit.booking import Booking, BookingGenerator, parse_booking
from labkit.config import Config
from labkit.errors import BackendError, BadMessage, BrokerUnavailable, ConfigError, LabkitError, StackError
from labkit.events import load_run
from labkit.lab import dead_letters, new_run, produce, reset, run, setup, stats, stats_frame, status_frame
from labkit.liveview import dashboard
from labkit.pool import WorkerPool
from labkit.workflow import WorkerSettings

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendError",
    "BadMessage",
    "Backend",
    "Booking",
    "BookingGenerator",
    "BrokerUnavailable",
    "Config",
    "ConfigError",
    "LabkitError",
    "StackError",
    "WorkerPool",
    "WorkerSettings",
    "dashboard",
    "dead_letters",
    "get_backend",
    "load_run",
    "new_run",
    "parse_booking",
    "produce",
    "reset",
    "run",
    "setup",
    "stats",
    "stats_frame",
    "status_frame",
]
