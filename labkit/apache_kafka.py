"""Apache Kafka without Docker: its jars, a JVM, and a single-node KRaft log in the state folder.

``labkit up --kafka apache`` (or ``LABKIT_KAFKA=apache``) runs the real broker next to the embedded one's
place in the stack (``labkit.stack``); this module knows where its pieces come from and how to run them:

- **Jars**, in this order: ``$LABKIT_KAFKA_HOME/libs`` (an unpacked Apache Kafka distribution), else a cache in
  the state folder (``$LABKIT_HOME/apache-kafka/<version>/libs``), filled on first use by Maven from the pom
  that ships in this package (``labkit kafka fetch`` does it on its own). Maven Central publishes the broker
  as ``org.apache.kafka:kafka_2.13``; the pom adds what only the release tarball carries (the SLF4J binding).
- **Java** 17 or newer: ``$JAVA_HOME/bin/java``, else ``java`` on ``PATH``.
- **The log** (the broker's data): ``$LABKIT_HOME/apache-kafka/data-<port>``, formatted once by Kafka's
  ``StorageTool`` and kept across ``down``/``up`` and restarts, so the broker is durable. It is keyed by port
  because formatting records the controller's address, which must not change afterwards.
- **Start-up on 2 cores**: a small heap, internal topics of one partition, no initial rebalance delay; the
  JDK's own class-data-sharing archive is mapped as always (what more the JVM offered was measured, see
  docs/benchmarks.md).

Every way this can fail is a :class:`~labkit.errors.StackError` of one line that says what is missing and how
to get it, so ``labkit up`` can print it and exit non-zero.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from labkit.config import Config
from labkit.errors import StackError

#: The Apache Kafka release the lab runs; docker-compose.yml and the pom name the same one (a test checks).
KAFKA_VERSION = "4.1.1"
#: The oldest Java the 4.x broker runs on.
MIN_JAVA = 17
#: The node id of the single KRaft node (broker and controller in one process).
NODE_ID = 1
RESOURCES = Path(__file__).resolve().parent / "resources" / "apache-kafka"
POM = RESOURCES / "pom.xml"
LOG_CONFIG = RESOURCES / "log4j2.yaml"
#: The broker's main class, what ``bin/kafka-server-start.sh`` runs.
BROKER_MAIN = "kafka.Kafka"
#: Kafka's storage tool, what ``bin/kafka-storage.sh`` runs.
STORAGE_MAIN = "kafka.tools.StorageTool"
#: Written into the cache folder once Maven copied every jar, so that a half-finished fetch is never used.
_COMPLETE = ".complete"
_KAFKA_JAR_RE = re.compile(r"^kafka_2\.13-(?P<version>\d+\.\d+\.\d+[^/]*?)\.jar$")
_LOGGED_VERSION_RE = re.compile(r"Kafka version: (?P<version>\S+)")
_JAVA_VERSION_RE = re.compile(r'version "(?P<major>\d+)(?:\.(?P<minor>\d+))?')
#: What the JVM gets, beyond the class path: a small heap suits a one-node teaching broker on 2 cores.
JVM_OPTIONS = (
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-Djava.awt.headless=true",
    # Listen on an IPv4 socket: 127.0.0.1 only, as Redis and the embedded broker do (not ::ffff:127.0.0.1).
    "-Djava.net.preferIPv4Stack=true",
)

#: Broker settings beyond the listeners and the log folder. Why each differs from Kafka's default:
SERVER_SETTINGS = {
    # One node: the internal topics cannot have the default 3 replicas, and 50 partitions each would take
    # seconds to create on the first group join.
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "share.coordinator.state.topic.num.partitions": "1",
    # The first join of an empty group waits 3 s by default for more members; testcontainers and Kafka's own
    # test harness set 0, and so does docker-compose.yml.
    "group.initial.rebalance.delay.ms": "0",
    # Topics the lab does not create itself (auto-created on produce) get 3 partitions, like docker-compose.yml.
    "num.partitions": "3",
    # 2 cores: fewer threads than the defaults (3 network, 8 I/O, 10 background).
    "num.network.threads": "2",
    "num.io.threads": "2",
    "background.threads": "2",
    # The log cleaner reserves 128 MiB of heap by default; the lab compacts little.
    "log.cleaner.dedupe.buffer.size": "8388608",
    # Retention is checked every 5 min by default; every 5 s lets a lesson see an expired segment go.
    "log.retention.check.interval.ms": "5000",
}


@dataclass(frozen=True)
class Distribution:
    """A folder of Apache Kafka jars the broker can run from.

    Attributes:
        libs: the folder (``libs/`` of a distribution, or the cache).
        version: the broker's version, from its ``kafka_2.13-<version>.jar``.
        source: where it came from, in words: ``LABKIT_KAFKA_HOME=...`` or ``cache in ...``.
    """

    libs: Path
    version: str
    source: str

    @property
    def classpath(self) -> str:
        # The JVM expands "dir/*" itself; every jar, in the folder's order, as bin/kafka-run-class.sh does.
        return str(self.libs / "*")


def version_of_libs(libs: Path) -> str | None:
    """The Kafka version of a folder of jars, from the broker jar's name; None if the broker jar is not there."""
    try:
        names = sorted(p.name for p in libs.iterdir())
    except OSError:
        return None
    for name in names:
        match = _KAFKA_JAR_RE.match(name)
        if match:
            return match["version"]
    return None


