"""Writes the small Tomocube-style TCF files that tests/tcf.rs reads (run from the repo root:
`python3 tests/data/tcf/make_tcf.py`; needs numpy, h5py and hdf5plugin for the LZ4 filter).

Layout as the microscope writes it: root attribute FormatVersion; group /Data/3D with the
attributes DataCount, SizeX/Y/Z, ResolutionX/Y/Z (um per voxel), TimeInterval (s), RIMin/RIMax,
each a one-element array; one dataset per frame, /Data/3D/000000, 000001, ..., stored Z, Y, X.
Float RI before FormatVersion 1.3, uint16 RI x 10000 from 1.3. Also written: `expected_ri.npy`
(the two frames as float32 X, Y, Z, i.e. np.transpose(frame, (2, 1, 0)) of the uint16 file / 1e4),
an LDM (tiled) file and a file with no 3D data, for the errors.
"""
import os
import h5py
import hdf5plugin
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE_ZYX = (16, 20, 24)  # Z, Y, X: the network sees X=24, Y=20, Z=16
RES = {"X": 0.4, "Y": 0.45, "Z": 0.8}


def frames():
    rng = np.random.default_rng(7)
    z, y, x = np.meshgrid(*[np.arange(n) for n in SIZE_ZYX], indexing="ij")
    out = []
    for t in range(2):
        r = np.sqrt(((x - 11 - 2 * t) * RES["X"]) ** 2 + ((y - 9) * RES["Y"]) ** 2 + ((z - 7) * RES["Z"]) ** 2)
        ri = 1.337 + 0.04 * (r < 3.0) + 0.002 * rng.standard_normal(SIZE_ZYX)
        out.append(np.round(ri * 1e4).astype(np.uint16))  # the uint16 file's exact values
    return out


def attrs(g, version_group_count, dtype_float):
    g.attrs["DataCount"] = np.array([version_group_count], dtype=np.int64)
    for a, n in zip("ZYX", SIZE_ZYX):
        g.attrs["Size" + a] = np.array([n], dtype=np.int64)
        g.attrs["Resolution" + a] = np.array([RES[a]], dtype=np.float64)
    g.attrs["TimeInterval"] = np.array([30.0], dtype=np.float64)
    g.attrs["RIMin"] = np.array([1.33])
    g.attrs["RIMax"] = np.array([1.40])


def write(name, version, kind, compression):
    with h5py.File(os.path.join(HERE, name), "w") as f:
        f.attrs["FormatVersion"] = np.bytes_(version)
        f.attrs["Title"] = np.bytes_("deepis test")
        g = f.create_group("Data/3D")
        fs = frames()
        attrs(g, len(fs), kind == "float")
        for t, u in enumerate(fs):
            data = (u.astype(np.float32) / np.float32(1e4)) if kind == "float" else u
            d = g.create_dataset("%06d" % t, data=data, chunks=(8, 10, 12), **compression)
            d.attrs["Time"] = np.array([30.0 * t])
            d.attrs["RIMin"] = np.array([float(data.min()) / (1 if kind == "float" else 1e4)])


def main():
    write("float_deflate.TCF", "1.2", "float", dict(compression="gzip", compression_opts=4))
    write("uint16_lz4.TCF", "1.4.1", "uint16", dict(**hdf5plugin.LZ4()))
    write("uint16_shuffle_deflate.TCF", "1.3", "uint16", dict(compression="gzip", shuffle=True))
    fs = frames()
    exp = np.stack([np.transpose(u / 1e4, (2, 1, 0)) for u in fs]).astype(np.float32)
    np.save(os.path.join(HERE, "expected_ri.npy"), exp)
    # Exactly the reference: float64, and Fortran order (a transposed view).
    np.save(os.path.join(HERE, "frame1.npy"), np.transpose(fs[1] / 1e4, (2, 1, 0)))
    # The tiled LDM layout: each frame a group of TILE_NNN datasets (not read by deepis).
    with h5py.File(os.path.join(HERE, "ldm.TCF"), "w") as f:
        f.attrs["FormatVersion"] = np.bytes_("1.4.1")
        g = f.create_group("Data/3D")
        attrs(g, 1, False)
        t = g.create_group("000000")
        t.attrs["NumberOfTiles"] = np.array([1], dtype=np.int64)
        t.create_dataset("TILE_0000", data=fs[0])
    # A TCF with 2D data only.
    with h5py.File(os.path.join(HERE, "no3d.TCF"), "w") as f:
        f.attrs["FormatVersion"] = np.bytes_("1.3")
        g = f.create_group("Data/2DMIP")
        g.attrs["DataCount"] = np.array([1], dtype=np.int64)
        g.create_dataset("000000", data=fs[0][0])


if __name__ == "__main__":
    main()
