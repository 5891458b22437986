//! The `train-step` and `train` subcommands (wired into `crate::cli`).
use super::data::{load_training_data, read_target};
use super::net::{train_step, Params};
use super::backend::TrainBackend;
use super::loss::loss_weights;
use super::run::{check_run_dir, recorded_options, train, RunMode, Start, TrainOptions};
use crate::config::Config;
use crate::engine::{choose, with_backend, BackendKind, Job};
use crate::error::{Error, Result};
use crate::io::read_volume;
use crate::weights::{serialize, Weights};
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Instant;


pub const TRAIN_STEP_LONG: &str = "\
One training-mode step of the published objective (the DeepIS trainer, trainers/CNNTrainer.py),
for comparing gradients with a reference framework: batch norm on batch statistics, dropout off,
loss = w0 x head term + w1 x CE(c3) + w2 x CE(c4). Head term: distance head
mean(weight * |out - target|), sigmoid head BCE + mean(1 - soft Dice). CE: cross-entropy of the
deep-supervision heads against 3-class labels (+1 where distance > 0.1, -1 where < -0.1, resized
trilinearly to the head's size, class 1 above 0.25, 2 below -0.25). (w0, w1, w2) by --epoch:
(0.2, 0.4, 0.4) before epoch 50, (0.4, 0.3, 0.3) before 100, (0.6, 0.2, 0.2) before 150, then
(0.8, 0.1, 0.1). Writes `loss` and `grad.<parameter name>` (PyTorch names and layouts) as float32
safetensors. Parameters are not changed.

--input: as for predict (.npy or .tif; N volumes). --target: distance head, the input's shape;
sigmoid head, C x D0 x D1 x D2 or N x C x D0 x D1 x D2 (.npy). --weight: the distance head's
weight map (default: the published edge weight map with pw = 10, computed from the training-mode
output: 1 + 10 within 3 voxels of the effector's boundary, 0 where the background is already
predicted negative).

Example:
  deepis train-step --weights tests/data/tiny/weights.safetensors --input tests/data/tiny/input.npy \\
      --target tests/data/tiny/target.npy -o grads.safetensors";

#[derive(Args, Debug)]
pub struct TrainStepArgs {
    /// Model (.safetensors); the classifier heads are initialised randomly if the file lacks them
    #[arg(short, long, value_name = "WEIGHTS")]
    pub weights: PathBuf,
    /// Input volume(s)
    #[arg(long, value_name = "INPUT")]
    pub input: PathBuf,
    /// Target of the head
    #[arg(long, value_name = "TARGET")]
    pub target: PathBuf,
    /// Weight map of the distance head (default: computed by deepis)
    #[arg(long, value_name = "WEIGHT")]
    pub weight: Option<PathBuf>,
    /// Where to write `loss` and `grad.<name>` (.safetensors)
    #[arg(short, long, value_name = "OUT")]
    pub output: PathBuf,
    /// Epoch (0-based) whose loss weights to use
    #[arg(long, default_value_t = 0)]
    pub epoch: usize,
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
}

/// Runs on the backend --backend names, chosen as `predict` chooses (auto: the GPU when one opens;
/// the CPU kinds train on the CPU reference ops).
pub fn train_step_cmd(a: &TrainStepArgs) -> Result<()> {
    with_backend(choose(a.backend)?, StepJob(a))
}

struct StepJob<'a>(&'a TrainStepArgs);

impl Job for StepJob<'_> {
    type Out = ();
    fn run<B: TrainBackend>(self, b: B) -> Result<()> {
        train_step_on(&b, self.0)
    }
}

