//! Training data: pairs of input and target volumes, and their augmentation.
//!
//! A data folder holds either
//!   NAME_input.npy / NAME_target.npy pairs (or .tif), side by side, or
//!   input/NAME.npy and target/NAME.npy (same file names in two sub-folders),
//! and, in either layout, NAME.mat files (MATLAB level 5, or v7.3 = HDF5) with arrays `input` and `target`.
//! A file may hold one volume (D0 x D1 x D2) or several (N x D0 x D1 x D2, N x 1 x D0 x D1 x D2);
//! each volume is one sample. Targets: distance heads, a signed distance map of the input's shape;
//! sigmoid heads, C masks: C x D0 x D1 x D2 (one volume) or N x C x D0 x D1 x D2 (.npy only).
//! A .mat file is one sample, in MATLAB's index order (see `read_mat`).
use crate::config::Config;
use crate::error::{Error, Result};
use crate::io::read_volume;
use crate::rng::Rng;
use crate::tensor::{Shape, Tensor};
use std::path::{Path, PathBuf};

/// One training sample: an input volume (D x 1) and its target (D x C), channels-last, n = 1.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub input: Tensor,
    pub target: Tensor,
}

fn extension_is(p: &Path, exts: &[&str]) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| exts.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn is_volume(p: &Path) -> bool {
    extension_is(p, &["npy", "tif", "tiff"])
}

/// Where a sample's input and target come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// An input file and its target file.
    Pair { input: PathBuf, target: PathBuf },
    /// A MATLAB MAT file holding both (`read_mat`).
    Mat(PathBuf),
}

/// The training files of a data folder, by name: the (input, target) pairs sorted by input file,
/// then the .mat files sorted by file.
pub fn find_sources(dir: &Path) -> Result<Vec<(String, Source)>> {
    let list = |d: &Path, keep: fn(&Path) -> bool| -> Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .map_err(|e| Error::io(d, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && keep(p))
            .collect();
        v.sort();
        Ok(v)
    };
    let mut pairs = Vec::new();
    let (din, dtg) = (dir.join("input"), dir.join("target"));
    if din.is_dir() && dtg.is_dir() {
        for p in list(&din, is_volume)? {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            let t = dtg.join(&name);
            if !t.is_file() {
                return Err(Error::format(&p, format!("no target {} for this input", t.display())));
            }
            pairs.push((name, Source::Pair { input: p, target: t }));
        }
    } else {
        for p in list(dir, is_volume)? {
            let stem = p.file_stem().unwrap().to_string_lossy().to_string();
            let Some(base) = stem.strip_suffix("_input") else { continue };
            let ext = p.extension().unwrap().to_string_lossy().to_string();
            let t = ["npy", "tif", "tiff"].iter().map(|e| dir.join(format!("{base}_target.{e}"))).chain(std::iter::once(dir.join(format!("{base}_target.{ext}")))).find(|t| t.is_file());
            let Some(t) = t else {
                return Err(Error::format(&p, format!("no {base}_target.npy/.tif next to this input")));
            };
            pairs.push((base.to_string(), Source::Pair { input: p, target: t }));
        }
    }
    for p in list(dir, |p| extension_is(p, &["mat"]))? {
        pairs.push((p.file_stem().unwrap().to_string_lossy().to_string(), Source::Mat(p)));
    }
    if pairs.is_empty() {
        return Err(Error::format(
            dir,
            "no training data: expected NAME_input.npy + NAME_target.npy pairs (or .tif), input/ and target/ folders with the same file names, or NAME.mat files",
        ));
    }
    Ok(pairs)
}

