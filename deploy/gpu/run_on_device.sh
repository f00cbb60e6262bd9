#!/usr/bin/env bash
# For the `device` tool (a lent H200): carry wheels the device image lacks, then run the
# GPU check. Prepare once here:
#   mkdir -p .gpu-wheels && .venv/bin/pip download --no-deps -d .gpu-wheels open_clip_torch==3.3.0 ftfy wcwidth
#   echo /.gpu-wheels/ >> .git/info/exclude
# then: device run, carry [".gpu-wheels"], command "bash deploy/gpu/run_on_device.sh".
# NOT RUN in the session that wrote it: no device machine was drawn for that task.
set -euo pipefail
python3 -m pip install --no-index --no-deps --quiet .gpu-wheels/*.whl
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
PYTHONUNBUFFERED=1 python3 deploy/gpu/bench_merge_cuda.py | tee "${OUT:-/tmp}/gpu_merge.json"
