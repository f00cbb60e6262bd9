#!/usr/bin/env bash
# The in-process INT8 timing and the export's time again, while the machine was quiet; from the repository root.
set -euo pipefail
R=bench/records
note() { echo "== $(date -u +%FT%TZ) $*; load: $(cut -d' ' -f1-3 /proc/loadavg)"; ps -eo pcpu,args --sort=-pcpu | head -6 | cut -c1-150; }
note int8_speed
.venv/bin/python -m cliplora.loadtest.int8_speed --repository $R/repo --fp32 pets-base --int8 pets-base-int8 \
  --batches 1,8 --runs 12 --threads 2 > $R/quiet-int8-in-process.json
for i in 1 2 3; do
  note "export run $i"
  /usr/bin/time -f "%e s wall, %M KB maxrss" -o $R/quiet-export-run$i.time .venv/bin/cliplora export --model ViT-B-16 \
    --lora $R/inputs/lora_demo.pt --classes $R/inputs/classes.txt --name b16-lora --repository $R/quiet-export-repo \
    --allow-random-weights --quiet > $R/quiet-export-run$i.json
done
note done
