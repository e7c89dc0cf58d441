#!/usr/bin/env bash
# The GPU checks, run on a lent CUDA machine (the device tool) from the repository root:
#
#     bash benchmarks/gpu_checks.sh [STEP...]   # steps: tests kernels sweep attention steps sit arsit
#                                              # (ARGS_steps="--methods sit" passes arguments to the steps step)
#                                              # (default: all but sweep)
#
# The machine has torch and Triton but none of our other dependencies, and no network: the few
# small wheels the imported modules need are carried in an ignored .whl/ folder (`make gpu-wheels`
# makes it; RESULTS.md, "Kernels on an H100", lists them), and the package is imported from the working tree through
# links (no install). Ray's wheel is too large to carry, so the NCCL test does not run there.
# Each step writes its output to $OUT (default .c2f/gpu), runs under its own time limit (seconds:
# $LIMIT_<step>, defaults below) so that one slow step cannot eat the others' device time, and a
# failing step does not stop the next; steps.txt records each step's exit status and seconds.
set -u -o pipefail
OUT=${OUT:-.c2f/gpu}
mkdir -p "$OUT"
steps=${*:-tests kernels attention steps sit arsit}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
pkg=$(mktemp -d)
mkdir "$pkg/coarse2fine" && cp c2f_root/__init__.py "$pkg/coarse2fine/"
for d in pipelines preprocess train evaluate; do ln -s "$PWD/$d" "$pkg/coarse2fine/$d"; done
export PYTHONPATH="$pkg:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
declare -A limit=([tests]=120 [kernels]=90 [sweep]=300 [attention]=60 [steps]=150 [sit]=120 [arsit]=100)
for step in $steps; do
    echo "== $step"
    case $step in
        tests) cmd=(-m pytest -p no:cacheprovider -q tests/test_kernels.py tests/test_gpu.py -k "not nccl"); log=pytest.txt ;;
        kernels) cmd=(benchmarks/bench_kernels.py); log=bench_kernels.md ;;
        sweep) cmd=(benchmarks/bench_kernels.py --sweep); log=bench_kernels_sweep.md ;;
        attention) cmd=(benchmarks/bench_attention.py); log=bench_attention.md ;;
        steps) cmd=(benchmarks/bench_train_step.py ${ARGS_steps:-}); log=bench_train_step.md ;;
        sit) cmd=(benchmarks/bench_sit.py --device cuda); log=bench_sit.md ;;
        arsit) cmd=(benchmarks/bench_arsit.py --device cuda); log=bench_arsit.md ;;
        *) echo "unknown step $step"; continue ;;
    esac
    var="LIMIT_$step"
    t0=$SECONDS
    # timeout signals the step's whole process group (compile workers included), then kills it 10 s later
    timeout -k 10 "${!var:-${limit[$step]}}" python3 "${cmd[@]}" 2>&1 | tee "$OUT/$log"
    rc=$?
    [ $rc -eq 124 ] && echo "== $step: over its time limit"
    echo "$step rc=$rc $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
done
