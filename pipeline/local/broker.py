"""Fetch (once), start and stop a real single-node KRaft Apache Kafka broker on 127.0.0.1.

Used by `make kafka-up` / `make kafka-down`, `make run` and the pytest session fixture. The jars come from
Maven Central through deploy/local/pom.xml and are cached in .kafka/libs, so a second start takes seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.connection import client_config
from pipeline.errors import BrokerError

ROOT = Path(__file__).resolve().parents[2]
KAFKA_HOME = Path(os.environ.get("PIPELINE_KAFKA_HOME", ROOT / ".kafka"))
LIBS = KAFKA_HOME / "libs"
POM = ROOT / "deploy" / "local" / "pom.xml"
KAFKA_VERSION = "3.9.1"
MARKER = LIBS / f"kafka_2.13-{KAFKA_VERSION}.jar"
# Extra JVM flags for the local broker, e.g. "-XX:TieredStopAtLevel=1" (C1 only: far less JIT CPU while
# the broker warms up on a small machine, at some cost in peak speed).
JVM_OPTS = os.environ.get("PIPELINE_KAFKA_JVM_OPTS", "")

LOG4J = """log4j.rootLogger=WARN, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.server.KafkaRaftServer=INFO
"""


_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now on 127.0.0.1, never one this process handed out before: the OS may give the same
    ephemeral port to two calls in a row once the first socket is closed (a broker's listener and its controller
    on one port would not start)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def ensure_jars(progress: bool = True) -> Path:
    """Resolve the pinned broker jars with Maven into .kafka/libs unless they are already there."""
    if MARKER.exists():
        return LIBS
    if shutil.which("mvn") is None:
        raise BrokerError("Maven (mvn) is needed to fetch the Kafka broker jars from Maven Central")
    LIBS.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"fetching Apache Kafka {KAFKA_VERSION} jars from Maven Central (first time only)...", flush=True)
    cmd = ["mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
           f"-DoutputDirectory={LIBS}", "-DincludeScope=runtime"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not MARKER.exists():
        raise BrokerError(f"mvn could not fetch the Kafka jars:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return LIBS


@dataclass
class LocalBroker:
    """A combined broker+controller KRaft node; `data_dir` holds its logs, config and log file. Alone by
    default (a single-node cluster); a node of a LocalCluster (pipeline.local.cluster) when given the quorum,
    the cluster id, a replication factor for Kafka's own topics and optionally a secured listener."""

    data_dir: Path
    port: int
    controller_port: int
    heap: str = "768m"
    proc: subprocess.Popen[bytes] | None = None
    node_id: int = 1
    voters: str | None = None  # controller.quorum.voters; None: this node alone
    cluster_id: str | None = None  # the same for every node of a cluster; None: a new one
    internal_replication: int = 1  # of Kafka's own topics (consumer offsets, transactions)
    secure: SecureListener | None = None  # a SASL_SSL listener besides the PLAINTEXT one

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        listeners = {"PLAINTEXT": self.port}
        if self.secure is not None:
            listeners["SASL_SSL"] = self.secure.port
        advertised = ",".join(f"{name}://127.0.0.1:{port}" for name, port in listeners.items())
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.voters or f"{self.node_id}@127.0.0.1:{self.controller_port}",
            "listeners": f"{advertised},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": advertised,
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": ",".join([*(f"{n}:{n}" for n in listeners), "CONTROLLER:PLAINTEXT"]),
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir / "logs"),
            "offsets.topic.replication.factor": str(self.internal_replication),
            # few offset partitions: the first consumer group of a test run gets its coordinator fast
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": str(self.internal_replication),
            "transaction.state.log.min.isr": str(min(2, self.internal_replication)),
            "transaction.state.log.num.partitions": "4",
            "group.initial.rebalance.delay.ms": "0",
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "log.retention.check.interval.ms": "60000",
            "message.max.bytes": "10485760",
            **(self.secure.broker_props() if self.secure is not None else {}),
        }
        cfg = self.data_dir / "server.properties"
        cfg.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.data_dir / "log4j.properties").write_text(LOG4J)
        return cfg

    def _java(self, main: str, *args: str) -> list[str]:
        return ["java", f"-Xmx{self.heap}", "-Xms128m", "-XX:+UseG1GC", *JVM_OPTS.split(), "-cp", f"{ensure_jars()}/*",
                f"-Dlog4j.configuration=file:{self.data_dir / 'log4j.properties'}", main, *args]

    def start(self, timeout_s: float = 60.0, wait: bool = True) -> None:
        """1. write the config; 2. format the KRaft storage once; 3. spawn the JVM; 4. wait until it answers
        (a node of a cluster answers once a quorum of its controllers runs: start them all, then wait)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cfg = self._write_config()
        if not (self.data_dir / "logs" / "meta.properties").exists():
            scram = self.secure.format_args() if self.secure is not None else []
            fmt = subprocess.run(self._java("kafka.tools.StorageTool", "format", "-t",
                                            self.cluster_id or uuid.uuid4().hex[:22], "-c", str(cfg), *scram),
                                 capture_output=True, text=True)
            if fmt.returncode != 0:
                raise BrokerError(f"formatting KRaft storage failed: {fmt.stdout}{fmt.stderr}")
        log = open(self.data_dir / "broker.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(self._java("kafka.Kafka", str(cfg)), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        (self.data_dir / "broker.pid").write_text(str(self.proc.pid))
        if wait:
            self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not _port_open(self.port):  # quiet wait for the socket
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.2)
        admin = AdminClient(client_config(self.bootstrap))
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise BrokerError(f"broker exited with {self.proc.returncode}; see {self.data_dir / 'broker.log'}:\n"
                                  + self.log_tail())
            with contextlib.suppress(Exception):
                if admin.list_topics(timeout=2).brokers:
                    return
            time.sleep(0.3)
        raise BrokerError(f"broker not ready after {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        p = self.data_dir / "broker.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else ""

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the JVM: SIGTERM for a clean shutdown, SIGKILL if it does not exit in time."""
        pid = self.proc.pid if self.proc else _read_pid(self.data_dir)
        if pid is None:
            return
        _terminate(pid, timeout_s)
        (self.data_dir / "broker.pid").unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL the JVM: a broker crash."""
        pid = self.proc.pid if self.proc else _read_pid(self.data_dir)
        if pid is not None:
            _terminate(pid, 0)
            if self.proc is not None:
                self.proc.wait(10)
            (self.data_dir / "broker.pid").unlink(missing_ok=True)


@dataclass(frozen=True)
class SecureListener:
    """A SASL_SSL listener: TLS with a certificate for 127.0.0.1 signed by the cluster's CA (PEM files), and
    SCRAM users created when the storage is formatted."""

    port: int
    keystore: Path  # PEM: the node's private key (PKCS#8) and certificate chain
    truststore: Path  # PEM: the CA
    users: tuple[tuple[str, str], ...]  # (name, password)
    mechanism: str = "SCRAM-SHA-512"

    def broker_props(self) -> dict[str, str]:
        return {
            "sasl.enabled.mechanisms": self.mechanism,
            f"listener.name.sasl_ssl.{self.mechanism.lower()}.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "ssl.keystore.type": "PEM", "ssl.keystore.location": str(self.keystore),
            "ssl.truststore.type": "PEM", "ssl.truststore.location": str(self.truststore),
        }

    def format_args(self) -> list[str]:
        out: list[str] = []
        for name, password in self.users:
            out += ["--add-scram", f"{self.mechanism}=[name={name},password={password}]"]
        return out


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _read_pid(data_dir: Path) -> int | None:
    p = data_dir / "broker.pid"
    try:
        return int(p.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child counts as gone
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _terminate(pid: int, timeout_s: float) -> None:
    """SIGTERM, and SIGKILL after timeout_s (0: SIGKILL at once)."""
    if timeout_s > 0:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


DEFAULT_DIR = KAFKA_HOME / "local"
# What the pipeline needs to run on one broker: topics.yaml asks for 3 replicas, 2 in sync (pipeline.topics).
SINGLE_BROKER_ENV = {"PIPELINE_REPLICATION_FACTOR": "1", "PIPELINE_MIN_INSYNC_REPLICAS": "1"}
DEFAULT_PORT = int(os.environ.get("PIPELINE_KAFKA_PORT", "9092"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.local.broker", description=__doc__)
    ap.add_argument("action", choices=["fetch", "up", "down", "status", "run"])
    ap.add_argument("--port", type=int, default=DEFAULT_PORT)
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = ap.parse_args(argv)
    broker = LocalBroker(args.dir, args.port, args.port + 1)
    if args.action == "fetch":
        print(ensure_jars())
        return 0
    if args.action in ("up", "run"):
        pid = _read_pid(args.dir)
        if pid and _alive(pid):
            print(f"broker already running (pid {pid}) on {broker.bootstrap}")
            if args.action == "up":
                return 0
        else:
            broker.start()
            print(f"broker up on {broker.bootstrap} (pid {broker.proc.pid if broker.proc else '?'}, "
                  f"data {args.dir})", flush=True)
        print("one broker: run the pipeline with " + " ".join(f"{k}={v}" for k, v in SINGLE_BROKER_ENV.items()),
              flush=True)
        if args.action == "run":  # foreground: stop the broker on Ctrl-C / SIGTERM
            signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                broker.stop()
        return 0
    if args.action == "down":
        broker.stop()
        print("broker stopped")
        return 0
    pid = _read_pid(args.dir)
    print(f"running (pid {pid}) on {broker.bootstrap}" if pid and _alive(pid) else "not running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
