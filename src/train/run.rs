//! The training loop of `deepis train`: epochs over shuffled, augmented batches, Adam, a
//! validation pass, an atomic checkpoint after every epoch, the best validation checkpoint, a
//! CSV log, and `--resume` that continues bit-for-bit.
//!
//! Files in RUN_DIR:
//!   last.safetensors   after every epoch: every model tensor (PyTorch names, loadable by
//!                      `deepis predict`), `adam.m.<name>`, `adam.v.<name>`, and in __metadata__
//!                      the config and `train_state` (epoch, Adam step, RNG state, options, best).
//!   best.safetensors   the model of the epoch with the lowest validation loss (training loss
//!                      when there is no validation set). The validation loss is the published
//!                      trainer's metric: the eval-mode head output under the head term with the
//!                      pw = 1 edge weight map (distance heads), no deep-supervision terms.
//!   log.csv            epoch,steps,train_loss,train_main,train_aux,val_loss,val_dice,seconds
//!                      (val_dice: mean Dice of the effector and target masks of the eval-mode
//!                      output, distance > 0.1 / < -0.1, or sigmoid channels 0 / 1 > 0.5)
//! Bit-for-bit resumption: every op of the CPU backend reduces in a fixed order, and one seeded
//! generator (saved in the checkpoint) drives the shuffle, the augmentation and the dropout masks.
use super::adam::Adam;
use super::backend::TrainBackend;
use super::data::{stack, Augment, Sample};
use super::loss::{edge_weight, head_loss, loss_weights, EdgeWeight};
use super::net::{forward_eval, train_step, Params, DROPOUT};
use crate::config::Head;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::weights::{serialize_with, Weights};
use std::collections::HashMap;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a run was asked for (saved in checkpoints; a resumed run keeps them, except `epochs`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// Fraction of the samples held out for validation (at least one when there are two or more).
    pub val_fraction: f64,
    pub augment: bool,
    pub dropout: f32,
    /// The data folder (canonical path) when the run was started by `deepis train`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<PathBuf>,
    /// The data's voxel size (um along D0, D1, D2), written into every checkpoint's
    /// `__metadata__` as `voxel_size_um`, so that `segment` can warn about inputs of another scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voxel_size_um: Option<[f64; 3]>,
}

/// The published trainer's Adam learning rate (main_DeepIS.py: 5e-5).
pub const LR: f64 = 5e-5;

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions { epochs: 100, batch: 2, lr: LR, weight_decay: 0.0, seed: 0, val_fraction: 0.2, augment: true, dropout: DROPOUT, data: None, voxel_size_um: None }
    }
}

/// Progress and RNG state, saved in every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub options: TrainOptions,
    /// Epochs completed.
    pub epoch: usize,
    pub adam_step: u64,
    pub rng_state: u64,
    pub best_val: Option<f64>,
    pub best_epoch: usize,
    /// Names of the validation samples.
    pub val: Vec<String>,
}

/// One line of the log.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochLog {
    pub epoch: usize,
    pub steps: u64,
    pub train_loss: f64,
    pub train_main: f64,
    pub train_aux: f64,
    pub val_loss: Option<f64>,
    pub val_dice: Option<f64>,
    pub seconds: f64,
}

const LOG_HEADER: &str = "epoch,steps,train_loss,train_main,train_aux,val_loss,val_dice,seconds";

fn log_line(l: &EpochLog) -> String {
    format!(
        "{},{},{:.6},{:.6},{:.6},{},{},{:.2}",
        l.epoch,
        l.steps,
        l.train_loss,
        l.train_main,
        l.train_aux,
        l.val_loss.map(|v| format!("{v:.6}")).unwrap_or_default(),
        l.val_dice.map(|v| format!("{v:.4}")).unwrap_or_default(),
        l.seconds
    )
}

