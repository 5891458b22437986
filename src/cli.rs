//! The `deepis` command line: predict, info, kernels, bench.
//!
//! Every failure comes back as an `Error` (main prints `error: <message>` and exits 1); nothing
//! here panics on bad input, and outputs are written atomically (a failed run leaves no file).
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::backend::Backend;
use crate::backward::TrainBackend;
use crate::config::{Config, Head};
use crate::cpu::CpuBackend;
use crate::error::{Error, Result};
use crate::gpu::cuda::{cuda_available, CudaDevice};
use crate::gpu::nvrtc::cache::CubinCache;
use crate::gpu::{nvrtc, Device};
use crate::io;
use crate::engine::{choose, with_backend, Chosen, Job};
use crate::gpu::emu::EmuDevice;
use crate::gpu::plan::{GpuOptions, GpuPlan, MmaTile, Precision};
pub use crate::engine::{parse_size, BackendKind};
use crate::model::{flops, Network};
use crate::rng::Rng;
use crate::tensor::{Shape, Tensor};
use crate::weights::Weights;

const ABOUT: &str = "DeepIS: 3D segmentation of refractive-index tomograms of CAR-T cells meeting their target cells";

const LONG_ABOUT: &str = "\
DeepIS: 3D segmentation of refractive-index (RI) tomograms of CAR-T cells meeting their target
cells, with the published DeepIS network (no Python or PyTorch needed).

Start with:
  deepis demo                                synthesise, segment (shipped weights) and analyse a
                                             time-lapse; writes demo_out/
  deepis info WEIGHTS.safetensors            what a weights file holds and what this machine can run
  deepis predict --weights WEIGHTS.safetensors VOLUME.npy -o MASKS.npy
                                             segment one volume (or a batch of volumes)
Run `deepis help predict` for the input and output formats.";

const PREDICT_LONG: &str = "\
Runs the network on RI volumes and writes its raw output, one value per voxel.

INPUT: one volume or a batch of volumes, with any voxel values the network was trained on
(the weights' input_offset / input_scale are applied first; see `deepis info`):
  .npy   float32, float64, uint16 or uint8 array, shaped
           D0 x D1 x D2            one volume
           N x D0 x D1 x D2        N volumes
           N x 1 x D0 x D1 x D2    N volumes (the PyTorch layout)
  .tif   a multi-page grayscale stack (8/16-bit or float32): D0 pages of D1 x D2 pixels.
The published model was trained on 128 x 128 x 64 volumes (in the order X, Y, Z); other sizes
work, but max-pool networks need every side to be at least 16 voxels.
NaN or infinite values are refused.

OUTPUT: float32 .npy or .tif (chosen by the extension of -o), the same D0 x D1 x D2 as the input:
  distance head (the published model): a signed distance map, > 0 inside the effector CAR-T
      cell, < 0 inside the target cell, near 0 in the background and at the immunological
      synapse between the two cells; the further from 0, the deeper inside the cell.
  sigmoid head: C probability maps in [0, 1], one per mask.
  Shape: C x D0 x D1 x D2 for a one-volume input (C = 1 for the distance head),
         N x C x D0 x D1 x D2 for a batch. A .tif output holds N*C*D0 pages, ordered by
         volume, then channel, then slice.
The output is written to a temporary file and renamed: a failed run leaves no output file.

Example:
  deepis predict --weights tests/data/readme/weights.safetensors tests/data/readme/input.npy -o out.npy";

#[derive(Parser, Debug)]
#[command(name = "deepis", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Segment RI volumes: write the network's output (signed distance map or probabilities)
    #[command(long_about = PREDICT_LONG)]
    Predict(PredictArgs),
    /// Show a weights file's configuration, size and cost, and the backends this machine has
    Info(InfoArgs),
    /// Compile every CUDA kernel with NVRTC (or take it from the cubin cache) and print registers, spills, shared memory and occupancy (no GPU needed)
    Kernels(KernelsArgs),
    /// Time the forward pass (random weights of the published model unless --weights is given)
    Bench(BenchArgs),
    /// One training step: write the loss and every parameter's gradient (for parity checks)
    #[command(name = "train-step", long_about = crate::train::cli::TRAIN_STEP_LONG)]
    TrainStep(crate::train::cli::TrainStepArgs),
    /// Train or fine-tune on pairs of input and target volumes
    #[command(long_about = crate::train::cli::TRAIN_LONG)]
    Train(crate::train::cli::TrainArgs),
    /// Convert a PyTorch checkpoint (.pth / .pth.tar, either format) to deepis weights, without PyTorch
    #[command(long_about = crate::import::IMPORT_LONG)]
    Import(crate::import::ImportArgs),
    /// Make a synthetic RI time-lapse of an effector cell meeting a target (inputs, labels, distance targets)
    Synth(crate::synth::SynthArgs),
    /// Segment RI volumes into uint8 label volumes (0 background, 1 effector, 2 target); any size, in tiles
    Segment(crate::segment::SegmentArgs),
    /// Measure the cells and their synapse in label volumes: one CSV row per frame, and a plot
    Analyze(crate::analysis::AnalyzeArgs),
    /// Synthesise a short time-lapse, segment it with the shipped weights, analyse it (CSV, plots, Dice)
    Demo(crate::demo::DemoArgs),
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Trained network (.safetensors), e.g. tests/data/readme/weights.safetensors
    #[arg(short, long, value_name = "WEIGHTS")]
    pub weights: PathBuf,
    /// RI volume(s): .npy (D0xD1xD2, NxD0xD1xD2 or Nx1xD0xD1xD2), a multi-page .tif stack, or a Tomocube .TCF (every 3D frame, as X x Y x Z)
    #[arg(value_name = "INPUT")]
    pub input: PathBuf,
    /// Where to write the output: .npy or .tif (float32)
    #[arg(short, long, value_name = "OUT")]
    pub output: PathBuf,
    /// Where to run the network
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,
    /// Volumes per forward pass (more uses more memory)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,
    #[command(flatten)]
    pub gpu: GpuOptions,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Trained network (.safetensors)
    #[arg(value_name = "WEIGHTS")]
    pub weights: PathBuf,
    /// Volume size D0,D1,D2 for the cost estimate
    #[arg(long, value_name = "D0,D1,D2", default_value = "128,128,64", value_parser = parse_size)]
    pub size: [usize; 3],
}

