//! DeepIS weights: safetensors files, memory-mapped, float32/float16/bfloat16 tensors named as the
//! oracle's `state_dict()` (a DataParallel `module.` prefix is accepted), with the config in
//! `__metadata__`. The tensors a config needs are the graph's parameters (`graph::param_specs`);
//! they drive validation, random initialisation, checkpoints and the parameter count.
use crate::config::Config;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::unravel;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The format_version this build reads and writes.
pub const FORMAT_VERSION: &str = "1";

pub use crate::graph::{param_count, param_specs, ParamKind, ParamSpec, Use};

/// Where the tensor bytes live: a memory-mapped file (zero-copy) or owned bytes.
enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A loaded, validated weights file.
pub struct Weights {
    pub config: Config,
    /// The file it came from, for messages.
    pub origin: PathBuf,
    /// The file's `__metadata__` (format, config, and what else the writer recorded).
    pub meta: HashMap<String, String>,
    storage: Storage,
    entries: HashMap<String, Entry>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Weights({}, {} tensors)", self.origin.display(), self.entries.len())
    }
}

impl Weights {
    /// Memory-maps and validates a safetensors file: header, metadata, and every tensor the config
    /// needs for inference (presence, shape, dtype). Nothing is computed before this succeeds.
    pub fn load(path: &Path) -> Result<Weights> {
        let (file, _) = crate::io::open_file(path)?;
        // SAFETY: the map is read-only and lives as long as `Weights`; a file truncated by another
        // process while mapped is the usual mmap caveat, accepted by every safetensors loader.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_storage(Storage::Mmap(map), path.to_path_buf())
    }

    /// Parses weights held in memory (e.g. just serialised).
    pub fn from_bytes(bytes: Vec<u8>, origin: impl Into<PathBuf>) -> Result<Weights> {
        Self::from_storage(Storage::Owned(bytes), origin.into())
    }

    fn from_storage(storage: Storage, origin: PathBuf) -> Result<Weights> {
        let bad = |m: String| Error::format(&origin, m);
        let bytes = storage.bytes();
        if bytes.len() < 8 {
            return Err(bad(format!("not a safetensors file: {} bytes, shorter than the 8-byte header length", bytes.len())));
        }
        let not_weights = |e: safetensors::SafeTensorError| {
            bad(format!("not a deepis weights file: the safetensors header does not parse ({e}); is it truncated, or another kind of file?"))
        };
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(not_weights)?;
        let st = SafeTensors::deserialize(bytes).map_err(not_weights)?;
        let config = config_from_metadata(meta.metadata().as_ref()).map_err(|e| match e {
            Error::Config(m) => bad(format!("config in __metadata__: {m}")),
            other => other,
        })?;
        let base = bytes.as_ptr() as usize;
        let mut entries = HashMap::new();
        for (name, view) in st.iter() {
            let start = view.data().as_ptr() as usize - base;
            let entry = Entry { dtype: view.dtype(), shape: view.shape().to_vec(), start, end: start + view.data().len() };
            let key = name.strip_prefix("module.").unwrap_or(name).to_string();
            if entries.insert(key.clone(), entry).is_some() {
                return Err(bad(format!("tensor {key} appears twice (with and without the `module.` prefix)")));
            }
        }
        let meta = meta.metadata().clone().unwrap_or_default();
        let w = Weights { config, origin, meta, storage, entries };
        w.check(Use::Inference)?;
        w.check_values()?;
        Ok(w)
    }

