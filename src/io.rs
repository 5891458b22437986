//! Volume I/O: refractive-index volumes in (`.npy`, multi-page `.tif`) and head outputs out.
//!
//! Inside the engine a volume is a channels-last [`Tensor`] with C = 1; the file's rank
//! convention (3D, 4D or 5D) is kept so the output can follow it. Every output goes through
//! [`write_atomic`]: a temporary file in the destination's folder, renamed when complete.
use crate::error::{Error, Result};
use crate::tensor::{unravel, Shape, Tensor};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

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

/// Whether `p`'s extension is one of `exts` (any case).
pub fn extension_is(p: &Path, exts: &[&str]) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| exts.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Opens `path` for reading, refusing a folder (whose read would fail with a puzzling OS error).
pub fn open_file(path: &Path) -> Result<(File, u64)> {
    if path.is_dir() {
        return Err(Error::format(path, "is a folder, not a file"));
    }
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    Ok((file, len))
}

/// Reads a volume (`.npy` or multi-page `.tif`), checking its rank, dtype and values.
pub fn read_volume(path: &Path) -> Result<Volume> {
    let kind = kind_of(path)?;
    if kind == Kind::Tcf {
        // Every frame of the 3D series, transposed to X, Y, Z (see `crate::tcf`).
        let (dims, data, _) = crate::tcf::read_tcf(path)?;
        return volume_from(path, &dims, data);
    }
    let (file, len) = open_file(path)?;
    read_volume_from(path, kind, BufReader::new(file), len)
}

/// [`read_volume`] of a file's bytes held in memory; `name`'s extension picks the format and
/// errors name it (the fuzz targets' entry point).
pub fn read_volume_bytes(name: &Path, bytes: &[u8]) -> Result<Volume> {
    read_volume_from(name, kind_of(name)?, std::io::Cursor::new(bytes), bytes.len() as u64)
}

fn read_volume_from(path: &Path, kind: Kind, reader: impl Read + Seek, len: u64) -> Result<Volume> {
    let (dims, data) = match kind {
        Kind::Npy => read_npy(path, reader, len, |dims| volume_shape(path, dims).map(|_| ()))?,
        Kind::Tif => read_tif(path, reader, len)?,
        Kind::Tcf => return Err(Error::format(path, "a TCF file is read from disk, not from memory")),
    };
    volume_from(path, &dims, data)
}

/// The engine's shape for a file of C-order `dims`, refusing ranks, channels and empty volumes
/// the network cannot take.
fn volume_shape(path: &Path, dims: &[usize]) -> Result<Shape> {
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
    if dims.contains(&0) {
        return Err(Error::format(path, format!("the volume is empty (shape {:?})", dims)));
    }
    Ok(shape)
}

/// Builds the volume from the file's dims (C order) and values, checking rank, size and finiteness.
fn volume_from(path: &Path, dims: &[usize], data: Vec<f32>) -> Result<Volume> {
    let rank = dims.len();
    let shape = volume_shape(path, dims)?;
    // With C = 1 the channels-last layout is the file's C order, so the flat index unravels on `dims`.
    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
        return Err(Error::format(
            path,
            format!("value {} at index {:?} (shape {:?}): the volume must hold finite numbers only", data[i], unravel(i, dims), dims),
        ));
    }
    Ok(Volume { tensor: Tensor::new(shape, data)?, rank })
}

/// numpy itself refuses headers over 10000 bytes unless told otherwise (`max_header_size`: its
/// literal parser is slow on long ones, and so is npyz's); a real header is ~128.
const NPY_MAX_HEADER: u64 = 10000;
/// Brackets a plain array's header nests: the dict and the shape tuple in it. npyz's parser of
/// the header backtracks exponentially in the depth (a 400-byte header of 150 `[` ran for hours).
const NPY_MAX_NESTING: usize = 2;

