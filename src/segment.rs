//! `deepis segment`: the network's output turned into label volumes (0 background, 1 effector,
//! 2 target), for volumes of any size.
//!
//! Large volumes are cut into tiles on the 16-voxel grid of the network's four down-samplings
//! (so the tiles see the same sampling grid as the whole volume would), overlapping by
//! `overlap` voxels. Each tile's prediction is weighted by a window that is 0 on its outer
//! `overlap/4` voxels (where the zero padding at the tile's edge changes the prediction), rises
//! as sin^2 over the rest of the overlap and is 1 inside and at the volume's own borders; the
//! weighted predictions are summed and divided by the summed weights. Only one tile's activations
//! exist at a time; the output volume and one weight per voxel are the only full-size buffers.
use crate::analysis::components::remove_small_components;
use crate::config::Head;
use crate::error::{Error, Result};
use crate::tensor::{Shape, Tensor};
use crate::weights::Weights;
use std::path::{Path, PathBuf};

/// Tile starts on the grid of the network's 4 down-samplings (16 voxels) when the step allows.
const GRID: usize = 16;

/// A prediction function: N x D0 x D1 x D2 x 1 in, N x D0 x D1 x D2 x C out.
pub type Predictor<'a> = dyn FnMut(&Tensor) -> Result<Tensor> + 'a;

/// Starts of the tiles along one axis of `n` voxels.
pub fn tile_starts(n: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if n <= tile {
        return vec![0];
    }
    let mut step = tile - overlap;
    if step >= GRID {
        step -= step % GRID;
    }
    let mut v = Vec::new();
    let mut s = 0;
    while s + tile < n {
        v.push(s);
        s += step;
    }
    v.push(n - tile);
    v
}

/// The window along one axis for a tile [s, s + len) of an axis of `n` voxels.
fn axis_window(s: usize, len: usize, n: usize, overlap: usize) -> Vec<f32> {
    let dead = overlap / 4;
    let ramp = overlap - dead;
    let edge = |i: usize| -> f64 {
        if i < dead {
            0.0
        } else if i >= dead + ramp {
            1.0
        } else {
            let t = (i - dead) as f64 + 0.5;
            (std::f64::consts::FRAC_PI_2 * t / ramp as f64).sin().powi(2)
        }
    };
    (0..len)
        .map(|i| {
            let lo = if s == 0 { 1.0 } else { edge(i) };
            let hi = if s + len == n { 1.0 } else { edge(len - 1 - i) };
            (lo * hi) as f32
        })
        .collect()
}

/// How overlapping tiles are weighted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Blend {
    /// 0 on the outer overlap/4 voxels of a tile, sin^2 over the rest of the overlap, 1 inside
    /// and at the volume's borders (only the overlap is blended)
    Window,
    /// A Gaussian centred on the tile, sigma = 1/8 of the tile side (nnU-Net's), floored at
    /// 1e-3 of its peak so every voxel keeps a weight
    Gaussian,
}

/// nnU-Net's importance map along one axis: exp(-(i - c)^2 / (2 sigma^2)), sigma = len / 8.
fn gaussian_window(len: usize) -> Vec<f32> {
    let c = (len as f64 - 1.0) / 2.0;
    let sigma = (len as f64 / 8.0).max(1e-6);
    (0..len).map(|i| ((-((i as f64 - c).powi(2)) / (2.0 * sigma * sigma)).exp().max(1e-3)) as f32).collect()
}

/// Checks the tile geometry.
pub fn check_tiling(tile: [usize; 3], overlap: usize) -> Result<()> {
    if tile.contains(&0) {
        return Err(Error::Input(format!("--tile {tile:?}: every side must be at least 1 voxel")));
    }
    if let Some(&t) = tile.iter().find(|&&t| overlap >= t) {
        return Err(Error::Input(format!("--overlap {overlap} must be smaller than every tile side (got a side of {t})")));
    }
    Ok(())
}

/// Runs `predict` over overlapping tiles of every volume of `x` (N x D0 x D1 x D2 x 1) and blends
/// them. A volume no larger than the tile is predicted whole.
pub fn predict_tiled(x: &Tensor, tile: [usize; 3], overlap: usize, predict: &mut Predictor<'_>) -> Result<Tensor> {
    predict_tiled_with(x, tile, overlap, Blend::Window, predict)
}