    /// Checks presence, shape and dtype of every tensor needed for `level` (Inference, or Training
    /// which also needs the deep-supervision heads).
    pub fn check(&self, level: Use) -> Result<()> {
        for spec in param_specs(&self.config) {
            let needed = match level {
                Use::Inference => spec.used == Use::Inference,
                Use::Training => spec.used != Use::Unused,
                Use::Unused => true,
            };
            if !needed && !self.entries.contains_key(&spec.name) {
                continue;
            }
            let e = self.entries.get(&spec.name).ok_or_else(|| {
                Error::format(&self.origin, format!("tensor {} is missing (expected shape {:?} for this config)", spec.name, spec.shape))
            })?;
            if e.shape != spec.shape {
                return Err(Error::format(
                    &self.origin,
                    format!("tensor {} has shape {:?}, the config needs {:?}", spec.name, e.shape, spec.shape),
                ));
            }
            if !matches!(e.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                return Err(Error::format(&self.origin, format!("tensor {} has dtype {:?}; float32, float16 or bfloat16 expected", spec.name, e.dtype)));
            }
        }
        Ok(())
    }

    /// Refuses a NaN or infinite value in any model tensor, and a negative BN running variance:
    /// either would make every output NaN.
    fn check_values(&self) -> Result<()> {
        for spec in param_specs(&self.config) {
            let Some(e) = self.entries.get(&spec.name).filter(|e| matches!(e.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)) else { continue };
            let bad = self.values(e).position(|v| !v.is_finite() || (spec.kind == ParamKind::BnVar && v < 0.0));
            if let Some(i) = bad {
                let v = self.values(e).nth(i).unwrap_or(f32::NAN);
                let why = if v.is_finite() { "a variance cannot be negative" } else { "weights must be finite" };
                return Err(Error::format(&self.origin, format!("tensor {} holds {v} at index {:?}: {why}", spec.name, unravel(i, &e.shape))));
            }
        }
        Ok(())
    }

    /// The values of an entry (float32, float16 or bfloat16), decoded as float32 on the fly.
    fn values<'a>(&'a self, e: &Entry) -> Box<dyn Iterator<Item = f32> + 'a> {
        let raw = &self.storage.bytes()[e.start..e.end];
        match e.dtype {
            Dtype::F16 => Box::new(raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())),
            Dtype::BF16 => Box::new(raw.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())),
            _ => Box::new(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        }
    }

    /// A tensor as float32 values (PyTorch layout).
    pub fn get(&self, name: &str) -> Result<Vec<f32>> {
        let e = self.entries.get(name).ok_or_else(|| Error::format(&self.origin, format!("tensor {name} is missing")))?;
        if !matches!(e.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(Error::format(&self.origin, format!("tensor {name} has unsupported dtype {:?}", e.dtype)));
        }
        Ok(self.values(e).collect())
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Learnable parameters of the whole model (as PyTorch's `sum(p.numel() for p in model.parameters())`).
    pub fn param_count(&self) -> usize {
        param_count(&self.config)
    }

    /// Random weights and BN statistics that keep every activation O(1) (the golden cases' scheme).
    pub fn random(config: &Config, seed: u64) -> Weights {
        Self::random_for(config, param_specs(config), seed)
    }

    /// [`Weights::random`] of the parameters `specs` (e.g. a variant graph's `params()`), drawn
    /// in their order.
    pub fn random_for(config: &Config, specs: Vec<ParamSpec>, seed: u64) -> Weights {
        let mut rng = Rng::new(seed);
        let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = specs
            .into_iter()
            .map(|s| {
                let n = s.numel();
                let fan_in: usize = s.shape[1..].iter().product();
                let data: Vec<f32> = (0..n)
                    .map(|_| match s.kind {
                        ParamKind::ConvWeight => (rng.normal() / (fan_in as f64).sqrt()) as f32,
                        ParamKind::ConvBias | ParamKind::BnBias => (0.1 * rng.normal()) as f32,
                        ParamKind::BnWeight => (0.8 + 0.4 * rng.uniform()) as f32,
                        ParamKind::BnMean => (0.2 * rng.normal()) as f32,
                        ParamKind::BnVar => (0.5 + rng.uniform()) as f32,
                    })
                    .collect();
                (s.name, s.shape, data)
            })
            .collect();
        Weights::from_tensors(config, &tensors).expect("random weights are valid by construction")
    }

    /// Builds weights from named float32 tensors (PyTorch layout).
    pub fn from_tensors(config: &Config, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<Weights> {
        let bytes = serialize(config, tensors)?;
        Weights::from_bytes(bytes, "<memory>")
    }

    /// Every tensor held, as float32, in name order.
    pub fn to_tensors(&self) -> Result<Vec<(String, Vec<usize>, Vec<f32>)>> {
        let names: BTreeMap<&String, &Entry> = self.entries.iter().collect();
        names.into_iter().map(|(n, e)| Ok((n.clone(), e.shape.clone(), self.get(n)?))).collect()
    }

    /// Writes the weights (float32) with the config metadata, to a temporary file renamed into place.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = serialize(&self.config, &self.to_tensors()?)?;
        crate::io::write_atomic(path, |w| w.write_all(&bytes))
    }
}

use std::io::Write as _;

/// safetensors bytes with `format`, `format_version` and `config` metadata.
pub fn serialize(config: &Config, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<Vec<u8>> {
    serialize_with(config, tensors, HashMap::new())
}

/// `serialize` with more `__metadata__` entries.
pub fn serialize_with(config: &Config, tensors: &[(String, Vec<usize>, Vec<f32>)], extra: HashMap<String, String>) -> Result<Vec<u8>> {
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), bytemuck::cast_slice::<f32, u8>(d).to_vec()))
        .collect();
    let mut views = Vec::with_capacity(raw.len());
    for (n, s, b) in &raw {
        let v = safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).map_err(|e| Error::Weights(format!("{n}: {e}")))?;
        views.push((n.clone(), v));
    }
    let mut meta = metadata(config);
    meta.extend(extra);
    safetensors::serialize(views, Some(meta)).map_err(|e| Error::Weights(e.to_string()))
}

