//! `deepis import`: a PyTorch checkpoint of DeepIS (a bare state_dict, or the published trainer's
//! `{model_type, start_epoch, network, optimizer, best_metric}` with a DataParallel `module.`
//! state_dict) to a deepis weights file, without PyTorch. The config comes from the tensor
//! shapes; what shapes cannot tell (head kind of a one-channel output, down-sampling, input
//! scaling) from flags with the published defaults. The Adam state, when present, becomes
//! `adam.m.<name>` / `adam.v.<name>` and an `optimizer` metadata entry, which `deepis train --init`
//! continues from.
//!
//! - `pickle`: the non-executing unpickler (allow-listed globals only).
//! - `torch`: the zip and legacy file formats, storages and tensors.
pub mod pickle;
pub mod torch;

use crate::config::{Config, Downsample, Head};
use crate::error::{Error, Result};
use crate::weights::{param_specs, serialize_with, Weights};
use clap::Args;
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use torch::TorchFile;

pub const IMPORT_LONG: &str = "\
Converts a PyTorch checkpoint of DeepIS into a deepis weights file, without PyTorch. Reads both
of PyTorch's formats (the zip archive of torch.save since PyTorch 1.6, and the older single-stream
format), holding either a bare state_dict or the published trainer's dict {model_type,
start_epoch, network, optimizer, best_metric} (network: a DataParallel state_dict; the `module.`
prefix is dropped).

The config is read from the tensor shapes: widths, trans_feature, blocks, gcn_kernels and
out_channels. What the shapes cannot tell comes from flags: --head (default: distance for one
output channel, as published; sigmoid for more), --downsample (default stride, the published
code; maxpool for the README's variant), --input-offset / --input-scale (default 0 and 1: the
published model saw pre-scaled volumes).

The output's metadata records the source file's name and sha256, its format, model_type,
start_epoch and best_metric. With the trainer's optimizer (Adam), the moments become
adam.m.<name> / adam.v.<name> and `deepis train --init OUT` continues that run: its Adam step and
its epoch count (which picks the loss weights); --no-optimizer leaves them out.

The pickle is interpreted, never executed: only the globals PyTorch writes for tensors and
state_dicts (collections.OrderedDict, torch._utils._rebuild_tensor_v2 / _rebuild_parameter,
torch.*Storage) are accepted; a file naming any other (e.g. os.system) is refused with its name.

Example:
  deepis import 'epoch[0324]_losssum[0.053456].pth.tar' -o deepis_published.safetensors";

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// PyTorch checkpoint (.pth, .pth.tar, .pt)
    #[arg(value_name = "CHECKPOINT")]
    pub checkpoint: PathBuf,
    /// Where to write the weights (.safetensors)
    #[arg(short, long, value_name = "WEIGHTS")]
    pub output: PathBuf,
    /// Head of the network: distance (published; one channel) or sigmoid [default: from the output channels]
    #[arg(long, value_enum)]
    pub head: Option<Head>,
    /// Down-sampling of the encoder (not visible in the shapes)
    #[arg(long, value_enum, default_value_t = Downsample::Stride)]
    pub downsample: Downsample,
    /// The network sees (input - input_offset) / input_scale
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub input_offset: f64,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub input_scale: f64,
    /// Batch-norm epsilon (PyTorch's default)
    #[arg(long, default_value_t = 1e-5)]
    pub bn_eps: f64,
    /// Leave the optimizer state out
    #[arg(long)]
    pub no_optimizer: bool,
}

/// What shapes cannot tell.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    pub head: Option<Head>,
    pub downsample: Downsample,
    pub input_offset: f64,
    pub input_scale: f64,
    pub bn_eps: f64,
    pub optimizer: bool,
}

impl Default for ImportOptions {
    fn default() -> Self {
        let c = Config::default();
        ImportOptions { head: None, downsample: c.downsample, input_offset: c.input_offset, input_scale: c.input_scale, bn_eps: c.bn_eps, optimizer: true }
    }
}

