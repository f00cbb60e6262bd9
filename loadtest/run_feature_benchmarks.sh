#!/usr/bin/env bash
# The open-vocabulary and CPU INT8 benchmarks of docs/benchmarks.md, on the demo models of
# `make serve` (ViT-B-16, random weights unless CLIPLORA_DEMO_PRETRAINED; pets-lora with
# --open-vocabulary). Starts and stops the stacks it needs itself (default ports, so
# nothing else may hold them); writes bench/features/. Every step is one command, so each
# figure can be reproduced alone. About 30 minutes on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
CL=.venv/bin/cliplora
PY=.venv/bin/python
OUT=${OUT:-bench/features}
REPO=${REPO:-model_repository}
DURATION=${DURATION:-60}
mkdir -p "$OUT"

STACK=""
start_stack() {  # start_stack REPOSITORY LOGDIR: cliplora serve in the background, wait for SERVING
  $CL serve --repository "$1" --log-dir "$2" > "$2.out" 2>&1 &
  STACK=$!
  for _ in $(seq 240); do
    $PY deploy/docker/grpc_health_check.py 127.0.0.1:50051 >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "stack on $1 did not become ready" >&2; return 1
}
stop_stack() { if [ -n "$STACK" ]; then kill -INT "$STACK" 2>/dev/null || true; wait "$STACK" || true; STACK=""; fi; }
trap stop_stack EXIT

# 0. Inputs: the demo models, their INT8 twins, label files of 10 and 1000 labels.
$PY -m cliplora.demo --repository "$REPO"
$PY -m cliplora.demo --write-inputs "$OUT/inputs"
for pair in "pets-base-int8 none" "pets-lora-int8 $OUT/inputs/lora_demo.pt"; do
  set -- $pair
  [ -d "$REPO/$1" ] || $CL export --model ViT-B-16 --lora "$2" --classes "$OUT/inputs/classes.txt" \
    --template "a photo of a {}, a type of pet." --name "$1" --repository "$REPO" --target cpu-int8 \
    --uncalibrated --allow-random-weights --quiet > "$OUT/export-$1.json"
done
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
animals = ["aardvark", "albatross", "alpaca", "anteater", "antelope", "armadillo", "baboon", "badger", "beaver", "bison"]
(out / "labels10.txt").write_text("\n".join(animals) + "\n")
(out / "labels1000.txt").write_text("\n".join(f"{a} of kind {i}" for i in range(100) for a in animals) + "\n")
EOF

# 0b. INT8 vs fp32 in this process (no server): batch 1 and 8, interleaved, and the logits' distance.
$PY -m cliplora.loadtest.int8_speed --repository "$REPO" --fp32 pets-base --int8 pets-base-int8 --batches 1,8 \
  --runs 12 --threads 2 > "$OUT/int8-in-process.json"

start_stack "$REPO" "$OUT/logs-stack"
# 1. Open vocabulary, warm cache: the fixed head vs request-time labels, 10 and 1000 labels.
$CL loadtest --target 127.0.0.1:50051 --models pets-lora,pets-lora:labels --labels-file "$OUT/labels10.txt" \
  --concurrency 2 --duration "$DURATION" --warmup 10 --report "$OUT/labels10" --quiet
$CL loadtest --target 127.0.0.1:50051 --models pets-lora,pets-lora:labels --labels-file "$OUT/labels1000.txt" \
  --concurrency 2 --duration "$DURATION" --warmup 60 --report "$OUT/labels1000" --quiet
# 2. Cold cache: ten labels no call has sent before, every request (the cost per label).
$CL loadtest --target 127.0.0.1:50051 --models pets-lora,pets-lora:labels-cold --labels-file "$OUT/labels10.txt" \
  --concurrency 2 --duration "$DURATION" --warmup 10 --report "$OUT/labels10-cold" --quiet
# 3. The text encoder alone: prompts per second through Triton.
$PY -m cliplora.loadtest.text_throughput --triton 127.0.0.1:8001 --model pets-lora_text --batch 32 \
  --concurrency 2 --seconds 30 > "$OUT/text-throughput.json"
# 4. INT8 vs fp32 through the full stack, the same (base) model, interleaved.
$CL loadtest --target 127.0.0.1:50051 --models pets-base,pets-base-int8 --concurrency 2 --duration "$DURATION" \
  --warmup 10 --report "$OUT/int8-vs-fp32" --quiet
# 5. Merged INT8 vs base INT8 (zero overhead, INT8), with Prometheus' verdict.
$CL loadtest --target 127.0.0.1:50051 --models pets-base-int8,pets-lora-int8 --concurrency 2 --duration "$DURATION" \
  --warmup 10 --report "$OUT/int8-merge" --prometheus http://127.0.0.1:9090 --quiet || true
# 6. The stack (INT8) for the eager comparison below, then stop it.
$CL loadtest --target 127.0.0.1:50051 --models pets-base-int8 --concurrency 2 --duration 40 --report "$OUT/stack-int8" --quiet
$CL loadtest --target 127.0.0.1:50051 --models pets-base --concurrency 2 --duration 40 --report "$OUT/stack-fp32" --quiet
stop_stack

# 7. The hand-written PyTorch-eager server (same API), alone on the machine.
$PY -m cliplora.loadtest.eager_server --model ViT-B-16 --lora none --classes "$OUT/inputs/classes.txt" \
  --template "a photo of a {}, a type of pet." --name pets-base --port 50061 --allow-random-weights --workers 2 \
  > "$OUT/eager.log" 2>&1 &
EAGER=$!
for _ in $(seq 180); do grep -q "eager server on" "$OUT/eager.log" && break; sleep 1; done
$CL loadtest --target 127.0.0.1:50061 --models pets-base --concurrency 2 --duration 40 --report "$OUT/eager" --quiet
kill "$EAGER"; wait "$EAGER" || true

# 8. Spinning on vs off, one model and three models in the repository (INT8 base).
for variant in one-on one-off three-on three-off; do
  set -- ${variant/-/ }
  repo="$OUT/spin-$variant"
  rm -rf "$repo" && mkdir -p "$repo"
  names=(pets-base-int8)
  [ "$1" = three ] && names=(pets-base-int8 pets-lora-int8 pets-base)
  for name in "${names[@]}"; do
    cp -r "$REPO/$name" "$repo/$name"
    printf 'parameters {\n  key: "allow_spinning"\n  value {\n    string_value: "%s"\n  }\n}\n' "$2" >> "$repo/$name/config.pbtxt"
  done
  start_stack "$repo" "$OUT/logs-spin-$variant"
  if [ "$1" = three ]; then models=pets-base-int8,pets-lora-int8,pets-base; else models=pets-base-int8; fi
  $CL loadtest --target 127.0.0.1:50051 --models "$models" --concurrency 2 --duration 40 --warmup 10 \
    --report "$OUT/spin-$variant" --quiet
  stop_stack
done
echo "done: $OUT"