/// Reads a whole `.npy` file as float32 (float32, float64, uint16 or uint8 data; C or Fortran
/// order, returned in C order): the dims and values. `check_dims` sees the shape before any
/// data is read.
pub fn read_npy_file(path: &Path, check_dims: impl Fn(&[usize]) -> Result<()>) -> Result<(Vec<usize>, Vec<f32>)> {
    let (file, len) = open_file(path)?;
    read_npy(path, BufReader::new(file), len, check_dims)
}

/// Reads a whole `.npy` array or `.tif` stack as float32, C order: its dims (a TIFF's are pages,
/// rows, columns, after the frames and channels an OME-TIFF records) and values. `check_dims` sees a `.npy`'s shape before any data is read.
pub fn read_array(path: &Path, check_dims: impl Fn(&[usize]) -> Result<()>) -> Result<(Vec<usize>, Vec<f32>)> {
    match kind_of(path)? {
        Kind::Npy => read_npy_file(path, check_dims),
        Kind::Tif => {
            let (file, len) = open_file(path)?;
            read_tif(path, BufReader::new(file), len)
        }
        Kind::Tcf => Err(Error::format(path, "expected a .npy array or a .tif stack, not a TCF file")),
    }
}

/// The header is checked against the file's `len` and the memory budget before npyz parses it
/// or any data is allocated.
fn read_npy(path: &Path, mut reader: impl Read, len: u64, check_dims: impl Fn(&[usize]) -> Result<()>) -> Result<(Vec<usize>, Vec<f32>)> {
    use npyz::{DType, TypeChar};
    let bad = |m: String| Error::format(path, m);
    let (pre, header) = npy_header(path, &mut reader, len)?;
    let head_len = (pre.len() + header.len()) as u64;
    let npy = npyz::NpyHeader::from_reader(std::io::Cursor::new([pre, header].concat())).map_err(|e| bad(format!("not a readable .npy file: {e}")))?;
    let shape = npy.shape().to_vec();
    let count = crate::limits::product(&shape);
    let dims: Vec<usize> = match count {
        Some(_) => shape.iter().map(|&s| s as usize).collect(),
        None => return Err(bad(format!("shape {shape:?} has more than 2^64 elements: the header is corrupt"))),
    };
    check_dims(&dims)?;
    let dtype = npy.dtype();
    let unsupported = || bad(format!("unsupported dtype {}: expected float32, float64, uint16 or uint8", dtype.descr()));
    let (tc, size) = match &dtype {
        DType::Plain(ts) => (ts.type_char(), ts.size_field()),
        _ => return Err(unsupported()),
    };
    if !matches!((tc, size), (TypeChar::Float, 4 | 8) | (TypeChar::Uint, 1 | 2)) {
        return Err(unsupported());
    }
    let need = crate::limits::bytes_of(count, size);
    let data_len = len.saturating_sub(head_len);
    if need.is_some_and(|n| n > data_len) || need.is_none() {
        let need = need.map_or("more than 2^64".to_string(), |n| n.to_string());
        return Err(bad(format!("the file is truncated: its header announces shape {dims:?} ({need} bytes of data), the file holds {data_len}")));
    }
    // the values as float32, plus the file's own type while converting
    let peak = crate::limits::bytes_of(count, if size == 4 { 4 } else { 4 + size });
    crate::limits::check(&format!("reading shape {dims:?}"), peak).map_err(bad)?;
    let trunc = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            bad(format!("the file is truncated: its header announces shape {:?}", dims))
        } else {
            bad(format!("cannot read the .npy data: {e}"))
        }
    };
    let strides: Vec<usize> = npy.strides().iter().map(|&s| s as usize).collect();
    let fortran = npy.order() == npyz::Order::Fortran;
    let big = matches!(&dtype, DType::Plain(ts) if ts.endianness() == npyz::Endianness::Big);
    let data = read_values(&mut reader, count.unwrap_or(0) as usize, tc == TypeChar::Float, size as usize, big).map_err(trunc)?;
    let data = if fortran && dims.len() > 1 { to_c_order(&dims, &strides, &data) } else { data };
    Ok((dims, data))
}

