"""deploy/ checked against the package (issue 18, item 3): the Kubernetes manifests against the Kubernetes schemas,
the compose file against the compose specification, the alert rules' syntax, every metric the rules and the
dashboard query defined in pipeline/observability/metrics.py, every command, port, path, environment variable
and mounted file the manifests name present in the package, and the rendered manifests equal to their source."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate.utils as kv
import pytest
import yaml
from prometheus_client import REGISTRY

import pipeline.observability.metrics  # noqa: F401 - every metric registered
from pipeline.api.server import operations
from pipeline.cli import RENDERED_HEADER, build_parser
from pipeline.destinations.cli import operations_app
from pipeline.resources import EXAMPLE_CONFIG_DIR
from pipeline.settings import Settings
from pipeline.topics import TopicRegistry, strimzi_topics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.33.0"
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("kafka.strimzi.io/v1beta2", "KafkaTopic")}
PACKAGE_SOURCE = "\n".join(p.read_text() for p in (ROOT / "pipeline").rglob("*.py"))


def manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            for doc in yaml.safe_load_all(path.read_text()):
                if doc:
                    yield path, doc


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def pod_containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod spec, container) of every workload."""
    for doc in by_kind("StatefulSet") + by_kind("Deployment"):
        spec = doc["spec"]["template"]["spec"]
        for c in spec["containers"]:
            yield spec, c


# -- PromQL: the metric names an expression reads --------------------------------------------------

KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
            "inf", "nan"}
# series Prometheus makes itself, not an exporter
PROMETHEUS_SERIES = {"up"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions or aggregations
    (followed by '('), keywords, label names (in {...}, by (...)) or durations (in [...])."""
    depth = 0
    for ch in expr:  # syntax first: brackets balance
        depth += ch in "([{"
        depth -= ch in ")]}"
        assert depth >= 0, f"unbalanced brackets: {expr}"
    assert depth == 0, f"unbalanced brackets: {expr}"
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if not e[m.end():].lstrip().startswith("(") and m.group() not in KEYWORDS:
            names.add(m.group())
    return names


def exported_series() -> set[str]:
    """Every series name the process can export: the metrics module's and prometheus-client's own (process_*)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("_count", "_sum", "_created"), "gauge": ("",)}
    return {family.name + s for family in REGISTRY.collect() for s in suffixes.get(family.type, ("",))}


def test_metric_names_reads_selectors_only() -> None:
    expr = ('histogram_quantile(0.99, sum by (le) (rate(cdp_x_bucket{job=~"a-.*", le!="1"}[5m]))) > 5 and '
            'deriv(sum without (p) (cdp_y)[5m:30s]) > 0 unless on (group) cdp_z offset 1h')
    assert metric_names(expr) == {"cdp_x_bucket", "cdp_y", "cdp_z"}
    with pytest.raises(AssertionError):
        metric_names("sum(rate(cdp_x[5m])")


# -- Kubernetes ------------------------------------------------------------------------------------

def test_every_manifest_is_valid_for_kubernetes() -> None:
    docs = list(manifests())
    assert {d["kind"] for _, d in docs} >= {"StatefulSet", "Service", "PodDisruptionBudget", "Deployment",
                                            "ConfigMap", "Secret", "ServiceMonitor", "KafkaTopic"}
    for path, doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:  # custom resources: no schema in Kubernetes'
            assert doc["metadata"]["name"] and doc["spec"], path
            continue
        kv.validate(doc, KUBERNETES_VERSION, strict=True)  # raises ValidationError naming the field


def test_every_kustomization_names_files_that_exist() -> None:
    for k in K8S.rglob("kustomization.yaml"):
        doc = yaml.safe_load(k.read_text())
        assert doc["kind"] == "Kustomization"
        for resource in doc["resources"]:
            assert (k.parent / resource).exists(), f"{k}: {resource}"
        for patch in doc.get("patches", []):
            target = patch["target"]
            assert any(d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]
                       for _, d in manifests()), f"{k}: no {target}"


