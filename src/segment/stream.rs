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
/// they went in, with up to [`Stream::depth`] batches queued and not yet collected.
pub trait Stream {
    /// How many batches may be queued at once: 1 where a batch is computed when it is submitted.
    fn depth(&self) -> usize;
    fn submit(&mut self, x: &Tensor) -> Result<()>;
    /// The output of the oldest batch submitted and not yet collected, into `y` (whose memory
    /// the stream may reuse).
    fn collect(&mut self, y: &mut Tensor) -> Result<()>;
}

/// A [`Predictor`] as a stream of depth 1: each batch computed when it is submitted.
pub struct Immediate<'p, 'a> {
    predict: &'p mut Predictor<'a>,
    done: Option<Result<Tensor>>,
}

impl<'p, 'a> Immediate<'p, 'a> {
    pub fn new(predict: &'p mut Predictor<'a>) -> Self {
        Immediate { predict, done: None }
    }
}

impl Stream for Immediate<'_, '_> {
    fn depth(&self) -> usize {
        1
    }

    fn submit(&mut self, x: &Tensor) -> Result<()> {
        if self.done.is_some() {
            return Err(Error::Other("stream: a batch submitted before the last was collected".into()));
        }
        self.done = Some((self.predict)(x));
        Ok(())
    }

    fn collect(&mut self, y: &mut Tensor) -> Result<()> {
        *y = self.done.take().unwrap_or_else(|| Err(Error::Other("stream: nothing to collect".into())))?;
        Ok(())
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

    fn submit(&mut self, x: &Tensor) -> Result<()> {
        if self.queued.len() >= self.depth() {
            return Err(Error::Other("gpu stream: two batches are queued already".into()));
        }
        let i = self.plan(x.shape.d, x.shape.n)?;
        let t = self.plans[i].submit(x)?;
        self.queued.push_back((i, t));
        Ok(())
    }

    fn collect(&mut self, y: &mut Tensor) -> Result<()> {
        let (i, t) = self.queued.pop_front().ok_or_else(|| Error::Other("gpu stream: nothing to collect".into()))?;
        self.plans[i].collect_into(t, y)
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
    /// A batch's tiles in and out, their memory reused from batch to batch.
    tiles_in: Tensor,
    tiles_out: Tensor,
}

/// An input handed back: its tag, and (unless it had nothing to predict) its input and output, or
/// why it failed.
pub type Done<T> = (T, Option<Result<(Tensor, Tensor)>>);

impl<'s, T> Streamer<'s, T> {
    pub fn new(stream: &'s mut dyn Stream, batch: usize) -> Self {
        Streamer { stream, batch: batch.max(1), inputs: VecDeque::new(), base: 0, queued: VecDeque::new(), tiles_in: Tensor::default(), tiles_out: Tensor::default() }
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
        while let Some(owners) = self.next_batch(false) {
            self.queue(owners);
        }
        self.pop_done()
    }

    /// Queues what is left (partial batches too), collects everything, hands back every input.
    pub fn finish(&mut self) -> Vec<Done<T>> {
        while let Some(owners) = self.next_batch(true) {
            self.queue(owners);
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

    /// The next batch, cut into `tiles_in`: up to `batch` tiles of the same size, from the first
    /// input with tiles left on; None unless it is full, its tile size changes after it, or
    /// `partial`. Returns the input of each tile.
    fn next_batch(&mut self, partial: bool) -> Option<Vec<usize>> {
        let first = self.inputs.iter().position(|(_, s)| matches!(s, State::Work(w) if w.left() > 0))?;
        let State::Work(w) = &self.inputs[first].1 else { return None };
        let tile = w.tile();
        let mut have = 0;
        let mut ended = false;
        for (_, s) in self.inputs.iter().skip(first) {
            match s {
                State::Work(w) if w.tile() == tile => have += w.left(),
                State::Work(w) if w.left() > 0 => {
                    ended = true;
                    break;
                }
                _ => {}
            }
            if have >= self.batch {
                break;
            }
        }
        if have < self.batch && !ended && !partial {
            return None;
        }
        let mut data = std::mem::take(&mut self.tiles_in.data);
        data.clear();
        let mut owners = Vec::new();
        for (k, (_, s)) in self.inputs.iter_mut().enumerate().skip(first) {
            let State::Work(w) = s else { continue };
            if w.tile() != tile && w.left() > 0 {
                break;
            }
            while owners.len() < self.batch && w.take(&mut data) {
                owners.push(self.base + k);
            }
        }
        self.tiles_in = Tensor { shape: Shape::new(owners.len(), tile, 1), data };
        Some(owners)
    }

    /// Submits a batch, then collects the oldest while `depth` batches are queued: the host takes
    /// the next step while the last batch submitted computes.
    fn queue(&mut self, owners: Vec<usize>) {
        match self.stream.submit(&self.tiles_in) {
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
        let mut y = std::mem::take(&mut self.tiles_out);
        match self.stream.collect(&mut y) {
            Ok(()) if y.shape.n == owners.len() && y.data.len() == y.shape.len() => {}
            Ok(()) => return self.fail(&owners, Error::Shape(format!("the network gave {} for a batch of {} tiles", y.shape, owners.len()))),
            Err(e) => return self.fail(&owners, e),
        }
        let per = y.shape.voxels() * y.shape.c;
        for (j, &id) in owners.iter().enumerate() {
            let Some((_, State::Work(w))) = id.checked_sub(self.base).and_then(|k| self.inputs.get_mut(k)) else { continue };
            if let Err(e) = w.give(&y.data[j * per..(j + 1) * per]) {
                self.fail(&[id], e);
            }
        }
        self.tiles_out = y;
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