/// `n` values of a `.npy`'s data as float32: read in bulk, then converted from float32 / float64
/// (`float`) or uint8 / uint16, of `size` bytes, little- or `big`-endian.
fn read_values(r: &mut impl Read, n: usize, float: bool, size: usize, big: bool) -> std::io::Result<Vec<f32>> {
    if (float, size) == (true, 4) {
        // straight into the values, then into this machine's byte order
        let mut v = vec![0f32; n];
        r.read_exact(bytemuck::cast_slice_mut(&mut v))?;
        if big != cfg!(target_endian = "big") {
            v.iter_mut().for_each(|x| *x = f32::from_bits(x.to_bits().swap_bytes()));
        }
        return Ok(v);
    }
    let mut bytes = vec![0u8; n * size];
    r.read_exact(&mut bytes)?;
    Ok(match (float, size) {
        (true, _) => convert(&bytes, |b: [u8; 8]| (if big { f64::from_be_bytes(b) } else { f64::from_le_bytes(b) }) as f32),
        (false, 2) => convert(&bytes, |b: [u8; 2]| f32::from(if big { u16::from_be_bytes(b) } else { u16::from_le_bytes(b) })),
        _ => bytes.into_iter().map(f32::from).collect(),
    })
}

/// Every `N` bytes of `bytes` converted by `f`.
fn convert<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
    bytes.chunks_exact(N).map(|c| f(c.try_into().unwrap_or([0; N]))).collect()
}

/// Reads the magic, version, header length and header text of a `.npy` stream, checking the
/// length against the file's and every tuple in the text for a product that overflows (npyz
/// multiplies the shape out unchecked).
fn npy_header(path: &Path, r: &mut impl Read, len: u64) -> Result<(Vec<u8>, Vec<u8>)> {
    let bad = |m: String| Error::format(path, m);
    let mut pre = vec![0u8; 8];
    r.read_exact(&mut pre).map_err(|_| bad(format!("not a readable .npy file: {len} bytes, too short for the .npy magic and version")))?;
    if &pre[..6] != b"\x93NUMPY" {
        return Err(bad("not a readable .npy file: it does not start with the \\x93NUMPY magic".into()));
    }
    let width = match pre[6] {
        1 => 2,
        2 | 3 => 4,
        v => return Err(bad(format!("not a readable .npy file: unknown format version {v}.{}", pre[7]))),
    };
    let mut hl = vec![0u8; width];
    r.read_exact(&mut hl).map_err(|_| bad("the file is truncated inside the .npy header length".into()))?;
    let hlen = hl.iter().rev().fold(0u64, |acc, &b| acc << 8 | b as u64);
    pre.extend_from_slice(&hl);
    if hlen > NPY_MAX_HEADER {
        return Err(bad(format!("the .npy header claims {hlen} bytes: more than the {NPY_MAX_HEADER} numpy reads (the file is corrupt)")));
    }
    if pre.len() as u64 + hlen > len {
        return Err(bad(format!("the file is truncated: the .npy header claims {hlen} bytes, the file has {len} in all")));
    }
    let mut header = vec![0u8; hlen as usize];
    r.read_exact(&mut header).map_err(|_| bad("the file is truncated inside the .npy header".into()))?;
    let text = String::from_utf8_lossy(&header);
    if let Some(t) = overflowing_tuple(&text) {
        return Err(bad(format!("shape ({t}) has more than 2^64 elements: the header is corrupt")));
    }
    let depth = nesting(&text);
    if depth > NPY_MAX_NESTING {
        return Err(bad(format!(
            "the .npy header nests brackets {depth} deep: a plain array's header (a dict holding the shape tuple) nests {NPY_MAX_NESTING}, and only plain float32, float64, uint16 or uint8 arrays are read"
        )));
    }
    Ok((pre, header))
}

