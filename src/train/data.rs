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
use crate::io::{extension_is, read_volume};
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
    read_map(path, "target", n, d, c)
}

/// Reads a per-voxel map (`role` names it in errors: "target", "weight map") for `n` volumes of
/// size `d` with `c` channels.
pub fn read_map(path: &Path, role: &str, n: usize, d: [usize; 3], c: usize) -> Result<Tensor> {
    if c == 1 || !extension_is(path, &["npy"]) {
        let v = read_volume(path)?;
        if v.tensor.shape != Shape::new(n, d, 1) || c != 1 {
            return Err(Error::format(path, format!("the {role} is {}, the input needs {}", v.tensor.shape, Shape::new(n, d, c))));
        }
        return Ok(v.tensor);
    }
    let want5 = [n, c, d[0], d[1], d[2]];
    let shape_ok = |dims: &[usize]| {
        if dims == want5 || (n == 1 && dims == &want5[1..]) {
            Ok(())
        } else {
            Err(Error::format(path, format!("{role} shape {dims:?}, expected {want5:?} (N x C x D0 x D1 x D2) or C x D0 x D1 x D2")))
        }
    };
    let (_, data) = crate::io::read_npy_file(path, shape_ok)?;
    Tensor::from_ncdhw(want5, &data)
}

/// Every sample of a data folder, checked against the config (head channels, input size).
pub fn load_samples(dir: &Path, cfg: &Config) -> Result<Vec<Sample>> {
    load(dir, cfg, None)
}

/// `load_samples` for training with `batch` volumes a step: when a batch can hold two volumes,
/// every volume must have one size, and the first file of another size is refused as it is
/// read (rather than when a batch happens to draw it, epochs later).
pub fn load_training_data(dir: &Path, cfg: &Config, batch: usize) -> Result<Vec<Sample>> {
    load(dir, cfg, Some(batch))
}

fn load(dir: &Path, cfg: &Config, batch: Option<usize>) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    let mut first: Option<(PathBuf, [usize; 3])> = None;
    for (name, src) in find_sources(dir)? {
        let file = match &src {
            Source::Pair { input, .. } => input.clone(),
            Source::Mat(path) => path.clone(),
        };
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
        match (&first, batch) {
            (None, _) => first = Some((file.clone(), x.shape.d)),
            (Some((f0, d0)), Some(b)) if b > 1 && *d0 != x.shape.d => {
                let dims = |d: &[usize; 3]| format!("{} x {} x {}", d[0], d[1], d[2]);
                return Err(Error::format(
                    &file,
                    format!(
                        "volumes of {}, but {} holds {}: a batch of {b} stacks volumes of one size (--batch 1 trains on mixed sizes; or crop them to one size)",
                        dims(&x.shape.d),
                        f0.display(),
                        dims(d0)
                    ),
                ));
            }
            _ => {}
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
    let (file, len) = crate::io::open_file(path)?;
    crate::limits::check("reading the MAT file", Some(len)).map_err(|m| Error::format(path, m))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::BufReader::new(file), &mut bytes).map_err(|e| Error::io(path, e))?;
    if is_mat73(&bytes) {
        return read_mat73(path, c);
    }
    read_mat_bytes(path, &bytes, c)
}

/// [`read_mat`] of a level-5 file's bytes held in memory (`path` names it in errors); a v7.3
/// (HDF5) file is read from disk by [`read_mat`] only.
pub fn read_mat_bytes(path: &Path, bytes: &[u8], c: usize) -> Result<(Tensor, Tensor)> {
    if is_mat73(bytes) {
        return Err(Error::format(path, "a MATLAB v7.3 (HDF5) MAT file is read from disk, not from memory"));
    }
    let plain = inflate_mat(path, bytes)?;
    check_mat_arrays(path, &plain)?;
    let mat = matfile::MatFile::parse(&plain[..])
        .map_err(|e| Error::format(path, format!("not a readable MAT file (MATLAB level 5, saved with -v7 or -v6): {e}")))?;
    let x = mat_volume(path, &mat, "input", 1)?;
    let t = mat_volume(path, &mat, "target", c)?;
    if t.shape.d != x.shape.d {
        return Err(Error::format(path, format!("target is {}, the input is {}", t.shape, x.shape)));
    }
    Ok((x, t))
}

