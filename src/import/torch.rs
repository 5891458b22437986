//! PyTorch's two file formats, read without PyTorch: the zip archive of `torch.save` since 1.6
//! (`ARCHIVE/data.pkl` + `ARCHIVE/data/KEY` raw storages) and the legacy single stream (pickles
//! of the magic number, the protocol version and sys_info, then the object, then the sorted
//! storage keys, then each storage as an int64 element count and its raw bytes).
//! Tensors are rebuilt from their storage, offset, size and stride into contiguous float32.
use super::pickle::{self, Obj, Pickle};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// `torch.serialization.MAGIC_NUMBER`, as the little-endian bytes of pickle's LONG1.
const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
/// `torch.serialization.PROTOCOL_VERSION`.
const PROTOCOL: i64 = 1001;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    fn of_storage(name: &str) -> Option<Dtype> {
        Some(match name {
            "FloatStorage" => Dtype::F32,
            "DoubleStorage" => Dtype::F64,
            "HalfStorage" => Dtype::F16,
            "BFloat16Storage" => Dtype::BF16,
            "LongStorage" => Dtype::I64,
            "IntStorage" => Dtype::I32,
            "ShortStorage" => Dtype::I16,
            "CharStorage" => Dtype::I8,
            "ByteStorage" => Dtype::U8,
            "BoolStorage" => Dtype::Bool,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }

    fn read(self, b: &[u8]) -> f64 {
        match self {
            Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            Dtype::F64 => f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            Dtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
            Dtype::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
            Dtype::I64 => i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f64,
            Dtype::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            Dtype::I16 => i16::from_le_bytes([b[0], b[1]]) as f64,
            Dtype::I8 => b[0] as i8 as f64,
            Dtype::U8 | Dtype::Bool => b[0] as f64,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::F64 | Dtype::F16 | Dtype::BF16)
    }
}

/// A storage reference of a persistent id: ('storage', torch.XStorage, key, location, numel[, view]).
struct StorageRef {
    dtype: Dtype,
    key: String,
    numel: usize,
}

fn storage_ref(pk: &Pickle, pid: usize) -> std::result::Result<StorageRef, String> {
    let bad = || "a persistent id that is not a storage reference ('storage', type, key, location, numel)".to_string();
    let Obj::PersId(t) = pk.get(pid) else { return Err(bad()) };
    let items = pk.items(*t).ok_or_else(bad)?;
    if items.len() < 5 || pk.str(items[0]) != Some("storage") {
        return Err(bad());
    }
    let dtype = match pk.get(items[1]) {
        Obj::Global(m, n) if m == "torch" => Dtype::of_storage(n).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    let key = pk.str(items[2]).ok_or_else(bad)?.to_string();
    let numel = match pk.get(items[4]) {
        Obj::Int(n) if *n >= 0 => *n as usize,
        _ => return Err(bad()),
    };
    Ok(StorageRef { dtype, key, numel })
}

/// A PyTorch file, parsed: the object pickle and the raw bytes of every storage it refers to.
pub struct TorchFile {
    pub pickle: Pickle,
    /// "zip" or "legacy".
    pub format: &'static str,
    storages: HashMap<String, (Dtype, Vec<u8>)>,
}

/// A tensor as contiguous values in C order.
pub struct Tensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl TorchFile {
    /// Reads a checkpoint in either format (told apart by the zip signature).
    pub fn read(path: &Path) -> Result<TorchFile> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |m: String| Error::format(path, m);
        if bytes.starts_with(b"PK\x03\x04") {
            Self::read_zip(bytes).map_err(bad)
        } else if bytes.first() == Some(&0x80) {
            Self::read_legacy(&bytes).map_err(bad)
        } else if bytes.len() > 262 && &bytes[257..262] == b"ustar" {
            Err(bad("a tar archive: the format of PyTorch before 0.4, not supported (load and re-save it with a newer PyTorch)".into()))
        } else {
            Err(bad("not a PyTorch checkpoint: neither a zip archive (torch.save since 1.6) nor a pickle stream (the legacy format)".into()))
        }
    }

    fn read_zip(bytes: Vec<u8>) -> std::result::Result<TorchFile, String> {
        let total = bytes.len() as u64;
        let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| format!("zip archive: {e}"))?;
        let names: Vec<String> = z.file_names().filter_map(|n| n.ok().map(|s| s.into_owned())).collect();
        let pkl = names.iter().find(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1).ok_or("zip archive without ARCHIVE/data.pkl: not a torch.save file")?;
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        let mut entry = |name: &str| -> std::result::Result<Vec<u8>, String> {
            let mut f = z.by_name(name).map_err(|e| format!("{name}: {e}"))?;
            if f.size() > total {
                return Err(format!("{name}: the zip directory claims {} bytes, more than the file holds", f.size()));
            }
            let mut v = Vec::with_capacity(f.size() as usize);
            f.read_to_end(&mut v).map_err(|e| format!("{name}: {e}"))?;
            Ok(v)
        };
        if let Ok(order) = entry(&format!("{prefix}byteorder")) {
            if order != b"little" {
                return Err(format!("byte order {:?}: only little-endian checkpoints are read", String::from_utf8_lossy(&order)));
            }
        }
        let data = entry(&format!("{prefix}data.pkl"))?;
        let (pickle, _) = pickle::parse(&data, 0).map_err(|e| format!("{prefix}data.pkl: {e}"))?;
        let mut storages = HashMap::new();
        for r in Self::refs(&pickle)? {
            if storages.contains_key(&r.key) {
                continue;
            }
            let raw = entry(&format!("{prefix}data/{}", r.key))?;
            Self::check_len(&r, raw.len())?;
            storages.insert(r.key, (r.dtype, raw));
        }
        Ok(TorchFile { pickle, format: "zip", storages })
    }

    fn read_legacy(bytes: &[u8]) -> std::result::Result<TorchFile, String> {
        let (magic, pos) = pickle::parse(bytes, 0).map_err(|e| format!("magic number: {e}"))?;
        if magic.get(magic.root) != &Obj::BigInt(MAGIC.to_vec()) {
            return Err("a pickle, but not a PyTorch checkpoint (no torch.save magic number)".into());
        }
        let (proto, pos) = pickle::parse(bytes, pos).map_err(|e| format!("protocol version: {e}"))?;
        if proto.get(proto.root) != &Obj::Int(PROTOCOL) {
            return Err(format!("legacy protocol version {:?}, expected {PROTOCOL}", proto.get(proto.root)));
        }
        let (info, pos) = pickle::parse(bytes, pos).map_err(|e| format!("sys_info: {e}"))?;
        if info.field(info.root, "little_endian").map(|i| info.get(i)) == Some(&Obj::Bool(false)) {
            return Err("written on a big-endian machine: only little-endian checkpoints are read".into());
        }
        let (pickle, pos) = pickle::parse(bytes, pos).map_err(|e| e.to_string())?;
        let (keys, mut pos) = pickle::parse(bytes, pos).map_err(|e| format!("storage keys: {e}"))?;
        let refs: HashMap<String, StorageRef> = Self::refs(&pickle)?.into_iter().map(|r| (r.key.clone(), r)).collect();
        let mut storages = HashMap::new();
        for &k in keys.items(keys.root).ok_or("the storage keys are not a list")? {
            let key = keys.str(k).ok_or("a storage key is not a string")?.to_string();
            let r = refs.get(&key).ok_or_else(|| format!("storage {key} is stored but no tensor refers to it"))?;
            let head = bytes.get(pos..pos + 8).ok_or_else(|| format!("storage {key}: truncated at byte {pos}"))?;
            let n = u64::from_le_bytes(head.try_into().expect("8 bytes"));
            let len = n.checked_mul(r.dtype.size() as u64).filter(|&l| l <= (bytes.len() - pos - 8) as u64);
            let len = len.ok_or_else(|| format!("storage {key} claims {n} elements, more than the {} bytes left", bytes.len() - pos - 8))? as usize;
            Self::check_len(r, len)?;
            storages.insert(key, (r.dtype, bytes[pos + 8..pos + 8 + len].to_vec()));
            pos += 8 + len;
        }
        if let Some(missing) = refs.keys().find(|k| !storages.contains_key(*k)) {
            return Err(format!("storage {missing} is referred to but not stored: truncated file?"));
        }
        Ok(TorchFile { pickle, format: "legacy", storages })
    }

    fn refs(pk: &Pickle) -> std::result::Result<Vec<StorageRef>, String> {
        (0..pk.objs.len()).filter(|&i| matches!(pk.get(i), Obj::PersId(_))).map(|i| storage_ref(pk, i)).collect()
    }

    fn check_len(r: &StorageRef, bytes: usize) -> std::result::Result<(), String> {
        if r.numel.checked_mul(r.dtype.size()).is_none_or(|n| n > bytes) {
            return Err(format!("storage {} holds {bytes} bytes, fewer than its {} elements of {:?}", r.key, r.numel, r.dtype));
        }
        Ok(())
    }

    /// The tensor object `i`, contiguous.
    pub fn tensor(&self, i: usize) -> std::result::Result<Tensor, String> {
        let Obj::Tensor { storage, offset, size, stride } = self.pickle.get(i) else {
            return Err("not a tensor".into());
        };
        let r = storage_ref(&self.pickle, *storage)?;
        let (dtype, raw) = self.storages.get(&r.key).ok_or_else(|| format!("storage {} is missing", r.key))?;
        let numel = size.iter().try_fold(1usize, |a, &s| a.checked_mul(s)).ok_or("tensor size overflows")?;
        if numel > raw.len() / dtype.size() {
            return Err(format!("tensor of size {size:?} has more elements than its storage of {}", raw.len() / dtype.size()));
        }
        if numel > 0 {
            let last = size.iter().zip(stride).try_fold(*offset, |a, (&s, &st)| (s - 1).checked_mul(st).and_then(|x| x.checked_add(a)));
            if last.is_none_or(|l| l >= raw.len() / dtype.size()) {
                return Err(format!("tensor of size {size:?}, stride {stride:?}, offset {offset} reaches past its storage of {} elements", raw.len() / dtype.size()));
            }
        }
        let es = dtype.size();
        let mut data = Vec::with_capacity(numel);
        let mut idx = vec![0usize; size.len()];
        for _ in 0..numel {
            let at = offset + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
            data.push(dtype.read(&raw[at * es..at * es + es]));
            for d in (0..size.len()).rev() {
                idx[d] += 1;
                if idx[d] < size[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(Tensor { dtype: *dtype, shape: size.clone(), data })
    }
}