#[derive(Args, Debug)]
pub struct KernelsArgs {
    /// GPU architectures to compile for (sm_80 = A100, sm_90 = H100)
    #[arg(long, value_name = "ARCHS", value_delimiter = ',', default_value = "sm_80,sm_90", value_parser = parse_arch)]
    pub arch: Vec<String>,
    /// Compile everything, neither reading nor writing the cubin cache
    #[arg(long)]
    pub no_cache: bool,
}

/// Published model (widths 64..1024) or the README variant (widths 32..512).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchConfig {
    Published,
    Readme,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Trained network to time (default: random weights of --config)
    #[arg(short, long, value_name = "WEIGHTS")]
    pub weights: Option<PathBuf>,
    /// Model to build with random weights when no --weights is given
    #[arg(long, value_enum, default_value_t = BenchConfig::Published)]
    pub config: BenchConfig,
    /// Volume size D0,D1,D2
    #[arg(long, value_name = "D0,D1,D2", default_value = "128,128,64", value_parser = parse_size)]
    pub size: [usize; 3],
    /// Volumes per forward pass
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,
    /// Where to run the network
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
    /// Timed runs (the median is reported)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Untimed runs first
    #[arg(long, default_value_t = 1)]
    pub warmup: u32,
    /// Also time N batches in one run of the GPU plan (--backend emu or cuda), two in flight, so
    /// that each batch's upload and download overlap the forward passes: the rate of a server
    /// fed without pause (0: not)
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub stream: u32,
    #[command(flatten)]
    pub gpu: GpuOptions,
}

/// rayon reads RAYON_NUM_THREADS itself and panics when its pool cannot start: check the value
/// first and start the pool here, so a bad value is an error like any other.
pub fn thread_pool_from_env() -> Result<()> {
    let Ok(v) = std::env::var("RAYON_NUM_THREADS") else { return Ok(()) };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max = 64 * cores.max(4);
    let n = match v.trim().parse::<usize>() {
        Ok(n) if n <= max => n,
        Ok(n) => return Err(Error::Input(format!("RAYON_NUM_THREADS={n}: more than {max} threads ({cores} cores here); unset it or give at most {max}"))),
        Err(_) => return Err(Error::Input(format!("RAYON_NUM_THREADS={v:?} is not a whole number of threads"))),
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| Error::Input(format!("RAYON_NUM_THREADS={n}: cannot start the threads: {e}")))
}

