//! The stages of a `segment` run: reader threads read the next inputs while the network (on the
//! calling thread) predicts the current ones and writer threads label and write the last ones;
//! what each input did is reported in the run's order.
use super::stream::{Done, Stream, Streamer};
use super::tiles::Work;
use super::{labels_from_output, write_labels_out, write_map, Report, SegmentArgs};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::weights::Weights;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::Scope;
use std::time::Instant;

/// Threads reading inputs and threads labelling and writing outputs: `--readers` / `--writers`,
/// else from the cores the process may use: a quarter of them read (1 to 4), the rest but one
/// (the network's thread) write (1 to 8). Each holds one input (a writer also its output and
/// labels) at a time.
pub fn workers(readers: Option<u32>, writers: Option<u32>) -> (usize, usize) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let r = readers.map_or((cores / 4).clamp(1, 4), |r| r.max(1) as usize);
    let w = writers.map_or(cores.saturating_sub(r + 1).clamp(1, 8), |w| w.max(1) as usize);
    (r, w)
}

/// What the stages share.
pub struct Ctx<'a> {
    pub a: &'a SegmentArgs,
    pub weights: &'a Weights,
    /// The voxel size the weights were trained at, where they record it.
    pub trained: Option<[f64; 3]>,
    pub wsha: &'a str,
    pub options: &'a serde_json::Value,
    pub pb: &'a indicatif::ProgressBar,
    /// Readers and writers ([`workers`]).
    pub workers: (usize, usize),
    /// Set when the run stops at a failure: the stages take no new input.
    pub stop: AtomicBool,
}