/// A level-5 MAT file with every compressed element inflated in place, so that matfile parses
/// plain bytes: each stream is inflated under the memory budget (a 4 MB file cannot inflate to
/// 2 GB), and every element's claimed size is checked against the file's.
fn inflate_mat<'a>(path: &Path, b: &'a [u8]) -> Result<std::borrow::Cow<'a, [u8]>> {
    let Some(little) = mat_little_endian(b) else {
        return Ok(b.into()); // matfile says what is wrong with the header
    };
    let u32_at = |o: usize| mat_u32(b, o, little);
    // the arrays, their f32 copies and the tensors: a few times the inflated bytes
    let room = crate::limits::budget() / 4;
    let mut out = b[..128].to_vec();
    let (mut off, mut any) = (128usize, false);
    while off + 8 <= b.len() {
        let (kind, size) = (u32_at(off), u32_at(off + 4) as usize);
        if kind >> 16 != 0 {
            // small data element: type and size in one word, 8 bytes in all
            out.extend_from_slice(&b[off..off + 8]);
            off += 8;
            continue;
        }
        let end = off.checked_add(8 + size).filter(|&e| e <= b.len()).ok_or_else(|| {
            Error::format(path, format!("MAT element at byte {off} claims {size} bytes, but the file ends at byte {}: it is truncated", b.len()))
        })?;
        if kind == MI_COMPRESSED {
            any = true;
            inflate_element(path, &b[off + 8..end], off, little, room.saturating_sub(out.len() as u64), &mut out)?;
        } else {
            let padded = (end - off).next_multiple_of(8).min(b.len() - off);
            out.extend_from_slice(&b[off..off + padded]);
            off += padded;
            continue;
        }
        off = end;
    }
    Ok(if any { out.into() } else { b.into() })
}

/// Inflates one compressed MAT element (at byte `off`) onto `out`: no more than the size its
/// own tag (the first 8 inflated bytes) promises, and that size within `room` bytes.
fn inflate_element(path: &Path, z: &[u8], off: usize, little: bool, room: u64, out: &mut Vec<u8>) -> Result<()> {
    use std::io::Read;
    let bad = |m: String| Error::format(path, format!("the compressed MAT element at byte {off} {m}"));
    let mut z = flate2::read::ZlibDecoder::new(z);
    let mut tag = [0u8; 8];
    z.read_exact(&mut tag).map_err(|e| bad(format!("does not inflate to an element: {e}")))?;
    let (kind, size) = (mat_u32(&tag, 0, little), mat_u32(&tag, 4, little) as u64);
    if kind == MI_COMPRESSED {
        // matfile would inflate it again, with no bound; MATLAB never nests them
        return Err(bad("holds another compressed element: the file is corrupt".into()));
    }
    let size = if kind >> 16 != 0 { 0 } else { size };
    if size + 8 > room {
        let all = crate::limits::gb(crate::limits::budget());
        return Err(bad(format!(
            "promises {} once inflated, more than a quarter of the {all} memory budget ({}): corrupt, or too large for this machine",
            crate::limits::gb(size + 8),
            crate::limits::ENV
        )));
    }
    out.extend_from_slice(&tag);
    let before = out.len();
    z.take(size + 1).read_to_end(out).map_err(|e| bad(format!("does not inflate: {e}")))?;
    let got = (out.len() - before) as u64;
    if got > size {
        return Err(bad(format!("inflates past the {size} bytes its header promises: the file is corrupt")));
    }
    if got < size {
        return Err(bad(format!("inflates to {got} bytes, its header promises {size}: the file is truncated or corrupt")));
    }
    Ok(())
}