type Named = Vec<(String, Vec<usize>, Vec<f32>)>;

/// A converted checkpoint.
pub struct Imported {
    pub config: Config,
    pub tensors: Named,
    /// `source` and (with an optimizer) `optimizer` metadata entries.
    pub meta: HashMap<String, String>,
    /// Adam state tensors converted.
    pub adam_tensors: usize,
}

impl Imported {
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        serialize_with(&self.config, &self.tensors, self.meta.clone())
    }
}

/// Reads and converts `path`.
pub fn import(path: &Path, opts: &ImportOptions) -> Result<Imported> {
    let f = TorchFile::read(path)?;
    let bad = |m: String| Error::format(path, m);
    let pk = &f.pickle;
    let root = pk.root;
    let trainer = pk.field(root, "network").or_else(|| pk.field(root, "state_dict"));
    let net = trainer.unwrap_or(root);
    let entries = pk.dict(net).ok_or_else(|| bad(describe(pk, root)))?;
    // the state_dict, in its order (parameters in that order, buffers left out, are the
    // optimizer's parameter ids)
    let mut state: Named = Vec::new();
    let mut param_order = Vec::new();
    for &(k, v) in entries {
        let name = pk.str(k).ok_or_else(|| bad("a state_dict key is not a string".into()))?;
        let name = name.strip_prefix("module.").unwrap_or(name).to_string();
        if name.ends_with("num_batches_tracked") {
            continue;
        }
        let t = f.tensor(v).map_err(|e| bad(format!("{name}: {e}")))?;
        if !t.dtype.is_float() {
            return Err(bad(format!("{name}: {:?} tensor, floating point expected", t.dtype)));
        }
        if !(name.ends_with("running_mean") || name.ends_with("running_var")) {
            param_order.push(state.len());
        }
        state.push((name, t.shape, t.data.iter().map(|&x| x as f32).collect()));
    }
    let config = infer_config(&state, opts).map_err(|e| bad(e.to_string()))?;
    check_names(&state, &config).map_err(bad)?;
    let mut tensors = state.clone();
    let mut meta = HashMap::new();
    let num = |key: &str| pk.field(root, key).and_then(|i| pk.num(i)).filter(|_| trainer.is_some());
    let source = json!({
        "file": path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "sha256": crate::batch::sha256_file(path)?,
        "format": f.format,
        "contents": if trainer.is_some() { "trainer checkpoint" } else { "state_dict" },
        "model_type": pk.field(root, "model_type").and_then(|i| pk.str(i)).filter(|_| trainer.is_some()),
        "start_epoch": num("start_epoch"),
        "best_metric": num("best_metric"),
    });
    meta.insert("source".to_string(), source.to_string());
    let mut adam_tensors = 0;
    if let (true, Some(opt)) = (opts.optimizer, pk.field(root, "optimizer").filter(|_| trainer.is_some())) {
        let epoch = num("start_epoch").unwrap_or(0.0).max(0.0) as usize;
        let (entry, moments) = adam_state(&f, opt, &state, &param_order, epoch).map_err(|e| bad(format!("optimizer: {e} (--no-optimizer imports the network alone)")))?;
        adam_tensors = moments.len();
        tensors.extend(moments);
        meta.insert("optimizer".to_string(), entry);
    }
    Weights::from_bytes(serialize_with(&config, &tensors, meta.clone())?, path)?;
    Ok(Imported { config, tensors, meta, adam_tensors })
}

/// What the top object is, for the error when it holds no state_dict.
fn describe(pk: &pickle::Pickle, root: usize) -> String {
    match pk.dict(root) {
        Some(d) => {
            let keys: Vec<String> = d.iter().take(8).map(|(k, _)| pk.str(*k).map_or_else(|| format!("{:?}", pk.get(*k)), str::to_string)).collect();
            format!("a dict with keys {keys:?} but no `network` or `state_dict` of tensors")
        }
        None => "the checkpoint holds neither a state_dict nor a trainer dict with `network`".to_string(),
    }
}

