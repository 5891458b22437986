//! Volume I/O: refractive-index volumes in (`.npy`, multi-page `.tif`) and head outputs out.
//!
//! Inside the engine a volume is a channels-last [`Tensor`] with C = 1; the file's rank
//! convention (3D, 4D or 5D) is kept so the output can follow it. Every output goes through
//! [`write_atomic`]: a temporary file in the destination's folder, renamed when complete.
use crate::error::{Error, Result};
use crate::tensor::{Shape, Tensor};
use std::fs::File;
use std::io::{BufReader, BufWriter, Seek, Write};
use std::path::Path;

/// A batch of input volumes, as read from one file.
#[derive(Clone, Debug, PartialEq)]
pub struct Volume {
    /// N x D0 x D1 x D2 x 1, channels-last.
    pub tensor: Tensor,
    /// Rank of the file: 3 (D0 x D1 x D2), 4 (N x D0 x D1 x D2) or 5 (N x 1 x D0 x D1 x D2).
    /// A `.tif` stack is rank 3.
    pub rank: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Npy,
    Tif,
    Tcf,
}

fn kind_of(path: &Path) -> Result<Kind> {
    let ext = path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("npy") => Ok(Kind::Npy),
        Some("tif") | Some("tiff") => Ok(Kind::Tif),
        Some("tcf") => Ok(Kind::Tcf),
        _ => Err(Error::format(path, "unsupported file type: expected a .npy array, a .tif/.tiff stack or a Tomocube .TCF")),
    }
}

/// Reads a volume (`.npy` or multi-page `.tif`), checking its rank, dtype and values.
pub fn read_volume(path: &Path) -> Result<Volume> {
    let kind = kind_of(path)?;
    if kind == Kind::Tcf {
        // Every frame of the 3D series, transposed to X, Y, Z (see `crate::tcf`).
        let (dims, data, _) = crate::tcf::read_tcf(path)?;
        return volume_from(path, &dims, data);
    }
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = BufReader::new(file);
    let (dims, data) = match kind {
        Kind::Npy => read_npy(path, reader)?,
        Kind::Tif | Kind::Tcf => read_tif(path, reader)?,
    };
    volume_from(path, &dims, data)
}

/// Builds the volume from the file's dims (C order) and values, checking rank, size and finiteness.
fn volume_from(path: &Path, dims: &[usize], data: Vec<f32>) -> Result<Volume> {
    let rank = dims.len();
    let shape = match *dims {
        [a, b, c] => Shape::new(1, [a, b, c], 1),
        [n, a, b, c] => Shape::new(n, [a, b, c], 1),
        [n, ch, a, b, c] => {
            if ch != 1 {
                return Err(Error::format(
                    path,
                    format!("5D input must be N x 1 x D0 x D1 x D2 (one channel), got {} channels in shape {:?}", ch, dims),
                ));
            }
            Shape::new(n, [a, b, c], 1)
        }
        _ => {
            return Err(Error::format(
                path,
                format!(
                    "a volume must be 3D (D0 x D1 x D2), 4D (N x D0 x D1 x D2) or 5D (N x 1 x D0 x D1 x D2); got {}D shape {:?}",
                    rank, dims
                ),
            ))
        }
    };
    if shape.is_empty() {
        return Err(Error::format(path, format!("the volume is empty (shape {:?})", dims)));
    }
    // With C = 1 the channels-last layout is the file's C order, so the flat index unravels on `dims`.
    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
        let mut idx = vec![0usize; rank];
        let mut r = i;
        for k in (0..rank).rev() {
            idx[k] = r % dims[k];
            r /= dims[k];
        }
        return Err(Error::format(
            path,
            format!("value {} at index {:?} (shape {:?}): the volume must hold finite numbers only", data[i], idx, dims),
        ));
    }
    Ok(Volume { tensor: Tensor::new(shape, data)?, rank })
}

