"""Writes cell_v73.mat and masks_v73.mat: MATLAB v7.3 MAT files (HDF5) as MATLAB's
save(FILE, 'input', 'target', '-v7.3') lays them out, for tests/train_mat.rs.

A v7.3 file is HDF5 behind a 512-byte user block holding the usual 128-byte MAT header (version
0x0200); each variable is a root dataset whose HDF5 dims are MATLAB's size reversed (MATLAB is
column-major), with a MATLAB_class attribute; logical arrays are stored as uint8.
The values are those of make_mat.py: input(i+1, j+1, k+1) = 100 i + 10 j + k on 4 x 3 x 5.
Run: python3 make_mat73.py (in this folder; needs numpy and h5py).
"""
import h5py
import numpy as np

i, j, k = np.meshgrid(np.arange(4), np.arange(3), np.arange(5), indexing="ij")
x = 100.0 * i + 10.0 * j + k
target = -x / 1000.0
h = np.arange(2).reshape(1, 1, 1, 2)
masks = (i[..., None] + j[..., None] + k[..., None] + h) % 2 == 0


def header():
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Tue Dec  1 12:00:00 2026 HDF5 schema 1.00 ."
    return text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"


def save(name, arrays):
    with h5py.File(name, "w", userblock_size=512) as f:
        for key, (a, cls) in arrays.items():
            d = f.create_dataset(key, data=np.ascontiguousarray(a.T))  # MATLAB size reversed
            d.attrs["MATLAB_class"] = np.bytes_(cls)
    with open(name, "r+b") as f:
        f.write(header())


save("cell_v73.mat", {"input": (x.astype(np.float32), "single"), "target": (target, "double")})
save("masks_v73.mat", {"input": (x.astype(np.float32), "single"), "target": (masks.astype(np.uint8), "logical")})
