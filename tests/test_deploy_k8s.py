"""deploy/k8s: both overlays render with the pinned kubectl's kustomize and validate offline
(kubernetes-validate, strict, oldest and newest supported Kubernetes); the Prometheus-operator
objects validate against the vendored CRD schemas; every Deployment has probes, limits and a
non-root, read-only, unprivileged container; Triton's liveness probe detects a hang (its
script run here against a hung stand-in); the PrometheusRule carries exactly
deploy/prometheus/rules.yml."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml

from cliplora.export import model_config
from cliplora.serve.gateway.settings import GatewaySettings
from tests.deploy_checks import (
    CRD_SCHEMAS,
    DEPLOY,
    K8S,
    KUBERNETES_VERSIONS,
    OVERLAYS,
    by_kind,
    compose_file,
    dashboard,
    needs_kubectl,
    render,
    validate,
)

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
    _check_triton_liveness(triton)
    assert "--model-control-mode=explicit" in triton["args"] and "--load-model=*" in triton["args"]
    mounts = {m["mountPath"] for m in triton["volumeMounts"]}
    assert model_config.TRT_CACHE_ROOT in mounts and "/tmp" in mounts  # the engine cache of `--target gpu`
    gateway = deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["grpc"]["port"] == 50051  # grpc.health.v1: SERVING iff Triton is ready
    assert "grpc" not in gateway["livenessProbe"]  # a Triton outage must not restart the gateways
    assert gateway["args"][:4] == ["--triton-url", "triton-grpc:8001", "--triton-renew-s", "10"]
    # A terminating Triton serves on until every gateway has renewed its channel without it.
    pause = int(triton["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pause > 10 + GatewaySettings().refresh_interval_s
    headless = [d for d in documents if d["kind"] == "Service" and d["metadata"]["name"] == "triton-grpc"]
    assert headless and headless[0]["spec"]["clusterIP"] == "None"  # one address per pod: round robin spreads calls


def _check_triton_liveness(triton: dict) -> None:
    """The liveness probe detects a hang as `cliplora serve --triton-hang-s` does: a timed
    request to /v2/health/ready, failing within about the stack's default window."""
    from cliplora.serve.stack.supervisor import ReadinessProbe

    live = triton["livenessProbe"]
    command = live["exec"]["command"]
    assert command[:2] == ["python3", "-c"] and "/v2/health/ready" in command[2], command
    script_timeout = float(re.search(r"timeout=([0-9.]+)", command[2]).group(1))
    assert script_timeout < live["timeoutSeconds"]  # the script's own timeout answers first, not the kubelet's
    window = live["periodSeconds"] * live["failureThreshold"]
    assert window <= ReadinessProbe.hang_s + live["periodSeconds"], window  # a hung pod restarted in ~15 s
    ready = triton["readinessProbe"]
    assert ready["periodSeconds"] * ready["failureThreshold"] <= window  # out of the Service before restarted


def _liveness_script() -> str:
    """The rendered Triton liveness script (it asks Triton's HTTP port, 8000)."""
    triton = by_kind(render(K8S / "overlays" / "cpu"), "Deployment")["triton"]["spec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in triton["ports"]}["http"] == 8000
    script = triton["livenessProbe"]["exec"]["command"][2]
    assert script.count("8000") == 1, script
    return script


@needs_kubectl
def test_triton_liveness_probe_fails_on_a_hang_not_on_a_model_loading() -> None:
    """The probe's own script, run here against stand-ins for Triton: ready (200) and not
    ready (400, a model loading) pass; a server that accepts the connection but never
    answers (a SIGSTOPped tritonserver) and no server at all fail, the hang within the
    script's timeout."""
    import http.server
    import socket
    import threading
    import time

    class Answer(http.server.BaseHTTPRequestHandler):
        status = 200

        def do_GET(self) -> None:
            self.send_response(self.status)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    script = _liveness_script()

    def probe(port: int) -> tuple[int, float]:
        """The script aimed at `port` instead of Triton's 8000: its exit code and duration."""
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-c", script.replace("8000", str(port))], capture_output=True,
                              timeout=30)
        return done.returncode, time.monotonic() - started

    for status in (200, 400):
        server = http.server.HTTPServer(("127.0.0.1", 0), type("Handler", (Answer,), {"status": status}))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            assert probe(server.server_port)[0] == 0, status
        finally:
            server.shutdown()
            server.server_close()
    with socket.socket() as hung:  # the kernel completes the handshake; nobody ever reads
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        code, seconds = probe(hung.getsockname()[1])
        waits = float(re.search(r"timeout=(\d+(?:\.\d+)?)", script).group(1))
        # it failed because its own timeout ran out, not sooner and not much later
        assert code != 0 and waits - 0.1 <= seconds < waits + 5, (code, seconds, waits)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert probe(port)[0] != 0


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
    command_lines = [json.loads(re.search(r"(?m)^CMD (.*)$", dockerfile).group(1)), compose_file()["services"]["gateway"]["command"]]
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


