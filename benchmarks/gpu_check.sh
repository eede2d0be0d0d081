#!/usr/bin/env bash
# The one prepared run for a lent GPU (H100 or H200), version 2: what has never been measured
# first, every stage writing its results as it finishes, the whole under 8 minutes.
#   bash benchmarks/gpu_check.sh
# Results, each naming device, versions and commit (with a dirty flag), go to
# benchmarks/results/ and, after every stage, into $OUT/gpu_results.tar when the device tool sets
# $OUT — a run cut off by its time limit still returns what it measured.
# Stages, in order (GPU_CHECK_STAGES picks some; each has its own limit and the run stops
# starting new ones once BUDGET seconds, default 450, are spent):
#   onepass  the one-pass fused DoRA loss (never run on a GPU) at 16 × 1024, llama3-8b, bfloat16: its
#            time against the scored bare matmuls, the recompute path, Liger's DPO loss and fused
#            linear cross-entropy, and its CUDA tests
#   train    the whole DPO step (benchmarks/train_step.py --device cuda): Qwen2.5-0.5B's shape, all 24
#            layers, bfloat16, 8192-token micro-batches, 2 accumulation steps: robalign's
#            DoRADPOTrainer against TRL's DPOTrainer with and without use_liger_kernel, and Liger's
#            fused DPO loss in a plain loop (tokens/s, peak memory above the model, first losses checked)
#   softcap  a Gemma-style soft-capped head (c = 30) at 16 × 1024, llama3-8b, bfloat16: robalign's
#            chunked op and one-pass loss against materialised logits, TRL's fused head, Liger FLCE and
#            CCE with their soft-caps, and robalign's paths without the cap in the same run (the cap's
#            cost on a GPU: the row kernels apply it, never measured there)
#   tests    CUDA tests: kernels, reliability, property test, sync-free step under
#            torch.cuda.set_sync_debug_mode("error"), torch.compile, no recompilation
#   linear   the honest fused-linear sweep: both floors (all and scored tokens), prompt and padding
#            fractions 1/8, 0, 1/2, 1/4 + 1/4, against TRL's fused head, Liger (DPO with a
#            reference model, chunk 1 and 4; fused linear cross-entropy) and Cut Cross-Entropy
#   logits   the logits path at 4096 and 16384 × 128256 with host µs per call, TRL's
#            selective_log_softmax as the baseline, sequence_logps_with_ref, the masked sweep
#   fwd      the forward-only headline shapes (how reference log-probs are computed)
#   packed   packed input (cu_seqlens)
#   long     long sequences: 8 × 8192 tokens
#   models   Qwen2.5-7B and Mistral-7B shapes (logits and linear)
#   chunks   the fused linear path's chunk size, by the rule and at fixed budgets
#   charts   the charts of the JSON written
# ROBALIGN_COMMIT (and ROBALIGN_DIRTY=1) name the commit measured where the copy's .git is not
# this checkout's. The machine has no network: wheels of what it lacks (TRL, accelerate,
# Liger-Kernel, Cut Cross-Entropy, datasets and two of its dependencies) are in
# benchmarks/wheels/ and installed, without dependencies, only where not importable.
# Before a GPU session, `make test-gpu-versions` runs the test suite on CPU under this machine's
# versions (torch 2.11, Triton 3.6, transformers 5.17): what they refuse is found there, not here.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
export PYTHONUNBUFFERED=1 ROBALIGN_NO_JIT=1
status=0
sync_out() {       # $OUT takes at most 8 files: one tarball, rewritten after every stage
  if [ -n "${OUT:-}" ]; then (cd "$RESULTS" && tar -cf "$OUT/gpu_results.tar.tmp" gpu_* && mv "$OUT/gpu_results.tar.tmp" "$OUT/gpu_results.tar"); fi
  return 0
}
STAGES=" ${GPU_CHECK_STAGES:-onepass train softcap tests linear logits fwd packed long models chunks charts} "
stage() {  # stage KEY SECONDS LOG COMMAND...
  local key=$1 limit=$2 log=$3; shift 3
  [[ "$STAGES" == *" $key "* ]] || { echo "== $key skipped (GPU_CHECK_STAGES)"; return 0; }
  if [ "$SECONDS" -ge "$BUDGET" ]; then echo "== $key skipped: ${SECONDS}s of the ${BUDGET}s budget spent"; status=1; return 0; fi
  echo "== $key (limit ${limit}s, at ${SECONDS}s) $(date -Iseconds)"
  timeout "$limit" "$@" 2>&1 | tee "$RESULTS/$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $key FAILED (exit $rc)"; status=1; }
  sync_out
}