def cache_dir(config: Config) -> Path:
    """Where ``labkit kafka fetch`` puts the jars of :data:`KAFKA_VERSION` for this state folder."""
    return config.home / "apache-kafka" / KAFKA_VERSION / "libs"


def data_dir(config: Config) -> Path:
    """The broker's log folder for the configured port (durable: kept across ``down``/``up``)."""
    return config.home / "apache-kafka" / f"data-{config.kafka_address[1]}"


def properties_file(config: Config) -> Path:
    """The ``server.properties`` labkit writes before each start (its name identifies our broker's process)."""
    return config.home / "apache-kafka" / f"server-{config.kafka_address[1]}.properties"


def controller_port(config: Config) -> int:
    """The KRaft controller's port: the client port + 1, as in docker-compose.yml (9092 and 9093)."""
    return config.kafka_address[1] + 1


def locate(config: Config) -> Distribution | None:
    """The jars to run, without fetching anything: ``$LABKIT_KAFKA_HOME/libs``, else a complete cache, else None.

    Raises:
        StackError: ``LABKIT_KAFKA_HOME`` is set but holds no Apache Kafka broker jar.
    """
    home = os.environ.get("LABKIT_KAFKA_HOME")
    if home:
        libs = Path(home).expanduser() / "libs"
        version = version_of_libs(libs)
        if version is None:
            raise StackError(
                f"LABKIT_KAFKA_HOME={home!r} has no libs/kafka_2.13-*.jar; point it at an unpacked Apache Kafka "
                "4.x distribution (kafka_2.13-<version>.tgz from kafka.apache.org), or unset it"
            )
        return Distribution(libs, version, f"LABKIT_KAFKA_HOME={home}")
    cache = cache_dir(config)
    if (cache / _COMPLETE).is_file() and version_of_libs(cache) == KAFKA_VERSION:
        return Distribution(cache, KAFKA_VERSION, f"cache in {cache}")
    return None


def resolve(config: Config, progress: Callable[[str], None] | None = None) -> Distribution:
    """The jars to run, fetched with Maven on first use (see :func:`fetch`).

    Raises:
        StackError: nothing to run from and no way to fetch it (the line says what is missing).
    """
    return locate(config) or fetch(config, progress)


def share_jars(source: Config, target: Config) -> None:
    """Let ``target``'s state folder run the jars ``source`` would run (a link to them), so nothing is fetched.

    For throwaway stacks (drills, tests, benchmarks) beside a lab whose jars are already there; does nothing
    when ``source`` has none yet or ``target`` already has a cache.
    """
    jars = locate(source)
    cache = cache_dir(target)
    if jars is None or cache.exists() or cache.is_symlink():
        return
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.symlink_to(jars.libs.resolve(), target_is_directory=True)


