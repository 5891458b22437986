//! A minimal autograd tape (micrograd's scheme): every forward op appends its output value and
//! what its backward needs; `backward` walks the ops in reverse and accumulates gradients with +=.
//! The tape is in topological order by construction. Parameters live outside the tape (a slice of
//! device vectors indexed by parameter number); their gradients come back indexed the same way.
use super::backend::{BnSaved, TrainBackend};
use crate::backend::{ConvSpec, DevTensor};
use crate::error::{Error, Result};

/// A value on the tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var(pub usize);

enum Op<S> {
    /// An input: no gradient flows into it.
    Leaf,
    Conv { x: usize, w: usize, b: Option<usize>, spec: ConvSpec },
    Bn { x: usize, gamma: usize, beta: usize, saved: BnSaved<S> },
    Relu { x: usize },
    Add { a: usize, b: usize },
    MaxPool { x: usize },
    Upsample { x: usize },
    Sigmoid { x: usize },
    Softmax { x: usize },
    /// x * mask (dropout; the mask already holds the 1 / (1 - p) scaling).
    Mul { x: usize, mask: DevTensor<S> },
}

pub struct Tape<'a, B: TrainBackend> {
    b: &'a B,
    params: &'a [Option<B::S>],
    vals: Vec<DevTensor<B::S>>,
    ops: Vec<Op<B::S>>,
    /// Whether a gradient must flow into the value (false for inputs and what only depends on them).
    needs: Vec<bool>,
}

impl<'a, B: TrainBackend> Tape<'a, B> {
    pub fn new(b: &'a B, params: &'a [Option<B::S>]) -> Self {
        Tape { b, params, vals: Vec::new(), ops: Vec::new(), needs: Vec::new() }
    }

