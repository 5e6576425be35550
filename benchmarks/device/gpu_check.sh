#!/usr/bin/env bash
# The GPU checks of issue 10 (d), run on a CUDA machine from the repository root:
#   bash benchmarks/device/gpu_check.sh OUT_DIR [merge|fitness|all] [quick]
# (quick: skips the 1B comparison with the torch-ops path)
# Writes JSON results and a log into OUT_DIR.
set -u
out=${1:?OUT_DIR}; what=${2:-all}; quick=${3:-}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
if [ "$what" != fitness ]; then
  echo "== 3 x 7B-shaped TIES / DARE-TIES, fused kernels"
  timeout 150 python3 benchmarks/gpu_merge.py --shape 7b --methods ties,ties_select,dare_ties --json "$out/gpu_merge_7b.json"
  echo "== Triton merge kernels vs torch path on the GPU"
  timeout 100 python3 tests/core/test_triton_merge.py cuda 2>&1 | tail -4
  if [ -z "$quick" ]; then
  echo "== 3 x 1B-shaped, torch-ops path (EVOMERGE_TRITON=0) vs fused"
  EVOMERGE_TRITON=0 timeout 100 python3 benchmarks/gpu_merge.py --shape 1b --methods ties --repeats 1 --json "$out/gpu_merge_1b_torch.json"
  timeout 60 python3 benchmarks/gpu_merge.py --shape 1b --methods ties,dare_ties --json "$out/gpu_merge_1b_fused.json"
  fi
fi
if [ "$what" != merge ]; then
  echo "== fitness throughput, 1B-shaped model"
  timeout 180 python3 benchmarks/gpu_fitness.py --json "$out/gpu_fitness.json"
fi