/// How deep `(`, `[` and `{` nest in `text` (a stray closer counts as none).
fn nesting(text: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    for b in text.bytes() {
        match b {
            b'(' | b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// The first parenthesised tuple of whole numbers whose product overflows a u64.
fn overflowing_tuple(text: &str) -> Option<&str> {
    let mut rest = text;
    while let Some(open) = rest.find('(') {
        let after = &rest[open + 1..];
        let close = after.find(')')?;
        let inner = &after[..close];
        let mut parts = inner.split(',').map(str::trim).filter(|p| !p.is_empty());
        let overflow = parts.clone().all(|p| p.bytes().all(|b| b.is_ascii_digit()))
            && parts.try_fold(1u64, |acc, p| p.parse::<u64>().ok().and_then(|v| acc.checked_mul(v))).is_none();
        if overflow {
            return Some(inner);
        }
        rest = &after[close + 1..];
    }
    None
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

/// A sample type of a TIFF page, which every page of a stack must share.
fn sample_name(r: &tiff::decoder::DecodingResult) -> &'static str {
    use tiff::decoder::DecodingResult as D;
    match r {
        D::U8(_) => "uint8",
        D::U16(_) => "uint16",
        D::F32(_) => "float32",
        D::F64(_) => "float64",
        _ => "other",
    }
}

/// Every page's size is checked against the file's length (uncompressed pages) and the memory
/// budget (all pages so far) before it is decoded; the decoder's own buffers are bounded by the
/// budget too, so a compressed page cannot inflate past it.
fn read_tif(path: &Path, reader: impl Read + Seek, len: u64) -> Result<(Vec<usize>, Vec<f32>)> {
    use tiff::decoder::{Decoder, DecodingResult, Limits};
    let terr = |page: usize, e: tiff::TiffError| Error::format(path, format!("cannot read TIFF page {page}: {e}"));
    let budget = usize::try_from(crate::limits::budget()).unwrap_or(usize::MAX);
    let mut limits = Limits::default();
    limits.decoding_buffer_size = budget;
    limits.intermediate_buffer_size = budget;
    let mut dec = Decoder::new(reader).map_err(|e| Error::format(path, format!("not a readable TIFF file: {e}")))?.with_limits(limits);
    let desc = dec.get_tag_ascii_string(tiff::tags::Tag::ImageDescription).unwrap_or_default();
    let mut data: Vec<f32> = Vec::new();
    let mut page = 0usize;
    let mut hw: Option<(usize, usize)> = None;
    let mut kind: Option<&'static str> = None;
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
        let tiff::ColorType::Gray(bits) = ct else {
            return Err(Error::format(path, format!("page {page} is {ct:?}: only grayscale pages (8/16-bit or float32) are supported")));
        };
        check_tif_page(path, &mut dec, page, [w as u64, h as u64, bits as u64], data.len(), len)?;
        let pixels = dec.read_image().map_err(|e| terr(page, e))?;
        let name = sample_name(&pixels);
        match kind {
            None => kind = Some(name),
            Some(k0) if k0 != name => {
                return Err(Error::format(path, format!("page {page} is {name} but page 0 is {k0}: every page of the stack must have the same sample type")))
            }
            _ => {}
        }
        match pixels {
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
    // An OME-TIFF's frames and channels as leading axes (`crate::ome_xml::dims`).
    Ok((crate::ome_xml::dims(&desc, page, h, w).unwrap_or_else(|| vec![page, h, w]), data))
}

/// Refuses page `page` of `[w, h, bits]` when its pixels cannot be in a file of `len` bytes
/// (uncompressed), or when it and the `have` float32 values so far exceed the memory budget.
fn check_tif_page<R: Read + Seek>(path: &Path, dec: &mut tiff::decoder::Decoder<R>, page: usize, whb: [u64; 3], have: usize, len: u64) -> Result<()> {
    let [w, h, bits] = whb;
    let raw = crate::limits::product(&[w, h, bits]).map(|b| b.div_ceil(8));
    let uncompressed = dec.get_tag_u32(tiff::tags::Tag::Compression).unwrap_or(1) == 1;
    if uncompressed && raw.is_none_or(|r| r > len) {
        return Err(Error::format(
            path,
            format!("page {page} claims {w} x {h} pixels of {bits} bits, uncompressed, but the file has {len} bytes: it is truncated or corrupt"),
        ));
    }
    let total = crate::limits::product(&[w, h]).and_then(|p| p.checked_add(have as u64)).and_then(|p| p.checked_mul(4));
    let decode = raw.and_then(|r| total.and_then(|t| t.checked_add(r)));
    crate::limits::check(&format!("page {page} ({w} x {h} pixels, with the pages before it)"), decode).map_err(|m| Error::format(path, m))
}

/// Temporary files being written now: `remove_temporaries` deletes them when a signal ends the
/// process (the lock is held while one is created and while one is renamed, so none escapes).
static LIVE: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes a file through `write` into a temporary file next to `path`, then renames it over `path`.
/// On any error (or a crash) no partial file is left at `path`; an I/O error names `path`. The
/// file gets the usual mode (0666 less the umask). The temporary, `.NAME.PID.XXXXXX.tmp`, is
/// removed on SIGINT/SIGTERM/SIGHUP ([`clean_up_on_signals`]), and those left by killed
/// processes are removed by this process's first write into their folder.
pub fn write_atomic<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<&mut File>) -> std::io::Result<()>,
{
    use std::os::unix::fs::PermissionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    sweep_once(dir);
    let mut tmp = {
        let mut live = live();
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}.{}.", std::process::id()))
            .suffix(".tmp")
            .permissions(std::fs::Permissions::from_mode(0o666))
            .tempfile_in(dir)
            .map_err(|e| Error::io(path, e))?;
        live.push(tmp.path().to_path_buf());
        tmp
    };
    let done = (|| {
        let mut w = BufWriter::new(tmp.as_file_mut());
        write(&mut w)?;
        w.flush()?;
        drop(w);
        tmp.as_file().sync_all()
    })();
    let mut live = live();
    live.retain(|p| p != tmp.path());
    if let Err(e) = done {
        drop(tmp);
        return Err(Error::io(path, e));
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Deletes the temporary files being written (the signal thread's job).
pub fn remove_temporaries() {
    for p in live().drain(..) {
        let _ = std::fs::remove_file(p);
    }
}

/// The folders this process has swept of stale temporaries.
static SWEPT: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<PathBuf>>> = std::sync::LazyLock::new(Default::default);

/// Removes the stale temporaries of `dir` at the first write into it: once per folder, not at
/// every write (a folder of thousands of outputs would be listed at each one).
fn sweep_once(dir: &Path) {
    let first = SWEPT.lock().unwrap_or_else(|e| e.into_inner()).insert(dir.to_path_buf());
    if first {
        remove_stale_temporaries(dir);
    }
}

/// Removes the temporaries of `write_atomic` in `dir` (`.NAME.PID.XXXXXX.tmp`, XXXXXX six letters
/// or digits) whose process no longer runs.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let file = e.file_name();
        let Some(rest) = file.to_str().and_then(|f| f.strip_prefix('.')).and_then(|f| f.strip_suffix(".tmp")) else { continue };
        let mut parts = rest.rsplitn(3, '.');
        let (Some(random), Some(pid), Some(name)) = (parts.next(), parts.next(), parts.next()) else { continue };
        if name.is_empty() || random.len() != 6 || !random.chars().all(|c| c.is_ascii_alphanumeric()) {
            continue;
        }
        let Ok(pid) = pid.parse::<i32>() else { continue };
        // SAFETY: kill with signal 0 only asks whether the process exists.
        let gone = pid > 0 && unsafe { libc::kill(pid, 0) } == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Installs the handler that removes `write_atomic`'s temporaries when SIGINT, SIGTERM or SIGHUP
/// arrives, then ends the process as the signal would have (the binary calls it once at start).
pub fn clean_up_on_signals() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(|e| Error::Other(format!("cannot install the signal handler: {e}")))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                remove_temporaries();
                let _ = signal_hook::low_level::emulate_default_handler(sig);
                std::process::exit(128 + sig);
            }
        })
        .map_err(|e| Error::Other(format!("cannot start the signal thread: {e}")))?;
    Ok(())
}

/// Whether `a` and `b` name the same file: the same device and inode when both exist, else the
/// same name in the same (canonical) folder.
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
        return x.dev() == y.dev() && x.ino() == y.ino();
    }
    let norm = |p: &Path| {
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        dir.canonicalize().ok().map(|d| d.join(p.file_name().unwrap_or_default()))
    };
    a == b || norm(a).is_some_and(|x| Some(x) == norm(b))
}

