//! `deepis demo`: the whole pipeline in one command, on the CPU, with the weights shipped in
//! `weights/` (embedded in the binary, so it runs from any folder).
//!
//! 1. synthesises a short time-lapse of an effector cell meeting a target (`crate::synth`) at the
//!    shipped model's volume and voxel size, with a seed that was not used for training;
//! 2. segments every frame with the shipped network on the fused CPU plan, as `deepis segment`:
//!    the shipped sigmoid head's two channels > 0.5 (for distance-head weights given with
//!    `--weights`: cores |d| > tau regrown to d = 0), small components removed;
//! 3. analyses the masks with the RI (`crate::analysis`), prints the metrics table and the Dice of
//!    each class against the synthetic truth;
//! 4. writes into the output folder: `synth/` (the time-lapse: input/, labels/, target/,
//!    input.npy, labels.npy, synth.json), `labels.npy` (T x D0 x D1 x D2 uint8, predicted),
//!    `metrics.csv` and `metrics.png` (as `deepis analyze`), `dice.csv`
//!    (frame,effector_dice,target_dice) and `slices/tNNN.png` (mid-slices with the predicted
//!    masks' outlines).
use crate::analysis::{self, FrameMetrics, Options};
use crate::error::{Error, Result};
use crate::synth::SynthOptions;
use crate::weights::Weights;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The shipped network: trained by `deepis train` on synthetic time-lapses (see weights/README.md).
pub const SHIPPED_WEIGHTS: &[u8] = include_bytes!("../weights/deepis-synth-w16.safetensors");
/// Path of the shipped weights inside the crate (for messages and tests).
pub const SHIPPED_WEIGHTS_PATH: &str = "weights/deepis-synth-w16.safetensors";
/// Volume size (voxels) and voxel size (um) the shipped network was trained at: a 25.6 x 25.6 x
/// 25.6 um field, as `deepis synth`'s default at half the resolution.
pub const SHIPPED_SIZE: [usize; 3] = [64, 64, 32];
pub const SHIPPED_VOXEL_SIZE: [f64; 3] = [0.4, 0.4, 0.8];
/// Post-processing the shipped weights were evaluated with.
pub const SHIPPED_TAU: f64 = 0.5;
/// Whether the cores are regrown to d = 0 (`deepis segment` without `--no-regrow`).
pub const SHIPPED_REGROW: bool = true;
/// 125 voxels of 0.128 um^3 = 16 um^3 (`segment`'s default 1000 voxels at 0.2 x 0.2 x 0.4 um).
pub const SHIPPED_MIN_SIZE: usize = 125;

/// The shipped weights, parsed.
pub fn shipped_weights() -> Result<Weights> {
    Weights::from_bytes(SHIPPED_WEIGHTS.to_vec(), SHIPPED_WEIGHTS_PATH)
}

/// Dice of class `c` between predicted and true labels (1 when both are empty).
pub fn dice(pred: &[u8], truth: &[u8], c: u8) -> f64 {
    let (mut inter, mut np, mut nt) = (0usize, 0usize, 0usize);
    for (&p, &t) in pred.iter().zip(truth) {
        let (a, b) = (p == c, t == c);
        inter += (a && b) as usize;
        np += a as usize;
        nt += b as usize;
    }
    if np + nt == 0 {
        1.0
    } else {
        2.0 * inter as f64 / (np + nt) as f64
    }
}

