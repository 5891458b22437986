//! Training data: pairs of input and target volumes, and their augmentation.
//!
//! A data folder holds either
//!   NAME_input.npy / NAME_target.npy pairs (or .tif), side by side, or
//!   input/NAME.npy and target/NAME.npy (same file names in two sub-folders).
//! A file may hold one volume (D0 x D1 x D2) or several (N x D0 x D1 x D2, N x 1 x D0 x D1 x D2);
//! each volume is one sample. Targets: distance heads, a signed distance map of the input's shape;
//! sigmoid heads, C masks: C x D0 x D1 x D2 (one volume) or N x C x D0 x D1 x D2 (.npy only).
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

fn is_volume(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref(), Some("npy" | "tif" | "tiff"))
}

/// (input, target) file pairs of a data folder, sorted by name.
pub fn find_pairs(dir: &Path) -> Result<Vec<(String, PathBuf, PathBuf)>> {
    let list = |d: &Path| -> Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .map_err(|e| Error::io(d, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_volume(p))
            .collect();
        v.sort();
        Ok(v)
    };
    let mut pairs = Vec::new();
    let (din, dtg) = (dir.join("input"), dir.join("target"));
    if din.is_dir() && dtg.is_dir() {
        for p in list(&din)? {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            let t = dtg.join(&name);
            if !t.is_file() {
                return Err(Error::format(&p, format!("no target {} for this input", t.display())));
            }
            pairs.push((name, p, t));
        }
    } else {
        for p in list(dir)? {
            let stem = p.file_stem().unwrap().to_string_lossy().to_string();
            let Some(base) = stem.strip_suffix("_input") else { continue };
            let ext = p.extension().unwrap().to_string_lossy().to_string();
            let t = ["npy", "tif", "tiff"].iter().map(|e| dir.join(format!("{base}_target.{e}"))).chain(std::iter::once(dir.join(format!("{base}_target.{ext}")))).find(|t| t.is_file());
            let Some(t) = t else {
                return Err(Error::format(&p, format!("no {base}_target.npy/.tif next to this input")));
            };
            pairs.push((base.to_string(), p, t));
        }
    }
    if pairs.is_empty() {
        return Err(Error::format(
            dir,
            "no training data: expected NAME_input.npy + NAME_target.npy pairs (or .tif), or input/ and target/ folders with the same file names",
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
    for (name, pin, ptg) in find_pairs(dir)? {
        let x = read_volume(&pin)?.tensor;
        cfg.check_input_size(x.shape.d).map_err(|e| Error::format(&pin, e.to_string()))?;
        let t = read_target(&ptg, x.shape.n, x.shape.d, cfg.head_channels())?;
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