impl Ctx<'_> {
    fn say(&self, line: String) {
        if self.pb.is_hidden() {
            eprintln!("{line}")
        } else {
            self.pb.println(line)
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
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

/// A job after the network: None when skipped, else its volume and output (or the error); when
/// the network took it, and how long it spent there (with the wait for the rest of its batch).
struct Predicted {
    job: Job,
    y: Option<Result<(Loaded, Tensor)>>,
    t0: Instant,
    network_s: f64,
}

/// What a writer did with an input, for the report.
enum Outcome {
    Skipped { input: PathBuf, out: PathBuf },
    Written { out: PathBuf, line: String },
    Failed { input: PathBuf, error: Error },
}

/// The run over `jobs` (input, unique stem) in three stages. Readers take the inputs in turn
/// (reader k the k-th of every `readers`) and the network takes them back in the run's order;
/// the network's stage is a [`Streamer`] (tiles of consecutive inputs share batches, and on a GPU
/// the next batch is queued while one computes); the writers take the predicted inputs as they
/// come, and a reporter prints and records what each did in the run's order. At most one input
/// waits after each reader and one before the writers, so memory stays at an input or two per
/// thread (and the inputs of the batches in the network). An input that fails stops the run
/// (the inputs already being written are finished), unless --keep-going.
pub fn pipeline<'s, 'e>(s: &'s Scope<'s, 'e>, c: &'s Ctx<'e>, jobs: &'s [(&'e Path, &'e str)], stream: &mut dyn Stream) -> Result<Report> {
    let (readers, writers) = c.workers;
    let mut from_readers = Vec::new();
    for k in 0..readers {
        let (tx, rx) = sync_channel::<Job>(1);
        from_readers.push(rx);
        s.spawn(move || {
            for &(input, stem) in jobs.iter().skip(k).step_by(readers) {
                if c.stopped() || tx.send(read_job(c, input, stem)).is_err() {
                    break;
                }
            }
        });
    }
    let (to_writers, work) = sync_channel::<(usize, Predicted)>(1);
    let work = Arc::new(Mutex::new(work));
    let (to_reporter, outcomes) = channel::<(usize, Outcome)>();
    for _ in 0..writers {
        let (work, to_reporter) = (Arc::clone(&work), to_reporter.clone());
        s.spawn(move || loop {
            // the lock is held only while waiting for the next input, not while writing it
            let next = work.lock().map_err(|_| ()).and_then(|rx| rx.recv().map_err(|_| ()));
            let Ok((i, p)) = next else { break };
            if to_reporter.send((i, write_job(c, p))).is_err() {
                break;
            }
        });
    }
    drop(to_reporter);
    let reporter = s.spawn(move || report_in_order(c, outcomes));
    network(c, jobs.len(), &from_readers, stream, |i, p| to_writers.send((i, p)).is_ok());
    // readers waiting to hand on an input are let go, writers finish what they hold
    drop(from_readers);
    drop(to_writers);
    reporter.join().map_err(|_| Error::Other("segment: the reporting thread panicked".into()))?
}

/// The network's stage: `n` inputs taken from the readers in turn, their predictions handed to
/// `send` (with their place in the run) in the same order, until `send` refuses or an input fails
/// and the run stops at a failure.
fn network(c: &Ctx, n: usize, from_readers: &[Receiver<Job>], stream: &mut dyn Stream, mut send: impl FnMut(usize, Predicted) -> bool) {
    let mut net = Streamer::new(stream, c.a.batch as usize);
    let mut sent = 0;
    let mut hand_on = |done: Vec<Done<InNet>>| {
        done.into_iter().all(|d| {
            let p = predicted(d);
            let stop = matches!(p.y, Some(Err(_))) && !c.a.keep_going;
            if stop {
                // the readers read no further
                c.stop.store(true, Ordering::Relaxed);
            }
            let ok = send(sent, p);
            sent += 1;
            ok && !stop && !c.stopped()
        })
    };
    for i in 0..n {
        let Ok(job) = from_readers[i % from_readers.len()].recv() else { return };
        let (tag, work) = to_network(c, job);
        net.push(tag, work);
        if !hand_on(net.advance()) {
            return;
        }
    }
    hand_on(net.finish());
}

/// Prints and records the writers' outcomes in the run's order; the first failure ends the run
/// (stops the other stages) unless --keep-going.
fn report_in_order(c: &Ctx, outcomes: Receiver<(usize, Outcome)>) -> Result<Report> {
    let mut report = Report::default();
    let mut early = BTreeMap::new();
    let mut next = 0;
    for (i, o) in outcomes {
        early.insert(i, o);
        while let Some(o) = early.remove(&next) {
            next += 1;
            c.pb.inc(1);
            match o {
                Outcome::Skipped { input, out } => {
                    c.say(format!("{} -> {}: done before (same weights, options and input), skipped", input.display(), out.display()));
                    report.skipped.push(input);
                }
                Outcome::Written { out, line } => {
                    c.say(line);
                    report.written.push(out);
                }
                Outcome::Failed { input, error } if c.a.keep_going => {
                    c.say(format!("{}: FAILED: {error}", input.display()));
                    report.failed.push((input, error.to_string()));
                }
                Outcome::Failed { error, .. } => {
                    c.stop.store(true, Ordering::Relaxed);
                    return Err(error);
                }
            }
        }
    }
    Ok(report)
}

/// An input in the network's stage: its job and volume, the size it is predicted at when that
/// differs (--resample), and when its prediction began.
struct InNet {
    job: Job,
    loaded: Option<Loaded>,
    resampled: bool,
    t0: Instant,
}

/// An input as the network takes it: its tiled (and test-time augmented, and resampled)
/// prediction, the error that stopped it before, or nothing (done before).
fn to_network(c: &Ctx, mut job: Job) -> (InNet, Option<Result<Work>>) {
    let t0 = Instant::now();
    let mut tag = InNet { job: Job { load: None, ..job }, loaded: None, resampled: false, t0 };
    let work = match job.load.take() {
        None => None,
        Some(Err(e)) => Some(Err(e)),
        Some(Ok(mut l)) => {
            c.pb.set_message(tag.job.input.display().to_string());
            let x = network_input(c, &tag.job.input, &mut l);
            tag.resampled = matches!(x, Ok(Some(_)));
            let x = x.map(|x| x.unwrap_or_else(|| std::mem::take(&mut l.vol.tensor)));
            tag.loaded = Some(l);
            let a = c.a;
            Some(x.and_then(|x| Work::new(x, a.tile, a.overlap, a.blend, a.tta)))
        }
    };
    (tag, work)
}

/// The volume the network sees when it is not the input's own: resampled to the voxel size of
/// the weights' training (--resample); warns when that size differs and it is not resampled.
fn network_input(c: &Ctx, input: &Path, l: &mut Loaded) -> Result<Option<Tensor>> {
    let d = l.vol.tensor.shape.d;
    let (v, t) = match (&l.voxel, c.trained) {
        (Some(v), Some(t)) if crate::voxel::differs(v.um, t, 0.10) => (v.um, t),
        _ => return Ok(None),
    };
    if c.a.resample {
        let to: [usize; 3] = std::array::from_fn(|k| ((d[k] as f64 * v[k] / t[k]).round() as usize).max(1));
        c.say(format!("{}: resampled from {d:?} voxels of {v:?} um to {to:?} of {t:?} um (the weights' training voxel size) and back", input.display()));
        return crate::voxel::resample(&l.vol.tensor, to).map(Some);
    }
    let worst = (0..3).map(|k| (v[k] / t[k] - 1.0).abs()).fold(0.0, f64::max);
    c.say(format!(
        "warning: {}: voxels of {v:?} um, but the weights were trained at {t:?} um ({:.1}% apart): the network sees cells at another scale; --resample predicts at the training voxel size",
        input.display(),
        100.0 * worst
    ));
    Ok(None)
}

/// An input out of the network, for the writer: its volume and output (at the input's size).
fn predicted((tag, y): Done<InNet>) -> Predicted {
    let InNet { job, loaded, resampled, t0 } = tag;
    let y = y.map(|r| {
        let (x, y) = r?;
        let mut l = loaded.ok_or_else(|| Error::Other("segment: a prediction without its input".into()))?;
        if resampled {
            let y = crate::voxel::resample(&y, l.vol.tensor.shape.d)?;
            return Ok((l, y));
        }
        l.vol.tensor = x;
        Ok((l, y))
    });
    Predicted { job, y, t0, network_s: t0.elapsed().as_secs_f64() }
}

/// The reader's stage: outputs, provenance, and the volume unless the outputs are done.
fn read_job(c: &Ctx, input: &Path, stem: &str) -> Job {
    let a = c.a;
    let mut outs = vec![super::output_path(&a.out_dir, stem, a.format)];
    if a.save_probabilities {
        outs.push(super::probabilities_path(&a.out_dir, stem, a.format));
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

/// The writer's stage: one input labelled and written (or skipped, or failed).
fn write_job(c: &Ctx, p: Predicted) -> Outcome {
    let Predicted { job, y, t0, network_s } = p;
    let Some(y) = y else {
        return Outcome::Skipped { input: job.input, out: job.outs[0].clone() };
    };
    let times = Times { t0, network_s, writing: Instant::now() };
    match y.and_then(|(l, y)| finish_job(c, &job, &l, &y, times)) {
        Ok(line) => Outcome::Written { out: job.outs[0].clone(), line },
        Err(error) => Outcome::Failed { input: job.input, error },
    }
}

/// When the network took an input, its time there, and when a writer took it.
struct Times {
    t0: Instant,
    network_s: f64,
    writing: Instant,
}

/// Labels one input's output and writes its files; returns the line to print: the time from the
/// network taking the input to its files written, split into the network's stage (its batch's
/// wait for later inputs included) and the writer's (labels and files); the rest waited for a
/// free writer.
fn finish_job(c: &Ctx, job: &Job, l: &Loaded, y: &Tensor, times: Times) -> Result<String> {
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
        "{} -> {}: {} volume(s) of {:?} in {:.2} s (network {:.2} s, labels and files {:.2} s); effector {} voxels, target {} voxels, {} spurious voxels removed; {vs}",
        job.input.display(),
        outs[0].display(),
        s.n,
        s.d,
        times.t0.elapsed().as_secs_f64(),
        times.network_s,
        times.writing.elapsed().as_secs_f64(),
        count(1),
        count(2),
        removed
    ))
}
