#!/usr/bin/env bash
# One prepared session on a lent GPU machine (its image has torch, triton, transformers; no harmony).
# Each step runs under its own timeout and logs to $OUT (default ./gpu-out); a failing step does
# not stop the next. Steps: a CUDA sanity check, the Triton kernel tests compiled for the GPU,
# the tile sweep (bench/gpu_sweep.py: its choices go to $OUT/tuned.env, which the bench step reads),
# bench/gpu.py (kernel path with its profile and graph replay; the eager path when named), the
# model/engine tests with --device cuda, and those again with every not-yet-default GPU option on.
#
#   OUT=/tmp/out bash bench/gpu_session.sh [bench-seconds] [steps: sanity,kernels,sweep,bench,tests,variants] [bench paths]
set -u
OUT=${OUT:-./gpu-out}
BENCH_SECONDS=${1:-280}
STEPS=${2:-sanity,kernels,sweep,bench,tests,variants}
PATHS_=${3:-kernel kernel-nograph}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=. PYTHON=${PYTHON:-python3}
unset TRITON_INTERPRET

step() {  # step NAME SECONDS COMMAND...: run when NAME is in $STEPS
    local name=$1 seconds=$2
    shift 2
    case ",$STEPS," in *",$name,"*) ;; *) return 0 ;; esac
    echo "=== $name (≤ ${seconds}s) $(date -u +%T)"
    local t0=$SECONDS
    timeout --kill-after=5 "$seconds" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n "${TAIL:-25}" "$OUT/$name.log"
    echo "=== $name rc=$rc in $((SECONDS - t0))s"
}

step sanity 40 bash -c 'nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv;
  $PYTHON -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0));
import ossrun.engine.engine, ossrun.model.kernels.triton_moe, ossrun.model.kernels.triton_attention; print(\"imports ok\")"'
# The sm_90 compile test runs on the CPU machines (CI); here the kernels themselves run.
step kernels 180 $PYTHON -m pytest -q -p no:cacheprovider --device cuda tests/test_triton_kernels.py -k "not compile_for_hopper"
TAIL=80 step sweep 240 $PYTHON bench/gpu_sweep.py --env-out "$OUT/tuned.env"
# The sweep's choices: this run's, or (TUNED=path) a file an earlier call's sweep wrote, when the steps are split
# over two device calls (each call starts with an empty $OUT; copy the file into the checkout to carry it over).
TUNED_FILE="$OUT/tuned.env"
[ -s "$TUNED_FILE" ] || TUNED_FILE=${TUNED:-}
if [ -n "$TUNED_FILE" ] && [ -s "$TUNED_FILE" ]; then echo "tuned: $(tr '\n' ' ' <"$TUNED_FILE")"; . "$TUNED_FILE"; fi
TAIL=45 step bench "$BENCH_SECONDS" $PYTHON bench/gpu.py --paths $PATHS_ --eager-max-concurrency 1 --max-seconds 20 --profile
step tests 60 $PYTHON -m pytest -q -p no:cacheprovider --device cuda tests/test_engine.py tests/test_model.py
# The same with every not-yet-default GPU option on (tensor-core MoE, split keys, fused norm, PDL): a race or a wrong
# kernel shows as a failure here (graph vs eager steps, engine tokens vs the reference).
step variants 120 env OSSRUN_MOE_DECODE_KIND=mma OSSRUN_ATTN_DECODE_SPLITS=16 OSSRUN_GEMV_FUSE_NORM=1 OSSRUN_PDL=1 \
  $PYTHON -m pytest -q -p no:cacheprovider --device cuda tests/test_engine.py tests/test_model.py tests/test_triton_kernels.py \
  -k "not compile_for_hopper"
exit 0