/// Segments one RI volume (D0 x D1 x D2, C order) with `weights` on the fused CPU plan.
pub fn segment_volume(
    predict: &mut crate::segment::Predictor<'_>,
    weights: &Weights,
    ri: &[f32],
    dims: [usize; 3],
    tau: f64,
    regrow: bool,
    min_size: usize,
) -> Result<Vec<u8>> {
    let x = crate::tensor::Tensor::new(crate::tensor::Shape::new(1, dims, 1), ri.to_vec())?;
    let y = crate::segment::predict_tiled(&x, [128, 128, 64], 16, predict)?;
    Ok(crate::segment::labels_from_output(&y, weights.config.head, tau, regrow, min_size)?.0)
}

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Output folder (created if missing)
    #[arg(short, long = "output", value_name = "DIR", default_value = "demo_out")]
    pub out_dir: PathBuf,
    /// Frames of the synthetic time-lapse (approach, contact, spreading)
    #[arg(long, default_value_t = 8)]
    pub frames: usize,
    /// Seed of the synthetic time-lapse (the shipped weights were trained on seeds 1-10)
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Distance head threshold (um), as `deepis segment --tau` (distance-head weights only; the
    /// shipped network has a sigmoid head)
    #[arg(long, default_value_t = SHIPPED_TAU)]
    pub tau: f64,
    /// Keep the distance head's cores (|d| > tau) as they are, as `deepis segment --no-regrow`
    /// (by default they are regrown to d = 0)
    #[arg(long)]
    pub no_regrow: bool,
    /// Use these weights instead of the shipped ones (trained at 64x64x32 voxels of 0.4,0.4,0.8 um)
    #[arg(short, long, value_name = "WEIGHTS")]
    pub weights: Option<PathBuf>,
}

impl DemoArgs {
    /// Whether a distance head's cores are regrown (`deepis segment`'s default) or not.
    pub fn grows(&self) -> bool {
        SHIPPED_REGROW && !self.no_regrow
    }
}

/// What a demo run gives back (for tests).
pub struct DemoReport {
    pub metrics: Vec<FrameMetrics>,
    /// (effector, target) Dice per frame.
    pub dice: Vec<(f64, f64)>,
    pub files: Vec<PathBuf>,
    pub seconds: f64,
}