fn parse_arch(s: &str) -> std::result::Result<String, String> {
    let s = s.trim();
    match s.strip_prefix("sm_") {
        Some(n) if !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric()) => Ok(s.to_string()),
        _ => Err(format!("expected an architecture like sm_80 or sm_90, got `{s}`")),
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Predict(a) => predict(&a),
        Command::Info(a) => info(&a),
        Command::Kernels(a) => kernels(&a),
        Command::Bench(a) => bench(&a),
        Command::TrainStep(a) => crate::train::cli::train_step_cmd(&a),
        Command::Train(a) => crate::train::cli::train_cmd(&a),
        Command::Import(a) => crate::import::import_cmd(&a),
        Command::Synth(a) => crate::synth::run_cli(&a),
        Command::Segment(a) => segment(&a),
        Command::Analyze(a) => {
            let rows = crate::analysis::run_cli(&a)?;
            if let Some(p) = &a.plot {
                crate::plot::plot_metrics(p, &rows)?;
                eprintln!("wrote {}", p.display());
            }
            Ok(())
        }
        Command::Demo(a) => crate::demo::run(&a).map(|_| ()),
    }
}

/// Runs the network on every volume of `x`, `batch` volumes at a time; returns the output and the
/// seconds spent in the forward passes.
fn forward_batched<B: Backend>(net: &Network<B>, x: &Tensor, batch: usize) -> Result<(Tensor, f64)> {
    let per = x.shape.voxels();
    let n = x.shape.n;
    let mut out: Option<Tensor> = None;
    let mut secs = 0.0;
    let mut i = 0;
    while i < n {
        let m = batch.min(n - i);
        let xb = Tensor::new(Shape::new(m, x.shape.d, 1), x.data[i * per..(i + m) * per].to_vec())?;
        let t0 = Instant::now();
        let yb = net.forward(&xb)?;
        secs += t0.elapsed().as_secs_f64();
        if n > m {
            eprintln!("  volumes {}..{} of {n}: {:.2} s", i + 1, i + m, t0.elapsed().as_secs_f64());
        }
        let o = out.get_or_insert_with(|| Tensor::zeros(Shape::new(n, yb.shape.d, yb.shape.c)));
        let off = i * o.shape.voxels() * o.shape.c;
        o.data[off..off + yb.data.len()].copy_from_slice(&yb.data);
        i += m;
    }
    out.map(|t| (t, secs)).ok_or_else(|| Error::Input("no volume to run".into()))
}

// ---------------------------------------------------------------------------------------------
// predict

struct Predict<'a> {
    weights: &'a Weights,
    x: &'a Tensor,
    batch: usize,
}

impl Job for Predict<'_> {
    type Out = Tensor;
    fn run<B: TrainBackend>(self, backend: B) -> Result<Tensor> {
        eprintln!("backend: {}", backend.name());
        let t0 = Instant::now();
        let net = Network::new(backend, self.weights)?;
        let setup = t0.elapsed().as_secs_f64();
        let (y, secs) = forward_batched(&net, self.x, self.batch)?;
        report_forward(self.weights, self.x, secs, &format!("weights upload {setup:.2} s"));
        Ok(y)
    }
}

/// The `forward:` line of predict: volumes, seconds and GFLOP/s of the forward passes over `x`.
fn report_forward(weights: &Weights, x: &Tensor, secs: f64, setup: &str) {
    let n = x.shape.n;
    let gflop = flops(&weights.config, x.shape.d) * n as f64 / 1e9;
    let [d0, d1, d2] = x.shape.d;
    eprintln!(
        "forward: {n} volume(s) of {d0}x{d1}x{d2} in {secs:.2} s ({:.3} s/volume, {:.1} GFLOP/s); {setup}",
        secs / n as f64,
        gflop / secs.max(1e-9)
    );
}

