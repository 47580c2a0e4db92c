#!/usr/bin/env bash
# The one script for a lent GPU (an H200): one call that decides, in under 5 minutes with Triton's
# cold compiles, so that one slot of device time can run it twice. Its steps, in order, each with
# its timeout on the GPU:
#   machine       the GPU, driver and versions (a cold torch and Triton import)             [20 s]
#   register      pip install -e of this checkout (kernels/ imports as fastlm.kernels); when
#                 it fails, the rest runs from the checkout and the summary fails the step   [10 s]
#   kernel_tests  the kernel tests on the compiled kernel (opcheck and torch.compile: in CI)  [45 s]
#   compile       the sweep's candidates compiled in parallel, filling Triton's cache       [30 s]
#   tune          the block-configuration sweep, winners into kernels/step_configs.json      [30 s]
#   benchmarks    the layer (fused, cuDNN, cuDNN persistent fp16 at B=16/24) and the step
#                 (graphed fused, graphed cuDNN, eager cuDNN bf16, eager fp32, plain loop,
#                 matmul floor)                                                              [45 s]
#   run_full      the full default run, 5 epochs (CUDA graphs + bf16 + the fused kernel)     [70 s]
#   run_small     300 steps of --recipe small (dropout, tied, SGD): graphed too?             [30 s]
#   summary       python -m benchmarks.gpu_summary: one PASS/FAIL line per check, and
#                 summary.json                                                               [10 s]
# Worst case, every step cut at its timeout: 290 s, and 2 s more for each training run (the one
# process that catches the TERM, to save a checkpoint; timeout -k 2 kills it then): 294 s, under 300.
# Each step leaves OUTDIR/<step>.log and OUTDIR/<step>.status (its exit status: 124 when its timeout
# cut it); the summary checks every one. Exit 0 only when every check passed. It downloads nothing.
#
#   bash benchmarks/gpu_check.sh [--rehearse] OUTDIR
#
# --rehearse runs the same steps on the CPU before a GPU is lent: CUDA graphs simulated
# (FASTLM_SIMULATE_CUDA_GRAPHS=1), the kernel interpreted (TRITON_INTERPRET=1), no nvidia-smi, pip
# in --dry-run, tiny shapes, step counts and a corpus written here, the runs on --backend triton in
# bf16 where the CPU has bf16 units (fp32 elsewhere), and one step more: an eager fp32 run of the
# same tiny configuration, the perplexity reference. About a minute on 2 cores; tests/test_gpu_check.py
# runs it. GPU_CHECK_STEPS=step,step runs only those steps (and the summary), for tests.
#
# OUTDIR must be new or empty, or the OUTDIR of an earlier call, which is emptied first (so that a
# second call never reads the first one's records). PTB is git-ignored: on the device tool, carry
# data/ptb. The tool brings back at most 8 files:
#   bash benchmarks/gpu_check.sh /tmp/gpu; s=$?; cp /tmp/gpu/summary.json /tmp/gpu/step_configs.json /tmp/gpu/cuda-*.json $OUT/; tar czf $OUT/gpu_check.tgz -C /tmp gpu; exit $s
# then commit summary.json and the cuda-*.json under benchmarks/results/ and step_configs.json as kernels/.
set -uo pipefail
rehearse=0
if [ "${1:-}" = --rehearse ]; then rehearse=1; shift; fi
out=${1:?usage: bash benchmarks/gpu_check.sh [--rehearse] OUTDIR}
if [ -d "$out" ] && [ -n "$(ls -A "$out")" ]; then
    [ -f "$out/.gpu_check" ] || { echo "error: $out is not empty and not an earlier gpu_check OUTDIR: pass a new folder" >&2; exit 2; }
    rm -rf "${out:?}"/* "$out"/.gpu_check
fi
mkdir -p "$out" && out=$(cd "$out" && pwd)
if [ $rehearse = 1 ]; then echo rehearsal >"$out/.gpu_check"; else echo gpu >"$out/.gpu_check"; fi
cd "$(dirname "$0")/.."
repo=$PWD
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 BENCHMARK_RESULTS=$out  # the benchmarks' results land in OUTDIR
export COLUMNS=240  # pytest cuts its FAILED lines to the terminal's width, and the summary quotes them

# limit GPU_SECONDS REHEARSAL_SECONDS: a step's timeout in this mode
limit() { if [ $rehearse = 1 ]; then echo "$2"; else echo "$1"; fi; }

# step NAME SECONDS COMMAND...: run it under its timeout; its output to NAME.log, its exit status to NAME.status
step() {
    local name=$1 seconds=$2
    shift 2
    [ -z "${GPU_CHECK_STEPS:-}" ] || [[ ",$GPU_CHECK_STEPS,summary," == *",$name,"* ]] || return 0
    echo; echo "== $name ($(date +%T), at most $seconds s)"
    timeout -k 2 "$seconds" "$@" 2>&1 | tee "$out/$name.log"
    echo "${PIPESTATUS[0]}" >"$out/$name.status"
}

# Without the registration, fastlm.kernels does not exist (it is the folder kernels/): lay the
# checkout out as the install would, in OUTDIR/checkout (links), and run the other steps there.
run_from_checkout() {
    local copy=$out/checkout entry
    mkdir -p "$copy/fastlm"
    for entry in "$repo"/*; do [ "$entry" = "$repo/fastlm" ] || ln -s "$entry" "$copy/"; done
    ln -s "$repo"/fastlm/* "$copy/fastlm/"
    ln -s "$repo/kernels" "$copy/fastlm/kernels"
    cd "$copy" && export PYTHONPATH="$copy${PYTHONPATH:+:$PYTHONPATH}"
    echo "could not register the checkout: the other steps run from $copy" | tee -a "$out/register.log"
    $py -c "import fastlm.kernels; print('fastlm.kernels from', fastlm.kernels.__path__[0])" 2>&1 \
        | tee -a "$out/register.log"
}

pip_install=(-m pip install -q --no-deps --no-index --no-build-isolation -e .)
versions="import platform, torch, triton; print('cpu', platform.processor() or platform.machine(), 'torch', \
torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)"
if [ $rehearse = 1 ]; then
    export TRITON_INTERPRET=1 FASTLM_SIMULATE_CUDA_GRAPHS=1
    machine=($py -c "$versions")
    pip_install+=(--dry-run)  # the build backend runs, the environment is left as it is
    layer=B4-T3-E8-H16  # the default shape's test id in benchmarks/test_lstm_layer.py, as rehearsed
    table=$out/step_configs.json  # the committed table stays as it is
    cp kernels/step_configs.json "$table"
    $py -c "import sys; sys.path.insert(0, 'tests'); from conftest import write_corpus; from pathlib import Path; \
write_corpus(Path(sys.argv[1]), lines=(60, 12, 12))" "$out/corpus"
    # bf16 where the CPU multiplies it (the trainer refuses it elsewhere); either way the fused
    # kernel runs in graphed steps, the GPU's path
    amp=$($py -c "import torch; from fastlm.device import check_cpu_can_multiply; \
check_cpu_can_multiply(torch.bfloat16); print('bf16')" 2>/dev/null || echo off)
    tiny=(--data "$out/corpus" --batch-size 4 --seq-len 4 --eval-batch-size 3 --log-interval 10)
    full=("${tiny[@]}" --embed-size 16 --hidden-size 32 --epochs 2 --backend triton --amp "$amp")
    small=(--max-steps 6 "${tiny[@]}" --embed-size 16 --hidden-size 16 --backend triton --amp "$amp")
    jobs=2 sweep_seconds=30
else
    export TRITON_INTERPRET=0
    machine=(bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv && \
$py -c \"\$0\"" "$versions")
    layer=B20-T30-E128-H1024
    table=kernels/step_configs.json  # the benchmarks and runs after the sweep read its winners here
    full=()
    small=(--max-steps 300)
    jobs=8 sweep_seconds=20
fi

step machine "$(limit 20 20)" "${machine[@]}"
step register "$(limit 10 30)" $py "${pip_install[@]}"
[ "$(cat "$out/register.status" 2>/dev/null || echo 0)" = 0 ] || run_from_checkout
step kernel_tests "$(limit 45 120)" $py -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    -k "not compiles and not opcheck and not torch_compile"  # those two trace, device-independent: CI runs them
step compile "$(limit 30 60)" $py -m benchmarks.tune_step --compile-only --jobs $jobs
step tune "$(limit 30 60)" $py -m benchmarks.tune_step --jobs 0 --seconds $sweep_seconds --out "$table" \
    --report "$out/tune_step.json"
[ $rehearse = 1 ] || cp "$table" "$out/"
step benchmarks "$(limit 45 120)" $py -m pytest -q -p no:cacheprovider benchmarks/test_lstm_layer.py \
    benchmarks/test_train_step.py --benchmark-only \
    -k "(test_lstm_layer and $layer and not reference) or persistent or train"
step run_full "$(limit 70 90)" $py -m fastlm.train "${full[@]}" --out "$out/run-full"
step run_small "$(limit 30 45)" $py -m fastlm.train --recipe small "${small[@]}" --out "$out/run-small"
if [ $rehearse = 1 ]; then
    step run_reference 30 $py -m fastlm.train "${tiny[@]}" --embed-size 16 --hidden-size 32 --epochs 1 \
        --backend torch --amp off --no-cuda-graphs --out "$out/run-reference"
fi
step summary "$(limit 10 25)" $py -m benchmarks.gpu_summary "$out"
rm -f "$out"/run-*/*.pt  # large, and the summary has read them
[ "$(cat "$out/summary.status" 2>/dev/null)" = 0 ] || { echo "gpu_check: FAILED (see the FAIL lines above)"; exit 1; }
echo "gpu_check: every check passed"
