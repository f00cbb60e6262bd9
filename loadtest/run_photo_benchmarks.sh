#!/usr/bin/env bash
# Phone photos (README and docs/benchmarks.md, "Phone photos"): the decode gate, the
# gateway's preprocessing throughput with --decode exact and fast side by side, and load
# tests with phone photos on the fp32 and cpu-int8 demo models, each through an exact and
# a fast gateway. Starts and stops what it needs (the local stack on its default ports
# and three more gateways on 50052-50054 / 9402-9404, so nothing else may hold them);
# writes bench/photos/. About 15 minutes on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
CL=.venv/bin/cliplora
PY=.venv/bin/python
OUT=${OUT:-bench/photos}
REPO=${REPO:-model_repository}
DURATION=${DURATION:-60}
TEMPLATE="a photo of a {}, a type of pet."
mkdir -p "$OUT/inputs"

PIDS=()
stop_all() { for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
             for pid in "${PIDS[@]}"; do wait "$pid" || true; done; PIDS=(); }
trap stop_all EXIT
start() {  # start PORT LOG ARGS...: a `cliplora serve` in the background, wait until it is SERVING
  local port=$1 log=$2; shift 2
  $CL serve --grpc-port "$port" --http-port 0 "$@" > "$log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 240); do
    $PY deploy/docker/grpc_health_check.py "127.0.0.1:$port" >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "cliplora serve on $port did not become ready (see $log)" >&2; return 1
}

# 0. Inputs: the demo models and the INT8 base; a tiny CLIP with a 224 input, so that the
#    model behind the gateway costs little and decoding sets the pace; demo and test images.
$PY -m cliplora.demo --repository "$REPO"
$PY -m cliplora.demo --write-inputs "$OUT/inputs"
[ -d "$REPO/pets-base-int8" ] || $CL export --model ViT-B-16 --lora none --classes "$OUT/inputs/classes.txt" \
  --template "$TEMPLATE" --name pets-base-int8 --repository "$REPO" --target cpu-int8 --uncalibrated --allow-random-weights \
  --quiet > "$OUT/export-pets-base-int8.json"
cat > "$OUT/inputs/tiny224.json" <<'JSON'
{"embed_dim": 64, "quick_gelu": true,
 "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
JSON
[ -d "$REPO/tiny224" ] || $CL export --model "$OUT/inputs/tiny224.json" --lora none \
  --classes "$OUT/inputs/classes.txt" --name tiny224 --repository "$REPO" --allow-random-weights \
  --quiet > "$OUT/export-tiny224.json"
$PY -m cliplora.finetune.demo_data "$OUT/demo-shapes" --per-class 10
$PY - "$OUT/test-images" <<'PY'
import sys
from pathlib import Path

from tests.images import make_image  # the tests' images, at the sizes tests/test_preprocess.py uses

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
for w, h in [(224, 224), (225, 224), (224, 225), (300, 200), (200, 301), (1, 1), (17, 999), (640, 480),
             (1001, 333), (223, 224), (226, 226)]:
    make_image(w, h, seed=w * 7 + h).save(out / f"{w}x{h}.jpg", quality=90)
PY

# 1. The gate: fast vs exact through the published fp32 graph, candidate gaps 1.5, 2, 3, 4.
$PY -m cliplora.loadtest.decode_gate --repository "$REPO" --name pets-lora --per-size 8 \
  --folder demo-shapes="$OUT/demo-shapes" --folder test-images="$OUT/test-images" > "$OUT/gate.json"

# 2. The stack (its gateway: --decode fast, the default, one thread per core) and three
#    gateways on its Triton: exact and fast with one decoding thread each, exact with the default.
start 50051 "$OUT/stack.log" --repository "$REPO" --log-dir "$OUT/logs"
start 50052 "$OUT/gateway-exact-1.log" --triton-url 127.0.0.1:8001 --metrics-port 9402 --decode exact --preprocess-workers 1
start 50053 "$OUT/gateway-fast-1.log" --triton-url 127.0.0.1:8001 --metrics-port 9403 --decode fast --preprocess-workers 1
start 50054 "$OUT/gateway-exact.log" --triton-url 127.0.0.1:8001 --metrics-port 9404 --decode exact

# 3. Preprocessing of 12 MP photos per core, exact and fast at the same time: two loads on
#    tiny224, each keeping its one-thread gateway busy; the window opens after photo
#    generation and warm-up.
$CL loadtest --target 127.0.0.1:50052 --models tiny224 --images photos --concurrency 2 --duration 90 \
  --warmup 10 --report "$OUT/rate-exact" --quiet > /dev/null &
LOAD_EXACT=$!
$CL loadtest --target 127.0.0.1:50053 --models tiny224 --images photos --concurrency 2 --duration 90 \
  --warmup 10 --report "$OUT/rate-fast" --quiet > /dev/null &
LOAD_FAST=$!
sleep 30
echo "rate start: $(uptime)" >> "$OUT/machine-load.txt"  # the machine may be shared: its load, said beside the figures
$PY -m cliplora.loadtest.decode_rate --gateway exact=http://127.0.0.1:9402/metrics \
  --gateway fast=http://127.0.0.1:9403/metrics --seconds 60 > "$OUT/decode-rate.json"
wait "$LOAD_EXACT" "$LOAD_FAST"
echo "rate end: $(uptime)" >> "$OUT/machine-load.txt"

# 4. Load tests with phone photos: fp32 and cpu-int8 interleaved, through the fast (default)
#    gateway, then through the exact one.
$CL loadtest --target 127.0.0.1:50051 --models pets-base,pets-base-int8 --images photos --concurrency 2 \
  --duration "$DURATION" --warmup 10 --report "$OUT/photos-fast" --quiet
$CL loadtest --target 127.0.0.1:50054 --models pets-base,pets-base-int8 --images photos --concurrency 2 \
  --duration "$DURATION" --warmup 10 --report "$OUT/photos-exact" --quiet
echo "photos end: $(uptime)" >> "$OUT/machine-load.txt"
echo "done: $OUT"