fn predict(a: &PredictArgs) -> Result<()> {
    io::check_output_path(&a.output)?;
    io::refuse_overwrites(&[("-o", &a.output)], &[("the input", &a.input), ("--weights", &a.weights)])?;
    let weights = Weights::load(&a.weights)?;
    let vol = io::read_volume(&a.input)?;
    weights
        .config
        .check_input_size(vol.tensor.shape.d)
        .map_err(|e| Error::Input(format!("{}: {}", a.input.display(), e.message())))?;
    eprintln!(
        "input: {} volume(s) of {}x{}x{} from {}",
        vol.tensor.shape.n,
        vol.tensor.shape.d[0],
        vol.tensor.shape.d[1],
        vol.tensor.shape.d[2],
        a.input.display()
    );
    let chosen = check_gpu_options(choose(a.backend)?, a.gpu)?;
    let (x, batch) = (&vol.tensor, a.batch as usize);
    let y = match chosen {
        Chosen::Plan => predict_plan(&weights, x)?,
        Chosen::Emu => predict_gpu(EmuDevice::new(), &weights, x, batch, a.gpu)?,
        Chosen::Cuda(dev) => predict_gpu(dev, &weights, x, batch, a.gpu)?,
        chosen => with_backend(chosen, Predict { weights: &weights, x, batch })?,
    };
    let dims = io::output_dims(&y, vol.rank)?;
    // The input's voxel size travels into the output (OME-TIFF header and/or JSON sidecar).
    let voxel = crate::voxel::voxel_size_of(&a.input)?;
    let um = voxel.as_ref().map(|v| v.um);
    let time_interval_s = crate::sidecar::time_interval_of(&a.input)?;
    crate::segment::write_map(&a.output, &y, &dims, um, time_interval_s)?;
    let lead: &[&str] = if dims.len() == 5 { &["N", "C"] } else { &["C"] };
    let card = crate::sidecar::Sidecar {
        axes: crate::sidecar::axes_for(dims.len(), lead),
        shape: dims.clone(),
        voxel_size_um: um,
        voxel_size_from: voxel.map(|v| v.from),
        time_interval_s,
        provenance: None,
    };
    crate::sidecar::write(&a.output, &card)?;
    eprintln!("wrote {} ({})", a.output.display(), head_meaning(&weights.config, &dims));
    Ok(())
}

/// `chosen`, unless the GPU options ask what it does not do (the CPU backends compute in fp32, on
/// no tensor cores).
fn check_gpu_options(chosen: Chosen, o: GpuOptions) -> Result<Chosen> {
    match chosen {
        Chosen::Plan | Chosen::CpuRef if o.precision != Precision::Fp32 => Err(Error::Input(format!(
            "--precision {}: the CPU backends compute in fp32; tf32 / fp16 / bf16 run in the GPU plan (--backend emu or cuda)",
            o.precision.name()
        ))),
        Chosen::Plan | Chosen::CpuRef if o.wgmma => {
            Err(Error::Input("--wgmma: a GPU plan option (--backend emu or cuda, --precision tf32, fp16 or bf16)".into()))
        }
        Chosen::Plan | Chosen::CpuRef if o.warp_tile != MmaTile::M32 => {
            Err(Error::Input("--warp-tile: a GPU plan option (--backend emu or cuda, --precision tf32, fp16 or bf16)".into()))
        }
        chosen => Ok(chosen),
    }
}

/// The GPU plan for `batch` (at most N) volumes of x's size on `dev`, and its output for `x`.
fn predict_gpu<D: Device>(dev: D, weights: &Weights, x: &Tensor, batch: usize, o: GpuOptions) -> Result<Tensor> {
    let t0 = Instant::now();
    let plan = GpuPlan::with_options(dev, weights, x.shape.d, batch.min(x.shape.n).max(1), o)?;
    eprintln!("backend: {}; {}", plan.device().name(), plan.summary());
    let setup = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let y = plan.run(x)?;
    report_forward(weights, x, t0.elapsed().as_secs_f64(), &format!("plan built in {setup:.2} s"));
    Ok(y)
}

fn head_meaning(cfg: &Config, dims: &[usize]) -> String {
    let shape = dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(" x ");
    match cfg.head {
        Head::Distance => format!("float32 {shape}: signed distance map, > 0 effector CAR-T cell, < 0 target cell"),
        Head::Sigmoid => format!("float32 {shape}: {} probability map(s) in [0, 1]", cfg.out_channels),
    }
}

