#!/usr/bin/env bash
# deepis (fused CPU plan) against PyTorch on the same weights and volume, in the same run.
#   benches/compare.sh [published|readme] [threads] [runs]      (defaults: published 2 3)
# PIN="taskset -c 0,1" pins both engines to two cores (a quiet many-core machine).
# Needs a release build (cargo build --release) and python3 with torch, numpy, safetensors.
# Prints both median times per volume, the ratio deepis / PyTorch, GFLOP/s, peak RSS of
# `deepis bench`, `deepis predict` and the PyTorch process, and the largest output difference.
set -euo pipefail
cd "$(dirname "$0")/.."
cfg=${1:-published}
threads=${2:-2}
runs=${3:-3}
deepis=${DEEPIS:-target/release/deepis}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads

python3 benches/pytorch_bench.py --make-weights "$dir/w.safetensors" --make-input "$dir/x.npy" --config "$cfg"
rss() { sed -n 's/^peak RSS: \([0-9.]*\) MiB/\1/p' "$1" | tail -1; }
calc() { python3 -c "print(f'{$1:.3f}')"; }
measure="python3 benches/rss.py ${PIN:-}"

echo "== deepis bench ($cfg, $threads threads)"
$measure "$deepis" bench --weights "$dir/w.safetensors" --backend cpu --runs "$runs" --warmup 1 \
    >"$dir/d.out" 2>"$dir/d.err" || { cat "$dir/d.err"; exit 1; }
cat "$dir/d.out"
echo "== deepis predict"
$measure "$deepis" predict --backend cpu --weights "$dir/w.safetensors" "$dir/x.npy" -o "$dir/yd.npy" \
    >"$dir/p.out" 2>"$dir/p.err" || { cat "$dir/p.err"; exit 1; }
grep -E "^forward" "$dir/p.err" || true
echo "== pytorch"
$measure python3 benches/pytorch_bench.py --weights "$dir/w.safetensors" --input "$dir/x.npy" \
    --threads "$threads" --runs "$runs" --output "$dir/yt.npy" >"$dir/t.out" 2>"$dir/t.err" || { cat "$dir/t.err"; exit 1; }
cat "$dir/t.out"

td=$(sed -n 's/^median of .* run(s): \([0-9.]*\) s per volume.*/\1/p' "$dir/d.out")
tt=$(sed -n 's/^median of .* run(s): \([0-9.]*\) s per volume.*/\1/p' "$dir/t.out")
gf=$(sed -n 's/^work: .*, \([0-9.]*\) GFLOP per forward/\1/p' "$dir/d.out")
diff=$(python3 -c "
import numpy as np
a = np.load('$dir/yd.npy').reshape(-1); b = np.load('$dir/yt.npy').reshape(-1)
print(f'{np.abs(a - b).max() / max(1.0, np.abs(b).max()):.2e}')")
echo "== summary ($cfg, 128x128x64, $threads threads)"
printf "deepis  %8.3f s/volume  %6.1f GFLOP/s  peak RSS bench %s MiB, predict %s MiB\n" "$td" "$(calc "$gf / $td")" "$(rss "$dir/d.err")" "$(rss "$dir/p.err")"
printf "pytorch %8.3f s/volume  %6.1f GFLOP/s  peak RSS %s MiB\n" "$tt" "$(calc "$gf / $tt")" "$(rss "$dir/t.err")"
printf "ratio deepis / pytorch: %.3f   output max|deepis - pytorch| / max(1, max|pytorch|): %s\n" "$(calc "$td / $tt")" "$diff"
