//! The network's side of `segment`: inputs' tiles packed into batches and kept flowing through
//! a [`Stream`], so that on a GPU the next batch is uploaded while one computes, and batches are
//! full across frames and files.
use super::tiles::Work;
use crate::error::{Error, Result};
use crate::gpu::plan::{GpuOptions, GpuPlan, Ticket};
use crate::gpu::Device;
use crate::tensor::{Shape, Tensor};
use crate::weights::Weights;
use std::collections::VecDeque;
use std::rc::Rc;

/// A prediction function: N x D0 x D1 x D2 x 1 in, N x D0 x D1 x D2 x C out.
pub type Predictor<'a> = dyn FnMut(&Tensor) -> Result<Tensor> + 'a;

/// A network that takes batches (N x D0 x D1 x D2 x 1) and gives their outputs back in the order
/// they went in, with up to [`Stream::depth`] batches queued and not yet collected. The values go
/// in and come out through the stream's own memory (on a GPU, the pinned memory the copies use),
/// so the host writes each tile once on the way in and reads it once on the way out.
pub trait Stream {
    /// How many batches may be queued at once: 1 where a batch is computed when it is submitted.
    fn depth(&self) -> usize;
    /// Queues a batch of `shape` whose values (channels-last) `fill` writes.
    fn submit_with(&mut self, shape: Shape, fill: &mut dyn FnMut(&mut [f32])) -> Result<()>;
    /// Hands the output of the oldest batch submitted and not yet collected (its shape, and its
    /// values channels-last) to `take`.
    fn collect_with(&mut self, take: &mut dyn FnMut(Shape, &[f32]) -> Result<()>) -> Result<()>;
}

/// A [`Predictor`] as a stream of depth 1: each batch computed when it is submitted.
pub struct Immediate<'p, 'a> {
    predict: &'p mut Predictor<'a>,
    /// The batch's input, its memory reused.
    x: Tensor,
    done: Option<Result<Tensor>>,
}

impl<'p, 'a> Immediate<'p, 'a> {
    pub fn new(predict: &'p mut Predictor<'a>) -> Self {
        Immediate { predict, x: Tensor::default(), done: None }
    }
}

impl Stream for Immediate<'_, '_> {
    fn depth(&self) -> usize {
        1
    }

    fn submit_with(&mut self, shape: Shape, fill: &mut dyn FnMut(&mut [f32])) -> Result<()> {
        if self.done.is_some() {
            return Err(Error::Other("stream: a batch submitted before the last was collected".into()));
        }
        self.x.shape = shape;
        self.x.data.resize(shape.len(), 0.0);
        fill(&mut self.x.data);
        self.done = Some((self.predict)(&self.x));
        Ok(())
    }

    fn collect_with(&mut self, take: &mut dyn FnMut(Shape, &[f32]) -> Result<()>) -> Result<()> {
        let y = self.done.take().unwrap_or_else(|| Err(Error::Other("stream: nothing to collect".into())))?;
        take(y.shape, &y.data)
    }
}

/// The GPU plan of a device as a stream of depth 2 (two batches in flight, see
/// [`GpuPlan::submit`]): one plan per tile size and batch size met, all on that device. The
/// first plan's summary is printed.
pub struct GpuStream<'w, D: Device> {
    dev: Rc<D>,
    weights: &'w Weights,
    options: GpuOptions,
    plans: Vec<GpuPlan<Rc<D>>>,
    queued: VecDeque<(usize, Ticket)>,
}

impl<'w, D: Device> GpuStream<'w, D> {
    pub fn new(dev: D, weights: &'w Weights, options: GpuOptions) -> Self {
        GpuStream { dev: Rc::new(dev), weights, options, plans: Vec::new(), queued: VecDeque::new() }
    }

    /// The plan for batches of `n` volumes of size `d`, made at its first use.
    fn plan(&mut self, d: [usize; 3], n: usize) -> Result<usize> {
        if let Some(i) = self.plans.iter().position(|p| p.size() == d && p.batch() == n) {
            return Ok(i);
        }
        let p = GpuPlan::with_options(Rc::clone(&self.dev), self.weights, d, n, self.options)?;
        if self.plans.is_empty() {
            eprintln!("{} for {}x{}x{} tiles", p.summary(), d[0], d[1], d[2]);
        }
        self.plans.push(p);
        Ok(self.plans.len() - 1)
    }

