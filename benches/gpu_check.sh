#!/usr/bin/env bash
# The tensor-core checks on a real GPU: the lane-layout truth table, fp16/bf16 conversions, mma.sync
# and the cp.async tile loop on CUDA must equal the emulator's bit for bit (tests/tensor_core.rs,
# cuda_truth_table_matches_the_emulator). A GPU machine may have no Rust toolchain, so:
#   benches/gpu_check.sh prepare    # on the build machine: test binary -> .gpu/tensor_core
#   benches/gpu_check.sh            # on the GPU machine: runs it, log in .gpu/gpu_check.log
# Needs libnvrtc there (DEEPIS_NVRTC, the nvidia-cuda-nvrtc-cu12 wheel, or the system's) and the driver.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu
if [ "${1:-}" = prepare ]; then
    bin=$(cargo test --release --test tensor_core --no-run --message-format=json 2>/dev/null \
        | sed -n 's/.*"executable":"\([^"]*tensor_core[^"]*\)".*/\1/p' | tail -1)
    [ -x "$bin" ] || { echo "gpu_check: no tensor_core test binary built" >&2; exit 1; }
    cp "$bin" .gpu/tensor_core
    echo "gpu_check: .gpu/tensor_core ready; run benches/gpu_check.sh on the GPU machine"
    exit 0
fi
[ -x .gpu/tensor_core ] || { echo "gpu_check: run 'benches/gpu_check.sh prepare' first (on a machine with cargo)" >&2; exit 1; }
log=.gpu/gpu_check.log
{
    echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>&1 || echo "nvidia-smi: not available"
    .gpu/tensor_core --test-threads 1 --nocapture 2>&1
} | tee "$log"
if grep -q "SKIPPED" "$log"; then
    echo "gpu_check: FAILED: the CUDA comparison was skipped (no GPU found)" >&2
    exit 1
fi
grep -q "test cuda_truth_table_matches_the_emulator ... ok" "$log" || { echo "gpu_check: FAILED" >&2; exit 1; }
echo "gpu_check: CUDA equals the emulator (log: $log)"
