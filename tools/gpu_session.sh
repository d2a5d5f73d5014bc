#!/usr/bin/env bash
# The whole GPU session in one device call; everything it writes goes under $OUT, in the four
# files that come back from there (session.log, table.md, results.json, logs.tar.gz):
#   tools/gpu_session.sh              # on the GPU machine, from the repository root (README "GPU")
#   tools/gpu_session.sh --dry-run    # here, on the CPU: the same steps, tiny sizes (OUT: a temp folder)
#   GPU_SESSION_SECONDS=150 tools/gpu_session.sh --only compiled   # a follow-up call: some parts again
# 1. versions: python, torch, CUDA, cuDNN, driver and card, before anything is installed
# 2. tools/gpu_install.py: what tools/pack_gpu.sh put in .device/ (carried) into /tmp/gpu-site
#    (dry run: unpacked into a temp folder for a check, not used)
# 3. tools/bench_gpu.py: pytest -m gpu, the EfficientNet-B0 recipe's epoch eager and compile=true,
#    the step, loader and run benchmarks, each part within its own time limit, the whole within
#    GPU_SESSION_SECONDS (default 540 of the call's 600); results are kept after every part.
# A step that fails is reported and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=""; [ "${1:-}" = "--dry-run" ] && { dry="--dry-run"; shift; }  # other arguments go to bench_gpu.py
OUT=${OUT:-$(mktemp -d /tmp/gpu-session.XXXX)}; mkdir -p "$OUT"
start=$(date +%s); seconds=${GPU_SESSION_SECONDS:-540}
py=${PYTHON:-python3}; work=${GPU_SESSION_WORK:-/tmp/gpu-session-work}; site=/tmp/gpu-site
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD

session() {
  echo "== versions ($(date -u +%FT%TZ))"
  "$py" -V; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2
  "$py" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN",
    torch.backends.cudnn.version(), "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")'
  "$py" -m pip list 2>/dev/null | grep -i -E '^(timm|accelerate|numpy|pillow|numba|opencv-python-headless|triton|pytest) ' \
    | tr -s ' ' | paste -sd ';' -
  echo "== install what .device/ carried ($(( $(date +%s) - start )) s in)"
  if [ -n "$dry" ]; then
    check=$(mktemp -d /tmp/gpu-site-check.XXXX)  # the carry unpacks and installs: checked, then removed
    "$py" tools/gpu_install.py --site "$check/site" --for-python 3.12 >/dev/null; rm -rf "$check"
  else
    lines=$("$py" tools/gpu_install.py --site "$site") && eval "$lines"
    "$py" -c 'import nvidia.dali as d; print("DALI", d.__version__)' 2>&1 | tail -1
    "$py" -c 'import ffcv.loader; print("FFCV importable")' 2>&1 | tail -1
  fi
  echo "== tools/bench_gpu.py ($(( $(date +%s) - start )) s in)"
  "$py" tools/bench_gpu.py $dry --out "$OUT" --work "$work" --cache-dir "$work/photos" \
    --budget $(( seconds - ($(date +%s) - start) )) "$@"
  echo "== done in $(( $(date +%s) - start )) s; under $OUT: $(ls "$OUT" | tr '\n' ' ')"
}

session "$@" 2>&1 | tee "$OUT/session.log"