// ---------------------------------------------------------------------------------------------
// info

fn info(a: &InfoArgs) -> Result<()> {
    let w = Weights::load(&a.weights)?;
    let c = &w.config;
    println!("weights: {}", a.weights.display());
    println!("config:");
    println!("  widths          {:?}", c.widths);
    println!("  trans_feature   {}", c.trans_feature);
    println!("  blocks          {:?}", c.blocks);
    println!("  gcn_kernels     {:?}", c.gcn_kernels);
    println!("  downsample      {}", format!("{:?}", c.downsample).to_lowercase());
    match c.head {
        Head::Distance => println!("  head            distance (signed distance map: + effector CAR-T cell, - target cell)"),
        Head::Sigmoid => println!("  head            sigmoid ({} probability map(s))", c.out_channels),
    }
    println!("  input           (x - {}) / {}", c.input_offset, c.input_scale);
    println!("  bn_eps          {}", c.bn_eps);
    let p = w.param_count();
    println!("parameters: {} ({:.2} M)", group_thousands(p), p as f64 / 1e6);
    let [d0, d1, d2] = a.size;
    match c.check_input_size(a.size) {
        Ok(()) => println!("cost: {:.1} GFLOP per {d0}x{d1}x{d2} volume", flops(c, a.size) / 1e9),
        Err(e) => println!("cost: {d0}x{d1}x{d2} cannot be run: {}", e.message()),
    }
    println!("backends on this machine:");
    let cpu = CpuBackend::new();
    println!("  cpu    yes: {} threads, convolution path {:?}", cpu.threads(), cpu.conv_path());
    let missing = crate::gpu::emu::host_build_failures();
    if missing.is_empty() {
        println!("  emu    yes: the CUDA kernels emulated on the CPU (slow; for checking the GPU code)");
    } else {
        let mut files: Vec<&str> = missing.iter().map(|&(_, file)| file).collect();
        files.dedup();
        println!("  emu    partly: the CUDA kernels emulated on the CPU, except {} (no host build)", files.join(", "));
    }
    if cuda_available() {
        match CudaDevice::new(0) {
            Ok(d) => println!("  cuda   yes: {}", d.name()),
            Err(e) => println!("  cuda   no: a driver is present but the GPU cannot be used: {e}"),
        }
    } else {
        println!("  cuda   no: no NVIDIA driver or GPU found");
    }
    match nvrtc::ensure_loaded() {
        Ok(path) => {
            let v = nvrtc::version().map(|(a, b)| format!("{a}.{b}")).unwrap_or_else(|e| format!("unknown version: {e}"));
            println!("  nvrtc  yes: {path} (version {v}); `deepis kernels` compiles every kernel")
        }
        Err(e) => println!("  nvrtc  no: {}", e.message()),
    }
    match CubinCache::from_env().dir() {
        Some(d) => {
            let n = std::fs::read_dir(d).map(|r| r.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "cubin")).count());
            println!("  cache  {}: {} compiled kernel files (DEEPIS_CACHE_DIR moves it)", d.display(), n.unwrap_or(0));
        }
        None => println!("  cache  off: every start compiles the kernels"),
    }
    Ok(())
}

fn group_thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// kernels

fn kernels(a: &KernelsArgs) -> Result<()> {
    let path = nvrtc::ensure_loaded()?;
    eprintln!("nvrtc: {path}");
    let cache = if a.no_cache { CubinCache::disabled() } else { CubinCache::from_env() };
    let (reports, stats) = nvrtc::compile_report_cached(&a.arch, &cache)?;
    for w in &stats.warnings {
        eprintln!("warning: {w}");
    }
    eprintln!("{}", stats.summary(&cache, &a.arch.join(", ")));
    print!("{}", crate::gpu::occupancy::format_table(&reports));
    let spills: Vec<String> = reports
        .iter()
        .filter(|r| r.spill_stores > 0 || r.spill_loads > 0)
        .map(|r| format!("{} ({}, {} bytes stored, {} loaded)", r.kernel, r.arch, r.spill_stores, r.spill_loads))
        .collect();
    if !spills.is_empty() {
        return Err(Error::Other(format!("{} kernel(s) spill registers: {}", spills.len(), spills.join(", "))));
    }
    eprintln!("{} kernel builds, no spills", reports.len());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// bench

struct Bench<'a> {
    weights: &'a Weights,
    x: &'a Tensor,
    runs: u32,
    warmup: u32,
}