def test_worker_statefulset_is_what_operations_expects() -> None:
    [sts] = by_kind("StatefulSet")
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    [c] = pod["containers"]
    assert spec["podManagementPolicy"] == "Parallel" and spec["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"] and pod["affinity"]["podAntiAffinity"] and pod["securityContext"]["runAsNonRoot"]
    env = {e["name"]: e for e in c["env"]}
    assert env["PIPELINE_WORKER_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # stable per pod
    [svc] = [s for s in by_kind("Service") if s["metadata"]["name"] == spec["serviceName"]]
    assert svc["spec"]["clusterIP"] == "None"
    [pdb] = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"] == spec["selector"]


def test_commands_ports_paths_and_variables_named_by_the_manifests_exist_in_the_package() -> None:
    parser = build_parser()
    worker_paths = {path for path, ops in operations().items() if ops.get("GET") and ops["GET"].scope is None}
    runner_paths = {r.resource.canonical for r in operations_app(dict).router.routes()}
    defaults = Settings.from_env()
    config_maps = {d["metadata"]["name"]: d for d in by_kind("ConfigMap")}
    secrets = {d["metadata"]["name"]: d for d in by_kind("Secret")}
    for pod, c in pod_containers():
        # the command parses as a `pipeline` command
        args = parser.parse_args(c["args"])
        env = {e["name"]: e.get("value") for e in c["env"]}
        for source in c.get("envFrom", []):
            ref = source.get("configMapRef") or source["secretRef"]
            found = config_maps.get(ref["name"]) or secrets[ref["name"]]
            env.update(found.get("data") or found.get("stringData") or {})
        # every variable is one the package reads
        for name in env:
            assert re.search(rf"['\"]{name}['\"]", PACKAGE_SOURCE) or name.startswith("KAFKA_") and (
                f'"{name}"' in PACKAGE_SOURCE or name.removeprefix("KAFKA_") in PACKAGE_SOURCE), name
        # the probed port is the one the process listens on, the probed paths are served there without a key
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        worker = args.func.__name__ == "cmd_worker"
        port_var, paths = ("PIPELINE_WEB_PORT", worker_paths) if worker else ("PIPELINE_DEST_METRICS_PORT", runner_paths)
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in c:
                get = c[probe]["httpGet"]
                assert ports[get["port"]] == int(env[port_var]) and get["path"] in paths, (probe, get)
        assert env.get("PIPELINE_WEB_HOST", env.get("PIPELINE_DEST_METRICS_HOST")) == "0.0.0.0"
        # files named by variables are where a volume is mounted, with that key in its ConfigMap or Secret
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert mounts[env["PIPELINE_DATA_DIR"]] == "data"
        assert volumes[mounts[env["PIPELINE_CONFIG"]]]["configMap"]["name"] == "cdp-pipeline-config"
        for var in ("PIPELINE_API_KEYS_FILE", "KAFKA_CA_FILE"):
            if var in env:
                folder, key = env[var].rsplit("/", 1)
                secret = secrets[volumes[mounts[folder]]["secret"]["secretName"]]
                assert key in secret["stringData"], var
        assert defaults.web_port == 6066  # the image's EXPOSE and compose's ports say 6066 as well


def test_the_configuration_configmap_is_the_example_configuration() -> None:
    [config] = [d for d in by_kind("ConfigMap") if d["metadata"]["name"] == "cdp-pipeline-config"]
    assert config["data"] == {p.name: p.read_text() for p in sorted(EXAMPLE_CONFIG_DIR.glob("*.yaml"))}


def test_strimzi_topics_are_rendered_from_topics_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    # (the tests' single broker overrides replication; the manifests keep topics.yaml's own)
    monkeypatch.delenv("PIPELINE_REPLICATION_FACTOR", raising=False)
    monkeypatch.delenv("PIPELINE_MIN_INSYNC_REPLICAS", raising=False)
    rendered = RENDERED_HEADER + yaml.safe_dump_all(strimzi_topics(TopicRegistry.load(), "cdp-kafka"), sort_keys=False)
    assert (K8S / "strimzi" / "kafka-topics.yaml").read_text() == rendered, \
        "run: pipeline topics render --format strimzi > deploy/k8s/strimzi/kafka-topics.yaml"


def test_pipeline_topics_render_prints_every_declared_topic(monkeypatch: pytest.MonkeyPatch) -> None:
    out = subprocess.run([sys.executable, "-m", "pipeline", "topics", "render", "--format", "strimzi",
                          "--cluster", "prod-kafka"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    reg = TopicRegistry.load()
    assert sorted(d["spec"]["topicName"] for d in docs) == sorted(s.name for s in reg)
    assert {d["metadata"]["labels"]["strimzi.io/cluster"] for d in docs} == {"prod-kafka"}


# -- compose, Docker -------------------------------------------------------------------------------

def test_compose_file_is_valid_for_the_compose_specification() -> None:
    out = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                          str(DEPLOY / "compose" / "docker-compose.yml")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_runs_three_brokers_two_workers_the_runner_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    parser = build_parser()
    assert [s for s in services if s.startswith("kafka-")] == ["kafka-1", "kafka-2", "kafka-3"]
    assert {s["image"].split(":")[0] for n, s in services.items() if n.startswith("kafka-")} == {"apache/kafka"}
    commands = {n: s["command"] for n, s in services.items() if s.get("image", "").startswith("cdp-pipeline")}
    assert sorted(commands.values()) == [["destinations", "run"], ["topics", "apply"], ["worker"], ["worker"]]
    for command in commands.values():
        parser.parse_args(command)
    prometheus = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"worker-1:6066", "worker-2:6066",
                       f"destinations:{services['destinations']['environment']['PIPELINE_DEST_METRICS_PORT']}"}
    mounted = {v.split(":")[1] for v in services["prometheus"]["volumes"]}
    assert set(prometheus["rule_files"]) <= mounted
    for volume in services["prometheus"]["volumes"] + services["grafana"]["volumes"]:
        assert (DEPLOY / "compose" / volume.split(":")[0]).exists(), volume


def test_dockerfile_is_multi_stage_non_root_from_a_wheel_with_a_healthcheck() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) == 2
    assert "python -m build --wheel" in text and "--no-index --find-links" in text
    [user] = re.findall(r"^USER (\S+)", text, re.M)
    assert not user.startswith(("0", "root"))
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.M)
    assert re.findall(r'^ENTRYPOINT \["(\w+)"\]', text, re.M) == ["pipeline"]
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for s in source.split():
            assert (ROOT / s).exists(), s
    assert "EXPOSE 6066 9108" in text and "PIPELINE_DEST_METRICS_PORT=9108" in text


