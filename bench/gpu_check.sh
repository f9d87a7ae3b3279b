#!/usr/bin/env bash
# The GPU check, in one call on a CUDA machine that has torch, triton, pytest and nvcc but no network:
#   1. build the C++/CUDA operators in place (no pip, no downloads),
#   2. `fused-sam check --device cuda`: every backend on the GPU held to the reference (and native CUDA to
#      native CPU, bit for bit), before anything else trusts them,
#   3. run the GPU tests (triton and native backends, CUDA-graph capture, >2^31-element span if it fits,
#      FSDP2 fully_shard on one GPU with NCCL, whole SAM steps captured in CUDA graphs),
#   4. time every method with `fused-sam bench` (end-to-end rows eager and graphed), each triton
#      operation with bench/gpu_triton.py, and telemetry on against off (bench/telemetry_cost.py),
#   5. print a short summary table last.
# Logs and JSON go to $OUT (default /tmp/fused_sam_gpu). Usage: bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/fused_sam_gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
status() { printf '%-34s %s\n' "$1" "$2" >>"$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/summary.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee -a "$OUT/summary.txt"

TESTS="tests/test_triton_gpu.py tests/test_amp_gpu.py tests/test_fsdp_gpu.py tests/test_capturable_gpu.py tests/test_telemetry_gpu.py"
start=$SECONDS
if [ "${NATIVE:-1}" = 0 ]; then
    status "build _C (CPU+CUDA ops)" "skipped (NATIVE=0)"
elif FUSED_SAM_CUDA=1 FUSED_SAM_NATIVE=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
    $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    status "build _C (CPU+CUDA ops)" "ok in $((SECONDS - start)) s"
    TESTS="$TESTS tests/test_native_gpu.py"
else
    status "build _C (CPU+CUDA ops)" "FAILED (see build.log)"
    tail -30 "$OUT/build.log"
fi

start=$SECONDS
timeout "${CHECK_TIMEOUT:-180}" $PY -m fused_sam check --device cuda --json "$OUT/check.json" >"$OUT/check.txt" 2>&1
status "fused-sam check (cuda)" "exit $? ($((SECONDS - start)) s): $(tail -1 "$OUT/check.txt")"

start=$SECONDS
timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
status "GPU tests" "$(tail -1 "$OUT/gpu_tests.log") ($((SECONDS - start)) s)"

start=$SECONDS
timeout "${BENCH_TIMEOUT:-240}" $PY -m fused_sam bench --full --device cuda --sets all --no-progress --out "$OUT/bench" \
    >"$OUT/bench.txt" 2>&1
status "fused-sam bench" "exit $? ($((SECONDS - start)) s)"

start=$SECONDS
timeout 150 $PY bench/gpu_triton.py >"$OUT/triton_ops.txt" 2>&1
status "bench/gpu_triton.py" "exit $? ($((SECONDS - start)) s)"

start=$SECONDS
timeout 90 $PY bench/telemetry_cost.py --device cuda --backend auto --rounds 3 >"$OUT/telemetry_cost.txt" 2>&1
status "bench/telemetry_cost.py (cuda)" "exit $? ($((SECONDS - start)) s)"

echo
echo "===== fused-sam check ====="; cat "$OUT/check.txt"
echo "===== fused-sam bench ====="; cat "$OUT/bench.txt"
echo "===== triton operations ====="; tail -25 "$OUT/triton_ops.txt"
echo "===== telemetry on/off ====="; cat "$OUT/telemetry_cost.txt"
echo "===== summary ====="; cat "$OUT/summary.txt"