/// Reads a target for `n` volumes of size `d` with `c` channels.
pub fn read_target(path: &Path, n: usize, d: [usize; 3], c: usize) -> Result<Tensor> {
    let is_npy = path.extension().and_then(|e| e.to_str()).map(|e| e.eq_ignore_ascii_case("npy")).unwrap_or(false);
    if c == 1 || !is_npy {
        let v = read_volume(path)?;
        if v.tensor.shape != Shape::new(n, d, 1) || c != 1 {
            return Err(Error::format(path, format!("target is {}, the input needs {}", v.tensor.shape, Shape::new(n, d, c))));
        }
        return Ok(v.tensor);
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| Error::format(path, format!("not a readable .npy file: {e}")))?;
    let dims: Vec<usize> = npy.shape().iter().map(|&s| s as usize).collect();
    if npy.order() == npyz::Order::Fortran {
        return Err(Error::format(path, "Fortran-ordered targets are not supported: save it in C order"));
    }
    let data: Vec<f32> = match npy.dtype() {
        npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Float && t.size_field() == 4 => npy.into_vec::<f32>(),
        npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Float && t.size_field() == 8 => npy.into_vec::<f64>().map(|v| v.into_iter().map(|x| x as f32).collect()),
        npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Uint && t.size_field() == 1 => npy.into_vec::<u8>().map(|v| v.into_iter().map(f32::from).collect()),
        d => return Err(Error::format(path, format!("unsupported target dtype {}: expected float32, float64 or uint8", d.descr()))),
    }
    .map_err(|e| Error::format(path, format!("cannot read the .npy data: {e}")))?;
    let want5 = [n, c, d[0], d[1], d[2]];
    let ok = dims == want5 || (n == 1 && dims == want5[1..]);
    if !ok {
        return Err(Error::format(path, format!("target shape {dims:?}, expected {want5:?} (N x C x D0 x D1 x D2) or C x D0 x D1 x D2")));
    }
    Tensor::from_ncdhw(want5, &data)
}

/// Every sample of a data folder, checked against the config (head channels, input size).
pub fn load_samples(dir: &Path, cfg: &Config) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (name, src) in find_sources(dir)? {
        let (x, t, ptg) = match src {
            Source::Pair { input, target } => {
                let x = read_volume(&input)?.tensor;
                cfg.check_input_size(x.shape.d).map_err(|e| Error::format(&input, e.to_string()))?;
                let t = read_target(&target, x.shape.n, x.shape.d, cfg.head_channels())?;
                (x, t, target)
            }
            Source::Mat(path) => {
                let (x, t) = read_mat(&path, cfg.head_channels())?;
                cfg.check_input_size(x.shape.d).map_err(|e| Error::format(&path, e.to_string()))?;
                (x, t, path)
            }
        };
        if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
            return Err(Error::format(&ptg, format!("non-finite target value at flat index {i}")));
        }
        for k in 0..x.shape.n {
            let (vi, vt) = (x.shape.voxels(), t.shape.voxels() * t.shape.c);
            out.push(Sample {
                name: if x.shape.n > 1 { format!("{name}[{k}]") } else { name.clone() },
                input: Tensor::new(x.shape.with_n(1), x.data[k * vi..(k + 1) * vi].to_vec())?,
                target: Tensor::new(t.shape.with_n(1), t.data[k * vt..(k + 1) * vt].to_vec())?,
            });
        }
    }
    Ok(out)
}

/// The arrays `input` and `target` of a MATLAB MAT file (level 5: `save -v7` or `-v6`; v7.3 is
/// HDF5 and refused with a hint), as one sample. MATLAB's index order is kept, as
/// scipy.io.loadmat keeps it: size(input) = [D0 D1 D2] and input(i,j,k) is voxel (i-1, j-1, k-1);
/// the column-major data is reordered here. `target` is [D0 D1 D2] (c = 1) or [D0 D1 D2 c], the
/// channel last. input: single or double; target: single, double or uint8/logical.
pub fn read_mat(path: &Path, c: usize) -> Result<(Tensor, Tensor)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if is_mat73(&bytes) {
        return read_mat73(path, c);
    }
    let mat = matfile::MatFile::parse(&bytes[..])
        .map_err(|e| Error::format(path, format!("not a readable MAT file (MATLAB level 5, saved with -v7 or -v6): {e}")))?;
    let x = mat_volume(path, &mat, "input", 1)?;
    let t = mat_volume(path, &mat, "target", c)?;
    if t.shape.d != x.shape.d {
        return Err(Error::format(path, format!("target is {}, the input is {}", t.shape, x.shape)));
    }
    Ok((x, t))
}

/// The MAT header's version field says 0x0200 (v7.3), or an HDF5 superblock starts at byte 512.
fn is_mat73(b: &[u8]) -> bool {
    // header: 116 bytes of text, 8 of subsystem data offset, version (u16), endian mark "IM" or "MI"
    let version = match b.get(124..128) {
        Some(&[v0, v1, b'I', b'M']) => u16::from_le_bytes([v0, v1]),
        Some(&[v0, v1, b'M', b'I']) => u16::from_be_bytes([v0, v1]),
        _ => 0,
    };
    version == 0x0200 || b.get(512..520) == Some(b"\x89HDF\r\n\x1a\n".as_slice())
}