# -- alerts, dashboard, runbook --------------------------------------------------------------------

def operations_anchors() -> set[str]:
    """GitHub's anchors of docs/operations.md's headings."""
    headings = re.findall(r"^#+ (.+)$", (ROOT / "docs" / "operations.md").read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_alert_rules_are_well_formed_query_existing_metrics_and_link_their_runbook_section() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    series, anchors = exported_series(), operations_anchors()
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert {"CdpConsumerLagGrowing", "CdpDeadLetterRateHigh", "CdpDestinationBreakerOpen", "CdpWorkerNotReady",
            "CdpEndToEndLatencyHigh"} <= {a["alert"] for a in alerts}
    for a in alerts:
        assert set(a) <= {"alert", "expr", "for", "labels", "annotations"} and re.fullmatch(r"Cdp[A-Za-z]+", a["alert"])
        assert re.fullmatch(r"\d+[smh]", a.get("for", "0s")) and a["labels"]["severity"] in ("warning", "critical")
        names = metric_names(a["expr"])
        assert names and names <= series | PROMETHEUS_SERIES, (a["alert"], names - series)
        url = a["annotations"]["runbook_url"]
        assert url.startswith("docs/operations.md#") and url.split("#")[1] in anchors, (a["alert"], url)
        assert a["annotations"]["summary"]


def test_every_command_the_operations_guide_gives_parses_as_a_pipeline_command() -> None:
    # Given every `pipeline ...` command in docs/operations.md, optional parts ([...]) and redirections left out
    text = (ROOT / "docs" / "operations.md").read_text()
    commands = [re.sub(r"\s*\[[^\]]*\]|\s*>.*$", "", c).split()[1:] for c in re.findall(r"`(pipeline [^`]+)`", text)]
    assert ["dlq", "replay", "--reason", "R", "--since", "T"] in commands
    # Then each one parses (argparse exits on an unknown command or option)
    parser = build_parser()
    for args in commands:
        assert parser.parse_args(args).func, args


def test_dashboard_panels_query_existing_metrics_and_cover_the_issue() -> None:
    dash = json.loads((DEPLOY / "grafana" / "cdp-pipeline.json").read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    series = exported_series()
    queried: set[str] = set()
    for p in panels:
        for t in p["targets"]:
            names = metric_names(t["expr"])
            assert names and names <= series, (p["title"], names - series)
            queried |= names
    # ingest rate, DLQ by reason, lag per group, latency histogram, memberships by audience and status,
    # destination deliveries / failures / breaker / dead letters, worker CPU and memory
    assert {"cdp_records_ingested_total", "cdp_records_dead_lettered_total", "cdp_consumer_lag",
            "cdp_event_to_membership_seconds_bucket", "cdp_membership_changes_total",
            "cdp_destination_deliveries_total", "cdp_destination_failures_total", "cdp_destination_breaker_open",
            "cdp_destination_dead_letters_total", "process_cpu_seconds_total", "process_resident_memory_bytes"} <= queried
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    assert "sum by (audience, status) (rate(cdp_membership_changes_total" in exprs
