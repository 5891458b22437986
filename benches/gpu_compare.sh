#!/usr/bin/env bash
# deepis on CUDA against PyTorch/cuDNN on the same weights and volume, in the same run.
#   benches/gpu_compare.sh [published|readme] [runs]       (defaults: published 10)
# Both are timed host to host (upload, forward, download), median of the runs after warm-up.
# PyTorch runs twice: strict float32 (what deepis computes) and with TF32 tensor cores allowed.
# Needs a release build (DEEPIS=path to the binary) and python3 with torch, numpy, safetensors.
set -euo pipefail
cd "$(dirname "$0")/.."
cfg=${1:-published}
runs=${2:-10}
deepis=${DEEPIS:-target/release/deepis}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
med() { sed -n 's/^median of .* run(s): \([0-9.]*\) s per volume.*/\1/p' "$1"; }

python3 benches/pytorch_bench.py --make-weights "$dir/w.safetensors" --make-input "$dir/x.npy" --config "$cfg"
echo "== deepis bench --backend cuda ($cfg)"
"$deepis" bench --weights "$dir/w.safetensors" --backend cuda --runs "$runs" --warmup 2 >"$dir/d.out" 2>"$dir/d.err" \
    || { cat "$dir/d.err"; exit 1; }
cat "$dir/d.out"
gf=$(sed -n 's/^work: .*, \([0-9.]*\) GFLOP per forward/\1/p' "$dir/d.out")
td=$(med "$dir/d.out")
for tf32 in "" "--tf32"; do
    echo "== pytorch cuda ${tf32:-float32}"
    python3 benches/pytorch_bench.py --weights "$dir/w.safetensors" --input "$dir/x.npy" --device cuda $tf32 \
        --runs "$runs" --warmup 2 >"$dir/t.out" 2>"$dir/t.err" || { cat "$dir/t.err"; exit 1; }
    cat "$dir/t.out"
    tt=$(med "$dir/t.out")
    python3 -c "print(f'deepis {$td:.4f} s ({$gf/$td/1e3:.1f} TFLOP/s)  pytorch ${tf32:-fp32} {$tt:.4f} s ({$gf/$tt/1e3:.1f} TFLOP/s)  ratio deepis/pytorch {$td/$tt:.2f}')"
done
