#!/usr/bin/env bash
# GPU speed check of the CAMEx models (issue 6), for a machine with one CUDA GPU. Budget: under 8 minutes.
#
#   1. benchmarks/bench_models.py on ViT-S/16 and Swin-T at 224 px, batch 256, bfloat16 (inference in bfloat16,
#      training under bfloat16 autocast with float32 weights): dense, Euclidean, SMoE top-2, CAMEx and
#      reparameterised CAMEx; images/s, ratios to dense, peak CUDA memory, FLOPs; 5 interleaved rounds (training
#      steps in all 5).
#   2. A short Swin-S (the paper's model: 8 experts in every other block of stages 3 and 4) training-throughput
#      check at batch 128: dense, Euclidean, SMoE and CAMEx training steps, 3 rounds.
#
# Results: benchmarks/results/bench_models_cuda_bfloat16_b256.{json,md} and ..._b128.{json,md}, plots in docs/img/.
# Each step has its own timeout, so the script cannot overrun its budget; a step that times out fails the script.
#
# Usage: bash benchmarks/gpu.sh            (PYTHON=/path/to/python to choose the interpreter)
#        GPU_SH_SMOKE=1 bash benchmarks/gpu.sh
#                                          the same two steps on the CPU at smoke size (batch 4, one round, nothing
#                                          saved): checks this script end to end without a GPU; its figures mean
#                                          nothing (about 75 s on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
device=(--device cuda)
smoke=()
if [[ "${GPU_SH_SMOKE:-0}" == 1 ]]; then
    device=(--device cpu)
    smoke=(--quick)
else
    "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible to torch")'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

start=$SECONDS
timeout 270 "$PYTHON" benchmarks/bench_models.py "${device[@]}" \
    --dtype bfloat16 --batch 256 --repeats 5 --train-repeats 5 --models vit_s swin_t "${smoke[@]}"
timeout 180 "$PYTHON" benchmarks/bench_models.py "${device[@]}" \
    --dtype bfloat16 --batch 128 --repeats 3 --train-repeats 3 --models swin_s --modes train \
    --variants dense euclid smoe camex "${smoke[@]}"
echo "gpu.sh: done in $((SECONDS - start)) s"
