#!/usr/bin/env bash
# Every GPU check of deepis in one short run, from binaries built elsewhere (a GPU machine may have
# no Rust toolchain):
#
#   bash benches/gpu_check.sh build        # on a machine with cargo: release binary + the test
#                                          # binaries, stripped, into .gpu/ (git-ignored, ~37 MB),
#                                          # and packed into .gpu.tar.xz (~8 MB) to carry
#   bash benches/gpu_check.sh run [DIR]    # on the GPU machine, in a copy of the repository that
#                                          # holds .gpu/ or .gpu.tar.xz (unpacked first): writes
#                                          # DIR/results.md and one log per step (DIR defaults to
#                                          # $OUT/gpu_check, else gpu_check_out)
#
# `run` does, each step under its own time limit (about 8 minutes in all on an H100/H200):
#   1. the machine: nvidia-smi, `deepis info` (CUDA device and NVRTC found);
#   2. `deepis kernels` for the GPU's architecture twice on an empty cubin cache (all compiled,
#      then all cached), with the occupancy table; the tensor-core kernels' inner loops in SASS
#      (benches/sass_loops.py with the machine's cuobjdump);
#   3. the CUDA tests: every op on the GPU against the CPU, forward and backward (ops_table), the
#      launch layer's shape errors (gpu_ops), the golden
#      cases through `deepis predict --backend cuda` and the second start compiling nothing (cuda),
#      the tensor-core truth table and products on CUDA equal to the emulator's bit for bit
#      (tensor_core), wgmma against float64 and the emulator (wgmma; sm_90), the tensor-core conv,
#      mma.sync and wgmma, within its derived error bound (tensor_conv), the GPU
#      plan on every golden case in fp32 / tf32 / fp16 / bf16 within its bounds (gpu_plan), the
#      copies on their own streams carrying each round's values (queues), segment's batches across
#      inputs bit for bit what each input gets alone (stream) and NVRTC's compile of every
#      kernel (nvrtc); of gpu_plan and tensor_conv only the tests on CUDA (their emulator tests,
#      a minute of device time, and kernel_cache's host-only ones run in CI);
#   4. napkin conv throughput of the CUDA variants (gpu_ops cuda_conv_throughput) and of the
#      tensor-core conv in fp16 / bf16 / tf32 (tensor_conv cuda_tensor_conv_throughput); the GPU
#      plan at batch 1 without the CUDA graph (--no-graph: the graph's gain); bf16 at batch 8 with
#      8 batches streamed in one run (--stream: the copies overlapped); the end-to-end folder
#      rate of `deepis segment --backend cuda` (files/s) at --batch 1 and 8, and the host's
#      ceiling on it (benches/host_pipeline.rs: the same stages with a network that costs nothing);
#   5. the comparison with PyTorch, benches/gpu_compare.sh published 10 1,8: deepis bench in
#      fp32 / tf32 / fp16 / bf16, tf32 / fp16 / bf16 with --wgmma and bf16 with --warp-tile m64,
#      batch 1 and 8, against PyTorch in
#      the same precisions, on the same weights (needs python3 with torch, numpy, safetensors;
#      RUNS=N changes the 10 timed runs; SKIP_COMPARE=1 leaves it out and benches deepis alone
#      in step 4 instead).
# It exits non-zero when any step fails, or when a test skipped (no GPU or NVRTC found; REQUIRE_GPU=0
# accepts that, to try the script on a machine without a GPU); results.md says which.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
gpu=$root/.gpu
# The test binaries each run as its own process; these are their cargo target names.
TESTS=(cuda ops_table gpu_ops tensor_core wgmma tensor_conv gpu_plan queues stream nvrtc)
# The name filter of a binary whose other tests run on the emulator alone (CI runs those).
declare -A ONLY=([gpu_plan]=cuda [tensor_conv]=cuda)

