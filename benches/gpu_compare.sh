#!/usr/bin/env bash
# deepis on CUDA against PyTorch/cuDNN on the same weights and volume, in the same run.
#   benches/gpu_compare.sh [published|readme|check] [runs] [batches]      (defaults: published 10 1,8)
# deepis: `deepis bench --backend cuda --batch B --precision P [--wgmma] [--warp-tile m64]` for
# every P[+wgmma][+m64] of PRECISIONS (default on cuda: fp32 tf32 fp16 bf16 tf32+wgmma fp16+wgmma
# bf16+wgmma bf16+m64 bf16+wgmma+m64; on the CPU check: fp32),
# timed host to host (upload, forward, download).
# PyTorch, in one process (benches/pytorch_bench.py --sweep): fp32 (strict), tf32, fp16 and bf16,
# all channels_last_3d with cudnn.benchmark, eager and replayed as a CUDA graph, at every batch;
# timed on the device and host to host, median of the runs after 2 warm-ups. Prints one table of
# ms/volume and volumes/s per configuration, each deepis row with its ratio to PyTorch in the same
# precision and to the fastest PyTorch configuration at that batch (host to host).
# Needs a release build (DEEPIS=path to the binary) and python3 with torch, numpy, safetensors.
# Without a GPU the same script runs as a check of itself:
#   DEVICE=cpu SIZE=16,16,16 benches/gpu_compare.sh check 1 1,2
# (BACKEND=emu PRECISIONS="fp32 bf16 bf16+wgmma" there: the precision rows through the emulator)
set -euo pipefail
cd "$(dirname "$0")/.."
cfg=${1:-published}
runs=${2:-10}
batches=${3:-1,8}
deepis=${DEEPIS:-target/release/deepis}
device=${DEVICE:-cuda}
size=${SIZE:-128,128,64}
backend=${BACKEND:-$([ "$device" = cuda ] && echo cuda || echo cpu)}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
med() { sed -n 's/^median of .* run(s): \([0-9.]*\) s per volume.*/\1/p' "$1"; }

python3 benches/pytorch_bench.py --make-weights "$dir/w.safetensors" --make-input "$dir/x.npy" --config "$cfg" --size "$size"
default_precisions=$([ "$device" = cuda ] && echo "fp32 tf32 fp16 bf16 tf32+wgmma fp16+wgmma bf16+wgmma bf16+m64 bf16+wgmma+m64" || echo fp32)
peer=""
for p in ${PRECISIONS:-$default_precisions}; do
    flags=(--precision "${p%%+*}")
    case "$p" in *+wgmma*) flags+=(--wgmma) ;; esac
    case "$p" in *+m64*) flags+=(--warp-tile m64) ;; esac
    for b in ${batches//,/ }; do
        echo "== deepis bench --backend $backend --batch $b ${flags[*]} ($cfg, $size)"
        "$deepis" bench --weights "$dir/w.safetensors" --backend "$backend" --size "$size" --batch "$b" "${flags[@]}" \
            --runs "$runs" --warmup 2 >"$dir/d.out" 2>"$dir/d.err" || { cat "$dir/d.err"; exit 1; }
        grep -E "^kernels:|^gpu plan" "$dir/d.err" || true
        cat "$dir/d.out"
        t=$(med "$dir/d.out")
        [ -n "$t" ] || { echo "no median in deepis bench output" >&2; exit 1; }
        python3 -c "t = $t; print(f'deepis $p batch $b: {t * 1e3:.3f} ms/volume, {1 / t:.1f} volumes/s')"
        peer="$peer${peer:+,}$p:$b:$t"
    done
done
echo "== pytorch ($device)"
graph=$([ "$device" = cuda ] && echo --graph || true)
python3 benches/pytorch_bench.py --weights "$dir/w.safetensors" --input "$dir/x.npy" --device "$device" \
    --sweep fp32,tf32,fp16,bf16 --batches "$batches" $graph --runs "$runs" --warmup 2 --deepis "$peer" \
    --deepis-label "bench --backend $backend"