/// The `__metadata__` of a deepis weights file.
pub fn metadata(config: &Config) -> HashMap<String, String> {
    HashMap::from([
        ("format".to_string(), "deepis".to_string()),
        ("format_version".to_string(), FORMAT_VERSION.to_string()),
        ("config".to_string(), config.to_json()),
    ])
}

fn config_from_metadata(meta: Option<&HashMap<String, String>>) -> Result<Config> {
    let Some(meta) = meta else {
        return Err(Error::Config("no __metadata__: a deepis weights file carries format, format_version and config".into()));
    };
    match meta.get("format").map(String::as_str) {
        Some("deepis") => {}
        Some(f) => return Err(Error::Config(format!("format is {f:?}, expected \"deepis\""))),
        None => return Err(Error::Config("no `format` key (expected \"deepis\")".into())),
    }
    match meta.get("format_version").map(String::as_str) {
        Some(FORMAT_VERSION) => {}
        Some(v) => return Err(Error::Config(format!("unknown format_version {v:?}: this build reads format_version {FORMAT_VERSION}"))),
        None => return Err(Error::Config("no `format_version` key".into())),
    }
    match meta.get("config") {
        Some(json) => Config::from_json(json),
        None => Ok(Config::default()),
    }
}

/// Refuses a config whose float32 tensors alone exceed the memory budget, before random weights
/// of it are made (a file's own tensors are its bytes: `Weights::load` needs no such check).
pub fn check_param_budget(cfg: &Config) -> Result<()> {
    let floats = param_specs(cfg).iter().try_fold(0u64, |acc, s| acc.checked_add(crate::limits::product(&s.shape.iter().map(|&d| d as u64).collect::<Vec<_>>())?));
    let what = format!("the model (widths {:?}, trans_feature {}, blocks {:?}, gcn_kernels {:?})", cfg.widths, cfg.trans_feature, cfg.blocks, cfg.gcn_kernels);
    crate::limits::check(&what, crate::limits::bytes_of(floats, 4)).map_err(Error::Config)
}