/// `deepis demo`.
pub fn run(a: &DemoArgs) -> Result<DemoReport> {
    let t0 = Instant::now();
    if !(a.tau.is_finite() && a.tau >= 0.0) {
        return Err(Error::Input(format!("--tau must be a finite number >= 0, got {}", a.tau)));
    }
    let weights = match &a.weights {
        Some(p) => Weights::load(p)?,
        None => shipped_weights()?,
    };
    let dir = &a.out_dir;
    let o = SynthOptions { frames: a.frames, size: SHIPPED_SIZE, voxel_size: SHIPPED_VOXEL_SIZE, seed: a.seed };
    o.validate()?;
    std::fs::create_dir_all(dir.join("slices")).map_err(|e| Error::io(dir.join("slices"), e))?;
    let d = o.size;
    let nv = d[0] * d[1] * d[2];

    eprintln!(
        "1/3 synthesising {} frames of {}x{}x{} voxels of {}x{}x{} um (seed {}) into {}",
        o.frames,
        d[0],
        d[1],
        d[2],
        o.voxel_size[0],
        o.voxel_size[1],
        o.voxel_size[2],
        o.seed,
        dir.join("synth").display()
    );
    let ts = Instant::now();
    crate::synth::write_time_lapse(&dir.join("synth"), &o, |_| {})?;
    let ri_all = crate::io::read_volume(&dir.join("synth").join("input.npy"))?.tensor.data;
    let truth_all = crate::io::read_volume(&dir.join("synth").join("labels.npy"))?.tensor.data;
    let truth_all: Vec<u8> = truth_all.iter().map(|&v| v as u8).collect();
    let t_synth = ts.elapsed().as_secs_f64();

    eprintln!(
        "2/3 segmenting with {} ({} parameters, widths {:?}) on the CPU, {} threads",
        weights.origin.display(),
        weights.param_count(),
        weights.config.widths,
        rayon::current_num_threads()
    );
    let tg = Instant::now();
    let mut predict = crate::segment::plan_predictor(&weights);
    let mut labels = Vec::with_capacity(o.frames * nv);
    let mut dice_rows = Vec::new();
    for t in 0..o.frames {
        let ri = &ri_all[t * nv..(t + 1) * nv];
        let l = segment_volume(&mut predict, &weights, ri, d, a.tau, a.grows(), SHIPPED_MIN_SIZE)?;
        let truth = &truth_all[t * nv..(t + 1) * nv];
        dice_rows.push((dice(&l, truth, analysis::EFFECTOR), dice(&l, truth, analysis::TARGET)));
        labels.extend_from_slice(&l);
    }
    let t_seg = tg.elapsed().as_secs_f64();

    eprintln!("3/3 analysing");
    let ta = Instant::now();
    let opt = Options { voxel_size: o.voxel_size, ..Options::default() };
    opt.validate()?;
    let metrics: Vec<FrameMetrics> = (0..o.frames)
        .map(|t| analysis::analyze_frame(t, &labels[t * nv..(t + 1) * nv], Some(&ri_all[t * nv..(t + 1) * nv]), d, &opt))
        .collect();
    let t_an = ta.elapsed().as_secs_f64();

    let mut files = Vec::new();
    let p = dir.join("labels.npy");
    analysis::write_labels(&p, &[o.frames, d[0], d[1], d[2]], &labels)?;
    files.push(p);
    let p = dir.join("metrics.csv");
    analysis::write_csv(&p, &metrics)?;
    files.push(p);
    let p = dir.join("metrics.png");
    crate::plot::plot_metrics(&p, &metrics)?;
    files.push(p);
    let p = dir.join("dice.csv");
    let mut csv = String::from("frame,effector_dice,target_dice\n");
    for (t, (e, g)) in dice_rows.iter().enumerate() {
        csv.push_str(&format!("{t},{e:.5},{g:.5}\n"));
    }
    crate::io::write_atomic(&p, |w| std::io::Write::write_all(w, csv.as_bytes()))?;
    files.push(p);
    for t in 0..o.frames {
        let p = dir.join("slices").join(format!("t{t:03}.png"));
        let title = format!("frame {t}, D0-D1 | D0-D2: red effector, blue target");
        crate::plot::plot_slices(&p, &ri_all[t * nv..(t + 1) * nv], &labels[t * nv..(t + 1) * nv], d, o.voxel_size, &title, 4)?;
        files.push(p);
    }

    println!("metrics (um, um^2, um^3, pg; IS = the effector's surface within 1 um of the target):");
    print!("{}", analysis::format_table(&metrics));
    println!("Dice against the synthetic truth:");
    println!("{:>9}{:>10}{:>10}", "frame", "effector", "target");
    for (t, (e, g)) in dice_rows.iter().enumerate() {
        println!("{t:>9}{e:>10.3}{g:>10.3}");
    }
    let n = dice_rows.len() as f64;
    let (me, mg) = dice_rows.iter().fold((0.0, 0.0), |(x, y), (e, g)| (x + e / n, y + g / n));
    println!("{:>9}{me:>10.3}{mg:>10.3}", "mean");
    let seconds = t0.elapsed().as_secs_f64();
    eprintln!(
        "done in {seconds:.1} s (synth {t_synth:.1} s, segment {t_seg:.1} s, analyse {t_an:.1} s); wrote {}: labels.npy, metrics.csv, metrics.png, dice.csv, slices/t000..t{:03}.png, synth/",
        dir.display(),
        o.frames - 1
    );
    Ok(DemoReport { metrics, dice: dice_rows, files, seconds })
}

/// Checks that `dir` holds what a demo run writes (for tests).
pub fn expected_files(dir: &Path, frames: usize) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = ["labels.npy", "metrics.csv", "metrics.png", "dice.csv", "synth/input.npy", "synth/labels.npy"]
        .iter()
        .map(|f| dir.join(f))
        .collect();
    v.extend((0..frames).map(|t| dir.join("slices").join(format!("t{t:03}.png"))));
    v
}