/// Array `key` of a MAT file as an n = 1 channels-last tensor with `c` channels (see `read_mat`).
fn mat_volume(path: &Path, mat: &matfile::MatFile, key: &str, c: usize) -> Result<Tensor> {
    use matfile::NumericData as N;
    let Some(a) = mat.find_by_name(key) else {
        let names: Vec<&str> = mat.arrays().iter().map(|a| a.name()).collect();
        return Err(Error::format(path, format!("no numeric array `{key}` (numeric arrays here: {names:?}); expected `input` and `target`")));
    };
    let data: Vec<f32> = match a.data() {
        N::Single { real, imag: None } => real.clone(),
        N::Double { real, imag: None } => real.iter().map(|&v| v as f32).collect(),
        N::UInt8 { real, imag: None } if key == "target" => real.iter().map(|&v| f32::from(v)).collect(),
        d => {
            let class = match d {
                N::Int8 { .. } => "int8",
                N::UInt8 { .. } => "uint8",
                N::Int16 { .. } => "int16",
                N::UInt16 { .. } => "uint16",
                N::Int32 { .. } => "int32",
                N::UInt32 { .. } => "uint32",
                N::Int64 { .. } => "int64",
                N::UInt64 { .. } => "uint64",
                N::Single { .. } => "complex single",
                N::Double { .. } => "complex double",
            };
            let want = if key == "target" { "real single, double or uint8/logical" } else { "real single or double" };
            return Err(Error::format(path, format!("`{key}` is {class}; expected {want}")));
        }
    };
    column_major_volume(path, key, a.size(), data, c)
}

/// A MATLAB v7.3 file (HDF5 behind a 512-byte header): root datasets `input` and `target`, whose
/// HDF5 dims are MATLAB's size reversed, so the stored order is MATLAB's column-major order.
fn read_mat73(path: &Path, c: usize) -> Result<(Tensor, Tensor)> {
    let f = hdf5_reader::Hdf5File::open(path).map_err(|e| {
        Error::format(path, format!("a MATLAB v7.3 (HDF5) file that cannot be read ({e}): re-save it with save(FILE, 'input', 'target', '-v7')"))
    })?;
    let read = |key: &str, ch: usize| -> Result<Tensor> {
        let ds = f.dataset(&format!("/{key}")).map_err(|_| Error::format(path, format!("no array `{key}` in this v7.3 MAT file; expected `input` and `target`")))?;
        let size: Vec<usize> = ds.shape().iter().rev().map(|&d| d as usize).collect();
        let n: usize = size.iter().product();
        let bad = |e: hdf5_reader::error::Error| Error::format(path, format!("`{key}`: {e}"));
        let data: Vec<f32> = match ds.dtype() {
            hdf5_reader::Datatype::FloatingPoint { size: 4, .. } => {
                let mut v = vec![0f32; n];
                ds.read_into(&mut v).map_err(bad)?;
                v
            }
            hdf5_reader::Datatype::FloatingPoint { size: 8, .. } => {
                let mut v = vec![0f64; n];
                ds.read_into(&mut v).map_err(bad)?;
                v.into_iter().map(|x| x as f32).collect()
            }
            hdf5_reader::Datatype::FixedPoint { size: 1, signed: false, .. } if key == "target" => {
                let mut v = vec![0u8; n];
                ds.read_into(&mut v).map_err(bad)?;
                v.into_iter().map(f32::from).collect()
            }
            d => return Err(Error::format(path, format!("`{key}` is {d:?}; expected single or double (or uint8/logical for the target)"))),
        };
        column_major_volume(path, key, &size, data, ch)
    };
    let x = read("input", 1)?;
    let t = read("target", c)?;
    if t.shape.d != x.shape.d {
        return Err(Error::format(path, format!("target is {}, the input is {}", t.shape, x.shape)));
    }
    Ok((x, t))
}

