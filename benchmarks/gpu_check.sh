#!/usr/bin/env bash
# The GPU checks of issue 27, for a machine with CUDA (under 8 minutes on one H100/H200):
#   1. the CUDA tests (pytest -m cuda): graph decoder, rollouts and select on CUDA equal to CPU captions for a
#      seed, bf16 agreement, NCCL broadcast between two ranks when two GPUs exist;
#   2. benchmarks/paper_scale.py --device cuda (ViT-B/32 + ClipCap over GPT-2 124M, batch 100, 40 tokens);
#   3. benchmarks/bf16_agreement.py --device cuda;
#   4. world-gpu for 20 updates.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (each step's output also goes to OUT_DIR/*.log)
set -uo pipefail
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
status=0
step() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$out/$name.log"
  echo "== $name: rc=$rc"
  [ $rc -eq 0 ] || status=1
}
step cuda_tests 150 $py -m pytest -q -m cuda tests -p no:cacheprovider
step paper_scale 200 $py benchmarks/paper_scale.py --device cuda --threads 8
step bf16_agreement 60 $py benchmarks/bf16_agreement.py --device cuda
gpus=$(nvidia-smi -L | wc -l)
single=()  # world-gpu wants 2 learner ranks + 2 rollout workers; on fewer GPUs its one-GPU form
[ "$gpus" -ge 4 ] || single=(--set runtime.weight_sync=colocated --set runtime.learner_workers=1)
step world_gpu 150 $py -m raycap.train --config world-gpu --out "$out/world-gpu" --set rl.steps=20 \
  --set eval.every=20 --set eval.report=false "${single[@]}"
exit $status
