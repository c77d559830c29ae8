#!/usr/bin/env bash
# The GPU checks in one run of at most 8 minutes (a lent GPU machine is short-lived):
# the CUDA tests, the optimizer-step benchmark in fp32 and bf16 at >100M elements
# (with inverse_share), the host time of a step with 500 small tensors (real
# launches), and the Trainer-level step time of --optim dualadam against
# adamw_torch_fused (full and LoRA, bf16, SmolLM2-360M's architecture), and the
# compiled low-bit step (state_bits 8 and 4) against torchao's AdamW8bit/AdamW4bit,
# and torchao's CPUOffloadOptimizer around DualAdam against it around fused AdamW.
# Logs go to $OUT (or ./gpu_out). Needs torch with CUDA, triton, transformers and
# peft; torchao (for the low-bit step) and pytorch_optimizer are optional (wheels
# in .whl/ are installed if present).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PWD:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
big="--vocab 32000 --hidden 1024 --intermediate 2816 --layers 16"
run() { local name=$1; shift; echo "== $name"; timeout "$@" 2>&1 | tee "$OUT/$name.txt" | tail -n 40; }
start=$SECONDS
run tests 90 python3 -m pytest -m gpu tests/test_gpu.py tests/test_stochastic_round.py -q -rs -p no:cacheprovider
run step_fp32 60 python3 benchmarks/optimizer_step.py --device cuda --dtype float32 $big --rounds 7 --skip-probe
run step_bf16 50 python3 benchmarks/optimizer_step.py --device cuda --dtype bfloat16 $big --rounds 5 --skip-probe --only fused
run trainer 140 python3 benchmarks/trainer_step.py --device cuda --preset smollm2-360m --batch 8 --seq 1024 --rounds 3
run lowbit 80 python3 benchmarks/lowbit_state.py time --device cuda --rounds 7
run offload 50 python3 benchmarks/lowbit_state.py offload --device cuda --rounds 5
echo "== done in $((SECONDS - start)) s"