/// [`predict_tiled`] with the tile weighting chosen by the caller.
pub fn predict_tiled_with(x: &Tensor, tile: [usize; 3], overlap: usize, blend: Blend, predict: &mut Predictor<'_>) -> Result<Tensor> {
    predict_tiled_batched(x, tile, overlap, blend, 1, predict)
}

/// [`predict_tiled_with`], the same tile of up to `batch` volumes (frames of a time-lapse) given
/// to `predict` at once: a GPU computes a batch faster per volume than one volume at a time.
/// Each volume's output is what it would be alone, for a predictor that treats the volumes of a
/// batch independently (every deepis engine does).
pub fn predict_tiled_batched(x: &Tensor, tile: [usize; 3], overlap: usize, blend: Blend, batch: usize, predict: &mut Predictor<'_>) -> Result<Tensor> {
    check_tiling(tile, overlap)?;
    if x.shape.c != 1 {
        return Err(Error::Shape(format!("the network takes 1-channel volumes, got {} channels", x.shape.c)));
    }
    if x.shape.n == 0 {
        return Err(Error::Input("no volume to segment".into()));
    }
    let d = x.shape.d;
    let len: [usize; 3] = std::array::from_fn(|k| tile[k].min(d[k]));
    let starts: [Vec<usize>; 3] = std::array::from_fn(|k| tile_starts(d[k], len[k], overlap));
    let mut tiles: Vec<[usize; 3]> = Vec::new();
    for &s0 in &starts[0] {
        for &s1 in &starts[1] {
            tiles.extend(starts[2].iter().map(|&s2| [s0, s1, s2]));
        }
    }
    let single = tiles.len() == 1;
    // The weights depend on the geometry only: the same for every volume.
    let mut wsum = vec![0f32; if single { 0 } else { x.shape.voxels() }];
    if !single {
        for &s in &tiles {
            let w = tile_window(s, len, d, overlap, blend);
            add_tile(&mut wsum, d, s, len, 1, |p, _| w[p]);
        }
    }
    let mut out: Option<Tensor> = None;
    for first in (0..x.shape.n).step_by(batch.max(1)) {
        let group = first..(first + batch.max(1)).min(x.shape.n);
        for &s in &tiles {
            let xt: Vec<f32> = group.clone().flat_map(|n| crop(volume(x, n), d, s, len)).collect();
            let y = predict(&Tensor::new(Shape::new(group.len(), len, 1), xt)?)?;
            if y.shape.d != len || y.shape.n != group.len() {
                return Err(Error::Shape(format!("the predictor gave {} for {} tile(s) of {:?}", y.shape, group.len(), len)));
            }
            let c = y.shape.c;
            let o = out.get_or_insert_with(|| Tensor::zeros(Shape::new(x.shape.n, d, c)));
            let w = if single { Vec::new() } else { tile_window(s, len, d, overlap, blend) };
            for (j, n) in group.clone().enumerate() {
                let (yt, dst) = (volume(&y, j), volume_mut(o, n));
                if single {
                    dst.copy_from_slice(yt);
                } else {
                    add_tile(dst, d, s, len, c, |p, ch| w[p] * yt[p * c + ch]);
                }
            }
        }
        if !single {
            let o = out.as_mut().expect("at least one tile");
            let c = o.shape.c;
            for n in group {
                let dst = volume_mut(o, n);
                for (p, &ws) in wsum.iter().enumerate() {
                    dst[p * c..(p + 1) * c].iter_mut().for_each(|v| *v /= ws);
                }
            }
        }
    }
    out.ok_or_else(|| Error::Input("no volume to segment".into()))
}

/// Volume n of a batch (all its channels).
fn volume(x: &Tensor, n: usize) -> &[f32] {
    let per = x.shape.voxels() * x.shape.c;
    &x.data[n * per..(n + 1) * per]
}

fn volume_mut(x: &mut Tensor, n: usize) -> &mut [f32] {
    let per = x.shape.voxels() * x.shape.c;
    &mut x.data[n * per..(n + 1) * per]
}