fn read_npy(path: &Path, reader: impl std::io::Read) -> Result<(Vec<usize>, Vec<f32>)> {
    use npyz::{DType, TypeChar};
    let npy = npyz::NpyFile::new(reader).map_err(|e| Error::format(path, format!("not a readable .npy file: {e}")))?;
    let dims: Vec<usize> = npy.shape().iter().map(|&s| s as usize).collect();
    let strides: Vec<usize> = npy.strides().iter().map(|&s| s as usize).collect();
    let fortran = npy.order() == npyz::Order::Fortran;
    let dtype = npy.dtype();
    let (tc, size) = match &dtype {
        DType::Plain(ts) => (ts.type_char(), ts.size_field()),
        _ => return Err(Error::format(path, format!("unsupported dtype {}: expected float32, float64, uint16 or uint8", dtype.descr()))),
    };
    let trunc = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::format(path, format!("the file is truncated: its header announces shape {:?}", dims))
        } else {
            Error::format(path, format!("cannot read the .npy data: {e}"))
        }
    };
    let data: Vec<f32> = match (tc, size) {
        (TypeChar::Float, 4) => npy.into_vec::<f32>().map_err(trunc)?,
        (TypeChar::Float, 8) => npy.into_vec::<f64>().map_err(trunc)?.into_iter().map(|x| x as f32).collect(),
        (TypeChar::Uint, 2) => npy.into_vec::<u16>().map_err(trunc)?.into_iter().map(f32::from).collect(),
        (TypeChar::Uint, 1) => npy.into_vec::<u8>().map_err(trunc)?.into_iter().map(f32::from).collect(),
        _ => {
            return Err(Error::format(
                path,
                format!("unsupported dtype {}: expected float32, float64, uint16 or uint8", dtype.descr()),
            ))
        }
    };
    let data = if fortran && dims.len() > 1 { to_c_order(&dims, &strides, &data) } else { data };
    Ok((dims, data))
}

