//! Tomocube TCF files (HDF5): the holotomography 3D series `/Data/3D/NNNNNN`.
//!
//! The microscope stores each frame as a Z x Y x X dataset (float RI before FormatVersion 1.3,
//! uint16 RI x 10000 from 1.3) under `/Data/3D`, whose attributes give `DataCount`, `SizeX/Y/Z`,
//! `ResolutionX/Y/Z` (um per voxel) and `TimeInterval` (s), each a one-element array. deepis
//! hands the network X x Y x Z (the optical axis last, as the published model was trained), so
//! a frame is transposed on reading: `np.transpose(frame, (2, 1, 0))`, and the voxel size along
//! D0, D1, D2 is (ResolutionX, ResolutionY, ResolutionZ). A uint16 frame becomes `(v as f64 /
//! 1e4) as f32`, the same values as numpy's `frame / 1e4` saved and read back as float32.
//!
//! Read by `hdf5-reader` (pure Rust: chunked datasets, deflate, shuffle, and the LZ4 filter 32004
//! that Tomocube files use). Not read: the tiled "LDM" layout (each frame a group of `TILE_*`
//! datasets), refused with a message saying so.
use crate::error::{Error, Result};
use hdf5_reader::{Datatype, Hdf5File};
use std::path::Path;

/// What `/Data/3D` says about the series.
#[derive(Clone, Debug, PartialEq)]
pub struct TcfInfo {
    pub format_version: String,
    /// Frames (DataCount).
    pub frames: usize,
    /// Voxels along X, Y, Z (the network's D0, D1, D2).
    pub size_xyz: [usize; 3],
    /// um per voxel along X, Y, Z.
    pub voxel_size_xyz: [f64; 3],
    /// Seconds between frames (absent or 0 for a single frame).
    pub time_interval_s: Option<f64>,
}

fn open(path: &Path) -> Result<Hdf5File> {
    if !path.is_file() {
        let e = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        return Err(Error::io(path, e));
    }
    Hdf5File::open(path).map_err(|e| Error::format(path, format!("not a readable HDF5 (TCF) file: {e}")))
}

fn series(path: &Path, f: &Hdf5File) -> Result<hdf5_reader::group::Group> {
    f.group("/Data/3D").map_err(|_| {
        let has = |g: &str| f.group(&format!("/Data/{g}")).is_ok();
        let other: Vec<&str> = ["2DMIP", "2D", "BF", "3DFL"].into_iter().filter(|g| has(g)).collect();
        let what = if other.is_empty() { String::new() } else { format!(" (it holds {})", other.join(", ")) };
        Error::format(path, format!("no 3D refractive-index data: the TCF file has no /Data/3D group{what}"))
    })
}

fn attr_f64(path: &Path, g: &hdf5_reader::group::Group, name: &str) -> Result<Option<f64>> {
    let Ok(a) = g.attribute(name) else { return Ok(None) };
    let v = a.read_as_f64().or_else(|_| a.read_1d::<f64>().map(|v| v.first().copied().unwrap_or(f64::NAN)));
    v.map(Some).map_err(|e| Error::format(path, format!("/Data/3D attribute {name}: {e}")))
}

fn need_f64(path: &Path, g: &hdf5_reader::group::Group, name: &str) -> Result<f64> {
    attr_f64(path, g, name)?.ok_or_else(|| Error::format(path, format!("/Data/3D has no {name} attribute")))
}

/// Reads the series' attributes (no voxel data).
pub fn read_info(path: &Path) -> Result<TcfInfo> {
    let f = open(path)?;
    info_of(path, &f)
}

fn info_of(path: &Path, f: &Hdf5File) -> Result<TcfInfo> {
    let root = f.root_group().map_err(|e| Error::format(path, format!("cannot read the HDF5 root group: {e}")))?;
    let format_version = root.attribute("FormatVersion").ok().and_then(|a| a.read_string().ok()).unwrap_or_default();
    let g = series(path, f)?;
    let count = |name: &str| -> Result<usize> {
        let v = need_f64(path, &g, name)?;
        if !(v.is_finite() && v >= 1.0 && v.fract() == 0.0 && v < 1e9) {
            return Err(Error::format(path, format!("/Data/3D attribute {name} is {v}: expected a positive whole number")));
        }
        Ok(v as usize)
    };
    let frames = count("DataCount")?;
    let size_xyz = [count("SizeX")?, count("SizeY")?, count("SizeZ")?];
    let mut voxel_size_xyz = [0.0; 3];
    for (k, a) in ["ResolutionX", "ResolutionY", "ResolutionZ"].iter().enumerate() {
        let v = need_f64(path, &g, a)?;
        if !(v.is_finite() && v > 0.0) {
            return Err(Error::format(path, format!("/Data/3D attribute {a} is {v}: a voxel size must be a positive number of um")));
        }
        voxel_size_xyz[k] = v;
    }
    let time_interval_s = attr_f64(path, &g, "TimeInterval")?.filter(|t| t.is_finite() && *t > 0.0);
    Ok(TcfInfo { format_version, frames, size_xyz, voxel_size_xyz, time_interval_s })
}