fn train_step_on<B: TrainBackend>(b: &B, a: &TrainStepArgs) -> Result<()> {
    eprintln!("backend: {}", b.name());
    let mut inputs = vec![("--weights", a.weights.as_path()), ("--input", &a.input), ("--target", &a.target)];
    inputs.extend(a.weight.as_deref().map(|p| ("--weight", p)));
    crate::io::refuse_overwrites(&[("-o", &a.output)], &inputs)?;
    let w = Weights::load(&a.weights)?;
    let (p, fresh) = Params::from_weights(&w, 0)?;
    if !fresh.is_empty() {
        eprintln!("note: {} tensor(s) missing from {} were initialised randomly (e.g. {})", fresh.len(), a.weights.display(), fresh[0]);
    }
    let x = read_volume(&a.input)?.tensor;
    p.cfg.check_input_size(x.shape.d)?;
    let t = read_target(&a.target, x.shape.n, x.shape.d, p.cfg.head_channels())?;
    let wm = match &a.weight {
        Some(path) => Some(super::data::read_map(path, "--weight map", x.shape.n, x.shape.d, 1)?),
        None => None,
    };
    let t0 = Instant::now();
    let lw = loss_weights(a.epoch);
    let step = train_step(b, &p, &x, &t, wm.as_ref(), lw, None)?;
    eprintln!("loss {:.6} = {} x head {:.6} + {} x CE3 + {} x CE4 (CE3 + CE4 = {:.6}) in {:.2} s", step.loss, lw[0], step.main, lw[1], lw[2], step.aux, t0.elapsed().as_secs_f64());
    let mut tensors = vec![("loss".to_string(), vec![1], vec![step.loss as f32])];
    for (s, g) in p.specs.iter().zip(&step.grads) {
        if let Some(g) = g {
            tensors.push((format!("grad.{}", s.name), s.shape.clone(), g.clone()));
        }
    }
    let bytes = serialize(&p.cfg, &tensors)?;
    crate::io::write_atomic(&a.output, |f| std::io::Write::write_all(f, &bytes))?;
    eprintln!("wrote {} ({} gradients)", a.output.display(), tensors.len() - 1);
    Ok(())
}

/// The voxel size the training inputs record (sidecars, TCF, OME-TIFF or ImageJ tags), if any;
/// inputs that record sizes more than 1% apart are an error naming two of them.
fn data_voxel_size(dir: &Path) -> Result<Option<[f64; 3]>> {
    let mut found: Option<crate::voxel::VoxelSize> = None;
    for (_, src) in super::data::find_sources(dir)? {
        let path = match &src {
            super::data::Source::Pair { input, .. } => input,
            super::data::Source::Mat(p) => p,
        };
        let Some(v) = crate::voxel::voxel_size_of(path)? else { continue };
        match &found {
            Some(f) if crate::voxel::differs(f.um, v.um, 0.01) => {
                return Err(Error::Input(format!(
                    "the training inputs record different voxel sizes: {:?} um ({}) and {:?} um ({}); train on one scale, or give --voxel-size",
                    f.um, f.from, v.um, v.from
                )))
            }
            Some(_) => {}
            None => found = Some(v),
        }
    }
    Ok(found.map(|v| v.um))
}

pub const TRAIN_LONG: &str = "\
Trains (or fine-tunes) DeepIS on pairs of input and target volumes with the published recipe
(the DeepIS trainer, trainers/CNNTrainer.py run by main_DeepIS.py): loss = w0 x head term +
w1 x CE(classifier3) + w2 x CE(classifier4), (w0, w1, w2) = (0.2, 0.4, 0.4) for epochs 0-49,
(0.4, 0.3, 0.3) for 50-99, (0.6, 0.2, 0.2) for 100-149, then (0.8, 0.1, 0.1); the distance head's
term is the L1 weighted by the edge map with pw = 10; Adam, lr 5e-5, betas (0.5, 0.999), batch 2.
Validation (and best.safetensors) as published: the eval-mode head output under the same L1 with
pw = 1 (sigmoid heads: BCE + soft Dice), no deep-supervision terms.

DATA (--data DIR), either
  DIR/NAME_input.npy + DIR/NAME_target.npy pairs (.tif works too), or
  DIR/input/NAME.npy + DIR/target/NAME.npy (the same file names in two folders),
and in either layout DIR/NAME.mat: MATLAB MAT files saved with -v7, -v6 or -v7.3 (HDF5), one
sample each, holding `input`
(single or double) and `target`. deepis keeps MATLAB's index order: size(input) = [D0 D1 D2], D2
the optical axis, input(i,j,k) is voxel (i,j,k) (the shape scipy.io.loadmat gives); a target with
C channels is [D0 D1 D2 C].
A file may hold one volume (D0 x D1 x D2) or several (N x D0 x D1 x D2); each volume is a sample.
Targets: distance head (the published model), a signed distance map (> 0 effector, < 0 target
cell, 0 background); sigmoid head, C masks in {0, 1} (C x D0 x D1 x D2 or N x C x D0 x D1 x D2).
Volumes in one batch must have the same size. A seeded --val-fraction of the samples is held out.
Augmentation: random flips of each axis and quarter turns in the D0-D1 plane (half turns when
D0 != D1); --no-augment turns it off.

