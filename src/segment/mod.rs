//! `deepis segment`: the network's output turned into label volumes (0 background, 1 effector,
//! 2 target), for volumes of any size.
//!
//! Large volumes are cut into tiles on the 16-voxel grid of the network's four down-samplings
//! (so the tiles see the same sampling grid as the whole volume would), overlapping by
//! `overlap` voxels. Each tile's prediction is weighted by a window that is 0 on its outer
//! `overlap/4` voxels (where the zero padding at the tile's edge changes the prediction), rises
//! as sin^2 over the rest of the overlap and is 1 inside and at the volume's own borders; the
//! weighted predictions are summed and divided by the summed weights (`tiles`). Only one batch of
//! tiles' activations exists at a time; the full-size buffers are the output volume, one weight
//! per voxel, and the sum of each frame whose tiles are in flight. Tiles of consecutive inputs
//! share batches, two of them in flight on a GPU (`stream`).
use crate::analysis::components::remove_small_components;
use crate::config::Head;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::weights::Weights;
use std::path::{Path, PathBuf};

mod pipeline;
mod stream;
mod tiles;
pub use pipeline::workers;
pub use stream::{gpu_predictor, Done, GpuStream, Immediate, Predictor, Stream, Streamer};
pub use tiles::{check_tiling, predict_tiled, predict_tiled_batched, predict_tiled_with, predict_tta, tile_starts, tta_transforms, Blend, Work};

/// Labels (0/1/2) of every voxel of a head output (N x D0 x D1 x D2 x C):
/// distance head: effector where d > tau, target where d < -tau;
/// sigmoid head: effector where channel 0 > 0.5, else target where channel 1 > 0.5.
pub fn masks(y: &Tensor, head: Head, tau: f64) -> Result<Vec<u8>> {
    let c = y.shape.c;
    let tau = tau as f32;
    Ok(match head {
        Head::Distance => {
            if c != 1 {
                return Err(Error::Shape(format!("a distance head has 1 channel, the output has {c}")));
            }
            y.data.iter().map(|&d| if d > tau { 1 } else if d < -tau { 2 } else { 0 }).collect()
        }
        Head::Sigmoid => y
            .data
            .chunks_exact(c)
            .map(|p| {
                if p[0] > 0.5 {
                    1
                } else if c > 1 && p[1] > 0.5 {
                    2
                } else {
                    0
                }
            })
            .collect(),
    })
}

/// Grows the distance head's cores (|d| > tau) back to the cell boundary (d = 0): every voxel with
/// d > 0 connected (26-neighbours) to an effector core through voxels with d > 0 becomes effector,
/// and likewise target for d < 0. The threshold tau separates touching cells and drops weak blobs;
/// without this step each cell would lose a rim of tau um (with the default tau = 0.5 um and
/// 0.2 x 0.2 x 0.4 um voxels, Dice 0.84 for the effector even from the exact distance map).
/// Voxels labelled already keep their label; a core grows only where d has its class's sign (as
/// every core of [`masks`] with tau >= 0 does).
pub fn regrow(labels: &mut [u8], d: &[f32], dims: [usize; 3]) {
    // the components of d > 0 (1) and of d < 0 (2); those that hold a core of their class become it
    let sign: Vec<u8> = d.iter().map(|&v| if v > 0.0 { 1 } else if v < 0.0 { 2 } else { 0 }).collect();
    let mut g = crate::analysis::components::Runs::new(&sign, dims, |s| s != 0);
    let (comp, sizes) = g.components();
    let mut grows = vec![false; sizes.len()];
    for (x, &c) in comp.iter().enumerate() {
        let v = g.runs[x].3;
        if !grows[c as usize] && labels[g.span(x)].contains(&v) {
            grows[c as usize] = true;
        }
    }
    for (x, &c) in comp.iter().enumerate() {
        if grows[c as usize] {
            let v = g.runs[x].3;
            labels[g.span(x)].iter_mut().filter(|l| **l == 0).for_each(|l| *l = v);
        }
    }
}