/// Writes a checkpoint: model tensors, Adam moments, and the state in the metadata.
pub fn save_checkpoint(path: &Path, p: &Params, adam: &Adam, state: &TrainState) -> Result<()> {
    let mut tensors = p.to_tensors();
    for (i, s) in p.specs.iter().enumerate() {
        if let (Some(m), Some(v)) = (&adam.m[i], &adam.v[i]) {
            tensors.push((format!("adam.m.{}", s.name), s.shape.clone(), m.clone()));
            tensors.push((format!("adam.v.{}", s.name), s.shape.clone(), v.clone()));
        }
    }
    let mut meta = run_metadata(&state.options);
    meta.insert("train_state".into(), serde_json::to_string(state).map_err(|e| Error::Other(e.to_string()))?);
    let bytes = serialize_with(&p.cfg, &tensors, meta)?;
    crate::io::write_atomic(path, |w| std::io::Write::write_all(w, &bytes))
}

/// The `__metadata__` every file of a run carries beyond the config: the voxel size it trained at.
fn run_metadata(o: &TrainOptions) -> HashMap<String, String> {
    o.voxel_size_um.map(|v| ("voxel_size_um".to_string(), format!("{},{},{}", v[0], v[1], v[2]))).into_iter().collect()
}

/// Reads a checkpoint written by `save_checkpoint`: the model, its Adam state (as `Start` reads
/// it, with the run's learning rate and weight decay) and the run's state.
pub fn load_checkpoint(path: &Path) -> Result<(Params, Adam, TrainState)> {
    let w = Weights::load(path)?;
    let st = w.meta.get("train_state").ok_or_else(|| Error::format(path, "no train_state in __metadata__: not a deepis training checkpoint"))?;
    let state: TrainState = serde_json::from_str(st).map_err(|e| Error::format(path, format!("train_state: {e}")))?;
    let (start, fresh) = Start::from_weights(&w, 0)?;
    if !fresh.is_empty() {
        return Err(Error::format(path, format!("checkpoint lacks {fresh:?}")));
    }
    let adam = start.adam.expect("a train_state records the run's progress");
    let adam = Adam { lr: state.options.lr, weight_decay: state.options.weight_decay, ..adam };
    Ok((start.params, adam, state))
}

/// Mean Dice of the effector and target masks of an output against its target.
pub fn mask_dice(head: Head, out: &Tensor, target: &Tensor) -> f64 {
    let c = out.shape.c;
    let class = |t: &[f32], k: usize| -> bool {
        match head {
            Head::Distance => if k == 0 { t[0] > 0.1 } else { t[0] < -0.1 },
            Head::Sigmoid => t.get(k).is_some_and(|&v| v > 0.5),
        }
    };
    let mut total = 0.0;
    for k in 0..2 {
        let (mut inter, mut sum) = (0usize, 0usize);
        for (o, t) in out.data.chunks_exact(c).zip(target.data.chunks_exact(c)) {
            let (a, b) = (class(o, k), class(t, k));
            inter += (a && b) as usize;
            sum += a as usize + b as usize;
        }
        total += if sum == 0 { 1.0 } else { 2.0 * inter as f64 / sum as f64 };
    }
    total / 2.0
}

/// Validation of the held-out samples: (loss, Dice). The loss is the published trainer's
/// validation metric: the head term on the eval-mode output (running statistics, no dropout, no
/// deep-supervision heads), distance heads with the pw = 1 weight map of that output; the Dice
/// is `mask_dice`. Both are means over the samples.
pub fn validate<B: TrainBackend>(b: &B, p: &Params, samples: &[&Sample]) -> Result<(f64, f64)> {
    let (mut total, mut dice) = (0.0, 0.0);
    for s in samples {
        let out = forward_eval(b, p, &s.input)?;
        let weight = if p.cfg.head == Head::Distance { Some(edge_weight(&out, &s.target, EdgeWeight::VALIDATION)?) } else { None };
        total += head_loss(&p.cfg, &out, &s.target, weight.as_ref())?.0;
        dice += mask_dice(p.cfg.head, &out, &s.target);
    }
    let n = samples.len().max(1) as f64;
    Ok((total / n, dice / n))
}

