#!/usr/bin/env bash
# One command that checks what only a GPU can show, on whatever CUDA device is
# present; under 5 minutes on one GPU. Prints PASS or FAIL per item and exits
# non-zero when any item fails (2 when there is no CUDA device at all).
#
#   bash scripts/gpu_check.sh            # from the repository root
#
# Items: the test suite's GPU tier (`pytest -m gpu`: fast vs plain path,
# exact resume, render-only against the CPU, the pinned host-memory ray path
# under a tiny device budget, out-of-memory fallback, a 2-process run), a
# 2-process torchrun training run (NCCL across two GPUs where there are two,
# gloo with both ranks on one GPU otherwise), and bench.py on the GPU against
# the original's code path in the same run.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${GPU_CHECK_LOG:-gpu_check_logs}
export NERF_NO_DOWNLOAD=1   # the GPU machine may be offline: LPIPS is then reported unavailable, nothing waits
mkdir -p "$log"

if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "SKIP: no CUDA device visible to torch ($(python -c 'import torch; print(torch.__version__)'))"
    exit 2
fi
python -c 'import torch; print("device:", torch.cuda.get_device_name(0), "x", torch.cuda.device_count(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)'

failed=0
item() {   # item NAME COMMAND...: runs it, logs to $log/NAME.txt, prints PASS/FAIL with the time taken
    local name=$1; shift
    local t0=$SECONDS
    if "$@" >"$log/$name.txt" 2>&1; then
        echo "PASS $name ($((SECONDS - t0)) s)"
    else
        echo "FAIL $name ($((SECONDS - t0)) s): see $log/$name.txt"; tail -n 15 "$log/$name.txt" | sed 's/^/    /'
        failed=1
    fi
}

item gpu_tests python -m pytest -q -m gpu tests/test_gpu.py -rs

ngpu=$(python -c 'import torch; print(min(torch.cuda.device_count(), 2))')
demo=$(mktemp -d)
item torchrun_2_processes python -m torch.distributed.run --standalone --nproc_per_node 2 run_nerf.py \
    --config configs/demo.txt --datadir "$demo/data/demo" --basedir "$demo/logs" --device cuda \
    --N_iters 200 --i_weights 200 --i_testset 200 --i_video 1000000
echo "     (backend: $([ "$ngpu" -ge 2 ] && echo NCCL over 2 GPUs || echo gloo, both ranks on one GPU))"

item bench python bench.py --config configs/demo.txt --baseline
grep -E "steps/s|rays/s|matmul" "$log/bench.txt" | sed 's/^/    /'

exit $failed