/// Refuses, before any work, outputs that would overwrite one of the command's inputs or each
/// other. `outputs` and `inputs` are (option, path) pairs, named in the message.
pub fn refuse_overwrites(outputs: &[(&str, &Path)], inputs: &[(&str, &Path)]) -> Result<()> {
    for (i, &(oname, out)) in outputs.iter().enumerate() {
        if let Some(&(iname, _)) = inputs.iter().find(|(_, p)| same_file(out, p)) {
            return Err(Error::format(out, format!("{oname} is the same file as {iname}: writing it would destroy the input; choose another output name")));
        }
        if let Some(&(other, _)) = outputs[..i].iter().find(|(_, p)| same_file(out, p)) {
            return Err(Error::format(out, format!("{oname} and {other} name the same file: one output would overwrite the other")));
        }
    }
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
            write_atomic(path, |w| write_tif_to::<tiff::encoder::colortype::Gray32Float>(w, d1, d2, &data))
        }
        Kind::Tcf => Err(Error::format(path, "deepis does not write TCF files: give a .npy or .tif output")),
    }
}

/// Writes float32 `data` of C-order `dims` as `.npy` (atomically).
pub fn write_npy(path: &Path, dims: &[usize], data: &[f32]) -> Result<()> {
    write_atomic(path, |w| write_npy_to(w, dims, data))
}

