#!/usr/bin/env bash
# The benchmark suite behind docs/benchmarks.md, on the demo models of `make serve`.
# Needs the stack running (`make serve` or `cliplora serve`) with Prometheus; writes bench/.
# Every step is one command, so each figure in the report can be reproduced alone.
set -euo pipefail
cd "$(dirname "$0")/.."
CL=.venv/bin/cliplora
PY=.venv/bin/python
OUT=${OUT:-bench}
DURATION=${DURATION:-60}
mkdir -p "$OUT"

# 0. Inputs: the demo adapter and classes; an --unmerged export of the same adapter; a copy
#    of the base model without dynamic batching. (Triton picks both up by polling.)
$PY -m cliplora.demo --write-inputs "$OUT/inputs"
if [ ! -d model_repository/pets-lora-unmerged ]; then
  $CL export --model ViT-B-16 --lora "$OUT/inputs/lora_demo.pt" --classes "$OUT/inputs/classes.txt" \
    --template "a photo of a {}, a type of pet." --name pets-lora-unmerged --unmerged \
    --allow-random-weights --quiet > "$OUT/export-unmerged.json"
fi
if [ ! -d model_repository/pets-base-nobatch ]; then
  rm -rf "$OUT/nobatch" && cp -r model_repository/pets-base "$OUT/nobatch"
  sed -i 's/name: "pets-base"/name: "pets-base-nobatch"/; /^dynamic_batching {/,/^}/d' "$OUT/nobatch/config.pbtxt"
  mv "$OUT/nobatch" model_repository/pets-base-nobatch
fi
sleep 8

# 1. base vs merged vs unmerged, interleaved, through the full stack, with Prometheus.
$CL loadtest --target 127.0.0.1:50051 --models pets-base,pets-lora,pets-lora-unmerged --concurrency 2 \
  --duration "$DURATION" --warmup 10 --report "$OUT/merge" --prometheus http://127.0.0.1:9090 --quiet

# 2. What the gateway and Triton cost: the same load on the full stack, Triton direct, in-process ORT.
$CL loadtest --target 127.0.0.1:50051 --models pets-base --concurrency 2 --duration 40 --report "$OUT/stack" --quiet
$CL loadtest --target 127.0.0.1:50051 --models pets-base --concurrency 2 --duration 40 --raw --report "$OUT/stack-raw" --quiet
$CL loadtest --target 127.0.0.1:8001 --direct-triton --models pets-base --concurrency 2 --duration 40 --report "$OUT/triton" --quiet
$CL loadtest --in-process model_repository --models pets-base --concurrency 1 --duration 40 --report "$OUT/ort" --quiet
$PY -m cliplora.loadtest.paths --gateway 127.0.0.1:50051 --triton 127.0.0.1:8001 --model pets-base --requests 30 > "$OUT/paths.json"

# 3. Concurrency 1/2/4/8 through the full stack.
for c in 1 2 4 8; do
  $CL loadtest --target 127.0.0.1:50051 --models pets-base --concurrency "$c" --duration 30 --report "$OUT/c$c" --quiet
done

# 4. Triton dynamic batching on vs off, interleaved, at concurrency 8.
$CL loadtest --target 127.0.0.1:50051 --models pets-base,pets-base-nobatch --concurrency 8 --duration "$DURATION" \
  --report "$OUT/batching" --quiet

# 5. The hand-written PyTorch-eager server (same API), alone on the machine's cores as far as possible.
$PY -m cliplora.loadtest.eager_server --model ViT-B-16 --lora none --classes "$OUT/inputs/classes.txt" \
  --template "a photo of a {}, a type of pet." --name pets-base --port 50061 --allow-random-weights --workers 2 \
  > "$OUT/eager.log" 2>&1 &
EAGER=$!
trap 'kill $EAGER 2>/dev/null || true' EXIT
for _ in $(seq 120); do grep -q "eager server on" "$OUT/eager.log" && break; sleep 1; done
$CL loadtest --target 127.0.0.1:50061 --models pets-base --concurrency 2 --duration 40 --report "$OUT/eager" --quiet
$CL loadtest --target 127.0.0.1:50051 --models pets-base --concurrency 2 --duration 40 --report "$OUT/stack-again" --quiet
echo "done: $OUT"
