"""A local multi-node KRaft Kafka cluster on 127.0.0.1 with a SASL_SSL listener: SCRAM users and a CA made at start.

Each node is a LocalBroker (combined broker and controller, the same Maven jars); together they form one
controller quorum. Every node has a PLAINTEXT listener (inter-broker traffic, and tests that need no
security) and, with `secure=True`, a SASL_SSL one whose certificate is signed by a CA made for this cluster
(`ca.pem`, what clients trust) and whose SCRAM-SHA-512 users are created when the storage is formatted.
"""

from __future__ import annotations

import datetime
import ipaddress
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.connection import client_config
from pipeline.errors import BrokerError
from pipeline.local.broker import LocalBroker, SecureListener, free_port

DEFAULT_USERS = (("pipeline", "pipeline-secret"),)


@dataclass
class LocalCluster:
    """`nodes` KRaft nodes under `data_dir` (node-1, node-2, ...), started together and stopped together;
    one can be stopped, killed and started again to test what a broker failure does."""

    data_dir: Path
    nodes: int = 3
    secure: bool = True
    users: tuple[tuple[str, str], ...] = DEFAULT_USERS
    heap: str = "512m"
    brokers: list[LocalBroker] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        keystore, truststore = make_tls(self.data_dir) if self.secure else (Path(), Path())
        ports = [(free_port(), free_port(), free_port()) for _ in range(self.nodes)]
        voters = ",".join(f"{i + 1}@127.0.0.1:{c}" for i, (_, _, c) in enumerate(ports))
        cluster_id = uuid.uuid4().hex[:22]
        for i, (port, secure_port, controller_port) in enumerate(ports):
            listener = SecureListener(secure_port, keystore, truststore, self.users) if self.secure else None
            self.brokers.append(LocalBroker(self.data_dir / f"node-{i + 1}", port, controller_port, heap=self.heap,
                                            node_id=i + 1, voters=voters, cluster_id=cluster_id,
                                            internal_replication=min(3, self.nodes), secure=listener))

    @property
    def bootstrap(self) -> str:
        """The PLAINTEXT listeners."""
        return ",".join(b.bootstrap for b in self.brokers)

    @property
    def secure_bootstrap(self) -> str:
        """The SASL_SSL listeners."""
        return ",".join(f"127.0.0.1:{b.secure.port}" for b in self.brokers if b.secure is not None)

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "tls" / "ca.pem"

    def start(self, timeout_s: float = 120.0) -> None:
        """1. start every node (none answers before a quorum of controllers runs); 2. wait for each."""
        for b in self.brokers:
            b.start(wait=False)
        deadline = time.monotonic() + timeout_s
        for b in self.brokers:
            b.wait_ready(max(1.0, deadline - time.monotonic()))
        self.wait_all_up(max(1.0, deadline - time.monotonic()))

    def wait_all_up(self, timeout_s: float) -> None:
        """Until the cluster's metadata lists every node (a restarted one has rejoined)."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient(client_config(self.bootstrap))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if len(admin.list_topics(timeout=2).brokers) == self.nodes:
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.3)
        raise BrokerError(f"not all {self.nodes} nodes are up after {timeout_s}s")

    def stop(self) -> None:
        for b in self.brokers:
            b.stop()

    def kill(self) -> None:
        """SIGKILL every node (a throwaway cluster: a clean stop waits on the controllers' quorum, node by node)."""
        for b in self.brokers:
            b.kill()


def make_tls(data_dir: Path) -> tuple[Path, Path]:
    """A CA and a certificate for 127.0.0.1 / localhost signed by it, as PEM files under data_dir/tls (made
    once): (the nodes' keystore: key and chain, the CA that clients and nodes trust)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    tls = data_dir / "tls"
    keystore, ca_file = tls / "node.pem", tls / "ca.pem"
    if keystore.exists() and ca_file.exists():
        return keystore, ca_file
    tls.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
             issuer_key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=365))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, node_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("cdp local CA", ca_key, None, ca_key, ca=True)
    node_cert = cert("127.0.0.1", node_key, ca_cert.subject, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    ca_file.write_bytes(ca_cert.public_bytes(pem))
    keystore.write_bytes(node_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
                         + node_cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    keystore.chmod(0o600)
    return keystore, ca_file