/// MAT data-element types (the level-5 format's miUINT32, miINT32, miMATRIX, miCOMPRESSED).
const MI_UINT32: u32 = 6;
const MI_INT32: u32 = 5;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;

/// The byte order a level-5 MAT header declares: little ("IM"), big ("MI"), or none.
fn mat_little_endian(b: &[u8]) -> Option<bool> {
    match b.get(126..128) {
        Some(b"IM") => Some(true),
        Some(b"MI") => Some(false),
        _ => None,
    }
}

/// The MAT word at byte `o` of `b` (the caller has checked that four bytes are there).
fn mat_u32(b: &[u8], o: usize, little: bool) -> u32 {
    let w = [b[o], b[o + 1], b[o + 2], b[o + 3]];
    if little { u32::from_le_bytes(w) } else { u32::from_be_bytes(w) }
}

/// What matfile multiplies and pads unchecked (an overflow panics in a debug build and miscounts
/// in a release one), checked before it parses the inflated bytes `b`: walking the top-level
/// elements as matfile does, each array it reads must hold its sub-elements, and its size must be
/// non-negative with a product that fits matfile's i32 at every step.
fn check_mat_arrays(path: &Path, b: &[u8]) -> Result<()> {
    let Some(little) = mat_little_endian(b) else { return Ok(()) };
    let mut off = 128usize;
    while off + 8 <= b.len() {
        let (kind, size) = (mat_u32(b, off, little), mat_u32(b, off + 4, little) as usize);
        if kind == MI_MATRIX {
            check_mat_array(path, &b[off + 8..(off + 8).saturating_add(size).min(b.len())], off, little)?;
        }
        off += 8 + if kind >> 16 != 0 { 0 } else { size.next_multiple_of(8) };
    }
    Ok(())
}

/// One top-level array `a` (the element at byte `off`, past its tag) for [`check_mat_arrays`].
fn check_mat_array(path: &Path, a: &[u8], off: usize, little: bool) -> Result<()> {
    // array flags: a miUINT32 sub-element of 8 bytes, the class in the low byte; matfile skips
    // cells, structs, objects and chars (classes 1 to 4) and says what is wrong with bad flags
    if a.len() < 16 || mat_u32(a, 0, little) != MI_UINT32 || mat_u32(a, 4, little) != 8 || (mat_u32(a, 8, little) & 0xFF) < 5 {
        return Ok(());
    }
    let bad = |m: String| Error::format(path, format!("the MAT array at byte {off} {m}: the file is corrupt"));
    let (mut p, mut first) = (16usize, true);
    while p + 8 <= a.len() {
        let (kind, size) = (mat_u32(a, p, little), mat_u32(a, p + 4, little) as usize);
        if kind >> 16 != 0 {
            (p, first) = (p + 8, false);
            continue;
        }
        if size > a.len() - p - 8 {
            return Err(bad(format!("has a part at its byte {p} that claims {size} bytes, past the array's end ({} bytes)", a.len())));
        }
        if first && kind == MI_INT32 && size >= 8 && size % 4 == 0 {
            let dims: Vec<i32> = (0..size / 4).map(|k| mat_u32(a, p + 8 + 4 * k, little) as i32).collect();
            if dims.iter().try_fold(1i32, |n, &d| if d < 0 { None } else { n.checked_mul(d) }).is_none() {
                return Err(bad(format!("has size {dims:?}: negative, or more than 2^31 - 1 elements")));
            }
        }
        (p, first) = (p + 8 + size.next_multiple_of(8), false);
    }
    Ok(())
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
        let total = crate::limits::product(ds.shape());
        crate::limits::check(&format!("`{key}`"), crate::limits::bytes_of(total, 8)).map_err(|m| Error::format(path, m))?;
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
    if crate::limits::product(&[d0 as u64, d1 as u64, d2 as u64, ch as u64]) != Some(data.len() as u64) {
        return Err(Error::format(path, format!("`{key}` has size {:?} but holds {} values: the file is corrupt", size, data.len())));
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