/// The separable window of one tile, as a flat D0 x D1 x D2 array of the tile's size.
fn tile_window(s: [usize; 3], len: [usize; 3], d: [usize; 3], overlap: usize, blend: Blend) -> Vec<f32> {
    let w: [Vec<f32>; 3] = std::array::from_fn(|k| match blend {
        Blend::Window => axis_window(s[k], len[k], d[k], overlap),
        Blend::Gaussian => gaussian_window(len[k]),
    });
    let mut out = Vec::with_capacity(len[0] * len[1] * len[2]);
    for a in &w[0] {
        for b in &w[1] {
            for c in &w[2] {
                out.push(a * b * c);
            }
        }
    }
    out
}

/// dst[voxel of the tile, ch] += value(tile voxel index, ch).
fn add_tile(dst: &mut [f32], d: [usize; 3], s: [usize; 3], len: [usize; 3], c: usize, value: impl Fn(usize, usize) -> f32) {
    for i in 0..len[0] {
        for j in 0..len[1] {
            for k in 0..len[2] {
                let p = (i * len[1] + j) * len[2] + k;
                let q = ((s[0] + i) * d[1] + s[1] + j) * d[2] + s[2] + k;
                for ch in 0..c {
                    dst[q * c + ch] += value(p, ch);
                }
            }
        }
    }
}

fn crop(x: &[f32], d: [usize; 3], s: [usize; 3], len: [usize; 3]) -> Vec<f32> {
    let mut out = Vec::with_capacity(len[0] * len[1] * len[2]);
    for i in 0..len[0] {
        for j in 0..len[1] {
            let q = ((s[0] + i) * d[1] + s[1] + j) * d[2] + s[2];
            out.extend_from_slice(&x[q..q + len[2]]);
        }
    }
    out
}

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
pub fn regrow(labels: &mut [u8], d: &[f32], dims: [usize; 3]) {
    let [n0, n1, n2] = dims;
    let mut stack: Vec<usize> = (0..labels.len()).filter(|&p| labels[p] != 0).collect();
    while let Some(p) = stack.pop() {
        let c = labels[p];
        let (i, j, k) = (p / (n1 * n2), p / n2 % n1, p % n2);
        for a in i.saturating_sub(1)..(i + 2).min(n0) {
            for b in j.saturating_sub(1)..(j + 2).min(n1) {
                for e in k.saturating_sub(1)..(k + 2).min(n2) {
                    let q = (a * n1 + b) * n2 + e;
                    let same_sign = if c == 1 { d[q] > 0.0 } else { d[q] < 0.0 };
                    if labels[q] == 0 && same_sign {
                        labels[q] = c;
                        stack.push(q);
                    }
                }
            }
        }
    }
}

/// Masks of every volume (the distance head's cores regrown to d = 0 when `grow`), with the
/// components of each class smaller than `min_size` voxels removed (the largest of each class
/// always kept). Returns the labels and the voxels removed.
pub fn labels_from_output(y: &Tensor, head: Head, tau: f64, grow: bool, min_size: usize) -> Result<(Vec<u8>, usize)> {
    let mut l = masks(y, head, tau)?;
    let vox = y.shape.voxels();
    let mut removed = 0;
    for (v, d) in l.chunks_mut(vox).zip(y.data.chunks(vox * y.shape.c)) {
        if grow && head == Head::Distance {
            regrow(v, d, y.shape.d);
        }
        removed += remove_small_components(v, y.shape.d, &[1, 2], min_size);
    }
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
    /// Tiles per forward pass: the same tile of up to N frames of a time-lapse at once (a GPU
    /// computes a batch faster per volume; more uses more memory; --tta runs one frame at a time)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,
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
    let ctx = Ctx { a, weights, trained, wsha: &wsha, options: &options, pb: &pb };
    let mut report = std::thread::scope(|s| pipeline(s, &ctx, &jobs, predict))?;
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

/// What the stages of [`pipeline`] share.
struct Ctx<'a> {
    a: &'a SegmentArgs,
    weights: &'a Weights,
    /// The voxel size the weights were trained at, where they record it.
    trained: Option<[f64; 3]>,
    wsha: &'a str,
    options: &'a serde_json::Value,
    pb: &'a indicatif::ProgressBar,
}

