#!/usr/bin/env bash
# GPU check of the engine: exactness tests on a CUDA device, then capture vs a training step in bf16.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root, on a machine with a CUDA GPU
#   GPU_RESULTS_DIR=/some/dir bash benchmarks/gpu_check.sh
#
# 1. Engine tests on CPU (the whole engine suite), then the architecture and LoRA exactness tests
#    again with DATAWORTH_TEST_DEVICE=cuda: every model runs on the GPU, in fp32 against torch.func
#    brute force, and in bf16 against fp32.
# 2. benchmarks/capture_throughput.py --device cuda --dtype bfloat16, train vs capture (paired and
#    fresh workers), on the GPT-2 small shape (batch 8 x 512 tokens) and on a ~1.1B Llama shape
#    (TinyLlama: 22 layers, hidden 2048, GQA 32/4, vocab 32000; batch 4 x 512 tokens). Results go to
#    $GPU_RESULTS_DIR (default: $OUT when set, else benchmarks/) as RESULTS_capture_gpu_*.md, never
#    over benchmarks/RESULTS_capture.md; copy the figures into its "GPU" section by hand.
# About 5 minutes on one H200 once the virtualenv exists. Uses PYTHON (default .venv/bin/python,
# else python3); torch must be a CUDA build there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
RESULTS="${GPU_RESULTS_DIR:-${OUT:-benchmarks}}"
mkdir -p "$RESULTS"

"$PYTHON" - <<'EOF'
import torch
assert torch.cuda.is_available(), f"no CUDA device visible to torch {torch.__version__}: this check needs a GPU"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
EOF

echo "== engine tests, CPU"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_engine_*.py tests/test_trainer_callback.py 2>&1 | tail -n 3
echo "== architecture and LoRA exactness tests, CUDA"
DATAWORTH_TEST_DEVICE=cuda "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_engine_architectures.py tests/test_engine_lora.py 2>&1 | tail -n 3

echo "== capture vs training step, GPT-2 small shape, bf16"
"$PYTHON" benchmarks/capture_throughput.py --device cuda --dtype bfloat16 --batch 8 --seq 512 --warmup 3 --reps 10 \
  --rounds 2 --paired-reps 20 --methods train,capture --output "$RESULTS/RESULTS_capture_gpu_gpt2.md" | tail -n 25
echo "== capture vs training step, ~1.1B Llama shape, bf16"
"$PYTHON" benchmarks/capture_throughput.py --device cuda --dtype bfloat16 --arch llama-1b --batch 4 --seq 512 --warmup 3 \
  --reps 10 --rounds 2 --paired-reps 20 --methods train,capture --output "$RESULTS/RESULTS_capture_gpu_llama1b.md" | tail -n 25
echo "results in $RESULTS/RESULTS_capture_gpu_gpt2.md and $RESULTS/RESULTS_capture_gpu_llama1b.md"
