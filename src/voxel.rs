//! Voxel sizes (um along D0, D1, D2) as the input files record them, so that no one types them.
//!
//! Looked up, in order: the file's deepis sidecar (`<file>.json`, written next to every output);
//! a TCF's `/Data/3D` ResolutionX/Y/Z (D0, D1, D2 = X, Y, Z, see `crate::tcf`); an OME-TIFF's
//! PhysicalSizeZ/Y/X (pages = D0, rows = D1, columns = D2); an ImageJ TIFF's `spacing` (between
//! pages) with its XResolution/YResolution (pixels per `unit`). A plain `.npy` or TIFF records
//! none: the caller then needs `--voxel-size`.
use crate::error::{Error, Result};
use std::path::Path;

/// A voxel size and where it was found.
#[derive(Clone, Debug, PartialEq)]
pub struct VoxelSize {
    pub um: [f64; 3],
    pub from: String,
}

/// The voxel size `path` records, if any. A file that records an impossible one is an error.
pub fn voxel_size_of(path: &Path) -> Result<Option<VoxelSize>> {
    if let Some(s) = crate::sidecar::read(path)? {
        if let Some(um) = s.voxel_size_um {
            let from = format!("{} (from {})", crate::sidecar::path_for(path).display(), s.voxel_size_from.unwrap_or_else(|| "deepis".into()));
            return Ok(Some(VoxelSize { um, from }));
        }
    }
    let ext = path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("tcf") => {
            let i = crate::tcf::read_info(path)?;
            Ok(Some(VoxelSize { um: i.voxel_size_xyz, from: format!("{} /Data/3D ResolutionX/Y/Z", path.display()) }))
        }
        Some("tif") | Some("tiff") => tiff_voxel_size(path),
        _ => Ok(None),
    }
}

/// A TIFF's decoder and its first ImageDescription ("" when it has none).
pub fn tiff_description(path: &Path) -> Result<(tiff::decoder::Decoder<std::io::BufReader<std::fs::File>>, String)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut dec = tiff::decoder::Decoder::new(std::io::BufReader::new(file)).map_err(|e| Error::format(path, format!("not a readable TIFF file: {e}")))?;
    let desc = dec.get_tag_ascii_string(tiff::tags::Tag::ImageDescription).unwrap_or_default();
    Ok((dec, desc))
}

fn tiff_voxel_size(path: &Path) -> Result<Option<VoxelSize>> {
    use tiff::decoder::Decoder;
    use tiff::tags::Tag;
    let (mut dec, desc) = tiff_description(path)?;
    let rational = |dec: &mut Decoder<_>, tag: Tag| -> Option<f64> {
        match dec.find_tag(tag).ok()?? {
            tiff::decoder::ifd::Value::Rational(n, d) if n > 0 && d > 0 => Some(n as f64 / d as f64),
            v => v.into_f64().ok().filter(|x| *x > 0.0),
        }
    };
    let bad = |what: &str, v: f64| Error::format(path, format!("the TIFF records {what} = {v}: a voxel size must be a positive number of um"));
    if desc.contains("<OME") {
        let get = |a: &str| crate::ome_xml::attr(&desc, a).and_then(|v| v.parse::<f64>().ok());
        let unit = |a: &str| crate::ome_xml::attr(&desc, &format!("{a}Unit")).map_or(Some(1.0), |u| unit_um(&u));
        let (Some(x), Some(y), Some(z)) = (get("PhysicalSizeX"), get("PhysicalSizeY"), get("PhysicalSizeZ")) else { return Ok(None) };
        let (Some(ux), Some(uy), Some(uz)) = (unit("PhysicalSizeX"), unit("PhysicalSizeY"), unit("PhysicalSizeZ")) else {
            return Err(Error::format(path, "the OME-XML gives PhysicalSize in a unit deepis does not know (expected nm, um/µm, mm)"));
        };
        let um = [z * uz, y * uy, x * ux];
        for (v, n) in um.iter().zip(["PhysicalSizeZ", "PhysicalSizeY", "PhysicalSizeX"]) {
            if !(v.is_finite() && *v > 0.0) {
                return Err(bad(n, *v));
            }
        }
        return Ok(Some(VoxelSize { um, from: format!("{} OME-XML PhysicalSizeZ/Y/X", path.display()) }));
    }
    if desc.starts_with("ImageJ=") {
        let field = |k: &str| desc.lines().find_map(|l| l.strip_prefix(&format!("{k}=")).map(|v| v.trim().to_string()));
        let Some(spacing) = field("spacing").and_then(|s| s.parse::<f64>().ok()) else { return Ok(None) };
        let u = field("unit").map_or(Some(1.0), |u| unit_um(&u));
        let (Some(xr), Some(yr), Some(u)) = (rational(&mut dec, Tag::XResolution), rational(&mut dec, Tag::YResolution), u) else { return Ok(None) };
        let um = [spacing * u, u / yr, u / xr];
        for (v, n) in um.iter().zip(["spacing", "1/YResolution", "1/XResolution"]) {
            if !(v.is_finite() && *v > 0.0) {
                return Err(bad(n, *v));
            }
        }
        return Ok(Some(VoxelSize { um, from: format!("{} ImageJ spacing and X/YResolution", path.display()) }));
    }
    Ok(None)
}