/// `data` of C-order `dims` as `.npy` bytes (float32 maps, uint8 labels).
pub(crate) fn write_npy_to<T: npyz::AutoSerialize + bytemuck::Pod>(mut w: impl Write, dims: &[usize], data: &[T]) -> std::io::Result<()> {
    use npyz::WriterBuilder;
    let shape: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
    if cfg!(target_endian = "big") {
        let mut npy = npyz::WriteOptions::new().default_dtype().shape(&shape).writer(w).begin_nd()?;
        npy.extend(data.iter().copied())?;
        return npy.finish();
    }
    // npyz writes the header (its default dtype is little-endian, this machine's order) when it
    // begins; the values then go in bulk rather than one call each. Dropped unfinished, npyz's
    // writer adds nothing to the header (its count check's error is ignored on drop).
    let mut header = Vec::new();
    drop(npyz::WriteOptions::<T>::new().default_dtype().shape(&shape).writer(&mut header).begin_nd()?);
    w.write_all(&header)?;
    w.write_all(bytemuck::cast_slice(data))?;
    w.flush()
}

/// `data` as a multi-page grayscale TIFF of pages of D1 rows x D2 columns (`C`: `Gray32Float`
/// maps, `Gray8` labels).
pub(crate) fn write_tif_to<C: tiff::encoder::colortype::ColorType>(w: impl Write + Seek, d1: usize, d2: usize, data: &[C::Inner]) -> std::io::Result<()>
where
    [C::Inner]: tiff::encoder::TiffValue,
{
    use tiff::encoder::TiffEncoder;
    let terr = |e: tiff::TiffError| match e {
        tiff::TiffError::IoError(e) => e,
        e => std::io::Error::other(format!("cannot write TIFF: {e}")),
    };
    let page = d1 * d2;
    let mut enc = TiffEncoder::new(w).map_err(terr)?;
    for p in data.chunks(page.max(1)) {
        enc.write_image::<C>(d2 as u32, d1 as u32, p).map_err(terr)?;
    }
    Ok(())
}
