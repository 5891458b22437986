"""Writes the MAT fixtures of tests/train_mat.rs (scipy.io.savemat, MAT level 5).

Every voxel says where it is: input[i, j, k] = 100 i + 10 j + k on a 4 x 3 x 5 volume (D0 x D1 x D2),
so a reader that mixes up MATLAB's column-major order or the axes gets other numbers.
scipy keeps the index order: MATLAB sees size(input) = [4 3 5] and input(i+1, j+1, k+1) = input[i, j, k].
Run: python3 make_mat.py (in this folder).
"""
import numpy as np
import scipy.io

i, j, k = np.meshgrid(np.arange(4), np.arange(3), np.arange(5), indexing="ij")
x = 100.0 * i + 10.0 * j + k
target = -x / 1000.0
h = np.arange(2).reshape(1, 1, 1, 2)
masks = (i[..., None] + j[..., None] + k[..., None] + h) % 2 == 0  # D0 x D1 x D2 x C, logical

# like MATLAB's -v6 (uncompressed) and -v7 (compressed), single and double both ways
scipy.io.savemat("cell_v6.mat", {"input": x.astype(np.float32), "target": target}, format="5")
scipy.io.savemat("cell_v7.mat", {"input": x, "target": target.astype(np.float32)}, format="5", do_compression=True)
scipy.io.savemat("masks.mat", {"input": x.astype(np.float32), "target": masks}, format="5", do_compression=True)
scipy.io.savemat("no_target.mat", {"input": x, "label": target}, format="5", do_compression=True)
