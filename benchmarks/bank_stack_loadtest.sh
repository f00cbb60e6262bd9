#!/usr/bin/env bash
# The bank that benchmarks/peft_compare.py built, through the full serving stack: `cliplora serve`
# on its repository (gateway, Triton with dynamic batching, Prometheus), then
# `cliplora loadtest --models peftcmp@* --concurrency 8`: each request the next of the bank's
# adapters (round robin), 8 in flight, so Triton batches requests for different adapters.
#
#   benchmarks/bank_stack_loadtest.sh WORK OUTPUT [DURATION]
#
# WORK is peft_compare.py's --work folder (its bank is in WORK/repo). The loadtest report goes to
# OUTPUT/stack, the load averages to OUTPUT/stack-load.txt, and Triton's counts of the bank's
# inferences and executions (the batches dynamic batching formed) to OUTPUT/stack-triton.json.
# Ports are not the defaults, so a stack someone else runs on the machine is left alone. The
# stack is stopped on the way out.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$1
OUT=$2
DURATION=${3:-60}
CL=.venv/bin/cliplora
mkdir -p "$OUT"

$CL serve --repository "$WORK/repo" --grpc-port 50161 --http-port 0 --metrics-port 9161 --triton-ports 18100,18101,18102 \
  --prometheus-port 19161 --log-dir "$WORK/logs" 2> "$WORK/serve.log" &
SERVE=$!
trap 'kill -INT $SERVE 2>/dev/null || true; wait $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  grep -q "cliplora is serving" "$WORK/serve.log" && break
  kill -0 $SERVE 2>/dev/null || { cat "$WORK/serve.log" >&2; exit 1; }
  sleep 1
done
grep -q "cliplora is serving" "$WORK/serve.log" || { echo "the stack did not start in 10 minutes" >&2; exit 1; }

echo "before: $(cat /proc/loadavg)" > "$OUT/stack-load.txt"
$CL loadtest --target 127.0.0.1:50161 --models 'peftcmp@*' --concurrency 8 --duration "$DURATION" --warmup 10 \
  --report "$OUT/stack" --prometheus http://127.0.0.1:19161 --quiet
echo "after: $(cat /proc/loadavg)" >> "$OUT/stack-load.txt"
# Triton's own counts: inferences (images) over executions is the batch its dynamic batcher formed.
.venv/bin/python - "$OUT/stack-triton.json" <<'PY'
import json, re, sys, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:18102/metrics", timeout=10).read().decode()
counts = {}
for name, labels, value in re.findall(r'^(nv_inference_(?:count|exec_count|request_success))\{([^}]*)\} (\S+)$', text, re.M):
    if 'model="peftcmp"' in labels:
        counts[name] = counts.get(name, 0.0) + float(value)
counts["images_per_execution"] = round(counts["nv_inference_count"] / counts["nv_inference_exec_count"], 2)
json.dump(counts, open(sys.argv[1], "w"), indent=1)
print(counts)
PY
