#!/usr/bin/env bash
# The one script for a lent GPU (an H200): one call that decides, in under 5 minutes with Triton's
# cold compiles, so that one slot of device time can run it twice. In order (timeouts in brackets):
#   1. the kernel tests on the compiled kernel                                          [55 s]
#   2. the block-configuration sweep, its winners written to kernels/step_configs.json  [60 s]
#   3. benchmarks: the layer (fused, cuDNN, cuDNN persistent fp16 at B=16/24) and the step
#      (graphed fused, graphed cuDNN, eager cuDNN bf16, eager fp32, plain loop, matmul floor)  [50 s]
#   4. the full default run, 5 epochs (CUDA graphs + bf16 + the fused kernel)          [75 s]
#   5. 300 steps of --recipe small (dropout, tied, SGD): graphed too?                   [35 s]
#   6. python -m benchmarks.gpu_summary: PASS/FAIL lines and summary.json               [15 s]
# The timeouts add to 290 s; machine facts and registering the checkout take a few more.
# Exit 0 only when every part ran and every check passed. It downloads nothing: the only install
# registers this checkout (pip -e, --no-deps --no-index) so that kernels/ imports as fastlm.kernels.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# OUTDIR must be new or empty, or the OUTDIR of an earlier call, which is emptied first (so that a
# second call never reads the first one's records). PTB is git-ignored: on the device tool, carry
# data/ptb. The tool brings back at most 8 files:
#   bash benchmarks/gpu_check.sh /tmp/gpu; s=$?; cp /tmp/gpu/summary.json /tmp/gpu/step_configs.json /tmp/gpu/cuda-*.json $OUT/; tar czf $OUT/gpu_check.tgz -C /tmp gpu; exit $s
# then commit summary.json and the cuda-*.json under benchmarks/results/ and step_configs.json as kernels/.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
if [ -d "$out" ] && [ -n "$(ls -A "$out")" ]; then
    [ -f "$out/.gpu_check" ] || { echo "error: $out is not empty and not an earlier gpu_check OUTDIR: pass a new folder" >&2; exit 2; }
    rm -rf "${out:?}"/*
fi
mkdir -p "$out" && touch "$out/.gpu_check"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
py=${PYTHON:-python3}
status=0
step() { echo; echo "== $* ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
$py -m pip install -q --no-deps --no-index --no-build-isolation -e . >"$out/pip.txt" 2>&1 || { echo "could not register the checkout"; exit 2; }

step "kernel tests, compiled on CUDA"
timeout 55 $py -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "not compiles" 2>&1 | tee "$out/kernel_tests.txt"
echo "${PIPESTATUS[0]}" >"$out/kernel_tests.status"

step "block-configuration sweep (bf16, B=20 and B=64, H=1024, forward and backward, graph replays)"
timeout 60 $py -m benchmarks.tune_step --seconds 25 --report "$out/tune_step.json" 2>&1 | tee "$out/tune_step.txt" || status=1
cp kernels/step_configs.json "$out/"

step "layer and step benchmarks"
timeout 50 $py -m pytest -q -p no:cacheprovider benchmarks/test_lstm_layer.py benchmarks/test_train_step.py \
    --benchmark-only -k "(test_lstm_layer and B20-T30-E128-H1024 and not reference) or persistent or train" 2>&1 \
    | tee "$out/benchmarks.txt" || status=1
find benchmarks/results -name 'cuda-*.json' -newer "$out/.gpu_check" -exec cp {} "$out/" \;  # this call's only

step "the full default run: 5 epochs, CUDA graphs + bf16"
timeout 75 $py -m fastlm.train --out "$out/run-full" 2>&1 | tee "$out/train_full.txt" || status=1

step "300 steps of the small recipe: dropout, tied weights and SGD under CUDA graphs"
timeout 35 $py -m fastlm.train --recipe small --max-steps 300 --out "$out/run-small" 2>&1 | tee "$out/train_small.txt" \
    || status=1

step "summary"
timeout 15 $py -m benchmarks.gpu_summary "$out" || status=1
rm -f "$out"/run-*/*.pt  # large, and the summary has read them
exit $status
