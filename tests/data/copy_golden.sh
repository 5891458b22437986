#!/usr/bin/env bash
# Refreshes the golden cases in tests/data from the oracle's output (a clone must test on its own,
# so the files are committed). Either copies an existing golden folder:
#   bash tests/data/copy_golden.sh /work/shared/golden
# or regenerates it first with PyTorch (needs torch numpy scipy safetensors):
#   bash tests/data/copy_golden.sh --make PATH/TO/reference   (the folder of make_golden.py)
# Then remakes the by-epoch losses and the tiny case's epoch-150 step (make_epochs.py, beside this).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ "${1:-}" = "--make" ]; then
  ref="$2"; src="$(mktemp -d)"
  (cd "$ref" && python3 make_golden.py "$src")
else
  src="${1:?usage: copy_golden.sh GOLDEN_DIR | --make REFERENCE_DIR}"; ref="${2:-$src/../reference}"
fi
for c in tiny small readme mid; do
  for f in weights.safetensors input.npy expected.npy target.npy train_output.npy weight.npy aux3.npy aux4.npy train_step.safetensors activations.safetensors; do
    [ -f "$src/$c/$f" ] && install -m 644 "$src/$c/$f" "$here/$c/$f"
  done
done
PYTHONPATH="$ref" python3 "$here/make_epochs.py" "$here"