impl Job for Bench<'_> {
    type Out = ();
    fn run<B: TrainBackend>(self, backend: B) -> Result<()> {
        println!("backend: {}", backend.name());
        let net = Network::new(backend, self.weights)?;
        time_runs(self.weights, self.x, self.runs, self.warmup, &|x| net.forward(x)).map(drop)
    }
}

/// `warmup` untimed then `runs` timed forward passes of `x`; prints the work and the median, and
/// returns it (seconds).
fn time_runs(weights: &Weights, x: &Tensor, runs: u32, warmup: u32, forward: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<f64> {
    let n = x.shape.n;
    let gflop = flops(&weights.config, x.shape.d) * n as f64 / 1e9;
    println!("work: {n} volume(s) of {:?}, {gflop:.1} GFLOP per forward", x.shape.d);
    for i in 0..warmup {
        let t0 = Instant::now();
        forward(x)?;
        eprintln!("  warmup {}: {:.3} s", i + 1, t0.elapsed().as_secs_f64());
    }
    let mut times = Vec::new();
    for i in 0..runs {
        let t0 = Instant::now();
        forward(x)?;
        let t = t0.elapsed().as_secs_f64();
        eprintln!("  run {}: {t:.3} s", i + 1);
        times.push(t);
    }
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    println!("median of {} run(s): {:.5} s per volume, {:.1} GFLOP/s, {:.2} volumes/s", times.len(), med / n as f64, gflop / med.max(1e-9), n as f64 / med.max(1e-9));
    Ok(med)
}

fn bench(a: &BenchArgs) -> Result<()> {
    let weights = match &a.weights {
        Some(p) => Weights::load(p)?,
        None => {
            let cfg = match a.config {
                BenchConfig::Published => Config::default(),
                BenchConfig::Readme => Config::readme_widths(),
            };
            Weights::random(&cfg, 1)
        }
    };
    weights.config.check_input_size(a.size)?;
    let voxels = crate::limits::product(&[a.batch as u64, a.size[0] as u64, a.size[1] as u64, a.size[2] as u64]);
    crate::limits::check(&format!("--batch {} of {:?} volumes", a.batch, a.size), crate::limits::bytes_of(voxels, 4)).map_err(Error::Input)?;
    let shape = Shape::new(a.batch as usize, a.size, 1);
    let mut rng = Rng::new(7);
    let x = Tensor::new(shape, (0..shape.len()).map(|_| rng.normal() as f32).collect())?;
    let chosen = check_gpu_options(choose(a.backend)?, a.gpu)?;
    if a.stream > 0 && !matches!(chosen, Chosen::Emu | Chosen::Cuda(_)) {
        return Err(Error::Input("--stream: times the GPU plan (--backend emu or cuda); the CPU runs volume by volume".into()));
    }
    match chosen {
        Chosen::Plan => bench_plan(&weights, &x, a.runs, a.warmup),
        Chosen::Emu => bench_gpu(EmuDevice::new(), &weights, &x, a),
        Chosen::Cuda(dev) => bench_gpu(dev, &weights, &x, a),
        chosen => with_backend(chosen, Bench { weights: &weights, x: &x, runs: a.runs, warmup: a.warmup }),
    }
}

// ---------------------------------------------------------------------------------------------
// the fused CPU plan (`--backend cpu`, and `auto` without a GPU)

/// Peak resident memory of this process so far (Linux VmHWM), in bytes.
fn peak_rss() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse::<usize>().ok()?;
    Some(kb * 1024)
}

fn mib(b: usize) -> f64 {
    b as f64 / 1048576.0
}

/// The plan runs volume by volume (peak memory is one volume's), so `--batch` changes nothing here.
fn predict_plan(weights: &Weights, x: &Tensor) -> Result<Tensor> {
    let t0 = Instant::now();
    let plan = new_plan(weights, x.shape.d)?;
    eprintln!("backend: cpu, {} threads; {}", rayon::current_num_threads(), plan.summary());
    let setup = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let y = crate::model::run_plan(&plan, weights, x)?;
    report_forward(weights, x, t0.elapsed().as_secs_f64(), &format!("plan built in {setup:.2} s"));
    Ok(y)
}

