#!/usr/bin/env bash
# The runs behind the records added on 2026-12-06 (docs/benchmarks.md); from the repository root.
set -euo pipefail
R=bench/records
note() { echo "== $(date -u +%FT%TZ) $*; load: $(cut -d' ' -f1-3 /proc/loadavg)"; ps -eo pcpu,args --sort=-pcpu | head -6 | cut -c1-150; }
note start
.venv/bin/python -m cliplora.demo --repository $R/repo
.venv/bin/python -m cliplora.demo --write-inputs $R/inputs
for pair in "pets-base-int8 none" "pets-lora-int8 $R/inputs/lora_demo.pt"; do
  set -- $pair
  note "export $1"
  .venv/bin/cliplora export --model ViT-B-16 --lora "$2" --classes $R/inputs/classes.txt \
    --template "a photo of a {}, a type of pet." --name "$1" --repository $R/repo --target cpu-int8 \
    --uncalibrated --allow-random-weights --quiet > $R/export-$1.json
done
note int8_speed
.venv/bin/python -m cliplora.loadtest.int8_speed --repository $R/repo --fp32 pets-base --int8 pets-base-int8 \
  --batches 1,8 --runs 12 --threads 2 > $R/int8-in-process.json
for i in 1 2 3; do
  note "export run $i"
  /usr/bin/time -f "%e s wall, %M KB maxrss" -o $R/export-run$i.time .venv/bin/cliplora export --model ViT-B-16 \
    --lora $R/inputs/lora_demo.pt --classes $R/inputs/classes.txt --name b16-lora --repository $R/export-repo \
    --allow-random-weights --quiet > $R/export-run$i.json
done
note done