def find_maven() -> str:
    """The ``mvn`` executable.

    Raises:
        StackError: none on ``PATH`` (nor in ``$MAVEN_HOME/bin``).
    """
    candidates = [os.path.join(os.environ["MAVEN_HOME"], "bin", "mvn")] if os.environ.get("MAVEN_HOME") else []
    candidates.append(shutil.which("mvn") or "")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise StackError(
        f"Apache Kafka's jars are not here yet and Maven (mvn) was not found to fetch them; install Maven "
        f"(e.g. apt-get install maven) and run `labkit kafka fetch`, or set LABKIT_KAFKA_HOME to an unpacked "
        f"Apache Kafka {KAFKA_VERSION} (kafka.apache.org/downloads)"
    )


def fetch(config: Config, progress: Callable[[str], None] | None = None) -> Distribution:
    """Fill the cache with the broker's jars from Maven Central, using the pom that ships in the package.

    Maven resolves into its own repository (``~/.m2``) first, so a second state folder costs a copy, not a
    download. The jars go to a temporary folder that replaces the cache only once Maven succeeded.

    Args:
        config: whose state folder holds the cache.
        progress: called with one short line per artifact Maven downloads (the CLI shows it as a progress line).

    Raises:
        StackError: no Java 17 (the jars would be useless), no Maven, or Maven failed (its last lines are shown).
    """
    find_java()
    mvn = find_maven()
    cache = cache_dir(config)
    staging = cache.with_name(f"libs.fetching-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    command = [
        mvn, "-B", "--no-transfer-progress", "-f", str(POM), "dependency:copy-dependencies",
        f"-Dlabkit.libs={staging}", f"-Dproject.build.directory={staging.parent / 'maven-build'}",
    ]  # fmt: skip
    lines: list[str] = []
    downloads = 0
    try:
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=staging.parent
        ) as maven:
            assert maven.stdout is not None
            for line in maven.stdout:
                lines.append(line.rstrip())
                if "Downloaded from" in line or "Copying " in line:
                    downloads += 1
                    if progress is not None:
                        artifact = line.rstrip().rsplit("/", 1)[-1].split(" ")[0]
                        progress(f"Apache Kafka {KAFKA_VERSION}: {downloads} files ({artifact})")
            code = maven.wait()
    except OSError as e:
        raise StackError(f"could not run {mvn}: {e}") from None
    if code != 0 or version_of_libs(staging) != KAFKA_VERSION:
        shutil.rmtree(staging, ignore_errors=True)
        errors = [line for line in lines if line.startswith("[ERROR]")] or lines
        tail = " | ".join(line.strip() for line in errors[-3:] if line.strip()) or "(no output)"
        raise StackError(f"Maven could not fetch Apache Kafka {KAFKA_VERSION} (exit {code}): {tail}")
    (staging / _COMPLETE).write_text(f"{KAFKA_VERSION}\n")
    shutil.rmtree(cache, ignore_errors=True)
    staging.replace(cache)
    shutil.rmtree(staging.parent / "maven-build", ignore_errors=True)
    return Distribution(cache, KAFKA_VERSION, f"cache in {cache}")


@lru_cache(maxsize=4)
def _java_version(java: str) -> int | None:
    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    match = _JAVA_VERSION_RE.search(done.stderr + done.stdout)
    if not match:
        return None
    major = int(match["major"])
    return int(match["minor"] or 0) if major == 1 else major  # "1.8.0" is Java 8


def find_java() -> str:
    """A ``java`` of version 17 or newer: ``$JAVA_HOME/bin/java``, else the one on ``PATH``.

    Raises:
        StackError: none found, or only an older one.
    """
    candidates = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(os.path.join(os.environ["JAVA_HOME"], "bin", "java"))
    candidates.append(shutil.which("java") or "")
    seen = []
    for candidate in filter(None, candidates):
        version = _java_version(candidate)
        if version is not None and version >= MIN_JAVA:
            return candidate
        seen.append(f"{candidate} is Java {version}" if version else f"{candidate} does not run")
    found = f" ({'; '.join(seen)})" if seen else ": java was not found on PATH"
    raise StackError(
        f"Apache Kafka {KAFKA_VERSION} needs Java {MIN_JAVA} or newer{found}; install one "
        f"(e.g. apt-get install openjdk-{MIN_JAVA}-jre-headless) or set JAVA_HOME to it"
    )


