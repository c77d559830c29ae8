#!/usr/bin/env bash
# The GPU checks in one run (a lent GPU machine is short-lived):
# the CUDA tests, the optimizer-step benchmark in fp32 and bf16 at >100M
# elements, a block-size sweep of the Triton kernel, and a fine-tune throughput
# run. Logs go to $OUT (or ./gpu_out). Needs torch with CUDA and triton;
# pytorch_optimizer is optional (wheels in .whl/ are installed if present).
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
run tests 150 python3 -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider
run step_fp32 110 python3 benchmarks/optimizer_step.py --device cuda --dtype float32 $big --rounds 9
run step_bf16 110 python3 benchmarks/optimizer_step.py --device cuda --dtype bfloat16 $big --rounds 9
run sweep 80 python3 benchmarks/fused_block_sweep.py --dtype float32
run finetune 110 python3 benchmarks/finetune_throughput.py --device cuda --preset smollm2-360m --amp bf16 --batch 8 --seq 1024 --rounds 7
echo "== done"