    /// Predicts `x` at once, up to `batch` volumes a pass (nothing may be queued).
    pub fn predict(&mut self, x: &Tensor, batch: usize) -> Result<Tensor> {
        if !self.queued.is_empty() {
            return Err(Error::Other("gpu stream: a prediction while batches are queued".into()));
        }
        let i = self.plan(x.shape.d, x.shape.n.clamp(1, batch.max(1)))?;
        self.plans[i].run(x)
    }
}

impl<D: Device> Stream for GpuStream<'_, D> {
    fn depth(&self) -> usize {
        2
    }

    fn submit_with(&mut self, shape: Shape, fill: &mut dyn FnMut(&mut [f32])) -> Result<()> {
        if self.queued.len() >= self.depth() {
            return Err(Error::Other("gpu stream: two batches are queued already".into()));
        }
        if shape.c != 1 {
            return Err(Error::Shape(format!("the GPU plan runs 1-channel volumes, got {shape}")));
        }
        let i = self.plan(shape.d, shape.n)?;
        let t = self.plans[i].submit_with(shape.n, fill)?;
        self.queued.push_back((i, t));
        Ok(())
    }

    fn collect_with(&mut self, take: &mut dyn FnMut(Shape, &[f32]) -> Result<()>) -> Result<()> {
        let (i, t) = self.queued.pop_front().ok_or_else(|| Error::Other("gpu stream: nothing to collect".into()))?;
        self.plans[i].collect_with(t, take)
    }
}

/// A predictor on the GPU plan of `dev` (see [`GpuStream`]), up to `batch` volumes a pass.
pub fn gpu_predictor<'a, D: Device + 'a>(dev: D, weights: &'a Weights, o: GpuOptions, batch: usize) -> impl FnMut(&Tensor) -> Result<Tensor> + 'a {
    let mut s = GpuStream::new(dev, weights, o);
    move |x: &Tensor| s.predict(x, batch)
}

/// What the inputs are, for the [`Streamer`]: one with nothing to predict (None), one that
/// failed before the network (Some(Err)), or its [`Work`].
enum State {
    Nothing,
    Failed(Error),
    Work(Box<Work>),
}

/// Inputs in, their outputs out in the same order, through a [`Stream`]: the tiles of the inputs
/// pushed are packed `batch` at a time (across frames and inputs, while the tile size stays the
/// same), and while a batch computes the host gets the next one ready. A batch that fails fails
/// the inputs it holds tiles of; the others go on.
pub struct Streamer<'s, T> {
    stream: &'s mut dyn Stream,
    batch: usize,
    /// The inputs not handed back yet, in order; `base` is the number handed back before.
    inputs: VecDeque<(T, State)>,
    base: usize,
    /// The input of each tile of each batch queued, oldest first.
    queued: VecDeque<Vec<usize>>,
}

/// An input handed back: its tag, and (unless it had nothing to predict) its input and output, or
/// why it failed.
pub type Done<T> = (T, Option<Result<(Tensor, Tensor)>>);

impl<'s, T> Streamer<'s, T> {
    pub fn new(stream: &'s mut dyn Stream, batch: usize) -> Self {
        Streamer { stream, batch: batch.max(1), inputs: VecDeque::new(), base: 0, queued: VecDeque::new() }
    }

    /// Adds an input: its work, the error that stopped it before the network, or None when there
    /// is nothing to predict (it is handed back in its turn).
    pub fn push(&mut self, tag: T, work: Option<Result<Work>>) {
        let state = match work {
            None => State::Nothing,
            Some(Err(e)) => State::Failed(e),
            Some(Ok(w)) => State::Work(Box::new(w)),
        };
        self.inputs.push_back((tag, state));
    }

    /// Queues every batch that the inputs pushed so far fill (or that a change of tile size
    /// ends), keeping no more than depth - 1 batches queued when it returns, and hands back the
    /// inputs that are done, in order.
    pub fn advance(&mut self) -> Vec<Done<T>> {
        while let Some((owners, tile)) = self.next_batch(false) {
            self.queue(owners, tile);
        }
        self.pop_done()
    }

    /// Queues what is left (partial batches too), collects everything, hands back every input.
    pub fn finish(&mut self) -> Vec<Done<T>> {
        while let Some((owners, tile)) = self.next_batch(true) {
            self.queue(owners, tile);
        }
        while !self.queued.is_empty() {
            self.collect_one();
        }
        let mut done = self.pop_done();
        // none should be left: if one is, it is handed back failed rather than lost
        while let Some((tag, _)) = self.inputs.pop_front() {
            self.base += 1;
            done.push((tag, Some(Err(Error::Other("segment: an input's tiles did not all come back from the network".into())))));
        }
        done
    }