/// Masks of every volume (the distance head's cores regrown to d = 0 when `grow`), with the
/// components of each class smaller than `min_size` voxels removed (the largest of each class
/// always kept). Returns the labels and the voxels removed.
pub fn labels_from_output(y: &Tensor, head: Head, tau: f64, grow: bool, min_size: usize) -> Result<(Vec<u8>, usize)> {
    use rayon::prelude::*;
    let mut l = masks(y, head, tau)?;
    let vox = y.shape.voxels();
    // the frames of a time-lapse in parallel
    let removed = l
        .par_chunks_mut(vox)
        .zip(y.data.par_chunks(vox * y.shape.c))
        .map(|(v, d)| {
            if grow && head == Head::Distance {
                regrow(v, d, y.shape.d);
            }
            remove_small_components(v, y.shape.d, &[1, 2], min_size)
        })
        .sum();
    Ok((l, removed))
}

/// Input files from arguments that are files, folders (their .npy/.tif/.tiff files, sorted) or
/// glob patterns.
pub fn expand_inputs(args: &[String]) -> Result<Vec<PathBuf>> {
    // the volumes among `found`, sorted; none is the error `none`
    let volumes = |found: Vec<PathBuf>, none: String| -> Result<Vec<PathBuf>> {
        let is_volume = |q: &PathBuf| q.is_file() && crate::io::extension_is(q, &["npy", "tif", "tiff", "tcf"]);
        let mut v: Vec<PathBuf> = found.into_iter().filter(is_volume).collect();
        if v.is_empty() {
            return Err(Error::Input(none));
        }
        v.sort();
        Ok(v)
    };
    let mut out = Vec::new();
    for a in args {
        let p = Path::new(a);
        if p.is_dir() {
            let rd = std::fs::read_dir(p).map_err(|e| Error::io(p, e))?;
            let found = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            out.extend(volumes(found, format!("{}: the folder holds no .npy, .tif or .tiff volume or .TCF file", p.display()))?);
        } else if p.exists() {
            out.push(p.to_path_buf());
        } else if a.contains(['*', '?', '[']) {
            let g = glob::glob(a).map_err(|e| Error::Input(format!("bad pattern {a:?}: {e}")))?;
            let found = g.filter_map(|e| e.ok()).collect();
            out.extend(volumes(found, format!("{a}: no .npy, .tif or .tiff volume or .TCF file matches"))?);
        } else {
            return Err(Error::io(p, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder")));
        }
    }
    Ok(out)
}

/// Output label file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LabelFormat {
    /// .npy (uint8), with a JSON sidecar holding the voxel size
    Npy,
    /// OME-TIFF with PhysicalSizeX/Y/Z (and the same JSON sidecar)
    Tif,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SegmentArgs {
    /// Trained network (.safetensors)
    #[arg(short, long, value_name = "WEIGHTS")]
    pub weights: PathBuf,
    /// RI volumes: files (.npy, .tif, Tomocube .TCF), folders of them, or glob patterns such as 'data/*.npy'
    #[arg(value_name = "INPUT", required_unless_present = "manifest")]
    pub inputs: Vec<String>,
    /// Folder for the label volumes (<input name>_labels.npy; created if missing)
    #[arg(short, long = "output", value_name = "OUT_DIR")]
    pub out_dir: PathBuf,
    /// Distance head threshold (um): effector cores where d > tau, target cores where d < -tau
    #[arg(long, default_value_t = 0.5)]
    pub tau: f64,
    /// Keep the cores as they are (by default they are regrown to the d = 0 boundary through
    /// voxels of the same sign, so cells do not lose a tau-thick rim)
    #[arg(long)]
    pub no_regrow: bool,
    /// Tile size D0,D1,D2: larger volumes are processed in overlapping tiles
    #[arg(long, default_value = "128,128,64", value_parser = crate::engine::parse_size)]
    pub tile: [usize; 3],
    /// Overlap of neighbouring tiles, in voxels
    #[arg(long, default_value_t = 16)]
    pub overlap: usize,
    /// How overlapping tiles are weighted
    #[arg(long, value_enum, default_value_t = Blend::Window)]
    pub blend: Blend,
    /// Test-time augmentation: average the network's output over the flips of each axis and the
    /// quarter turns in the D0-D1 plane that training uses (16 passes; 8 when D0 != D1)
    #[arg(long)]
    pub tta: bool,
    /// Also write the network's output (<name>_probabilities.npy/.tif, float32, C x D0 x D1 x D2)
    #[arg(long)]
    pub save_probabilities: bool,
    /// Components smaller than this (voxels) are removed; the largest of each class is kept
    #[arg(long, default_value_t = 1000)]
    pub min_size: usize,
    /// Label file format (uint8)
    #[arg(long, value_enum, default_value_t = LabelFormat::Npy)]
    pub format: LabelFormat,
    /// Voxel size D0,D1,D2 in um written into the outputs (default: what each input records:
    /// TCF resolution, OME-TIFF or ImageJ TIFF tags, a deepis sidecar)
    #[arg(long, value_name = "D0,D1,D2", value_parser = crate::analysis::parse_voxel_size)]
    pub voxel_size: Option<[f64; 3]>,
    /// Run only shard I of N (0-based) of the sorted inputs: input i belongs to shard i mod N.
    /// Default: from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT, or JOB_COMPLETION_INDEX with --shards
    #[arg(long, value_name = "I/N", value_parser = crate::batch::parse_shard)]
    pub shard: Option<crate::batch::Shard>,
    /// Number of shards, with the index from JOB_COMPLETION_INDEX (Kubernetes) or SLURM_ARRAY_TASK_ID
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub shards: Option<u64>,
    /// A file listing the inputs, one path per line (relative to the file's folder), instead of or besides INPUT
    #[arg(long, value_name = "LIST")]
    pub manifest: Option<PathBuf>,
    /// When an input's voxel size differs by more than 10% from the one the weights record they
    /// were trained at, resample it to that size for the network and the output back
    #[arg(long)]
    pub resample: bool,
    /// On a failed input, go on with the others; list failures in OUT_DIR/failed-<shard>.txt and
    /// exit with status 3
    #[arg(long)]
    pub keep_going: bool,
    /// Where to run the network
    #[arg(long, value_enum, default_value_t = crate::engine::BackendKind::Auto)]
    pub backend: crate::engine::BackendKind,
    /// Tiles per forward pass: up to N tiles of the same size at once, from any frames, test-time
    /// transforms and inputs in a row (a GPU computes a batch faster per volume; more uses more memory)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,
    /// Threads reading inputs (default: a quarter of the cores, 1 to 4); each holds one input
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub readers: Option<u32>,
    /// Threads labelling and writing outputs (default: the cores left but one, 1 to 8); each holds
    /// one input, its output and labels
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub writers: Option<u32>,
    #[command(flatten)]
    pub gpu: crate::gpu::plan::GpuOptions,
}

fn ext(format: LabelFormat) -> &'static str {
    match format {
        LabelFormat::Npy => "npy",
        LabelFormat::Tif => "tif",
    }
}

/// Where the labels of `input` go, for a name stem that is unique over the run (see
/// [`crate::batch::unique_stems`]).
pub fn output_path(out_dir: &Path, stem: &str, format: LabelFormat) -> PathBuf {
    out_dir.join(format!("{stem}_labels.{}", ext(format)))
}

/// Where the probability maps of `input` go (`--save-probabilities`).
pub fn probabilities_path(out_dir: &Path, stem: &str, format: LabelFormat) -> PathBuf {
    out_dir.join(format!("{stem}_probabilities.{}", ext(format)))
}

/// What a `segment` run did.
#[derive(Debug, Default)]
pub struct Report {
    /// Label files written by this run.
    pub written: Vec<PathBuf>,
    /// Inputs skipped because their outputs were complete and matched this run's provenance.
    pub skipped: Vec<PathBuf>,
    /// Inputs that failed (with --keep-going), with the error.
    pub failed: Vec<(PathBuf, String)>,
    /// OUT_DIR/failed-<shard>.txt when some failed.
    pub failed_list: Option<PathBuf>,
}

impl Report {
    /// Ok when nothing failed; else [`Error::InputsFailed`] (exit status 3).
    pub fn into_result(self) -> Result<()> {
        match self.failed_list {
            Some(list) if !self.failed.is_empty() => {
                Err(Error::InputsFailed { failed: self.failed.len(), done: self.written.len() + self.skipped.len(), list })
            }
            _ => Ok(()),
        }
    }
}

/// The options that decide the outputs' content (the provenance's `options`).
fn options_json(a: &SegmentArgs) -> serde_json::Value {
    let mut o = serde_json::json!({
        "tau": a.tau, "regrow": !a.no_regrow, "min_size": a.min_size, "tile": a.tile, "overlap": a.overlap,
        "blend": format!("{:?}", a.blend).to_lowercase(), "tta": a.tta, "save_probabilities": a.save_probabilities,
        "format": ext(a.format), "voxel_size": a.voxel_size, "resample": a.resample,
    });
    // fp32 on any backend is one result (to rounding); a half precision is another
    if a.gpu.precision != crate::gpu::plan::Precision::Fp32 {
        o["precision"] = a.gpu.precision.name().into();
    }
    // wgmma sums in another order than mma.sync on a GPU: another result again
    if a.gpu.wgmma {
        o["wgmma"] = true.into();
    }
    o
}

/// All inputs of the run, in the order every shard agrees on.
pub fn all_inputs(a: &SegmentArgs) -> Result<Vec<PathBuf>> {
    let mut v = if a.inputs.is_empty() { Vec::new() } else { expand_inputs(&a.inputs)? };
    if let Some(m) = &a.manifest {
        v.extend(crate::batch::read_manifest(m)?);
    }
    Ok(crate::batch::canonical_order(v))
}

/// Segments this shard's inputs with `predict` (the CLI builds it for the chosen backend),
/// skipping those already done.
pub fn run(a: &SegmentArgs, weights: &Weights, predict: &mut Predictor<'_>) -> Result<Report> {
    run_stream(a, weights, &mut Immediate::new(predict))
}

/// [`run`] on a [`Stream`] (the GPU plan's keeps two batches in flight).
pub fn run_stream(a: &SegmentArgs, weights: &Weights, stream: &mut dyn Stream) -> Result<Report> {
    check_tiling(a.tile, a.overlap)?;
    if !(a.tau.is_finite() && a.tau >= 0.0) {
        return Err(Error::Input(format!("--tau must be a finite number >= 0, got {}", a.tau)));
    }
    if let Some(v) = a.voxel_size {
        crate::analysis::check_voxel_size(v)?;
    }
    let all = all_inputs(a)?;
    let stems = crate::batch::unique_stems(&all);
    let env = |k: &str| std::env::var(k).ok();
    let (shard, from) = crate::batch::shard_from(a.shard, a.shards.map(|n| n as usize), &env)?;
    let mine = crate::batch::select(&all, shard);
    let wsha = crate::batch::sha256_file(&a.weights)?;
    let options = options_json(a);
    if shard.count > 1 {
        eprintln!("shard {}/{} ({from}): {} of {} input(s)", shard.index, shard.count, mine.len(), all.len());
    }
    let pb = indicatif::ProgressBar::new(mine.len() as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} files, {elapsed} elapsed, ETA {eta} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let t0 = std::time::Instant::now();
    let jobs: Vec<(&Path, &str)> = mine.iter().map(|&i| (all[i].as_path(), stems[i].as_str())).collect();
    let trained = crate::voxel::trained_voxel_size(&a.weights)?;
    let workers = workers(a.readers, a.writers);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let ctx = pipeline::Ctx { a, weights, trained, wsha: &wsha, options: &options, pb: &pb, workers, stop };
    let mut report = std::thread::scope(|s| pipeline::pipeline(s, &ctx, &jobs, stream))?;
    pb.finish_and_clear();
    let list = crate::batch::failed_list_path(&a.out_dir, shard);
    if report.failed.is_empty() {
        // A clean re-run clears the list an earlier run of this shard left.
        if list.is_file() {
            std::fs::remove_file(&list).map_err(|e| Error::io(&list, e))?;
        }
    } else {
        std::fs::create_dir_all(&a.out_dir).map_err(|e| Error::io(&a.out_dir, e))?;
        crate::batch::write_failed_list(&list, &report.failed)?;
        report.failed_list = Some(list);
    }
    let secs = t0.elapsed().as_secs_f64();
    let rate = if report.written.is_empty() { String::new() } else { format!(" ({:.2} files/s)", report.written.len() as f64 / secs.max(1e-9)) };
    eprintln!("{} written, {} skipped (already done), {} failed in {secs:.1} s{rate}", report.written.len(), report.skipped.len(), report.failed.len());
    Ok(report)
}

/// Labels as .npy, or as OME-TIFF carrying the voxel size.
pub fn write_labels_out(path: &Path, dims: &[usize], labels: &[u8], um: Option<[f64; 3]>, time_interval_s: Option<f64>) -> Result<()> {
    if crate::io::extension_is(path, &["npy"]) {
        return crate::analysis::write_labels(path, dims, labels);
    }
    let d5 = dims5(dims, false);
    crate::ome_tiff::write(path, d5, crate::ome_tiff::Pixels::U8(labels), um, time_interval_s)
}

/// A head output (file dims from `io::output_dims`) as .npy, or as OME-TIFF with the voxel size.
pub fn write_map(path: &Path, y: &Tensor, dims: &[usize], um: Option<[f64; 3]>, time_interval_s: Option<f64>) -> Result<()> {
    if crate::io::extension_is(path, &["npy"]) {
        return crate::io::write_npy(path, dims, &y.to_ncdhw());
    }
    crate::ome_tiff::write(path, dims5(dims, true), crate::ome_tiff::Pixels::F32(&y.to_ncdhw()), um, time_interval_s)
}

/// [T, C, D0, D1, D2] of file dims: labels are [D0..] or [T, D0..]; maps [C, D0..] or [T, C, D0..].
fn dims5(dims: &[usize], has_c: bool) -> [usize; 5] {
    let mut v = [1usize; 5];
    let k = dims.len();
    v[5 - 3..].copy_from_slice(&dims[k - 3..]);
    match (k, has_c) {
        (4, false) => v[0] = dims[0],
        (4, true) => v[1] = dims[0],
        (5, _) => {
            v[0] = dims[0];
            v[1] = dims[1];
        }
        _ => {}
    }
    v
}

/// A predictor on the fused CPU plan, one plan per tile size met.
pub fn plan_predictor(weights: &Weights) -> impl FnMut(&Tensor) -> Result<Tensor> + '_ {
    let mut plans: Vec<([usize; 3], crate::plan::Plan)> = Vec::new();
    move |x: &Tensor| {
        let d = x.shape.d;
        if let Some((_, p)) = plans.iter().find(|(s, _)| *s == d) {
            return crate::model::run_plan(p, weights, x);
        }
        let p = crate::plan::Plan::new(weights, d, crate::plan::PlanOptions::default())?;
        let y = crate::model::run_plan(&p, weights, x);
        plans.push((d, p));
        y
    }
}
