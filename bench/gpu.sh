#!/usr/bin/env bash
# bench/steps.py on a GPU: an OPT-1.3B-shaped causal LM with random weights built from its
# config (no hub), bfloat16, batch 8 x 128, LoRA r16 on q_proj/v_proj. Prints the step table
# with per-case peak memory and the memory ratios of the issue's GPU goals (ZO step vs
# inference, hybrid-LoRA vs FO-LoRA). Budget: under 5 minutes (model init on the device,
# one warm-up round and 5 round-robin repeats of ~25 cases).
#
# First the tests marked `gpu` (every perturbation source and the blocked linear layers on
# the device; about a minute), where pytest is installed.
#
#   bash bench/gpu.sh                 # writes bench/out/{gpu_tests,steps_gpu}.txt (or $OUT/)
#   bash bench/gpu.sh --repeats 3     # extra arguments go to bench/steps.py
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY="${PYTHON:-.venv/bin/python}"
OUTDIR="${OUT:-bench/out}"
mkdir -p "$OUTDIR"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA device')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
if "$PY" -m pytest --version > /dev/null 2>&1; then
    timeout 180 "$PY" -m pytest -q -m gpu -rs 2>&1 | tee "$OUTDIR/gpu_tests.txt" || true
else
    echo "bench/gpu.sh: pytest is not installed here; the gpu-marked tests did not run"
fi
timeout 290 "$PY" bench/steps.py --model-config opt-1.3b --dtype bfloat16 --device cuda \
    --batch 8 --seq 128 --repeats 5 "$@" 2>&1 | tee "$OUTDIR/steps_gpu.txt"