/// MATLAB's column-major `data` of `size` ([D0 D1 D2] or [D0 D1 D2 C]) as an n = 1 channels-last tensor.
fn column_major_volume(path: &Path, key: &str, size: &[usize], data: Vec<f32>, c: usize) -> Result<Tensor> {
    let ndims = size.len();
    let [d0, d1, d2, ch] = match size[..] {
        [d0, d1, d2] if c == 1 => [d0, d1, d2, 1],
        [d0, d1, d2, ch] if ch == c => [d0, d1, d2, ch],
        ref s => {
            let want = if c == 1 { "[D0 D1 D2]".to_string() } else { format!("[D0 D1 D2 {c}] (the channel last)") };
            return Err(Error::format(path, format!("`{key}` has size {s:?}; expected {want}")));
        }
    };
    if data.is_empty() {
        return Err(Error::format(path, format!("`{key}` is empty (size {size:?})")));
    }
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        let sub = [i % d0, i / d0 % d1, i / (d0 * d1) % d2, i / (d0 * d1 * d2)].map(|s| s + 1);
        return Err(Error::format(path, format!("`{key}` holds {} at subscript {:?} (1-based): values must be finite", data[i], &sub[..ndims])));
    }
    // column-major data[i + d0 * (j + d1 * (k + d2 * ch))] -> channels-last ((i * d1 + j) * d2 + k) * c + ch
    let mut out = vec![0.0f32; data.len()];
    for (m, &v) in data.iter().enumerate() {
        let (i, j, k, h) = (m % d0, m / d0 % d1, m / (d0 * d1) % d2, m / (d0 * d1 * d2));
        out[((i * d1 + j) * d2 + k) * ch + h] = v;
    }
    Tensor::new(Shape::new(1, [d0, d1, d2], ch), out)
}

trait WithN {
    fn with_n(&self, n: usize) -> Shape;
}
impl WithN for Shape {
    fn with_n(&self, n: usize) -> Shape {
        Shape { n, ..*self }
    }
}

/// An augmentation: flips of each axis, then `rot` quarter turns in the D0-D1 plane (the lateral
/// plane; D2 is the optical axis, whose missing cone makes it unlike the other two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Augment {
    pub flip: [bool; 3],
    pub rot: u8,
}

impl Augment {
    pub const NONE: Augment = Augment { flip: [false; 3], rot: 0 };

    /// A random augmentation; odd quarter turns only when D0 == D1.
    pub fn random(rng: &mut Rng, d: [usize; 3]) -> Augment {
        let flip = [rng.below(2) == 1, rng.below(2) == 1, rng.below(2) == 1];
        let rot = if d[0] == d[1] { rng.below(4) as u8 } else { 2 * rng.below(2) as u8 };
        Augment { flip, rot }
    }

    /// Applies the augmentation to an n = 1 tensor (any channel count).
    pub fn apply(&self, t: &Tensor) -> Tensor {
        if *self == Augment::NONE {
            return t.clone();
        }
        let s = t.shape;
        let [a, b, e] = s.d;
        let c = s.c;
        let od = if self.rot % 2 == 1 { [b, a, e] } else { [a, b, e] };
        let mut out = vec![0.0f32; t.data.len()];
        for i in 0..a {
            for j in 0..b {
                for k in 0..e {
                    let (fi, fj, fk) = (if self.flip[0] { a - 1 - i } else { i }, if self.flip[1] { b - 1 - j } else { j }, if self.flip[2] { e - 1 - k } else { k });
                    // quarter turns of (fi, fj) in the plane: (i, j) -> (j, A-1-i)
                    let (mut p, mut q, mut pa, mut qa) = (fi, fj, a, b);
                    for _ in 0..self.rot {
                        (p, q) = (q, pa - 1 - p);
                        (pa, qa) = (qa, pa);
                    }
                    let src = ((i * b + j) * e + k) * c;
                    let dst = ((p * od[1] + q) * e + fk) * c;
                    out[dst..dst + c].copy_from_slice(&t.data[src..src + c]);
                }
            }
        }
        Tensor { shape: s.with_d(od), data: out }
    }
}

/// Stacks n = 1 tensors of one shape into a batch.
pub fn stack(ts: &[Tensor]) -> Result<Tensor> {
    let s = ts.first().ok_or_else(|| Error::Input("empty batch".into()))?.shape;
    let mut data = Vec::with_capacity(s.len() * ts.len());
    for t in ts {
        if t.shape != s {
            return Err(Error::Shape(format!("a batch mixes volume shapes {} and {}", s, t.shape)));
        }
        data.extend_from_slice(&t.data);
    }
    Tensor::new(Shape::new(ts.len(), s.d, s.c), data)
}