build() {
    set -e
    cargo build --release
    local json
    json=$(cargo test --release --no-run --message-format=json $(printf -- '--test %s ' "${TESTS[@]}"))
    rm -rf "$gpu"
    mkdir -p "$gpu/tests"
    strip -o "$gpu/deepis" target/release/deepis
    for t in "${TESTS[@]}"; do
        local exe
        exe=$(jq -r --arg t "$t" 'select(.reason == "compiler-artifact" and .target.name == $t
                                         and (.target.kind | index("test")) and .executable != null) | .executable' <<<"$json" | tail -1)
        [ -n "$exe" ] || { echo "gpu_check build: no test binary for $t" >&2; exit 1; }
        strip -o "$gpu/tests/$t" "$exe"
    done
    # the host's ceiling on the folder rate (benches/host_pipeline.rs), on the GPU machine's cores
    local bench
    bench=$(cargo bench --no-run --message-format=json --bench host_pipeline |
        jq -r 'select(.reason == "compiler-artifact" and .target.name == "host_pipeline" and .executable != null) | .executable' | tail -1)
    [ -n "$bench" ] || { echo "gpu_check build: no host_pipeline bench binary" >&2; exit 1; }
    mkdir -p "$gpu/benches"
    strip -o "$gpu/benches/host_pipeline" "$bench"
    # Test binaries find tests/data, kernels/testing and the deepis binary under the folder they
    # were built in (CARGO_MANIFEST_DIR): `run` links that path to the repository copy it runs in.
    {
        echo "MANIFEST_DIR=$root"
        echo "COMMIT=$(git rev-parse HEAD)$(git diff --quiet HEAD || echo '+changes')"
        echo "BUILT=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    } >"$gpu/build.env"
    du -sh "$gpu"
    # A GPU machine takes the working tree and what is carried with it, 64 MiB in all: the packed
    # binaries are a quarter of the folder.
    rm -f "$root/.gpu.tar.xz"
    XZ_OPT=-T0 tar -C "$root" -cJf "$root/.gpu.tar.xz.tmp" .gpu
    mv "$root/.gpu.tar.xz.tmp" "$root/.gpu.tar.xz"
    du -sh "$root/.gpu.tar.xz"
    echo "built into .gpu/ and .gpu.tar.xz; on the GPU machine: bash benches/gpu_check.sh run"
}

# .gpu/ from .gpu.tar.xz when only the packed binaries came (tar with xz, else python3's tarfile).
unpack() {
    [ ! -x "$gpu/deepis" ] && [ -f "$root/.gpu.tar.xz" ] || return 0
    echo "unpacking .gpu.tar.xz"
    tar -C "$root" -xJf "$root/.gpu.tar.xz" 2>/dev/null ||
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$root/.gpu.tar.xz" "$root"
}

# The built-in folder must lead to this copy of the repository (it does when run where built).
link_manifest_dir() {
    local m=$1
    if [ "$(cd "$m" 2>/dev/null && pwd -P)" = "$(pwd -P)" ]; then
        return 0
    fi
    if [ -e "$m" ]; then
        echo "$m exists and is not this repository: the tests would read their data from there" >&2
        return 1
    fi
    mkdir -p "$(dirname "$m")" && ln -s "$root" "$m"
}

run() {
    local out=${1:-${OUT:+$OUT/gpu_check}}
    out=${out:-gpu_check_out}
    mkdir -p "$out"
    out=$(cd "$out" && pwd)
    unpack
    [ -x "$gpu/deepis" ] || { echo "no .gpu/deepis or .gpu.tar.xz: run 'bash benches/gpu_check.sh build' first (where cargo is)" >&2; exit 1; }
    # shellcheck disable=SC1091
    source "$gpu/build.env"
    link_manifest_dir "$MANIFEST_DIR" || exit 1
    # The tests run the deepis binary from the built-in target folder.
    mkdir -p "$root/target/release"
    [ -x "$root/target/release/deepis" ] || cp "$gpu/deepis" "$root/target/release/deepis"
    local results=$out/results.md failed=0
    export DEEPIS_CACHE_DIR
    DEEPIS_CACHE_DIR=$(mktemp -d)
    {
        echo "# deepis GPU check"
        echo
        echo "- binaries: commit $COMMIT, built $BUILT; run $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
        echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>/dev/null | head -1 || true)"
        echo
    } >"$results"

    # step NAME LIMIT_S CMD...: runs CMD with its output in NAME.log; records status and time.
    step() {
        local name=$1 limit=$2
        shift 2
        local t0=$SECONDS rc
        echo "== $name: $*"
        timeout "$limit" "$@" >"$out/$name.log" 2>&1
        rc=$?
        local status=PASS
        [ $rc -eq 0 ] || { status="FAIL (exit $rc$([ $rc -eq 124 ] && echo ", over ${limit} s"))"; failed=1; }
        echo "== $name: $status in $((SECONDS - t0)) s"
        printf '## %s: %s (%d s)\n\n`%s`\n\n' "$name" "$status" $((SECONDS - t0)) "$*" >>"$results"
    }
    # excerpt NAME PATTERN: the matching lines of NAME.log, as a code block in results.md.
    excerpt() {
        { echo '```'; grep -E "$2" "$out/$1.log" | head -80; echo '```'; echo; } >>"$results"
    }

    local arch
    arch=sm_$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
    [ "$arch" != sm_ ] || arch=sm_90
    nvidia-smi >"$out/nvidia-smi.log" 2>&1 || echo "no nvidia-smi" >"$out/nvidia-smi.log"
    step info 60 "$gpu/deepis" info tests/data/tiny/weights.safetensors
    excerpt info '^ *(cpu|cuda|nvrtc|emu) '
    step kernels-first 120 "$gpu/deepis" kernels --arch "$arch"
    excerpt kernels-first '^kernels:'
    step kernels-second 60 "$gpu/deepis" kernels --arch "$arch"
    excerpt kernels-second '^kernels:|^file|^conv3d|spill'
    # the tensor-core inner loops as this machine's NVRTC built them (its cuobjdump, no GPU time)
    step sass 60 python3 benches/sass_loops.py "$DEEPIS_CACHE_DIR"
    excerpt sass 'loop|no '
    for t in "${TESTS[@]}"; do
        # the op table also runs every op on the emulator, under two schedules
        limit=150
        [ "$t" = ops_table ] && limit=300
        # shellcheck disable=SC2086
        step "test-$t" "$limit" "$gpu/tests/$t" --test-threads 1 --nocapture ${ONLY[$t]:-}
        excerpt "test-$t" '^test |rel err|^cuda .*err/bound|^device:|SKIPPED|first start|second start|agree bit|equal|panicked|test result'
        # On the GPU machine a test that skips for want of a GPU or NVRTC has not checked anything.
        if [ "${REQUIRE_GPU:-1}" = 1 ] && grep -q SKIPPED "$out/test-$t.log"; then
            echo "**FAIL: skipped tests (no GPU or no NVRTC found)**" >>"$results"
            echo >>"$results"
            failed=1
        fi
    done
    step conv-throughput 120 "$gpu/tests/gpu_ops" --ignored cuda_conv_throughput --nocapture
    excerpt conv-throughput 'TFLOP/s|Direct|Tiled|SKIPPED'
    step tc-conv-throughput 120 "$gpu/tests/tensor_conv" --ignored cuda_tensor_conv_throughput --nocapture
    excerpt tc-conv-throughput 'TFLOP/s|f16|bf16|f32|SKIPPED'
    # ms per volume of every precision (tf32 / fp16 / bf16 also on wgmma) at batch 1 and 8: in the
    # comparison below, on the same weights as PyTorch; here only when it is skipped
    if [ "${SKIP_COMPARE:-0}" = 1 ]; then
        for p in fp32 tf32 fp16 bf16 tf32+wgmma fp16+wgmma bf16+wgmma bf16+m64 bf16+wgmma+m64; do
            flags=(--precision "${p%%+*}")
            case "$p" in *+wgmma*) flags+=(--wgmma) ;; esac
            case "$p" in *+m64*) flags+=(--warp-tile m64) ;; esac
            for b in 1 8; do
                step "plan-$p-b$b" 120 "$gpu/deepis" bench --backend cuda "${flags[@]}" --batch "$b" --runs 5 --warmup 2
                excerpt "plan-$p-b$b" '^gpu plan|^median|^backend|error'
            done
        done
    fi
    # the CUDA graph's gain: batch 1 with the launches queued one by one
    for p in fp32 bf16; do
        step "plan-$p-b1-no-graph" 120 "$gpu/deepis" bench --backend cuda --precision "$p" --batch 1 --runs 5 --warmup 2 --no-graph
        excerpt "plan-$p-b1-no-graph" '^gpu plan|^median'
    done
    # copies overlapped: 8 batches of 8 in one run, two in flight (uploads, downloads and the
    # forward passes on their own streams), against one batch per run
    step plan-bf16-b8-stream 120 "$gpu/deepis" bench --backend cuda --precision bf16 --batch 8 --runs 3 --warmup 1 --stream 8
    excerpt plan-bf16-b8-stream '^gpu plan|^median|^streamed'
    # the end-to-end folder rate: segment over 16 synthetic 128x128x64 volumes (read, predict,
    # label, write, pipelined), the shipped weights, bf16, batch 1 and 8
    step synth 60 "$gpu/deepis" synth -o "$out/folder" --frames 16 --size 128,128,64
    step segment-folder 180 "$gpu/deepis" segment --weights weights/deepis-synth-w16.safetensors "$out/folder/input" -o "$out/folder/labels" --backend cuda --precision bf16
    excerpt segment-folder 'written|^gpu plan|^backend'
    # the same at --batch 8: 8 files per forward pass, two batches in flight across files
    step segment-folder-b8 180 "$gpu/deepis" segment --weights weights/deepis-synth-w16.safetensors "$out/folder/input" -o "$out/folder/labels-b8" --backend cuda --precision bf16 --batch 8
    excerpt segment-folder-b8 'written|^gpu plan'
    rm -rf "$out/folder"
    # what the host alone can do: the same pipeline with a network that costs nothing, 1 reader +
    # 1 writer against segment's counts for these cores
    step host-pipeline 120 "$gpu/benches/host_pipeline" 32 8
    excerpt host-pipeline '^host pipeline|^  '

    if [ "${SKIP_COMPARE:-0}" = 1 ]; then
        echo "## compare: skipped (SKIP_COMPARE=1)" >>"$results"
    elif ! python3 -c "import torch, numpy, safetensors" 2>/dev/null; then
        echo "## compare: FAIL (python3 lacks torch, numpy or safetensors)" >>"$results"
        failed=1
    else
        step compare 420 env DEEPIS="$gpu/deepis" bash benches/gpu_compare.sh published "${RUNS:-10}" 1,8
        excerpt compare '^deepis |^gpu plan|^\||^batch |FAILED|^pytorch |error'
    fi
    rm -rf "$DEEPIS_CACHE_DIR"
    echo "results: $results"
    cat "$results"
    return $failed
}

case "${1:-run}" in
    build | prepare) build ;;
    run) shift || true; run "$@" ;;
    *) echo "usage: bash benches/gpu_check.sh build | run [DIR]" >&2; exit 2 ;;
esac