    pub fn backend(&self) -> &'a B {
        self.b
    }

    pub fn value(&self, v: Var) -> &DevTensor<B::S> {
        &self.vals[v.0]
    }

    pub fn len(&self) -> usize {
        self.vals.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vals.is_empty()
    }

    fn push(&mut self, y: DevTensor<B::S>, op: Op<B::S>, needs: bool) -> Var {
        self.vals.push(y);
        self.ops.push(op);
        self.needs.push(needs);
        Var(self.vals.len() - 1)
    }

    fn param(&self, i: usize) -> Result<&'a B::S> {
        self.params.get(i).and_then(Option::as_ref).ok_or_else(|| Error::Other(format!("tape: parameter {i} is not on the device")))
    }

    /// A value no gradient flows into (the network input).
    pub fn leaf(&mut self, x: DevTensor<B::S>) -> Var {
        self.push(x, Op::Leaf, false)
    }

    pub fn conv(&mut self, x: Var, w: usize, b: Option<usize>, spec: ConvSpec) -> Result<Var> {
        let bias = match b {
            Some(i) => Some(self.param(i)?),
            None => None,
        };
        let y = self.b.conv3d(&self.vals[x.0], self.param(w)?, bias, &spec)?;
        Ok(self.push(y, Op::Conv { x: x.0, w, b, spec }, true))
    }

    /// Training-mode batch norm; returns the output and the batch mean and biased variance.
    pub fn batch_norm(&mut self, x: Var, gamma: usize, beta: usize, eps: f64) -> Result<(Var, Vec<f32>, Vec<f32>)> {
        let (y, saved) = self.b.batch_norm_train(&self.vals[x.0], self.param(gamma)?, self.param(beta)?, eps)?;
        let (mean, var) = (self.b.download_param(&saved.mean)?, self.b.download_param(&saved.var)?);
        Ok((self.push(y, Op::Bn { x: x.0, gamma, beta, saved }, true), mean, var))
    }

    pub fn relu(&mut self, x: Var) -> Result<Var> {
        let y = self.b.relu(&self.vals[x.0])?;
        let n = self.needs[x.0];
        Ok(self.push(y, Op::Relu { x: x.0 }, n))
    }

    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        let y = self.b.add(&self.vals[a.0], &self.vals[b.0], false)?;
        let n = self.needs[a.0] || self.needs[b.0];
        Ok(self.push(y, Op::Add { a: a.0, b: b.0 }, n))
    }

    pub fn maxpool2(&mut self, x: Var) -> Result<Var> {
        let y = self.b.maxpool2(&self.vals[x.0])?;
        let n = self.needs[x.0];
        Ok(self.push(y, Op::MaxPool { x: x.0 }, n))
    }

    pub fn upsample(&mut self, x: Var, size: [usize; 3]) -> Result<Var> {
        let y = self.b.upsample(&self.vals[x.0], size)?;
        let n = self.needs[x.0];
        Ok(self.push(y, Op::Upsample { x: x.0 }, n))
    }

    pub fn sigmoid(&mut self, x: Var) -> Result<Var> {
        let y = self.b.sigmoid(&self.vals[x.0])?;
        let n = self.needs[x.0];
        Ok(self.push(y, Op::Sigmoid { x: x.0 }, n))
    }

    pub fn softmax(&mut self, x: Var) -> Result<Var> {
        let y = self.b.softmax(&self.vals[x.0])?;
        let n = self.needs[x.0];
        Ok(self.push(y, Op::Softmax { x: x.0 }, n))
    }

    /// x * mask, the mask uploaded by the caller (dropout).
    pub fn mul_mask(&mut self, x: Var, mask: DevTensor<B::S>) -> Result<Var> {
        let y = self.b.mul(&self.vals[x.0], &mask)?;
        let n = self.needs[x.0];
        Ok(self.push(y, Op::Mul { x: x.0, mask }, n))
    }

    /// Walks the tape backwards from the seed gradients (d loss / d value) and returns the gradient
    /// of every parameter the tape used (None for the others), indexed as the parameter slice.
    pub fn backward(&self, seeds: Vec<(Var, DevTensor<B::S>)>) -> Result<Vec<Option<B::S>>> {
        let b = self.b;
        let mut grads: Vec<Option<DevTensor<B::S>>> = (0..self.vals.len()).map(|_| None).collect();
        let mut pgrads: Vec<Option<B::S>> = (0..self.params.len()).map(|_| None).collect();
        let acc = |grads: &mut Vec<Option<DevTensor<B::S>>>, i: usize, g: DevTensor<B::S>| -> Result<()> {
            match &mut grads[i] {
                Some(a) => b.accumulate(a, &g),
                slot => {
                    *slot = Some(g);
                    Ok(())
                }
            }
        };
        let pacc = |pgrads: &mut Vec<Option<B::S>>, i: usize, g: B::S| -> Result<()> {
            match &mut pgrads[i] {
                Some(a) => b.accumulate_param(a, &g),
                slot => {
                    *slot = Some(g);
                    Ok(())
                }
            }
        };
        for (v, g) in seeds {
            if g.shape != self.vals[v.0].shape {
                return Err(Error::Shape(format!("backward: seed {} for a value of shape {}", g.shape, self.vals[v.0].shape)));
            }
            acc(&mut grads, v.0, g)?;
        }
        for i in (0..self.ops.len()).rev() {
            let Some(g) = grads[i].take() else { continue };
            match &self.ops[i] {
                Op::Leaf => {}
                Op::Conv { x, w, b: bias, spec } => {
                    let xv = &self.vals[*x];
                    pacc(&mut pgrads, *w, b.conv3d_backward_weight(xv, &g, spec)?)?;
                    if let Some(bi) = bias {
                        pacc(&mut pgrads, *bi, b.conv3d_backward_bias(&g)?)?;
                    }
                    if self.needs[*x] {
                        let dx = b.conv3d_backward_input(&g, self.param(*w)?, spec, xv.shape.d)?;
                        acc(&mut grads, *x, dx)?;
                    }
                }
                Op::Bn { x, gamma, beta, saved } => {
                    let (dx, dg, db) = b.batch_norm_backward(&g, &self.vals[*x], self.param(*gamma)?, saved)?;
                    pacc(&mut pgrads, *gamma, dg)?;
                    pacc(&mut pgrads, *beta, db)?;
                    if self.needs[*x] {
                        acc(&mut grads, *x, dx)?;
                    }
                }
                Op::Add { a, b: c } => {
                    if self.needs[*a] && self.needs[*c] {
                        let g2 = b.duplicate(&g)?;
                        acc(&mut grads, *a, g2)?;
                        acc(&mut grads, *c, g)?;
                    } else if self.needs[*a] {
                        acc(&mut grads, *a, g)?;
                    } else if self.needs[*c] {
                        acc(&mut grads, *c, g)?;
                    }
                }
                // the one-input ops: x's gradient from the output's (and y, the output, or x)
                Op::Relu { x } | Op::MaxPool { x } | Op::Upsample { x } | Op::Sigmoid { x } | Op::Softmax { x } | Op::Mul { x, .. } => {
                    if !self.needs[*x] {
                        continue;
                    }
                    let (xv, y) = (&self.vals[*x], &self.vals[i]);
                    let dx = match &self.ops[i] {
                        Op::Relu { .. } => b.relu_backward(&g, y)?,
                        Op::MaxPool { .. } => b.maxpool2_backward(&g, xv)?,
                        Op::Upsample { .. } => b.upsample_backward(&g, xv.shape.d)?,
                        Op::Sigmoid { .. } => b.sigmoid_backward(&g, y)?,
                        Op::Softmax { .. } => b.softmax_backward(&g, y)?,
                        Op::Mul { mask, .. } => b.mul(&g, mask)?,
                        _ => unreachable!("matched above"),
                    };
                    acc(&mut grads, *x, dx)?;
                }
            }
        }
        Ok(pgrads)
    }
}