/// Re-orders data stored with element `strides` into C order of `dims`.
fn to_c_order(dims: &[usize], strides: &[usize], src: &[f32]) -> Vec<f32> {
    let total: usize = dims.iter().product();
    let mut out = Vec::with_capacity(total);
    let mut idx = vec![0usize; dims.len()];
    for _ in 0..total {
        out.push(src[idx.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>()]);
        for k in (0..dims.len()).rev() {
            idx[k] += 1;
            if idx[k] < dims[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    out
}

fn read_tif(path: &Path, reader: impl std::io::Read + Seek) -> Result<(Vec<usize>, Vec<f32>)> {
    use tiff::decoder::{Decoder, DecodingResult, Limits};
    let terr = |page: usize, e: tiff::TiffError| Error::format(path, format!("cannot read TIFF page {page}: {e}"));
    let mut dec = Decoder::new(reader)
        .map_err(|e| Error::format(path, format!("not a readable TIFF file: {e}")))?
        .with_limits(Limits::unlimited());
    let mut data = Vec::new();
    let mut page = 0usize;
    let mut hw: Option<(usize, usize)> = None;
    loop {
        let (w, h) = dec.dimensions().map_err(|e| terr(page, e))?;
        let (w, h) = (w as usize, h as usize);
        match hw {
            None => hw = Some((h, w)),
            Some((h0, w0)) if (h0, w0) != (h, w) => {
                return Err(Error::format(
                    path,
                    format!("page {page} is {h} x {w} but page 0 is {h0} x {w0}: every page of the stack must have the same size"),
                ))
            }
            _ => {}
        }
        let ct = dec.colortype().map_err(|e| terr(page, e))?;
        if !matches!(ct, tiff::ColorType::Gray(_)) {
            return Err(Error::format(path, format!("page {page} is {ct:?}: only grayscale pages (8/16-bit or float32) are supported")));
        }
        match dec.read_image().map_err(|e| terr(page, e))? {
            DecodingResult::U8(v) => data.extend(v.into_iter().map(f32::from)),
            DecodingResult::U16(v) => data.extend(v.into_iter().map(f32::from)),
            DecodingResult::F32(v) => data.extend(v),
            DecodingResult::F64(v) => data.extend(v.into_iter().map(|x| x as f32)),
            _ => {
                return Err(Error::format(path, format!("page {page} has an unsupported sample type: expected uint8, uint16 or float32")))
            }
        }
        page += 1;
        if !dec.more_images() {
            break;
        }
        dec.next_image().map_err(|e| terr(page, e))?;
    }
    let (h, w) = hw.unwrap_or((0, 0));
    if data.len() != page * h * w {
        return Err(Error::format(path, format!("pages hold {} samples, expected {} x {} x {}: not a single-channel stack", data.len(), page, h, w)));
    }
    Ok((vec![page, h, w], data))
}

/// Writes a file through `write` into a temporary file next to `path`, then renames it over `path`.
/// On any error (or a crash) no partial file is left at `path`; an I/O error names `path`.
pub fn write_atomic<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<&mut File>) -> std::io::Result<()>,
{
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io(path, e))?;
    {
        let mut w = BufWriter::new(tmp.as_file_mut());
        write(&mut w).map_err(|e| Error::io(path, e))?;
        w.flush().map_err(|e| Error::io(path, e))?;
    }
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Checks, before any work, that an output can be written at `path`: a known extension and an
/// existing folder.
pub fn check_output_path(path: &Path) -> Result<()> {
    if kind_of(path)? == Kind::Tcf {
        return Err(Error::format(path, "deepis does not write TCF files: give a .npy or .tif output"));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(Error::format(path, format!("the output folder {} does not exist", dir.display())));
        }
    }
    if path.is_dir() {
        return Err(Error::format(path, "is a folder; give the output file's name"));
    }
    Ok(())
}

/// The dims of the output file for a head output `t` of an input of rank `rank`:
/// C x D0 x D1 x D2 for a 3D input, N x C x D0 x D1 x D2 otherwise.
pub fn output_dims(t: &Tensor, rank: usize) -> Result<Vec<usize>> {
    let [n, c, a, b, e] = t.shape.ncdhw();
    match rank {
        3 if n == 1 => Ok(vec![c, a, b, e]),
        3 => Err(Error::Shape(format!("a 3D input gives one volume, got {n}"))),
        4 | 5 => Ok(vec![n, c, a, b, e]),
        _ => Err(Error::Shape(format!("input rank {rank} is not 3, 4 or 5"))),
    }
}

/// Writes the head output as float32 `.npy` (dims from [`output_dims`]) or as a multi-page float32
/// `.tif` (pages ordered (n, c, d0), each D1 rows x D2 columns).
pub fn write_output(path: &Path, t: &Tensor, rank: usize) -> Result<()> {
    let kind = kind_of(path)?;
    let dims = output_dims(t, rank)?;
    let data = t.to_ncdhw();
    match kind {
        Kind::Npy => write_atomic(path, |w| write_npy_to(w, &dims, &data)),
        Kind::Tif => {
            let [_, _, _, d1, d2] = t.shape.ncdhw();
            write_atomic(path, |w| write_tif_to(w, d1, d2, &data))
        }        Kind::Tcf => Err(Error::format(path, "deepis does not write TCF files: give a .npy or .tif output")),
    }
}

/// Writes float32 `data` of C-order `dims` as `.npy` (atomically).
pub fn write_npy(path: &Path, dims: &[usize], data: &[f32]) -> Result<()> {
    write_atomic(path, |w| write_npy_to(w, dims, data))
}

fn write_npy_to(w: impl Write, dims: &[usize], data: &[f32]) -> std::io::Result<()> {
    use npyz::WriterBuilder;
    let shape: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
    let mut npy = npyz::WriteOptions::new().default_dtype().shape(&shape).writer(w).begin_nd()?;
    npy.extend(data.iter().copied())?;
    npy.finish()
}

fn write_tif_to(w: impl Write + Seek, d1: usize, d2: usize, data: &[f32]) -> std::io::Result<()> {
    use tiff::encoder::{colortype::Gray32Float, TiffEncoder};
    let terr = |e: tiff::TiffError| match e {
        tiff::TiffError::IoError(e) => e,
        e => std::io::Error::other(format!("cannot write TIFF: {e}")),
    };
    let page = d1 * d2;
    let mut enc = TiffEncoder::new(w).map_err(terr)?;
    for p in data.chunks(page.max(1)) {
        enc.write_image::<Gray32Float>(d2 as u32, d1 as u32, p).map_err(terr)?;
    }
    Ok(())
}