RUN_DIR (-o) receives, after every epoch (written atomically):
  last.safetensors   model + Adam state + RNG state (loadable by `deepis predict`)
  best.safetensors   the model with the lowest validation loss so far
  log.csv            epoch,steps,train_loss,train_main,train_aux,val_loss,val_dice,seconds
                     (val_dice: mean Dice of the effector and target masks)
RUN_DIR must be missing or empty for a new run: --resume continues from RUN_DIR/last.safetensors,
bit-for-bit as if never interrupted (options left out are the run's; --batch, --lr,
--weight-decay, --seed, --val-fraction, --no-augment and --data given must match it; only
--epochs, the total, may change and must exceed the epochs done); --force starts over, removing
the folder's last.safetensors, best.safetensors and log.csv first.
--init WEIGHTS that record a run's progress (`deepis import` of a PyTorch checkpoint with its
optimizer, or a deepis last.safetensors) continue that run: its Adam moments and step, and its
epoch count, which picks the loss weights; --epochs is then the total, as in --resume.
--fresh-optimizer instead starts from epoch 0 with a new Adam (fine-tuning on new data).

Example:
  deepis train --data my_tomograms -o runs/ft1 --init published.safetensors --fresh-optimizer --epochs 20 --lr 1e-5";

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Folder of training pairs (see above)
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Run folder: checkpoints and log
    #[arg(short, long, value_name = "RUN_DIR")]
    pub output: PathBuf,
    /// Start from these weights (fine-tuning); default: random weights of --config
    #[arg(long, value_name = "WEIGHTS")]
    pub init: Option<PathBuf>,
    /// Model config for a random start: a JSON file with keys of DEFAULT_CONFIG (default: the published model)
    #[arg(long, value_name = "CONFIG.json", conflicts_with = "init")]
    pub config: Option<PathBuf>,
    /// Epochs in total (counting those of a run continued by --init or --resume)
    #[arg(long, default_value_t = 100)]
    pub epochs: usize,
    /// Volumes per step [default: 2, as published; with --resume: the run's]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: Option<u32>,
    /// Adam learning rate [default: 5e-5, as published; with --resume: the run's]
    #[arg(long)]
    pub lr: Option<f64>,
    /// L2 weight decay (as torch.optim.Adam) [default: 0; with --resume: the run's]
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Seed of the initialisation, split, shuffle, augmentation and dropout [default: 0; with --resume: the run's]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Fraction of samples held out for validation [default: 0.2; with --resume: the run's]
    #[arg(long)]
    pub val_fraction: Option<f64>,
    /// No random flips and rotations
    #[arg(long)]
    pub no_augment: bool,
    /// Continue RUN_DIR/last.safetensors (options not given are the run's; given ones must match)
    #[arg(long)]
    pub resume: bool,
    /// Start a new run in a RUN_DIR that holds one (its checkpoints and log are removed)
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// With --init: a new Adam from epoch 0, not the run the weights record
    #[arg(long, requires = "init")]
    pub fresh_optimizer: bool,
    /// Where training runs (as for predict; auto: the GPU when one is found)
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,
    /// Voxel size D0,D1,D2 in um of the data, recorded in every checkpoint (`voxel_size_um`) so
    /// that `segment` warns about inputs of another scale (default: what the input files record)
    #[arg(long, value_name = "D0,D1,D2", value_parser = crate::analysis::parse_voxel_size)]
    pub voxel_size: Option<[f64; 3]>,
}

/// Runs where `train_step_cmd` runs.
pub fn train_cmd(a: &TrainArgs) -> Result<()> {
    with_backend(choose(a.backend)?, RunJob(a))
}

struct RunJob<'a>(&'a TrainArgs);

impl Job for RunJob<'_> {
    type Out = ();
    fn run<B: TrainBackend>(self, b: B) -> Result<()> {
        train_on(&b, self.0)
    }
}