/// um per `unit` (ImageJ and OME spellings).
fn unit_um(unit: &str) -> Option<f64> {
    match unit.trim() {
        "um" | "µm" | "μm" | "micron" | "microns" | "\\u00B5m" => Some(1.0),
        "nm" => Some(1e-3),
        "mm" => Some(1e3),
        _ => None,
    }
}

/// The voxel size for an analysis or an output: `given` (the command line) wins; otherwise the
/// first of `files` that records one. Says on stderr where it came from.
pub fn resolve(given: Option<[f64; 3]>, files: &[&Path]) -> Result<Option<VoxelSize>> {
    if let Some(um) = given {
        return Ok(Some(VoxelSize { um, from: "--voxel-size".into() }));
    }
    for f in files {
        if let Some(v) = voxel_size_of(f)? {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// Whether two voxel sizes differ by more than `rel` along any axis.
pub fn differs(a: [f64; 3], b: [f64; 3], rel: f64) -> bool {
    a.iter().zip(&b).any(|(x, y)| (x / y - 1.0).abs() > rel)
}

/// The voxel size a weights file records it was trained at: `voxel_size_um` ("D0,D1,D2" in um)
/// in its safetensors `__metadata__`, if present.
pub fn trained_voxel_size(weights: &Path) -> Result<Option<[f64; 3]>> {
    use std::io::Read;
    let mut f = std::fs::File::open(weights).map_err(|e| Error::io(weights, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| Error::io(weights, e))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Ok(None); // not a header deepis wrote; Weights::load reports the file's problems
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h).map_err(|e| Error::io(weights, e))?;
    let v: serde_json::Value = serde_json::from_slice(&h).unwrap_or_default();
    let Some(s) = v["__metadata__"]["voxel_size_um"].as_str() else { return Ok(None) };
    let um = parse_voxel_size(s).map_err(|e| Error::format(weights, format!("__metadata__ voxel_size_um: {e}")))?;
    check_voxel_size(um).map_err(|e| Error::format(weights, e.to_string()))?;
    Ok(Some(um))
}

/// Trilinear resampling of every volume (and channel) of `t` to `to` voxels, voxel centres
/// aligned (a voxel of the new grid samples the old one at its centre's position).
pub fn resample(t: &crate::tensor::Tensor, to: [usize; 3]) -> Result<crate::tensor::Tensor> {
    use crate::tensor::{Shape, Tensor};
    let (d, c) = (t.shape.d, t.shape.c);
    let axis = |k: usize| -> Vec<(usize, usize, f32)> {
        let s = d[k] as f64 / to[k] as f64;
        (0..to[k])
            .map(|i| {
                let x = ((i as f64 + 0.5) * s - 0.5).clamp(0.0, (d[k] - 1) as f64);
                let i0 = x.floor() as usize;
                (i0, (i0 + 1).min(d[k] - 1), (x - i0 as f64) as f32)
            })
            .collect()
    };
    let (a0, a1, a2) = (axis(0), axis(1), axis(2));
    let mut out = Vec::with_capacity(t.shape.n * to.iter().product::<usize>() * c);
    let vox = t.shape.voxels();
    for n in 0..t.shape.n {
        let src = &t.data[n * vox * c..(n + 1) * vox * c];
        let at = |i: usize, j: usize, k: usize, ch: usize| src[((i * d[1] + j) * d[2] + k) * c + ch];
        for &(i0, i1, wi) in &a0 {
            for &(j0, j1, wj) in &a1 {
                for &(k0, k1, wk) in &a2 {
                    for ch in 0..c {
                        let lerp = |a: f32, b: f32, w: f32| a + (b - a) * w;
                        let plane = |i| lerp(lerp(at(i, j0, k0, ch), at(i, j0, k1, ch), wk), lerp(at(i, j1, k0, ch), at(i, j1, k1, ch), wk), wj);
                        out.push(lerp(plane(i0), plane(i1), wi));
                    }
                }
            }
        }
    }
    Tensor::new(Shape::new(t.shape.n, to, c), out)
}

/// Refuses zero, negative or non-finite voxel sizes.
pub fn check_voxel_size(v: [f64; 3]) -> Result<()> {
    if let Some(i) = v.iter().position(|x| !(x.is_finite() && *x > 0.0)) {
        return Err(Error::Input(format!(
            "voxel size {:?}: the size along axis D{i} is {}; every voxel size must be a positive number of um",
            v, v[i]
        )));
    }
    Ok(())
}

/// Parses "D0,D1,D2" voxel sizes in um (positivity is checked by [`check_voxel_size`], whose
/// error says which axis is wrong).
pub fn parse_voxel_size(s: &str) -> std::result::Result<[f64; 3], String> {
    let v: Vec<f64> = s
        .split(',')
        .map(|p| p.trim().parse::<f64>().map_err(|_| format!("`{p}` is not a number")))
        .collect::<std::result::Result<_, _>>()?;
    match v[..] {
        [a, b, c] => Ok([a, b, c]),
        _ => Err(format!("expected three voxel sizes in um like 0.2,0.2,0.4, got `{s}`")),
    }
}