{
  echo "date: $(date -Iseconds)"
  echo "commit: ${ROBALIGN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}$( [ "${ROBALIGN_DIRTY:-0}" = 1 ] || ! git diff --quiet -- . ':(exclude)benchmarks/results' 2>/dev/null && echo ' (with uncommitted changes)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} | tee "$RESULTS/gpu_env.txt"

SITE=/tmp/robalign_site
for wheel in benchmarks/wheels/*.whl; do
  pkg=$(basename "$wheel" | cut -d- -f1)
  $PY -c "import $pkg" 2>/dev/null || $PY -m pip install -q --no-deps --no-index --target "$SITE" "$wheel"
done
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import trl, liger_kernel, cut_cross_entropy; print('trl', trl.__version__, 'liger', liger_kernel.__version__ if hasattr(liger_kernel, '__version__') else '0.8.5', 'cce', cut_cross_entropy.__version__)" \
  2>&1 | tee -a "$RESULTS/gpu_env.txt"

# robalign from this checkout; the C++ extension is not needed for the GPU path (CI tests it).
ROBALIGN_BUILD_EXT=0 $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . \
  || { echo "installing robalign failed"; sync_out; exit 1; }

G="$PY benchmarks"
stage onepass 90 gpu_one_pass.md bash -c "$G/gpu_linear.py --quick --masks 0.125/0 \
  --providers matmul_floor_scored,triton,recompute,one_pass,liger_dpo_c1,liger_flce --out /tmp/onepass && \
  $PY -m pytest tests/test_one_pass.py -k 'triton-cuda or torch' -p no:cacheprovider -q"
stage train 150 gpu_train_step.md $G/train_step.py --device cuda --models qwen2.5-0.5b --micro 8192 \
  --dtypes bfloat16 --arms robalign,trl,trl_liger,liger --layers 0 --steps 2 --warmup 1 --out "$RESULTS"
stage softcap 45 gpu_softcap.md $G/gpu_linear.py --quick --masks 0.125/0 --softcap 30 \
  --providers naive,trl_fused,matmul_floor_scored,triton,triton_uncapped,one_pass,one_pass_uncapped,liger_flce,cce \
  --out "$RESULTS"
stage tests 120 gpu_tests.log $PY -m pytest tests/test_logits_backends.py tests/test_linear_backends.py \
  tests/test_one_pass.py tests/test_head_transform.py \
  tests/test_kernel_reliability.py tests/test_property_backends.py tests/test_sync_free.py \
  -k "triton-cuda or torch-cuda or recompile or property or sync" -p no:cacheprovider
stage linear 170 gpu_linear.md $G/gpu_linear.py --out "$RESULTS"
stage logits 110 gpu_logits.md $G/gpu_logits.py --model llama3-8b --tokens 4096,16384 --out "$RESULTS"
stage fwd 60 gpu_fwd.md bash -c "$G/gpu_logits.py --mode fwd --quick --masks 0.125/0 --out '$RESULTS' && \
  $G/gpu_linear.py --mode fwd --quick --masks 0.125/0 --out '$RESULTS'"
stage packed 30 gpu_packed.md $G/gpu_logits.py --packed --quick --masks 0.125/0 --providers torch,triton,triton_inplace --out "$RESULTS"
stage long 40 gpu_long.md $G/gpu_logits.py --tokens 65536 --seqlen 8192 --model llama3-8b --masks 0.125/0 \
  --providers trl,triton,triton_inplace,triton_with_ref --out "$RESULTS"
stage models 80 gpu_models.md bash -c "for m in qwen2.5-7b mistral-7b; do \
  $G/gpu_logits.py --quick --model \$m --masks 0.125/0 --out '$RESULTS' && \
  $G/gpu_linear.py --quick --model \$m --masks 0.125/0 --providers trl_fused,matmul_floor_scored,triton,liger_dpo_c1 --out '$RESULTS' || exit 1; done"
stage chunks 50 gpu_linear_chunk_sizes.log bash -c "for mb in rule 256 1024 4096; do echo \"ROBALIGN_CHUNK_MB=\$mb\"; \
  if [ \$mb = rule ]; then unset ROBALIGN_CHUNK_MB; else export ROBALIGN_CHUNK_MB=\$mb; fi; \
  $G/gpu_linear.py --quick --masks 0.125/0 --providers matmul_floor_scored,triton --out /tmp/chunks_\$mb | grep -E '^\\| [0-9]'; done"
if [[ "$STAGES" == *" charts "* ]]; then
  echo "== charts"
  $PY benchmarks/plot.py "$RESULTS"/gpu_logits_*.json "$RESULTS"/gpu_linear_*.json || status=1
  sync_out
fi
echo "== done in ${SECONDS}s (budget ${BUDGET}s; the device tool's limit is 8 minutes)"
exit $status