/// The fused plan for volumes of size `d`, refused when its memory exceeds the budget (the
/// arena is allocated on the first run).
pub fn new_plan(weights: &Weights, d: [usize; 3]) -> Result<crate::plan::Plan> {
    let plan = crate::plan::Plan::new(weights, d, crate::plan::PlanOptions::default())?;
    let what = format!("the CPU plan for {}x{}x{} volumes", d[0], d[1], d[2]);
    crate::limits::check(&what, Some(plan.peak_bytes() as u64)).map_err(Error::Input)?;
    Ok(plan)
}

/// `bench` on the GPU plan: one batch of x's N volumes per forward pass.
fn bench_gpu<D: Device>(dev: D, weights: &Weights, x: &Tensor, a: &BenchArgs) -> Result<()> {
    let plan = GpuPlan::with_options(dev, weights, x.shape.d, x.shape.n, a.gpu)?;
    println!("backend: {}", plan.device().name());
    println!("{}", plan.summary());
    let one = time_runs(weights, x, a.runs, a.warmup, &|x| plan.run(x))?;
    if a.stream == 0 {
        return Ok(());
    }
    let k = a.stream as usize;
    let many = Tensor::new(Shape::new(k * x.shape.n, x.shape.d, 1), x.data.repeat(k))?;
    println!("streamed: {k} batches of {} in one run, two in flight (uploads and downloads overlap the forward passes)", x.shape.n);
    let med = time_runs(weights, &many, a.runs, 0, &|x| plan.run(x))?;
    println!("streamed: {:.2}x the volumes/s of one batch per run", one * k as f64 / med.max(1e-12));
    Ok(())
}

fn bench_plan(weights: &Weights, x: &Tensor, runs: u32, warmup: u32) -> Result<()> {
    let plan = new_plan(weights, x.shape.d)?;
    println!("backend: cpu (fused plan), {} threads", rayon::current_num_threads());
    println!("{}", plan.summary());
    time_runs(weights, x, runs, warmup, &|x| plan.run(x))?;
    println!(
        "peak memory: plan {:.1} MiB (planned), process {}",
        mib(plan.peak_bytes()),
        peak_rss().map_or("unknown".to_string(), |b| format!("{:.1} MiB (VmHWM)", mib(b)))
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// segment: the backend is chosen as for predict; tiling, masks and files live in crate::segment.

struct Segment<'a> {
    args: &'a crate::segment::SegmentArgs,
    weights: &'a Weights,
}

impl Job for Segment<'_> {
    type Out = ();
    fn run<B: TrainBackend>(self, backend: B) -> Result<()> {
        eprintln!("backend: {}", backend.name());
        let net = Network::new(backend, self.weights)?;
        crate::segment::run(self.args, self.weights, &mut |x| net.forward(x))?.into_result()
    }
}

fn segment(a: &crate::segment::SegmentArgs) -> Result<()> {
    let weights = Weights::load(&a.weights)?;
    let report = match check_gpu_options(choose(a.backend)?, a.gpu)? {
        Chosen::Plan => {
            eprintln!("backend: cpu (fused plan), {} threads", rayon::current_num_threads());
            crate::segment::run(a, &weights, &mut crate::segment::plan_predictor(&weights))?
        }
        Chosen::Emu => segment_gpu(EmuDevice::new(), a, &weights)?,
        Chosen::Cuda(dev) => segment_gpu(dev, a, &weights)?,
        chosen => return with_backend(chosen, Segment { args: a, weights: &weights }),
    };
    report.into_result()
}

fn segment_gpu<D: Device>(dev: D, a: &crate::segment::SegmentArgs, weights: &Weights) -> Result<crate::segment::Report> {
    eprintln!("backend: {}", dev.name());
    crate::segment::run_stream(a, weights, &mut crate::segment::GpuStream::new(dev, weights, a.gpu))
}

/// Exposed for `main`: parse the process arguments (clap prints help/usage and exits itself).
pub fn main_entry() -> i32 {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_status()
        }
    }
}
