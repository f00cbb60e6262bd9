#!/usr/bin/env bash
# Accuracy, fp32 vs INT8, on the finetune demo data (docs/benchmarks.md, CPU INT8); from the repository root.
set -euo pipefail
R=bench/records/int8-eval
note() { echo "== $(date -u +%FT%TZ) $*; load: $(cut -d' ' -f1-3 /proc/loadavg)"; ps -eo pcpu,args --sort=-pcpu | head -6 | cut -c1-150; }
mkdir -p $R
note start
.venv/bin/python -m cliplora.finetune.demo_data $R/shapes --per-class 40
.venv/bin/cliplora finetune --model ViT-B-32 --allow-random-weights --data $R/shapes --shots 4 --iterations 20 \
  --output $R/run --quiet > $R/finetune.json
note export
.venv/bin/cliplora export --model ViT-B-32 --allow-random-weights --lora $R/run/lora.pt --classes $R/run/classes.txt \
  --template 'a photo of a {}.' --name shapes-portable --repository $R/repo --quiet > $R/export-portable.json
.venv/bin/cliplora export --model ViT-B-32 --allow-random-weights --lora $R/run/lora.pt --classes $R/run/classes.txt \
  --template 'a photo of a {}.' --name shapes-cpu-int8 --repository $R/repo --target cpu-int8 --calibration $R/shapes \
  --quiet > $R/export-cpu-int8.json
note evaluate
.venv/bin/cliplora evaluate --data $R/run/heldout.csv --name shapes-portable --name shapes-cpu-int8 --repository $R/repo \
  > $R/evaluate.json
note done
