#!/usr/bin/env bash
# One prepared run for a lent GPU (under 6 minutes): the CUDA tests and the GPU benchmarks.
# Results, with device name, versions and commit, go to benchmarks/results/ (and to $OUT when
# the device tool sets it, so they come back):
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 ROBALIGN_NO_JIT=1
status=0

{
  echo "date: $(date -Iseconds)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee "$RESULTS/gpu_env.txt"

# robalign from this checkout; the C++ extension is not needed for the GPU path (CI tests it).
ROBALIGN_BUILD_EXT=0 $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . || status=1

# CUDA tests: the Triton kernels compiled on CUDA tensors (logits and fused linear paths) and
# torch.compile of DoRALoss.
timeout 180 $PY -m pytest tests/test_logits_backends.py tests/test_linear_backends.py -k "triton" -p no:cacheprovider -q 2>&1 \
  | tee "$RESULTS/gpu_tests.log" || status=1

# The logits-path sweep against the naive path and the copy-bandwidth floor.
timeout 150 $PY benchmarks/gpu_logits.py --out "$RESULTS" 2>&1 | tee "$RESULTS/gpu_logits.md" || status=1

# The fused linear path against the naive path, the bare matmuls and Liger-Kernel (its wheel is
# kept in benchmarks/wheels/: the GPU machine has no network).
$PY -m pip install -q --no-deps --no-index --target /tmp/liger benchmarks/wheels/liger_kernel-*.whl \
  && export PYTHONPATH=/tmp/liger${PYTHONPATH:+:$PYTHONPATH}
timeout 150 $PY benchmarks/gpu_linear.py --out "$RESULTS" 2>&1 | tee "$RESULTS/gpu_linear.md" || status=1

if [ -n "${OUT:-}" ]; then cp "$RESULTS"/gpu_* "$OUT"/ 2>/dev/null; fi
exit $status
