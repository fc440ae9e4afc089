#!/usr/bin/env bash
# One prepared run on a lent GPU machine (never needed by CI or the tests):
#   1. the lossless / sampling / attention / linear / tree suites on the GPU (SPARROW_TEST_DEVICE),
#   2. benchmarks/verify_cost.py on the GPU in fp32 and bf16.
# The machine's image has its own torch; the project's other pins travel as wheels in .whl/
# (transformers, av: see /work/.library/device/README.md). Results land in $OUT (or ./gpu-out).
#
#   bash benchmarks/gpu_run.sh TAG        # TAG names the card in the result files, e.g. h200
set -uo pipefail
tag=${1:?usage: gpu_run.sh TAG (e.g. h200)}
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/gpu.txt"

SPARROW_TEST_DEVICE=cuda timeout 200 python3 -m pytest -p no:cacheprovider -q -x \
    tests/speculative/test_lossless.py tests/speculative/test_sampling.py tests/runtime/test_attention.py \
    tests/runtime/test_linear.py tests/speculative/test_tree.py 2>&1 | tail -25 | tee "$out/tests_cuda.txt"

for dtype in float32 bfloat16; do
    suffix=$tag; [ "$dtype" = bfloat16 ] && suffix=${tag}_bf16
    timeout 140 python3 benchmarks/verify_cost.py --device cuda --dtype "$dtype" --tag "$suffix" \
        --out "$out" --reps 20 --reps-long 20 --rate-reps 10 --compare sdpa+static sdpa+dynamic \
        2>&1 | tail -30
done