/// The config the shapes imply (the oracle's parameter names), completed by `opts`.
pub fn infer_config(state: &Named, opts: &ImportOptions) -> Result<Config> {
    let shapes: HashMap<&str, &[usize]> = state.iter().map(|(n, s, _)| (n.as_str(), s.as_slice())).collect();
    let dim = |n: &str, d: usize| -> Result<usize> {
        let s = shapes.get(n).ok_or_else(|| Error::Config(format!("no tensor {n}: not a DeepIS (Unet3D_glob) state_dict")))?;
        s.get(d).copied().ok_or_else(|| Error::Config(format!("{n} has shape {s:?}")))
    };
    let mut c = Config { downsample: opts.downsample, input_offset: opts.input_offset, input_scale: opts.input_scale, bn_eps: opts.bn_eps, ..Config::default() };
    c.widths[0] = dim("conv1.conv1.0.weight", 0)?;
    for i in 0..4 {
        c.widths[i + 1] = dim(&format!("layer{}.blocks.0.increase.0.weight", i + 1), 0)?;
        c.blocks[i] = (0..).take_while(|j| shapes.contains_key(format!("layer{}.blocks.{j}.reduce.0.weight", i + 1).as_str())).count();
        c.gcn_kernels[i] = dim(&format!("gcn{}.conv_l1.weight", i + 2), 2)?;
    }
    c.trans_feature = dim("gcn1.weight", 0)?;
    let out = dim("final.0.weight", 0)?;
    c.head = opts.head.unwrap_or(if out == 1 { Head::Distance } else { Head::Sigmoid });
    if c.head == Head::Distance && out != 1 {
        return Err(Error::Config(format!("final.0.weight has {out} output channels: a distance head has one (--head sigmoid?)")));
    }
    c.out_channels = out;
    c.validate()?;
    Ok(c)
}

/// Every tensor must be one of the config's, with its shape; the config's inference tensors must all be there.
fn check_names(state: &Named, cfg: &Config) -> std::result::Result<(), String> {
    let specs: HashMap<String, Vec<usize>> = param_specs(cfg).into_iter().map(|s| (s.name, s.shape)).collect();
    let unknown: Vec<&str> = state.iter().filter(|(n, _, _)| !specs.contains_key(n)).map(|(n, _, _)| n.as_str()).collect();
    if !unknown.is_empty() {
        return Err(format!("{} tensor(s) that DeepIS does not have, e.g. {:?}", unknown.len(), &unknown[..unknown.len().min(5)]));
    }
    for (n, s, _) in state {
        if &specs[n] != s {
            return Err(format!("{n} has shape {s:?}; the config read from the other shapes needs {:?}", specs[n]));
        }
    }
    Ok(())
}