impl Ctx<'_> {
    fn say(&self, line: String) {
        if self.pb.is_hidden() {
            eprintln!("{line}")
        } else {
            self.pb.println(line)
        }
    }
}

/// One input as the reader hands it on.
struct Job {
    input: PathBuf,
    outs: Vec<PathBuf>,
    prov: serde_json::Value,
    /// None when its outputs are done (same weights, options and input): skipped.
    load: Option<Result<Loaded>>,
}

/// An input volume read, with what its outputs record.
struct Loaded {
    vol: crate::io::Volume,
    voxel: Option<crate::voxel::VoxelSize>,
    time_interval_s: Option<f64>,
}

/// A job after the network: None when skipped, else its volume and output (or the error); timed
/// from the start of its prediction.
struct Predicted {
    job: Job,
    y: Option<Result<(Loaded, Tensor)>>,
    t0: std::time::Instant,
}

/// The run in three stages, one input after another in each: a reader thread reads the next input
/// while the network (this thread: a GPU plan stays on the thread that made it) predicts the
/// current one, and a writer thread labels and writes the last one. At most one input waits
/// between two stages, so memory stays at a few inputs and outputs. An input that fails stops the
/// run, unless --keep-going.
fn pipeline<'s, 'e>(s: &'s std::thread::Scope<'s, 'e>, c: &'s Ctx<'e>, jobs: &'s [(&'e Path, &'e str)], predict: &mut Predictor<'_>) -> Result<Report> {
    let (to_net, from_reader) = std::sync::mpsc::sync_channel::<Job>(1);
    let (to_writer, from_net) = std::sync::mpsc::sync_channel::<Predicted>(1);
    s.spawn(move || {
        for &(input, stem) in jobs {
            if to_net.send(read_job(c, input, stem)).is_err() {
                break;
            }
        }
    });
    let writer = s.spawn(move || {
        let mut report = Report::default();
        for p in from_net {
            write_job(c, p, &mut report)?;
            c.pb.inc(1);
        }
        Ok::<Report, Error>(report)
    });
    for mut job in from_reader {
        let t0 = std::time::Instant::now();
        let y = job.load.take().map(|load| {
            let l = load?;
            c.pb.set_message(job.input.display().to_string());
            predict_job(c, &job.input, &l, predict).map(|y| (l, y))
        });
        let stop = !c.a.keep_going && matches!(y, Some(Err(_)));
        // a writer that stopped (an input failed) ends the run, as does a failure here
        if to_writer.send(Predicted { job, y, t0 }).is_err() || stop {
            break;
        }
    }
    drop(to_writer);
    writer.join().map_err(|_| Error::Other("segment: the writer thread panicked".into()))?
}

/// The reader's stage: outputs, provenance, and the volume unless the outputs are done.
fn read_job(c: &Ctx, input: &Path, stem: &str) -> Job {
    let a = c.a;
    let mut outs = vec![output_path(&a.out_dir, stem, a.format)];
    if a.save_probabilities {
        outs.push(probabilities_path(&a.out_dir, stem, a.format));
    }
    let (prov, load) = match crate::batch::provenance(c.wsha, c.options, input) {
        Ok(p) if crate::batch::is_done(&outs, &p) => (p, None),
        Ok(p) => (p, Some(load(c, input))),
        Err(e) => (serde_json::Value::Null, Some(Err(e))),
    };
    Job { input: input.to_path_buf(), outs, prov, load }
}

fn load(c: &Ctx, input: &Path) -> Result<Loaded> {
    let vol = crate::io::read_volume(input)?;
    let voxel = crate::voxel::resolve(c.a.voxel_size, &[input])?;
    let d = vol.tensor.shape.d;
    let len: [usize; 3] = std::array::from_fn(|k| c.a.tile[k].min(d[k]));
    c.weights.config.check_input_size(len).map_err(|e| Error::Input(format!("{}: tiles of {len:?}: {}", input.display(), e.message())))?;
    Ok(Loaded { vol, voxel, time_interval_s: crate::sidecar::time_interval_of(input)? })
}

