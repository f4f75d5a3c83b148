"""Tests of the one Kafka connection configuration: environment and file, validation, what clients get."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.connection import KafkaConnection, check_cluster, client_config
from pipeline.errors import ConfigError, KafkaAuthError, PipelineError
from pipeline.local.broker import free_port
from pipeline.local.cluster import make_tls
from pipeline.observability.logs import LIBRDKAFKA, log_client_error
from pipeline.settings import Settings


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    return make_tls(tmp_path)[1]


def test_the_default_is_a_local_plaintext_broker() -> None:
    conn = KafkaConnection.from_env({})
    assert conn.librdkafka() == {"bootstrap.servers": "127.0.0.1:9092", "security.protocol": "PLAINTEXT"}
    assert conn.faust_credentials() is None and conn.describe() == "127.0.0.1:9092 (PLAINTEXT)"


def test_sasl_ssl_from_the_environment_gives_every_client_the_same_settings(ca: Path) -> None:
    # Given SASL_SSL settings in the environment
    env = {"KAFKA_BOOTSTRAP": "b1:9093,b2:9093", "KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
           "KAFKA_USERNAME": "svc", "KAFKA_PASSWORD": "s3cret", "KAFKA_CA_FILE": str(ca)}
    conn = KafkaConnection.from_env(env)
    # Then librdkafka gets them (SCRAM-SHA-512 by default), a client adds its own properties on top
    assert conn.librdkafka(**{"group.id": "g"}) == {
        "bootstrap.servers": "b1:9093,b2:9093", "security.protocol": "SASL_SSL", "sasl.mechanisms": "SCRAM-SHA-512",
        "sasl.username": "svc", "sasl.password": "s3cret", "ssl.ca.location": str(ca), "group.id": "g"}
    # And aiokafka the same, and the secret is in no description of it
    assert {k: v for k, v in conn.aiokafka().items() if k != "ssl_context"} == {
        "bootstrap_servers": "b1:9093,b2:9093", "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc", "sasl_plain_password": "s3cret"}
    assert "s3cret" not in repr(conn) and "s3cret" not in conn.describe()
    assert conn.describe() == "b1:9093,b2:9093 (SASL_SSL/SCRAM-SHA-512 as svc)"


def test_a_file_is_read_and_the_environment_overrides_it(tmp_path: Path, ca: Path) -> None:
    (tmp_path / "pw").write_text("from-file\n")
    f = tmp_path / "kafka.yaml"
    f.write_text(f"bootstrap: b1:9093\nsecurity_protocol: SASL_SSL\nsasl_mechanism: SCRAM-SHA-256\n"
                 f"username: svc\npassword_file: {tmp_path / 'pw'}\nca_file: {ca}\n"
                 f"librdkafka: {{socket.keepalive.enable: true, client.rack: r1}}\n")
    conn = KafkaConnection.from_env({"PIPELINE_KAFKA_CONFIG": str(f), "KAFKA_BOOTSTRAP": "b9:9093"})
    assert (conn.bootstrap, conn.sasl_mechanism, conn.password) == ("b9:9093", "SCRAM-SHA-256", "from-file")
    assert conn.librdkafka()["client.rack"] == "r1" and conn.librdkafka()["socket.keepalive.enable"] == "True"


@pytest.mark.parametrize(("text", "problem"), [
    ("bootstrap: b1\nsecurity_protol: SSL\n", ":2:1: Kafka connection: unknown key 'security_protol'"),
    ("security_protocol: TLS\n", "security_protocol 'TLS' is not one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
    ("security_protocol: SASL_SSL\nusername: svc\n", "SASL_SSL needs a username and a password"),
    ("security_protocol: SASL_PLAINTEXT\nsasl_mechanism: GSSAPI\nusername: a\npassword: b\n",
     "sasl_mechanism 'GSSAPI' is not one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
    ("security_protocol: SSL\nca_file: /nowhere/ca.pem\n", "ca_file /nowhere/ca.pem is not a readable file"),
    ("librdkafka: {sasl.password: x}\n", "librdkafka properties sasl.password are set by their own keys"),
    ("bootstrap: [a, b]\n", ":1:12: bootstrap must be a single value"),
])
def test_a_bad_file_stops_start_up_naming_the_file_and_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    f = tmp_path / "kafka.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        KafkaConnection.from_env({"PIPELINE_KAFKA_CONFIG": str(f)})
    assert str(f) in str(info.value) and problem in str(info.value)


def test_client_config_is_the_connection_then_the_clients_own_properties_and_quiet_logging(ca: Path) -> None:
    # Given a SASL_SSL connection
    conn = KafkaConnection("b1:9093", "SASL_SSL", "SCRAM-SHA-512", "svc", "s3cret", ca_file=ca)
    # When a client's settings are built with its own properties and error callback
    seen: list[object] = []
    conf = client_config(conn, {"group.id": "g", "enable.auto.commit": False}, error_cb=seen.append)
    # Then it has the connection, its properties, the throttled logger and its callback
    assert {k: v for k, v in conf.items() if k not in ("logger", "error_cb")} == {
        "bootstrap.servers": "b1:9093", "security.protocol": "SASL_SSL", "sasl.mechanisms": "SCRAM-SHA-512",
        "sasl.username": "svc", "sasl.password": "s3cret", "ssl.ca.location": str(ca),
        "log.connection.close": False, "group.id": "g", "enable.auto.commit": False}
    assert conf["logger"] is LIBRDKAFKA and conf["error_cb"] == seen.append
    # And a bare string is a PLAINTEXT bootstrap (the local broker, tests)
    assert client_config("127.0.0.1:1")["security.protocol"] == "PLAINTEXT"
    assert client_config("127.0.0.1:1")["error_cb"] is log_client_error


def test_faust_gets_one_broker_url_per_server() -> None:
    assert KafkaConnection("b1:9093, b2:9093").faust_brokers() == ["kafka://b1:9093", "kafka://b2:9093"]


def test_an_unreachable_cluster_is_waited_for_then_reported_without_secrets(caplog: pytest.LogCaptureFixture
                                                                            ) -> None:
    # Given nothing listening where the cluster should be, and a password
    conn = KafkaConnection(f"127.0.0.1:{free_port()}", "SASL_PLAINTEXT", "PLAIN", "svc", "s3cret")
    # When start-up checks it with a short wait
    with pytest.raises(PipelineError) as err:
        check_cluster(conn, wait_s=2)
    # Then the error says where and that it is unreachable (not refused), and never the password
    assert not isinstance(err.value, KafkaAuthError)
    assert f"{conn.bootstrap} (SASL_PLAINTEXT/PLAIN as svc) is not reachable" in str(err.value)
    assert "s3cret" not in str(err.value) and "s3cret" not in caplog.text


def test_bind_addresses_and_ports_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a deployment's bind settings
    monkeypatch.setenv("PIPELINE_WEB_HOST", "0.0.0.0")
    monkeypatch.setenv("PIPELINE_WEB_PORT", "8080")
    monkeypatch.setenv("PIPELINE_DEST_METRICS_HOST", "10.0.0.5")
    monkeypatch.setenv("PIPELINE_DEST_METRICS_PORT", "9100")
    s = Settings.from_env()
    assert (s.web_host, s.web_port, s.dest_metrics_host, s.dest_metrics_port) == ("0.0.0.0", 8080, "10.0.0.5", 9100)
    # And without them everything stays local, the runner's metrics off
    for name in ("PIPELINE_WEB_HOST", "PIPELINE_WEB_PORT", "PIPELINE_DEST_METRICS_HOST", "PIPELINE_DEST_METRICS_PORT"):
        monkeypatch.delenv(name)
    s = Settings.from_env()
    assert (s.web_host, s.web_port, s.dest_metrics_host, s.dest_metrics_port) == ("127.0.0.1", 6066, "127.0.0.1", 0)
    # And a port that is not one stops start-up naming the variable
    monkeypatch.setenv("PIPELINE_WEB_PORT", "80a")
    with pytest.raises(ConfigError, match="PIPELINE_WEB_PORT must be a TCP port"):
        Settings.from_env()


def test_free_ports_are_never_handed_out_twice_in_a_process() -> None:
    # (the session broker once got the same port for its listener and its controller, and did not start)
    from pipeline.local.broker import free_port

    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
