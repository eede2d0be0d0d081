#!/usr/bin/env bash
# One prepared run for a lent GPU: the CUDA tests and the GPU benchmarks (205 s on an H100 before
# the forward-only sweeps were added, an estimated 4-5 minutes with them; the budget is 6).
# Results, with device name, versions and commit, go to benchmarks/results/ (and to $OUT when
# the device tool sets it, after every stage, so a stage that runs out of time loses nothing):
#   bash benchmarks/gpu_check.sh
# Stages, each with its own time limit; a failing stage is reported and the next one runs:
#   1. CUDA kernel tests: Triton and chunked-PyTorch backends on CUDA tensors, torch.compile
#   2. the logits-path sweep (benchmarks/gpu_logits.py) against the copy-bandwidth floor,
#      forward+backward then forward alone
#   3. the fused-linear sweep (benchmarks/gpu_linear.py) against the matmul floor and Liger-Kernel,
#      forward+backward then forward alone
#   4. the training tests (tests/test_train.py) on CUDA: DoRATrainer with the Triton path
#   5. the charts of the JSON written (benchmarks/plot.py)
# ROBALIGN_COMMIT names the commit measured where the copy's .git is not this checkout's.
# GPU_CHECK_STAGES picks stages (default "tests logits linear train").
# The GPU machine has no network: wheels of what it lacks (Liger-Kernel; datasets and its two
# missing dependencies) are kept in benchmarks/wheels/ and installed only where not importable.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 ROBALIGN_NO_JIT=1
status=0
# $OUT takes at most 8 files: the results travel as one tarball, rewritten after every stage.
sync_out() {
  if [ -n "${OUT:-}" ]; then (cd "$RESULTS" && tar -cf "$OUT/gpu_results.tar.tmp" gpu_* && mv "$OUT/gpu_results.tar.tmp" "$OUT/gpu_results.tar"); fi
  return 0
}
STAGES=" ${GPU_CHECK_STAGES:-tests logits linear train} "
stage() {  # stage KEY NAME SECONDS LOG COMMAND...
  local key=$1 name=$2 limit=$3 log=$4; shift 4
  [[ "$STAGES" == *" $key "* ]] || { echo "== $name skipped (GPU_CHECK_STAGES)"; return 0; }
  echo "== $name (limit ${limit}s) $(date -Iseconds)"
  timeout "$limit" "$@" 2>&1 | tee "$RESULTS/$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $name FAILED (exit $rc)"; status=1; }
  sync_out
}

{
  echo "date: $(date -Iseconds)"
  echo "commit: ${ROBALIGN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} | tee "$RESULTS/gpu_env.txt"

SITE=/tmp/robalign_site
for wheel in benchmarks/wheels/*.whl; do
  pkg=$(basename "$wheel" | cut -d- -f1)
  $PY -c "import $pkg" 2>/dev/null || $PY -m pip install -q --no-deps --no-index --target "$SITE" "$wheel"
done
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}

# robalign from this checkout; the C++ extension is not needed for the GPU path (CI tests it).
ROBALIGN_BUILD_EXT=0 $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . \
  || { echo "installing robalign failed"; sync_out; exit 1; }

stage tests "CUDA kernel tests" 150 gpu_tests.log \
  $PY -m pytest tests/test_logits_backends.py tests/test_linear_backends.py -k "triton-cuda or torch-cuda or recompile" -p no:cacheprovider
stage logits "logits sweep" 150 gpu_logits.md bash -c \
  "$PY benchmarks/gpu_logits.py --out '$RESULTS' && $PY benchmarks/gpu_logits.py --mode fwd --out '$RESULTS'"
stage linear "fused linear sweep" 200 gpu_linear.md bash -c \
  "$PY benchmarks/gpu_linear.py --out '$RESULTS' && $PY benchmarks/gpu_linear.py --mode fwd --out '$RESULTS'"
stage train "training on CUDA" 100 gpu_train.log \
  $PY -m pytest tests/test_train.py -m "not distributed" -p no:cacheprovider -p no:logging
echo "== charts"
$PY benchmarks/plot.py "$RESULTS"/gpu_logits_*.json "$RESULTS"/gpu_linear_*.json || status=1
sync_out
exit $status