/// torch.optim.Adam's state_dict to `adam.m.<name>` / `adam.v.<name>` and the `optimizer`
/// metadata entry (`train::run::Progress` plus the hyper-parameters). Parameter ids are
/// positions in the optimizer's param_groups, which list `model.parameters()`: the state_dict's
/// tensors in order, buffers left out.
fn adam_state(f: &TorchFile, opt: usize, state: &Named, order: &[usize], epoch: usize) -> std::result::Result<(String, Named), String> {
    let pk = &f.pickle;
    let groups = pk.field(opt, "param_groups").and_then(|g| pk.items(g)).ok_or("no param_groups: not a torch.optim state_dict")?;
    let st = pk.field(opt, "state").and_then(|s| pk.dict(s)).ok_or("no state: not a torch.optim state_dict")?;
    let mut ids = Vec::new();
    for &g in groups {
        if pk.field(g, "amsgrad").map(|a| pk.get(a)) == Some(&pickle::Obj::Bool(true)) {
            return Err("amsgrad Adam: deepis's Adam has no amsgrad".into());
        }
        let ps = pk.field(g, "params").and_then(|p| pk.items(p)).ok_or("a param_group without params")?;
        ids.extend(ps.iter().map(|&p| pk.num(p).map(|v| v as i64)));
    }
    if ids.len() != order.len() {
        return Err(format!("it has {} parameters, the network {}: its state cannot be matched to names", ids.len(), order.len()));
    }
    let g0 = groups[0];
    let hyper = |k: &str| pk.field(g0, k).and_then(|i| pk.num(i));
    let betas: Vec<f64> = pk.field(g0, "betas").and_then(|b| pk.items(b)).map(|b| b.iter().filter_map(|&x| pk.num(x)).collect()).unwrap_or_default();
    let mut out = Named::new();
    let mut step: Option<f64> = None;
    for &(k, v) in st {
        let id = pk.num(k).map(|x| x as i64);
        let pos = ids.iter().position(|&i| i.is_some() && i == id).ok_or_else(|| format!("state of parameter {id:?}, which no param_group lists"))?;
        let (name, shape, _) = &state[order[pos]];
        let t = |key: &str| -> std::result::Result<torch::Tensor, String> {
            let i = pk.field(v, key).ok_or_else(|| format!("{name}: no {key} (not Adam?)"))?;
            f.tensor(i).map_err(|e| format!("{name}.{key}: {e}"))
        };
        let s = match pk.field(v, "step") {
            Some(i) => match pk.num(i) {
                Some(x) => x,
                None => t("step")?.data.first().copied().ok_or(format!("{name}: empty step"))?,
            },
            None => return Err(format!("{name}: no step")),
        };
        if step.is_some_and(|p| p != s) {
            return Err(format!("{name}: step {s}, other parameters {}", step.unwrap_or_default()));
        }
        step = Some(s);
        for (key, prefix) in [("exp_avg", "adam.m"), ("exp_avg_sq", "adam.v")] {
            let m = t(key)?;
            if &m.shape != shape {
                return Err(format!("{name}.{key} has shape {:?}, the parameter {shape:?}", m.shape));
            }
            out.push((format!("{prefix}.{name}"), m.shape, m.data.iter().map(|&x| x as f32).collect()));
        }
    }
    let entry = json!({
        "epoch": epoch,
        "adam_step": step.unwrap_or(0.0) as u64,
        "lr": hyper("lr"),
        "betas": betas,
        "eps": hyper("eps"),
        "weight_decay": hyper("weight_decay"),
    });
    if !betas.is_empty() && betas != [crate::train::adam::BETAS.0, crate::train::adam::BETAS.1] {
        eprintln!("note: the checkpoint's Adam betas are {betas:?}; deepis train uses the published (0.5, 0.999)");
    }
    Ok((entry.to_string(), out))
}

pub fn import_cmd(a: &ImportArgs) -> Result<()> {
    let opts = ImportOptions {
        head: a.head,
        downsample: a.downsample,
        input_offset: a.input_offset,
        input_scale: a.input_scale,
        bn_eps: a.bn_eps,
        optimizer: !a.no_optimizer,
    };
    let im = import(&a.checkpoint, &opts)?;
    let bytes = im.to_bytes()?;
    crate::io::write_atomic(&a.output, |w| std::io::Write::write_all(w, &bytes))?;
    let n = im.tensors.len() - im.adam_tensors;
    let params = crate::weights::param_count(&im.config);
    eprintln!("config: {}", im.config.to_json());
    eprintln!("source: {}", im.meta["source"]);
    if let Some(o) = im.meta.get("optimizer") {
        eprintln!("optimizer: {o} ({} Adam moments; `deepis train --init` continues the run)", im.adam_tensors);
    }
    eprintln!("wrote {} ({n} tensors, {params} parameters)", a.output.display());
    Ok(())
}