/// Where a new run starts: the model, and when continuing another run (an imported PyTorch
/// checkpoint, or a deepis checkpoint given to --init) its Adam state and the epochs it completed,
/// which pick the loss weights.
pub struct Start {
    pub params: Params,
    pub adam: Option<Adam>,
    pub epoch: usize,
}

impl From<Params> for Start {
    fn from(params: Params) -> Start {
        Start { params, adam: None, epoch: 0 }
    }
}

/// What a weights file says about the run that made it (metadata `train_state` of a deepis
/// checkpoint, or `optimizer` of an imported PyTorch checkpoint).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Epochs completed.
    pub epoch: usize,
    pub adam_step: u64,
}

impl Start {
    /// The model of `w` and, when its `__metadata__` records a run's progress and `w`
    /// holds `adam.m.<name>` / `adam.v.<name>`, that run's Adam moments, step and epoch.
    pub fn from_weights(w: &Weights, seed: u64) -> Result<(Start, Vec<String>)> {
        let (params, fresh) = Params::from_weights(w, seed)?;
        let progress: Option<Progress> = match (w.meta.get("train_state"), w.meta.get("optimizer")) {
            (Some(t), _) => {
                let s: TrainState = serde_json::from_str(t).map_err(|e| Error::format(&w.origin, format!("train_state in __metadata__: {e}")))?;
                Some(Progress { epoch: s.epoch, adam_step: s.adam_step })
            }
            (None, Some(o)) => Some(serde_json::from_str(o).map_err(|e| Error::format(&w.origin, format!("optimizer in __metadata__: {e}")))?),
            _ => None,
        };
        let Some(pr) = progress else { return Ok((Start::from(params), fresh)) };
        let mut adam = Adam::new(params.specs.len(), LR, 0.0);
        adam.step = pr.adam_step;
        for (i, s) in params.specs.iter().enumerate() {
            let (m, v) = (format!("adam.m.{}", s.name), format!("adam.v.{}", s.name));
            if w.contains(&m) && w.contains(&v) {
                for n in [&m, &v] {
                    if w.shape(n) != Some(s.shape.as_slice()) {
                        return Err(Error::format(&w.origin, format!("{n} has shape {:?}, the parameter {:?}", w.shape(n), s.shape)));
                    }
                }
                adam.m[i] = Some(w.get(&m)?);
                adam.v[i] = Some(w.get(&v)?);
            }
        }
        Ok((Start { params, adam: Some(adam), epoch: pr.epoch }, fresh))
    }
}

/// What `train` reports.
pub struct RunReport {
    pub log: Vec<EpochLog>,
    pub last: PathBuf,
    pub best: PathBuf,
}

/// How `train` treats the run folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    /// A new run: the folder must be missing or empty.
    New,
    /// Continue the run of the folder's last.safetensors, with the options it recorded.
    Resume,
    /// A new run in a folder that may hold an old one: its run files are removed first.
    Force,
}

impl From<bool> for RunMode {
    fn from(resume: bool) -> RunMode {
        if resume { RunMode::Resume } else { RunMode::New }
    }
}

/// The files a run writes into its folder.
const RUN_FILES: [&str; 3] = ["last.safetensors", "best.safetensors", "log.csv"];