/// Largest series read (voxels over all frames): 4 GiB of float32, far above any HT recording.
const MAX_VOXELS: usize = 1 << 30;

/// Reads every frame of the 3D series as float32 RI, transposed to X, Y, Z. Returns the dims
/// (`[X, Y, Z]` for one frame, `[T, X, Y, Z]` for a time-lapse), the values in C order of those
/// dims, and the series' attributes.
pub fn read_tcf(path: &Path) -> Result<(Vec<usize>, Vec<f32>, TcfInfo)> {
    let f = open(path)?;
    let info = info_of(path, &f)?;
    let [x, y, z] = info.size_xyz;
    let total = crate::limits::product(&[x as u64, y as u64, z as u64, info.frames as u64]);
    if total.is_none_or(|t| t > MAX_VOXELS as u64) {
        return Err(Error::format(
            path,
            format!("the series claims {} frames of {x} x {y} x {z} voxels: more than deepis reads ({MAX_VOXELS} voxels)", info.frames),
        ));
    }
    crate::limits::check("the TCF series", crate::limits::bytes_of(total, 4)).map_err(|m| Error::format(path, m))?;
    let n = x * y * z;
    let g = series(path, &f)?;
    let mut data = Vec::with_capacity(n * info.frames);
    for t in 0..info.frames {
        let frame = read_frame(path, &g, t, [z, y, x])?;
        transpose_zyx(&frame, [z, y, x], &mut data);
    }
    let dims = if info.frames == 1 { vec![x, y, z] } else { vec![info.frames, x, y, z] };
    Ok((dims, data, info))
}

/// One frame as stored (Z, Y, X), as RI.
fn read_frame(path: &Path, g: &hdf5_reader::group::Group, t: usize, zyx: [usize; 3]) -> Result<Vec<f32>> {
    let name = format!("{t:06}");
    let where_ = format!("/Data/3D/{name}");
    let ds = match g.dataset(&name) {
        Ok(d) => d,
        Err(_) if g.group(&name).is_ok() => {
            return Err(Error::format(
                path,
                format!("{where_} is a group of tiles (the TCF \"LDM\" layout), which deepis does not read: export the frame as a plain TCF, TIFF or .npy"),
            ))
        }
        Err(_) => return Err(Error::format(path, format!("{where_} is missing, but DataCount says the series has {} frame(s)", t + 1))),
    };
    let shape: Vec<usize> = ds.shape().iter().map(|&s| s as usize).collect();
    if shape != zyx {
        return Err(Error::format(
            path,
            format!("{where_} has shape {shape:?}, but SizeZ/SizeY/SizeX say {zyx:?} (stored Z, Y, X)"),
        ));
    }
    let n = zyx.iter().product();
    let rerr = |e: hdf5_reader::error::Error| Error::format(path, format!("cannot read {where_}: {e}"));
    let data: Vec<f32> = match ds.dtype() {
        Datatype::FloatingPoint { size: 4, .. } => {
            let mut v = vec![0f32; n];
            ds.read_into(&mut v).map_err(rerr)?;
            v
        }
        Datatype::FloatingPoint { size: 8, .. } => {
            let mut v = vec![0f64; n];
            ds.read_into(&mut v).map_err(rerr)?;
            v.into_iter().map(|x| x as f32).collect()
        }
        Datatype::FixedPoint { size: 2, signed: false, .. } => {
            let mut v = vec![0u16; n];
            ds.read_into(&mut v).map_err(rerr)?;
            // Same rounding as numpy's `frame / 1e4` (float64) stored as float32.
            v.into_iter().map(|x| (x as f64 / 1e4) as f32).collect()
        }
        other => {
            return Err(Error::format(
                path,
                format!("{where_} holds {other:?}: expected float RI or uint16 RI x 10000 (FormatVersion 1.3 and later)"),
            ))
        }
    };
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        let idx = [i / (zyx[1] * zyx[2]), i / zyx[2] % zyx[1], i % zyx[2]];
        return Err(Error::format(path, format!("{where_}: value {} at (z, y, x) {idx:?}: RI must be finite", data[i])));
    }
    Ok(data)
}

/// Appends the Z x Y x X frame `src` to `out` as X x Y x Z (C order).
fn transpose_zyx(src: &[f32], [nz, ny, nx]: [usize; 3], out: &mut Vec<f32>) {
    for i in 0..nx {
        for j in 0..ny {
            for k in 0..nz {
                out.push(src[(k * ny + j) * nx + i]);
            }
        }
    }
}