/// The run's options: those given, the rest from the resumed run (or the defaults), so that
/// `--resume` needs no options repeated and `train` refuses only those given differently.
fn options(a: &TrainArgs) -> Result<TrainOptions> {
    let base = if a.resume { recorded_options(&a.output)? } else { None }.unwrap_or_default();
    let o = TrainOptions {
        epochs: a.epochs,
        batch: a.batch.map_or(base.batch, |b| b as usize),
        lr: a.lr.unwrap_or(base.lr),
        weight_decay: a.weight_decay.unwrap_or(base.weight_decay),
        seed: a.seed.unwrap_or(base.seed),
        val_fraction: a.val_fraction.unwrap_or(base.val_fraction),
        augment: base.augment && !a.no_augment,
        dropout: base.dropout,
        data: Some(std::fs::canonicalize(&a.data).unwrap_or_else(|_| a.data.clone())),
        voxel_size_um: a.voxel_size.or(base.voxel_size_um),
    };
    if !(o.lr.is_finite() && o.lr > 0.0 && (0.0..1.0).contains(&o.val_fraction)) {
        return Err(Error::Input("--lr must be positive and --val-fraction in [0, 1)".into()));
    }
    Ok(o)
}

fn train_on<B: TrainBackend>(b: &B, a: &TrainArgs) -> Result<()> {
    eprintln!("backend: {}", b.name());
    let mode = match (a.resume, a.force) {
        (true, _) => RunMode::Resume,
        (_, true) => RunMode::Force,
        _ => RunMode::New,
    };
    // before the data is read: a refusal should not wait for gigabytes to load
    check_run_dir(&a.output, mode)?;
    let mut opts = options(a)?;
    let start = start_of(a, opts.seed)?;
    opts.voxel_size_um = training_voxel_size(opts.voxel_size_um, &a.data)?;
    let samples = load_training_data(&a.data, &start.params.cfg, opts.batch)?;
    eprintln!("data: {} sample(s) from {}", samples.len(), a.data.display());
    let rep = train(b, start, &samples, &a.output, opts, mode, None, true)?;
    eprintln!("done: {} and {}", rep.last.display(), rep.best.display());
    Ok(())
}

/// The model to train: from `--init` weights, a `--config`, or the default config, drawn with `seed`.
fn start_of(a: &TrainArgs, seed: u64) -> Result<Start> {
    Ok(match (&a.init, &a.config) {
        (Some(w), _) => {
            let (mut s, fresh) = Start::from_weights(&Weights::load(w)?, seed)?;
            if a.fresh_optimizer {
                (s.adam, s.epoch) = (None, 0);
            }
            if !fresh.is_empty() {
                eprintln!("note: {} tensor(s) missing from {} initialised randomly (e.g. {})", fresh.len(), w.display(), fresh[0]);
            }
            if let Some(adam) = &s.adam {
                eprintln!("continuing the run of {} after epoch {} (Adam step {})", w.display(), s.epoch, adam.step);
            }
            s
        }
        (None, Some(c)) => {
            let (file, len) = crate::io::open_file(c)?;
            if len > 1 << 20 {
                return Err(Error::format(c, format!("{len} bytes: a config is a short JSON object of DEFAULT_CONFIG keys")));
            }
            let text = std::io::read_to_string(file).map_err(|e| Error::io(c, e))?;
            let cfg = Config::from_json(&text).map_err(|e| Error::format(c, e.to_string()))?;
            crate::weights::check_param_budget(&cfg).map_err(|e| Error::format(c, e.to_string()))?;
            Params::random(&cfg, seed).into()
        }
        (None, None) => Params::random(&Config::default(), seed).into(),
    })
}

/// The voxel size the run records: `given` (--voxel-size or the resumed run's), else what the
/// data's inputs record; said on stderr either way.
fn training_voxel_size(given: Option<[f64; 3]>, data: &Path) -> Result<Option<[f64; 3]>> {
    let v = match given {
        Some(v) => Some(v),
        None => data_voxel_size(data)?,
    };
    match v {
        Some(v) => eprintln!("voxel size {v:?} um, recorded in the checkpoints"),
        None => eprintln!("note: the data records no voxel size; give --voxel-size so that the checkpoints record it and segment can check its inputs' scale"),
    }
    Ok(v)
}
