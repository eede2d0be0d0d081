#!/usr/bin/env bash
# What the CPU tests cannot reach, on a machine with >= 2 CUDA GPUs (never run yet: the GPU this
# project is lent is one chip):
#   1. tests/test_engines.py with ROBALIGN_MULTI_GPU=1: every launcher (torchrun, accelerate, two
#      nodes by rendezvous, DeepSpeed ZeRO-2/3) on NCCL against one process, plus the Trainer's own
#      --fsdp wiring and bfloat16 autocast with its collectives;
#   2. `robalign train --model` on 2 GPUs with --bf16: the attention implementation it picked
#      (flash_attention_2 when flash-attn is installed) and that the loss falls.
# Writes benchmarks/results/multi_gpu_<device>.log with the device, versions and commit.
#   bash benchmarks/multi_gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 2 ]; then echo "multi_gpu_check: needs >= 2 CUDA GPUs, found $GPUS"; exit 2; fi
DEVICE=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
LOG=benchmarks/results/multi_gpu_${DEVICE}.log
{
  echo "# multi_gpu_check $(date -Iseconds) commit $(git rev-parse --short HEAD) on $GPUS x $DEVICE"
  $PY -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
  $PY -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>/dev/null || echo "deepspeed: not installed"
  $PY -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null || echo "flash-attn: not installed"
  echo "## 1. launchers on NCCL against one process"
  ROBALIGN_MULTI_GPU=1 timeout 1200 $PY -m pytest tests/test_engines.py -p no:cacheprovider -rA 2>&1 | tail -40
  echo "## 2. robalign train --model on 2 GPUs, bf16"
  TMP=$(mktemp -d)
  $PY -c "from robalign.app.commands.train import embedded_model; m, t = embedded_model(); m.save_pretrained('$TMP/model'); t.save_pretrained('$TMP/model')"
  timeout 600 $PY -m torch.distributed.run --nproc-per-node 2 --standalone -m robalign train --model "$TMP/model" \
      --out "$TMP/run" --bf16 --max-steps 20 --batch-size 4 --grad-accum 2 --lr 5e-4 --logging-steps 10 2>&1 \
      | grep -E "attention:|trained|Error|error" | head -20
  $PY -c "import json; e = json.load(open('$TMP/run/summary.json'))['engine']; print('engine', e)"
} 2>&1 | tee "$LOG"
echo "written: $LOG"