    /// The next batch: up to `batch` tiles of the same size, from the first input with tiles
    /// left on; None unless it is full, its tile size changes after it, or `partial`. Returns the
    /// input of each tile, and the tile size.
    fn next_batch(&self, partial: bool) -> Option<(Vec<usize>, [usize; 3])> {
        let first = self.inputs.iter().position(|(_, s)| matches!(s, State::Work(w) if w.left() > 0))?;
        let State::Work(w) = &self.inputs[first].1 else { return None };
        let tile = w.tile();
        let mut owners = Vec::new();
        let mut ended = false;
        for (k, (_, s)) in self.inputs.iter().enumerate().skip(first) {
            match s {
                State::Work(w) if w.tile() == tile => {
                    let n = w.left().min(self.batch - owners.len());
                    owners.extend(std::iter::repeat_n(self.base + k, n));
                }
                State::Work(w) if w.left() > 0 => {
                    ended = true;
                    break;
                }
                _ => {}
            }
            if owners.len() == self.batch {
                break;
            }
        }
        if owners.len() < self.batch && !ended && !partial {
            return None;
        }
        Some((owners, tile))
    }

    /// Submits a batch (each tile cut straight into the stream's memory), then collects the
    /// oldest while `depth` batches are queued: the host takes the next step while the last batch
    /// submitted computes.
    fn queue(&mut self, owners: Vec<usize>, tile: [usize; 3]) {
        let shape = Shape::new(owners.len(), tile, 1);
        let per = shape.voxels();
        let (inputs, base) = (&mut self.inputs, self.base);
        let mut fill = |buf: &mut [f32]| {
            for (&id, dst) in owners.iter().zip(buf.chunks_exact_mut(per)) {
                if let Some((_, State::Work(w))) = inputs.get_mut(id - base) {
                    w.take(dst);
                }
            }
        };
        match self.stream.submit_with(shape, &mut fill) {
            Ok(()) => self.queued.push_back(owners),
            Err(e) => self.fail(&owners, e),
        }
        while self.queued.len() >= self.stream.depth() {
            self.collect_one();
        }
    }

    /// Collects the oldest batch and gives each tile's output to its input.
    fn collect_one(&mut self) {
        let Some(owners) = self.queued.pop_front() else { return };
        let (inputs, base) = (&mut self.inputs, self.base);
        let mut failed: Vec<(usize, Error)> = Vec::new();
        let mut give = |shape: Shape, y: &[f32]| {
            if shape.n != owners.len() || y.len() != shape.len() {
                return Err(Error::Shape(format!("the network gave {shape} ({} values) for a batch of {} tiles", y.len(), owners.len())));
            }
            let per = shape.voxels() * shape.c;
            for (&id, y) in owners.iter().zip(y.chunks_exact(per)) {
                let Some((_, State::Work(w))) = id.checked_sub(base).and_then(|k| inputs.get_mut(k)) else { continue };
                if failed.iter().any(|f| f.0 == id) {
                    continue;
                }
                if let Err(e) = w.give(y) {
                    failed.push((id, e));
                }
            }
            Ok(())
        };
        if let Err(e) = self.stream.collect_with(&mut give) {
            return self.fail(&owners, e);
        }
        for (id, e) in failed {
            self.fail(&[id], e);
        }
    }

    /// Fails the inputs that own tiles of a batch: the first with `e`, the others with its text.
    fn fail(&mut self, owners: &[usize], e: Error) {
        let mut e = Some(e);
        let mut text = String::new();
        let mut ids = owners.to_vec();
        ids.dedup();
        for id in ids {
            let Some((_, s)) = id.checked_sub(self.base).and_then(|k| self.inputs.get_mut(k)) else { continue };
            if matches!(s, State::Work(_)) {
                let err = match e.take() {
                    Some(e) => {
                        text = e.to_string();
                        e
                    }
                    None => Error::Other(format!("in the same batch as a failed input: {text}")),
                };
                *s = State::Failed(err);
            }
        }
    }

    /// The inputs at the front that are done.
    fn pop_done(&mut self) -> Vec<Done<T>> {
        let mut done = Vec::new();
        while let Some((_, s)) = self.inputs.front() {
            if matches!(s, State::Work(w) if !w.is_done()) {
                break;
            }
            let Some((tag, s)) = self.inputs.pop_front() else { break };
            self.base += 1;
            done.push((tag, match s {
                State::Nothing => None,
                State::Failed(e) => Some(Err(e)),
                State::Work(w) => Some(w.finish()),
            }));
        }
        done
    }
}
