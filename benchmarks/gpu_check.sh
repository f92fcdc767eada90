#!/usr/bin/env bash
# The first run of schedany on a GPU: one prepared script, under 5 minutes on one CUDA
# device, that prints its figures for the report.
#
#   bash benchmarks/gpu_check.sh              # on a CUDA machine
#   bash benchmarks/gpu_check.sh --cpu-smoke  # the same steps, tiny, on a CPU (seconds)
#
# 1. `schedany train` on cuda for each control kind (none, logical_batch, gnts, gnts with
#    control.norm: sketch): exit code, wall time, steps, micro-steps, last train loss.
# 2. A 100 M-parameter byte transformer (d_model 1024, 8 layers): forward+backward time
#    per micro-step, the exact norm's time, and for m = 2^14, 2^16, 2^18 the sketch's time
#    (index_add path, and the CPU's per-block path for comparison) and its relative error
#    on the gradient norm (median, p99 over 50 hash seeds).
# 3. Two DDP ranks sharing the device (gloo): exact vs sketched GNTS, seconds per
#    optimizer step, DDP comm-hook calls per step, the sketch's error where it closed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

device=cuda
flags=()
if [[ "${1:-}" == "--cpu-smoke" ]]; then
  device=cpu
  flags=(--smoke)
elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--cpu-smoke]" >&2
  exit 2
fi

python - <<'PY'
import torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"torch {torch.__version__}, {name}")
PY
for check in jobs sketch ddp; do
  echo
  echo "== $check"
  start=$SECONDS
  timeout 240 python benchmarks/gpu_check.py "$check" --device "$device" ${flags[@]+"${flags[@]}"}
  echo "($check: $((SECONDS - start)) s)"
done
