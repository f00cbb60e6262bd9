#!/usr/bin/env bash
# Smoke test of the Compose stack on a GPU host, for a model exported with --target gpu:
#   deploy/compose/smoke_test.sh MODEL IMAGE.jpg
# Starts (or reuses) the stack, waits for the gateway's health, checks that Triton took the
# TensorRT accelerator and the warm-up, classifies IMAGE through the gateway and compares
# with `cliplora predict` (ONNX Runtime on this host's CPU), then looks for GPU metrics in
# Prometheus. Needs Docker + NVIDIA Container Toolkit, GRAFANA_ADMIN_PASSWORD, and
# `make install` (.venv) on the host.
# NOT RUN in the session that wrote it: its machines have no Docker daemon and no GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:?usage: smoke_test.sh MODEL IMAGE}
image=${2:?usage: smoke_test.sh MODEL IMAGE}
repository=${CLIPLORA_MODEL_REPOSITORY:-model_repository}
compose=(docker compose -f deploy/compose/compose.yaml)

"${compose[@]}" up -d --build
echo "waiting for the gateway to report SERVING (TensorRT engines build on first start) ..."
for _ in $(seq 1 180); do
  .venv/bin/python deploy/docker/grpc_health_check.py 127.0.0.1:50051 2>/dev/null && break
  sleep 5
done
.venv/bin/python deploy/docker/grpc_health_check.py 127.0.0.1:50051

curl -fsS "http://127.0.0.1:8000/v2/models/${model}/config" > /tmp/cliplora-config.json
.venv/bin/python - /tmp/cliplora-config.json <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
accelerators = config["optimization"]["execution_accelerators"]["gpu_execution_accelerator"]
assert accelerators and accelerators[0]["name"] == "tensorrt", "no TensorRT accelerator: exported without --target gpu?"
kinds = {group["kind"] for group in config["instance_group"]}
print("instance kinds:", kinds, "| warm-up:", [w["batch_size"] for w in config.get("model_warmup", [])])
assert "KIND_GPU" in kinds, "Triton placed the model on the CPU: is the GPU visible to the container?"
PY

.venv/bin/cliplora classify --target 127.0.0.1:50051 --model "$model" --top-k 0 "$image" > /tmp/cliplora-served.json
.venv/bin/cliplora predict --repository "$repository" --name "$model" --top-k 0 "$image" > /tmp/cliplora-local.json
.venv/bin/python - /tmp/cliplora-served.json /tmp/cliplora-local.json "$repository/$model" <<'PY'
import json, pathlib, sys
served, local = (json.load(open(p))[0]["predictions"] for p in sys.argv[1:3])
versions = [v for v in pathlib.Path(sys.argv[3]).iterdir() if v.name.isdigit()]
manifest = json.loads((max(versions, key=lambda v: int(v.name)) / "manifest.json").read_text())
tolerance = manifest.get("gpu_serving", {}).get("expected_tolerance_abs_logit")
by_index = {p["index"]: p["logit"] for p in local}
delta = max(abs(p["logit"] - by_index[p["index"]]) for p in served)
print(f"TensorRT FP16 (GPU) vs ONNX Runtime (CPU): max |dlogit| {delta:.4f}, top-1 {served[0]['label']} / {local[0]['label']}")
margin = local[0]["logit"] - local[1]["logit"]
assert served[0]["index"] == local[0]["index"] or margin < 2 * delta, "top-1 differs on a clear margin"
if tolerance is not None:  # a --target gpu export states what its FP16 engine may differ by
    assert delta <= tolerance, f"max |dlogit| {delta:.4f} over the manifest's fp16 tolerance {tolerance:.4f}"
PY

curl -fsS 'http://127.0.0.1:9090/api/v1/query?query=nv_gpu_utilization' | grep -q '"result":\[{' \
  && echo "Prometheus has Triton's GPU metrics" || { echo "no nv_gpu_utilization in Prometheus yet"; exit 1; }
docker compose -f deploy/compose/compose.yaml logs triton 2>&1 | grep -i "tensorrt" | tail -5 || true
echo "smoke test passed"
