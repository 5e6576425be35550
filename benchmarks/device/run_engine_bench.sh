#!/usr/bin/env bash
# Issue 21's GPU measurements, run on a CUDA machine from the repository root, in at most 8 minutes:
#   bash benchmarks/device/run_engine_bench.sh OUT_DIR
# 1. engine parity on the GPU (tiny families, float32) and the 1B-shaped speed comparison
#    (engine, generate_batch on 512 items; today's loop and HF generate on 64 of them);
# 2. the 7B-shaped speed comparison at 128 slots (engine, generate_batch);
# 3. one paper-shaped candidate: four 7B-shaped sources, DARE-TIES, 1069 prompts, both residencies
#    (device residency is skipped, and says so, where the sources do not fit).
# Each step has its own timeout; the sum is the budget (480 s). JSON results and a log go to OUT_DIR.
set -u
out=${1:?OUT_DIR}; mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
left() { echo $(( 480 - ($(date +%s) - start) )); }
budget() { local want=$1 l; l=$(left); [ "$l" -lt "$want" ] && want=$l; [ "$want" -lt 10 ] && want=10; echo "$want"; }
{
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
echo "== engine parity vs HF generate on the GPU (tiny models, float32)"
timeout "$(budget 40)" python3 tests/core/test_engine_gpu.py 2>&1 | tail -6
echo "== 1B shape ($(left) s left)"
timeout "$(budget 150)" python3 benchmarks/generation_speed.py --shape 1b --items 512 --slots 256 --batch-size 64 \
  --baseline-items 64 --json "$out/generation_speed_1b.json"
echo "== 7B shape ($(left) s left)"
timeout "$(budget 110)" python3 benchmarks/generation_speed.py --shape 7b --items 384 --slots 128 \
  --tools engine,generate_batch --json "$out/generation_speed_7b.json"
echo "== paper-shaped candidate ($(left) s left)"
timeout "$(budget 170)" python3 benchmarks/candidate_gpu.py --shape 7b --items 1069 --slots 128 \
  --residency pinned,device --json "$out/candidate_gpu.json"
echo "== done in $(( $(date +%s) - start )) s"
} 2>&1 | tee "$out/run_engine_bench.log"