/// Refuses to start a new run over anything (its checkpoints and log would be replaced), and
/// to resume without a checkpoint to resume from.
pub fn check_run_dir(run_dir: &Path, mode: RunMode) -> Result<()> {
    let held = match std::fs::read_dir(run_dir) {
        Ok(rd) => {
            let mut v: Vec<String> = rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
            v.sort();
            v
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io(run_dir, e)),
    };
    let list = || {
        let shown: Vec<&str> = held.iter().take(5).map(String::as_str).collect();
        format!("{}{}", shown.join(", "), if held.len() > 5 { format!(" and {} more", held.len() - 5) } else { String::new() })
    };
    match mode {
        RunMode::New if !held.is_empty() => Err(Error::Input(format!(
            "the run folder {} is not empty (it holds {}): --resume continues the run in it, --force starts over (removing its {}), or give another -o",
            run_dir.display(),
            list(),
            RUN_FILES.join(", ")
        ))),
        RunMode::Resume if !run_dir.join(RUN_FILES[0]).is_file() => Err(Error::Input(format!(
            "--resume: {} has no last.safetensors to resume from ({}); drop --resume to start a new run",
            run_dir.display(),
            if held.is_empty() { "the folder is empty or missing".to_string() } else { format!("it holds {}", list()) }
        ))),
        _ => Ok(()),
    }
}

/// Refuses a resume whose options differ from those the run recorded (all but --epochs: they
/// fix the split, the shuffle and the optimiser, so a change would not continue the same run).
fn check_same_options(recorded: &TrainOptions, given: &TrainOptions, last: &Path) -> Result<()> {
    let on = |b: bool| if b { "on" } else { "off (--no-augment)" }.to_string();
    let mut pairs = vec![
        ("--batch", recorded.batch.to_string(), given.batch.to_string()),
        ("--lr", recorded.lr.to_string(), given.lr.to_string()),
        ("--weight-decay", recorded.weight_decay.to_string(), given.weight_decay.to_string()),
        ("--seed", recorded.seed.to_string(), given.seed.to_string()),
        ("--val-fraction", recorded.val_fraction.to_string(), given.val_fraction.to_string()),
        ("augmentation", on(recorded.augment), on(given.augment)),
        ("dropout", recorded.dropout.to_string(), given.dropout.to_string()),
    ];
    if let (Some(r), Some(g)) = (&recorded.data, &given.data) {
        pairs.push(("--data", r.display().to_string(), g.display().to_string()));
    }
    if let (Some(r), Some(g)) = (recorded.voxel_size_um, given.voxel_size_um) {
        pairs.push(("--voxel-size", format!("{r:?}"), format!("{g:?}")));
    }
    match pairs.into_iter().find(|(_, r, g)| r != g) {
        None => Ok(()),
        Some((name, r, g)) => Err(Error::Input(format!(
            "--resume: {name} is {g}, but the run was started with {r} (recorded in {}); a resumed run keeps its options (only --epochs may change): leave {name} out to keep {r}, or start a new run in another folder",
            last.display()
        ))),
    }
}

/// The options recorded by the run in `run_dir`, when it has a checkpoint.
pub fn recorded_options(run_dir: &Path) -> Result<Option<TrainOptions>> {
    let last = run_dir.join(RUN_FILES[0]);
    if !last.is_file() {
        return Ok(None);
    }
    Ok(Some(load_checkpoint(&last)?.2.options))
}