/// The network's stage: tiled (and test-time augmented, and resampled) prediction of one volume.
fn predict_job(c: &Ctx, input: &Path, l: &Loaded, predict: &mut Predictor<'_>) -> Result<Tensor> {
    let a = c.a;
    let d = l.vol.tensor.shape.d;
    let tiled = |x: &Tensor, p: &mut Predictor<'_>| predict_tiled_batched(x, a.tile, a.overlap, a.blend, a.batch as usize, p);
    let mut run = |x: &Tensor| if a.tta { predict_tta(x, &mut |x| tiled(x, predict)) } else { tiled(x, predict) };
    let mismatch = match (&l.voxel, c.trained) {
        (Some(v), Some(t)) if crate::voxel::differs(v.um, t, 0.10) => Some((v.um, t)),
        _ => None,
    };
    match mismatch {
        Some((v, t)) if a.resample => {
            let to: [usize; 3] = std::array::from_fn(|k| ((d[k] as f64 * v[k] / t[k]).round() as usize).max(1));
            c.say(format!("{}: resampled from {d:?} voxels of {v:?} um to {to:?} of {t:?} um (the weights' training voxel size) and back", input.display()));
            let yr = run(&crate::voxel::resample(&l.vol.tensor, to)?)?;
            crate::voxel::resample(&yr, d)
        }
        Some((v, t)) => {
            let worst = (0..3).map(|k| (v[k] / t[k] - 1.0).abs()).fold(0.0, f64::max);
            c.say(format!(
                "warning: {}: voxels of {v:?} um, but the weights were trained at {t:?} um ({:.1}% apart): the network sees cells at another scale; --resample predicts at the training voxel size",
                input.display(),
                100.0 * worst
            ));
            run(&l.vol.tensor)
        }
        None => run(&l.vol.tensor),
    }
}