def new_cluster_id() -> str:
    """A KRaft cluster id as ``kafka-storage.sh random-uuid`` makes them: 16 random bytes, URL-safe base64.

    Kafka never hands out one that starts with ``-`` (a command line would read it as an option).
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def server_properties(config: Config) -> str:
    """The broker's ``server.properties``: one KRaft node on 127.0.0.1, its log in the state folder."""
    host, port = "127.0.0.1", config.kafka_address[1]
    controller = f"{host}:{controller_port(config)}"
    settings = {
        "process.roles": "broker,controller",
        "node.id": str(NODE_ID),
        "controller.quorum.bootstrap.servers": controller,
        "controller.listener.names": "CONTROLLER",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{controller}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{controller}",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(data_dir(config)),
        **SERVER_SETTINGS,
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


def read_meta(folder: Path) -> dict[str, str]:
    """The ``key=value`` lines of a log folder's ``meta.properties`` (empty if it has none)."""
    try:
        text = (folder / "meta.properties").read_text()
    except OSError:
        return {}
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def check_log_folder(folder: Path) -> bool:
    """Whether ``folder`` is a log folder labkit formatted; False if it is missing or empty (format it).

    Raises:
        StackError: it holds something else (files but no ``meta.properties``, or another node's log).
    """
    try:
        entries = [p.name for p in folder.iterdir()]
    except FileNotFoundError:
        return False
    except OSError as e:
        raise StackError(f"cannot read the Apache Kafka log folder {folder}: {e.strerror}") from None
    if not entries:
        return False
    meta = read_meta(folder)
    if not meta:
        raise StackError(
            f"{folder} is not a Kafka log folder (it has files but no meta.properties); move it away or delete it "
            "to start with an empty log"
        )
    if meta.get("node.id") != str(NODE_ID) or not meta.get("cluster.id"):
        raise StackError(
            f"{folder} holds the log of another Kafka (node.id {meta.get('node.id')!r}, cluster.id "
            f"{meta.get('cluster.id')!r}); labkit's broker is node {NODE_ID}: move that folder away or delete it"
        )
    return True


def format_storage(config: Config, java: str, dist: Distribution, log_file: Path) -> None:
    """Format an empty log folder once (``kafka-storage.sh format --standalone``).

    Raises:
        StackError: the storage tool failed (its last lines are shown).
    """
    folder = data_dir(config)
    if check_log_folder(folder):
        return
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        java, "-Xmx256m", f"-Dlog4j2.configurationFile={LOG_CONFIG}", "-cp", dist.classpath, STORAGE_MAIN,
        "format", "--standalone", "--ignore-formatted", "--cluster-id", new_cluster_id(),
        "--config", str(properties_file(config)),
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise StackError(f"could not run Kafka's storage tool: {e}") from None
    with log_file.open("a") as out:
        out.write(done.stdout + done.stderr)
    if done.returncode != 0 or not read_meta(folder):
        lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        raise StackError(
            f"formatting the Apache Kafka log in {folder} failed (exit {done.returncode}): {' | '.join(lines[-3:])}"
        )


def broker_command(config: Config, java: str, dist: Distribution) -> list[str]:
    """The broker's command line; also writes its ``server.properties``."""
    target = properties_file(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(server_properties(config))
    return [
        java, *JVM_OPTIONS,
        f"-Dkafka.logs.dir={config.home / 'logs'}", f"-Dlog4j2.configurationFile={LOG_CONFIG}",
        "-cp", dist.classpath, BROKER_MAIN, str(target),
    ]  # fmt: skip


def logged_version(text: str) -> str | None:
    """The version the broker printed when it last started (``Kafka version: 4.1.1``), if it did."""
    versions = _LOGGED_VERSION_RE.findall(text)
    return versions[-1] if versions else None


def describe() -> str:
    """One line for ``--help`` texts: which Kafka, and what it needs."""
    return f"Apache Kafka {KAFKA_VERSION} (KRaft, durable; needs Java {MIN_JAVA}+ and Maven or LABKIT_KAFKA_HOME)"