/// Trains from `init` (or resumes from `run_dir/last.safetensors`: `RunMode::Resume`, or
/// `true`), on `samples`, writing into `run_dir` (see `RunMode` for what it may hold). `stop_after`: end this process's run after that many epochs (tests
/// use it to emulate an interruption). `progress`: draw a progress bar.
#[allow(clippy::too_many_arguments)]
pub fn train<B: TrainBackend>(
    b: &B,
    init: impl Into<Start>,
    samples: &[Sample],
    run_dir: &Path,
    opts: TrainOptions,
    mode: impl Into<RunMode>,
    stop_after: Option<usize>,
    progress: bool,
) -> Result<RunReport> {
    let (init, mode): (Start, RunMode) = (init.into(), mode.into());
    let (last, best, csv) = (run_dir.join(RUN_FILES[0]), run_dir.join(RUN_FILES[1]), run_dir.join(RUN_FILES[2]));
    if samples.is_empty() {
        return Err(Error::Input("no training samples".into()));
    }
    check_run_dir(run_dir, mode)?;
    let (mut p, mut adam, mut state, mut rng, mut log_lines) = if mode == RunMode::Resume {
        let (p, adam, mut state) = load_checkpoint(&last)?;
        if p.cfg != init.params.cfg {
            return Err(Error::format(&last, "the checkpoint's config differs from the model being trained"));
        }
        check_same_options(&state.options, &opts, &last)?;
        if state.epoch >= opts.epochs {
            return Err(Error::Input(format!(
                "--epochs {}: the run in {} has completed {} epoch(s) already; --epochs is the total, so give more than {} to train on (nothing was written)",
                opts.epochs,
                run_dir.display(),
                state.epoch,
                state.epoch
            )));
        }
        state.options.epochs = opts.epochs;
        let rng = Rng::from_state(state.rng_state);
        let text = std::fs::read_to_string(&csv).unwrap_or_default();
        let lines: Vec<String> = text
            .lines()
            .skip(1)
            .filter(|l| l.split(',').next().and_then(|e| e.parse::<usize>().ok()).is_some_and(|e| e <= state.epoch))
            .map(str::to_string)
            .collect();
        eprintln!("resuming {} after epoch {} (Adam step {})", last.display(), state.epoch, state.adam_step);
        (p, adam, state, rng, lines)
    } else {
        let mut rng = Rng::new(opts.seed);
        // validation split: a seeded shuffle of the sample indices, the last ones held out
        let mut idx: Vec<usize> = (0..samples.len()).collect();
        shuffle(&mut idx, &mut rng);
        let nval = if samples.len() >= 2 { ((samples.len() as f64 * opts.val_fraction).ceil() as usize).clamp(0, samples.len() - 1) } else { 0 };
        let val: Vec<String> = idx[samples.len() - nval..].iter().map(|&i| samples[i].name.clone()).collect();
        let mut adam = init.adam.unwrap_or_else(|| Adam::new(init.params.specs.len(), opts.lr, opts.weight_decay));
        (adam.lr, adam.weight_decay) = (opts.lr, opts.weight_decay);
        if opts.epochs == 0 {
            return Err(Error::Input("--epochs 0: nothing to train (--epochs is the number of epochs in total); nothing was written".into()));
        }
        if init.epoch >= opts.epochs {
            return Err(Error::Input(format!("the initial weights' run has completed {} epochs: --epochs (the total) must be larger, or --fresh-optimizer to fine-tune from epoch 0 with a new Adam", init.epoch)));
        }
        if mode == RunMode::Force {
            remove_run_files(run_dir)?;
        }
        std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
        let state = TrainState { options: opts.clone(), epoch: init.epoch, adam_step: adam.step, rng_state: rng.state(), best_val: None, best_epoch: 0, val };
        (init.params, adam, state, rng, Vec::new())
    };
    let o = state.options.clone();
    let train_set: Vec<&Sample> = samples.iter().filter(|s| !state.val.contains(&s.name)).collect();
    let val_set: Vec<&Sample> = samples.iter().filter(|s| state.val.contains(&s.name)).collect();
    if train_set.is_empty() {
        return Err(Error::Input("every sample is in the validation set".into()));
    }
    let steps_per_epoch = train_set.len().div_ceil(o.batch);
    let mut log = Vec::new();
    let mut ran = 0;
    while state.epoch < o.epochs && stop_after.is_none_or(|s| ran < s) {
        let t0 = Instant::now();
        let epoch = state.epoch + 1;
        let mut order: Vec<usize> = (0..train_set.len()).collect();
        shuffle(&mut order, &mut rng);
        let bar = if progress {
            let pb = indicatif::ProgressBar::new(steps_per_epoch as u64);
            pb.set_style(
                indicatif::ProgressStyle::with_template("epoch {prefix} {bar:30} {pos}/{len} steps, {msg}, ETA {eta}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            pb.set_prefix(format!("{epoch}/{}", o.epochs));
            Some(pb)
        } else {
            None
        };
        let (mut sl, mut sm, mut sa, mut n) = (0.0, 0.0, 0.0, 0usize);
        for chunk in order.chunks(o.batch) {
            let mut xs = Vec::new();
            let mut ts = Vec::new();
            for &i in chunk {
                let s = train_set[i];
                let aug = if o.augment { Augment::random(&mut rng, s.input.shape.d) } else { Augment::NONE };
                xs.push(aug.apply(&s.input));
                ts.push(aug.apply(&s.target));
            }
            let (x, t) = (stack(&xs)?, stack(&ts)?);
            let step = train_step(b, &p, &x, &t, None, loss_weights(state.epoch), Some((o.dropout, &mut rng)))?;
            if !step.loss.is_finite() {
                return Err(Error::Other(format!("epoch {epoch}: the loss is {} (lower --lr?)", step.loss)));
            }
            p.update_running_stats(&step.bn)?;
            adam.update(&mut p, &step.grads)?;
            sl += step.loss;
            sm += step.main;
            sa += step.aux;
            n += 1;
            if let Some(pb) = &bar {
                pb.set_message(format!("loss {:.4} (mean {:.4})", step.loss, sl / n as f64));
                pb.inc(1);
            }
        }
        if let Some(pb) = bar {
            pb.finish_and_clear();
        }
        let (vl, vd) = if val_set.is_empty() {
            (None, None)
        } else {
            let (l, d) = validate(b, &p, &val_set)?;
            (Some(l), Some(d))
        };
        let entry = EpochLog {
            epoch,
            steps: adam.step,
            train_loss: sl / n as f64,
            train_main: sm / n as f64,
            train_aux: sa / n as f64,
            val_loss: vl,
            val_dice: vd,
            seconds: t0.elapsed().as_secs_f64(),
        };
        let score = vl.unwrap_or(entry.train_loss);
        let improved = state.best_val.is_none_or(|b| score < b);
        state.epoch = epoch;
        state.adam_step = adam.step;
        state.rng_state = rng.state();
        if improved {
            state.best_val = Some(score);
            state.best_epoch = epoch;
            let bytes = serialize_with(&p.cfg, &p.to_tensors(), run_metadata(&state.options))?;
            crate::io::write_atomic(&best, |w| std::io::Write::write_all(w, &bytes))?;
        }
        // The checkpoint is written last: it is the commit point of the epoch. A kill before it
        // leaves the previous checkpoint, and a resume drops log rows newer than it.
        log_lines.push(log_line(&entry));
        let text = format!("{LOG_HEADER}\n{}\n", log_lines.join("\n"));
        crate::io::write_atomic(&csv, |w| std::io::Write::write_all(w, text.as_bytes()))?;
        save_checkpoint(&last, &p, &adam, &state)?;
        eprintln!(
            "epoch {epoch}/{}: train loss {:.5} (head {:.5}, aux {:.5}){} in {:.1} s{}",
            o.epochs,
            entry.train_loss,
            entry.train_main,
            entry.train_aux,
            vl.zip(vd).map(|(v, d)| format!(", validation {v:.5} (Dice {d:.3})")).unwrap_or_default(),
            entry.seconds,
            if improved { " (best)" } else { "" }
        );
        log.push(entry);
        ran += 1;
    }
    Ok(RunReport { log, last, best })
}

/// `--force`: the old run's files go before the new run writes its first epoch, so that a kill
/// in that epoch cannot leave the old checkpoint to be resumed as if it were the new run's.
fn remove_run_files(run_dir: &Path) -> Result<()> {
    let mut removed = Vec::new();
    for name in RUN_FILES {
        let f = run_dir.join(name);
        if f.is_file() {
            std::fs::remove_file(&f).map_err(|e| Error::io(&f, e))?;
            removed.push(name);
        }
    }
    if !removed.is_empty() {
        eprintln!("--force: removed the previous run's {} from {}", removed.join(", "), run_dir.display());
    }
    Ok(())
}

/// Fisher-Yates with the run's generator.
fn shuffle(v: &mut [usize], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}