/// The writer's stage: one input's line printed and its outcome recorded; an error when it failed
/// and the run stops at a failure.
fn write_job(c: &Ctx, p: Predicted, report: &mut Report) -> Result<()> {
    let Predicted { job, y, t0 } = p;
    let Some(y) = y else {
        c.say(format!("{} -> {}: done before (same weights, options and input), skipped", job.input.display(), job.outs[0].display()));
        report.skipped.push(job.input);
        return Ok(());
    };
    match y.and_then(|(l, y)| finish_job(c, &job, &l, &y, t0)) {
        Ok(line) => {
            c.say(line);
            report.written.push(job.outs[0].clone());
            Ok(())
        }
        Err(e) if c.a.keep_going => {
            c.say(format!("{}: FAILED: {e}", job.input.display()));
            report.failed.push((job.input, e.to_string()));
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Labels one input's output and writes its files; returns the line to print.
fn finish_job(c: &Ctx, job: &Job, l: &Loaded, y: &Tensor, t0: std::time::Instant) -> Result<String> {
    let (a, outs) = (c.a, &job.outs);
    let (labels, removed) = labels_from_output(y, c.weights.config.head, a.tau, !a.no_regrow, a.min_size)?;
    let (vol, voxel, time_interval_s) = (&l.vol, &l.voxel, l.time_interval_s);
    let s = vol.tensor.shape;
    let dims: Vec<usize> = if vol.rank == 3 { s.d.to_vec() } else { vec![s.n, s.d[0], s.d[1], s.d[2]] };
    let um = voxel.as_ref().map(|v| v.um);
    let card = |shape: Vec<usize>, lead: &[&str]| crate::sidecar::Sidecar {
        axes: crate::sidecar::axes_for(shape.len(), lead),
        shape,
        voxel_size_um: um,
        voxel_size_from: voxel.as_ref().map(|v| v.from.clone()),
        time_interval_s,
        provenance: Some(job.prov.clone()),
    };
    // made only now, so that a run refused on its first input leaves no folder behind
    std::fs::create_dir_all(&a.out_dir).map_err(|e| Error::io(&a.out_dir, e))?;
    if a.save_probabilities {
        let pdims = crate::io::output_dims(y, vol.rank)?;
        write_map(&outs[1], y, &pdims, um, time_interval_s)?;
        crate::sidecar::write(&outs[1], &card(pdims.clone(), if pdims.len() == 5 { &["T", "C"] } else { &["C"] }))?;
    }
    write_labels_out(&outs[0], &dims, &labels, um, time_interval_s)?;
    // The labels' sidecar last: its provenance marks the input done.
    crate::sidecar::write(&outs[0], &card(dims.clone(), &["T"]))?;
    let count = |c: u8| labels.iter().filter(|&&l| l == c).count();
    let vs = voxel.as_ref().map_or("no voxel size recorded".to_string(), |v| format!("voxels {:?} um from {}", v.um, v.from));
    Ok(format!(
        "{} -> {}: {} volume(s) of {:?} in {:.1} s; effector {} voxels, target {} voxels, {} spurious voxels removed; {vs}",
        job.input.display(),
        outs[0].display(),
        s.n,
        s.d,
        t0.elapsed().as_secs_f64(),
        count(1),
        count(2),
        removed
    ))
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

/// The transforms test-time augmentation averages over: the group generated by the flips of each
/// axis and the quarter turns in the D0-D1 plane (odd turns only when D0 == D1, as in training).
/// Flipping D0 and D1 together is a half turn, so 16 transforms (8 when D0 != D1) cover them all.
pub fn tta_transforms(d: [usize; 3]) -> Vec<crate::train::data::Augment> {
    use crate::train::data::Augment;
    let rots: &[u8] = if d[0] == d[1] { &[0, 1, 2, 3] } else { &[0, 2] };
    let mut v = Vec::new();
    for &rot in rots {
        for f0 in [false, true] {
            for f2 in [false, true] {
                v.push(Augment { flip: [f0, false, f2], rot });
            }
        }
    }
    v
}

/// Averages `predict` over [`tta_transforms`]: each transformed volume is predicted and
/// transformed back (undo the turn, then the flips) before averaging.
pub fn predict_tta(x: &Tensor, predict: &mut dyn FnMut(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    use crate::train::data::Augment;
    let vox = x.shape.voxels();
    let mut sum: Option<Tensor> = None;
    let ts = tta_transforms(x.shape.d);
    for n in 0..x.shape.n {
        let xn = Tensor::new(Shape::new(1, x.shape.d, 1), x.data[n * vox..(n + 1) * vox].to_vec())?;
        let mut acc: Option<Vec<f32>> = None;
        for t in &ts {
            let y = predict(&t.apply(&xn))?;
            let back = Augment { flip: [false; 3], rot: (4 - t.rot) % 4 }.apply(&y);
            let back = Augment { flip: t.flip, rot: 0 }.apply(&back);
            match &mut acc {
                None => acc = Some(back.data),
                Some(a) => a.iter_mut().zip(&back.data).for_each(|(a, b)| *a += b),
            }
        }
        let mut a = acc.unwrap_or_default();
        a.iter_mut().for_each(|v| *v /= ts.len() as f32);
        let c = a.len() / vox;
        let out = sum.get_or_insert_with(|| Tensor::zeros(Shape::new(x.shape.n, x.shape.d, c)));
        out.data[n * vox * c..(n + 1) * vox * c].copy_from_slice(&a);
    }
    sum.ok_or_else(|| Error::Input("no volume to segment".into()))
}

/// A predictor on the GPU plan of `dev`, one plan per tile size and number of tiles (at most
/// `batch`) met, all on that device. The first plan's summary is printed.
pub fn gpu_predictor<'a, D: crate::gpu::Device + 'a>(dev: D, weights: &'a Weights, o: crate::gpu::plan::GpuOptions, batch: usize) -> impl FnMut(&Tensor) -> Result<Tensor> + 'a {
    use crate::gpu::plan::GpuPlan;
    let dev = std::rc::Rc::new(dev);
    let mut plans: Vec<GpuPlan<std::rc::Rc<D>>> = Vec::new();
    move |x: &Tensor| {
        let (d, b) = (x.shape.d, x.shape.n.clamp(1, batch.max(1)));
        if let Some(p) = plans.iter().find(|p| p.size() == d && p.batch() == b) {
            return p.run(x);
        }
        let p = GpuPlan::with_options(std::rc::Rc::clone(&dev), weights, d, b, o)?;
        if plans.is_empty() {
            eprintln!("{} for {}x{}x{} tiles", p.summary(), d[0], d[1], d[2]);
        }
        let y = p.run(x);
        plans.push(p);
        y
    }
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
