//! The host's ceiling on `deepis segment`'s folder rate: the whole pipeline (read, tile, batch,
//! blend, label, write) over a folder of 128 x 128 x 64 volumes, with a network that costs
//! nothing: a stream of depth 2 that hands each batch back from staging buffers of its own,
//! written and read as the GPU plan's pinned buffers are. The inputs are the signed distance
//! maps of synthetic frames (um), so the "output" labels and cleans up as a real one does. It
//! runs one reader and one writer, then the counts given (default: `segment`'s for this
//! machine's cores), and prints each rate and their ratio, against the GPU's target rate; and
//! the network's stage alone (one thread: the tiles cut, staged in and out, blended).
//!
//! cargo bench --bench host_pipeline [-- FILES BATCH READERS WRITERS]   (default 16 8 and segment's)
use deepis::config::{Config, Head};
use deepis::error::Result;
use deepis::segment::{self, SegmentArgs, Stream};
use deepis::tensor::{Shape, Tensor};
use std::collections::VecDeque;
use std::path::Path;
use std::time::Instant;

/// The GPU's target for the published model at batch 8 (issue 11): 2 ms per volume.
const GPU_TARGET_MS: f64 = 2.0;

/// Batches handed back as they came, through buffers reused from batch to batch.
#[derive(Default)]
struct Echo {
    queued: VecDeque<(Shape, Vec<f32>)>,
    free: Vec<Vec<f32>>,
}

impl Stream for Echo {
    fn depth(&self) -> usize {
        2
    }

    fn submit_with(&mut self, shape: Shape, fill: &mut dyn FnMut(&mut [f32])) -> Result<()> {
        let mut b = self.free.pop().unwrap_or_default();
        b.resize(shape.len(), 0.0);
        fill(&mut b);
        self.queued.push_back((shape, b));
        Ok(())
    }

    fn collect_with(&mut self, take: &mut dyn FnMut(Shape, &[f32]) -> Result<()>) -> Result<()> {
        let (shape, b) = self.queued.pop_front().expect("a batch queued");
        let r = take(shape, &b);
        self.free.push(b);
        r
    }
}

fn arg(k: usize) -> Option<u32> {
    std::env::args().filter(|a| a != "--bench").nth(k).and_then(|a| a.parse().ok())
}

/// One run over dir/target; returns seconds per file. `echo`'s buffers last from run to run, as
/// the GPU plan's pinned ones last for the plan's life (not faulted in again for each run).
fn run(dir: &Path, weights: &deepis::weights::Weights, files: usize, batch: u32, readers: u32, writers: u32, echo: &mut Echo) -> f64 {
    let out = dir.join(format!("out-{readers}-{writers}"));
    let _ = std::fs::remove_dir_all(&out);
    let a = SegmentArgs { tile: [128, 128, 64], batch, readers: Some(readers), writers: Some(writers), ..args(dir, &out) };
    let t = Instant::now();
    let r = segment::run_stream(&a, weights, echo).expect("the run");
    assert_eq!(r.written.len(), files);
    t.elapsed().as_secs_f64() / files as f64
}

fn args(dir: &Path, out: &Path) -> SegmentArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: SegmentArgs,
    }
    let (w, i, o) = (dir.join("w.safetensors"), dir.join("target"), out.to_path_buf());
    Cli::parse_from(["segment", "-w", w.to_str().unwrap(), i.to_str().unwrap(), "-o", o.to_str().unwrap()]).a
}

fn main() {
    let files = arg(1).unwrap_or(16) as usize;
    let batch = arg(2).unwrap_or(8);
    let (r, w) = segment::workers(arg(3), arg(4));
    let dir = tempfile::tempdir().expect("a temporary folder");
    let d = dir.path();
    let o = deepis::synth::SynthOptions { frames: files, ..Default::default() };
    eprintln!("synthesising {files} frames of {:?}...", o.size);
    // target/tNNN.npy: each frame's signed distance map, the inputs here
    deepis::synth::write_time_lapse(d, &o, |_| {}).expect("the frames");
    let cfg = Config { widths: [4, 8, 8, 8, 8], trans_feature: 4, head: Head::Distance, ..Config::default() };
    let weights = deepis::weights::Weights::random(&cfg, 1);
    weights.save(&d.join("w.safetensors")).unwrap();
    // a first run reads the files into the page cache; then the best of 3 of each, alternating
    let echo = &mut Echo::default();
    run(d, &weights, files, batch, 1, 1, echo);
    let (mut one, mut many) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        one = one.min(run(d, &weights, files, batch, 1, 1, echo));
        many = many.min(run(d, &weights, files, batch, r as u32, w as u32, echo));
    }
    let net = network_stage(d, files, batch as usize);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("host pipeline: {files} files of 128x128x64, batch {batch}, a network that costs nothing, {cores} cores, best of 3");
    println!("  1 reader,  1 writer : {:6.2} ms/file, {:7.1} files/s", one * 1e3, 1.0 / one);
    println!("  {r} readers, {w} writers: {:6.2} ms/file, {:7.1} files/s, {:.2}x the rate of 1 + 1", many * 1e3, 1.0 / many, one / many);
    println!("  the network's stage alone (tiles cut, staged in and out, blended; one thread): {:.2} ms/volume", net * 1e3);
    println!("  the GPU's target, {GPU_TARGET_MS} ms/volume ({:.0} volumes/s): the host's ceiling is {:.2}x it", 1e3 / GPU_TARGET_MS, GPU_TARGET_MS / (many * 1e3));
}

/// Seconds per volume of the network's stage alone: the volumes (read and copied before) through a
/// [`segment::Streamer`] on the echo stream, `batch` tiles at a time, 4 times over; best of 3.
fn network_stage(dir: &Path, files: usize, batch: usize) -> f64 {
    let xs: Vec<Tensor> = (0..files).map(|t| deepis::io::read_volume(&dir.join(format!("target/t{t:03}.npy"))).expect("a volume").tensor).collect();
    let (mut best, mut echo) = (f64::MAX, Echo::default());
    for _ in 0..3 {
        let work: Vec<_> = xs.iter().cycle().take(4 * files).map(|x| segment::Work::new(x.clone(), [128, 128, 64], 16, segment::Blend::Window, false)).collect();
        let mut s = segment::Streamer::new(&mut echo, batch);
        let t = Instant::now();
        let mut n = 0;
        for w in work {
            s.push((), Some(w));
            n += s.advance().len();
        }
        n += s.finish().len();
        assert_eq!(n, 4 * files);
        best = best.min(t.elapsed().as_secs_f64() / n as f64);
    }
    best
}
