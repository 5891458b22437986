#!/usr/bin/env bash
# Rebuilds the training set of the shipped weights (see README.md here):
# 10 synthetic time-lapses (seeds 1-10) of 16 frames, 64 x 64 x 32 voxels of 0.4 x 0.4 x 0.8 um,
# as DATA/input/sS_tNNN.npy (RI) + DATA/target/sS_tNNN.npy (uint8 masks, 2 x 64 x 64 x 32:
# channel 0 effector, channel 1 target), the sigmoid head's training pairs.
# Usage: bash weights/make_training_data.sh DATA [DEEPIS]   (needs python3 with numpy)
set -euo pipefail
DATA=${1:?usage: make_training_data.sh DATA [DEEPIS]}
DEEPIS=${2:-target/release/deepis}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$DATA/input" "$DATA/target"
for s in 1 2 3 4 5 6 7 8 9 10; do
    "$DEEPIS" synth -o "$TMP/s$s" --frames 16 --size 64,64,32 --voxel-size 0.4,0.4,0.8 --seed "$s" 2>/dev/null
    for f in "$TMP/s$s"/input/*.npy; do cp "$f" "$DATA/input/s${s}_$(basename "$f")"; done
done
python3 - "$TMP" "$DATA" <<'PY'
import glob, os, sys
import numpy as np
tmp, data = sys.argv[1], sys.argv[2]
for f in sorted(glob.glob(os.path.join(data, "input", "s*_t*.npy"))):
    name = os.path.basename(f)
    seed, frame = name.split("_")
    labels = np.load(os.path.join(tmp, seed, "labels", frame))
    np.save(os.path.join(data, "target", name), np.stack([labels == 1, labels == 2]).astype(np.uint8))
PY
echo "wrote $(ls "$DATA/input" | wc -l) training pairs to $DATA"
