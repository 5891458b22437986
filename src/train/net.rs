//! The network in training mode on the tape: the training graph (`graph::Graph`, `Mode::Train`)
//! walked node by node, batch norm on batch statistics (running stats updated as PyTorch does),
//! dropout in the classifier heads, and the two deep-supervision heads.
//! `Params` is the host master copy of every tensor (PyTorch layout and names); `train_step` runs
//! one forward + loss + backward and returns the gradients in PyTorch layout.
use super::backend::TrainBackend;
use super::loss::{edge_weight, train_loss, EdgeWeight, LossWeights};
use super::tape::{Tape, Var};
use crate::backend::{conv_weight_layout, conv_weight_to_torch};
use crate::config::{Config, Head};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::graph::{layout_spec, param_specs, Graph, Mode, Op, ParamKind, ParamSpec, Use};
use crate::weights::Weights;
use std::collections::HashMap;

/// BN momentum of PyTorch's default.
pub const BN_MOMENTUM: f64 = 0.1;
pub use crate::graph::DROPOUT;

/// Every tensor of the model on the host, float32, PyTorch layout, in `param_specs` order.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub cfg: Config,
    pub specs: Vec<ParamSpec>,
    pub data: Vec<Vec<f32>>,
    index: HashMap<String, usize>,
}

impl Params {
    /// Every tensor from `w`; tensors a weights file may lack (the classifier heads of an
    /// inference-only file, ConBR0) are initialised as `Weights::random` does with `seed`.
    /// Returns the params and the names that were initialised.
    pub fn from_weights(w: &Weights, seed: u64) -> Result<(Params, Vec<String>)> {
        let cfg = w.config.clone();
        let specs = param_specs(&cfg);
        let random = Weights::random(&cfg, seed);
        let mut data = Vec::with_capacity(specs.len());
        let mut fresh = Vec::new();
        for s in &specs {
            if w.contains(&s.name) {
                data.push(w.get(&s.name)?);
            } else {
                if s.used != Use::Unused {
                    fresh.push(s.name.clone());
                }
                data.push(random.get(&s.name)?);
            }
        }
        Ok((Params::new(cfg, specs, data), fresh))
    }

    fn new(cfg: Config, specs: Vec<ParamSpec>, data: Vec<Vec<f32>>) -> Params {
        let index = specs.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        Params { cfg, specs, data, index }
    }

    pub fn random(cfg: &Config, seed: u64) -> Params {
        Params::from_weights(&Weights::random(cfg, seed), seed).expect("random weights are complete").0
    }

    pub fn idx(&self, name: &str) -> Result<usize> {
        self.index.get(name).copied().ok_or_else(|| Error::Weights(format!("no tensor {name} in this model")))
    }

    pub fn get(&self, name: &str) -> Result<&[f32]> {
        Ok(&self.data[self.idx(name)?])
    }

    /// Whether parameter i is trained (learnable and used by the training graph).
    pub fn trainable(&self, i: usize) -> bool {
        self.specs[i].kind.learnable() && self.specs[i].used != Use::Unused
    }

    /// Named tensors (PyTorch layout), for saving.
    pub fn to_tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        self.specs.iter().zip(&self.data).map(|(s, d)| (s.name.clone(), s.shape.clone(), d.clone())).collect()
    }

    pub fn to_weights(&self) -> Result<Weights> {
        Weights::from_tensors(&self.cfg, &self.to_tensors())
    }

    /// The learnable tensors on the device (conv weights in the engine layout); None for BN
    /// running statistics and unused tensors.
    pub fn upload<B: TrainBackend>(&self, b: &B) -> Result<Vec<Option<B::S>>> {
        self.specs
            .iter()
            .zip(&self.data)
            .map(|(s, d)| {
                if !s.kind.learnable() || s.used == Use::Unused {
                    return Ok(None);
                }
                let v = if s.kind == ParamKind::ConvWeight { conv_weight_layout(&layout_spec(&s.shape), d) } else { d.clone() };
                Ok(Some(b.upload_param(&v)?))
            })
            .collect()
    }

    /// PyTorch's running-stat update from the batch statistics of one forward pass.
    pub fn update_running_stats(&mut self, stats: &[BnStat]) -> Result<()> {
        for st in stats {
            let (im, iv) = (self.idx(&format!("{}.running_mean", st.name))?, self.idx(&format!("{}.running_var", st.name))?);
            let unbias = if st.count > 1 { st.count as f64 / (st.count - 1) as f64 } else { 1.0 };
            for (r, &m) in self.data[im].iter_mut().zip(&st.mean) {
                *r = ((1.0 - BN_MOMENTUM) * *r as f64 + BN_MOMENTUM * m as f64) as f32;
            }
            for (r, &v) in self.data[iv].iter_mut().zip(&st.var) {
                *r = ((1.0 - BN_MOMENTUM) * *r as f64 + BN_MOMENTUM * v as f64 * unbias) as f32;
            }
        }
        Ok(())
    }
}

/// Batch statistics of one BN layer in one forward pass (biased variance over `count` values).
#[derive(Clone, Debug)]
pub struct BnStat {
    pub name: String,
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
    pub count: usize,
}

/// The training-mode forward on a tape.
pub struct Forward<'a, B: TrainBackend> {
    pub tape: Tape<'a, B>,
    pub out: Var,
    pub c3: Var,
    pub c4: Var,
    pub bn: Vec<BnStat>,
}

/// The training-mode forward pass of `x` (raw input values, N x D x 1). `dev` is `p.upload(b)`.
/// `dropout`: probability and generator of the classifier heads' masks (None: dropout off).
pub fn forward_train<'a, B: TrainBackend>(
    b: &'a B,
    p: &'a Params,
    dev: &'a [Option<B::S>],
    x: &Tensor,
    dropout: Option<(f32, &mut Rng)>,
) -> Result<Forward<'a, B>> {
    walk(b, p, dev, x, dropout, Mode::Train)
}

/// The eval-mode head output (batch norm on the running statistics, no dropout, no aux heads),
/// as `model::Network` computes it, on any `TrainBackend` (validation during training).
pub fn forward_eval<B: TrainBackend>(b: &B, p: &Params, x: &Tensor) -> Result<Tensor> {
    let dev = p.upload(b)?;
    let f = walk(b, p, &dev, x, None, Mode::Eval)?;
    b.download(f.tape.value(f.out))
}

/// Eval-mode batch norm of node `name` on the running statistics (no gradient).
fn bn_eval<B: TrainBackend>(tape: &mut Tape<'_, B>, p: &Params, name: &str, x: Var) -> Result<Var> {
    let b = tape.backend();
    let (scale, shift) = crate::model::bn_params(b, |s| p.get(&format!("{name}.{s}")), p.cfg.bn_eps)?;
    let y = b.channel_affine(tape.value(x), &scale, &shift, false)?;
    Ok(tape.leaf(y))
}

/// The graph of `mode` on the tape, node by node: batch norm on batch statistics in train mode.
fn walk<'a, B: TrainBackend>(
    b: &'a B,
    p: &'a Params,
    dev: &'a [Option<B::S>],
    x: &Tensor,
    mut dropout: Option<(f32, &mut Rng)>,
    mode: Mode,
) -> Result<Forward<'a, B>> {
    let cfg = &p.cfg;
    cfg.check_input(x.shape)?;
    let g = Graph::new(cfg, mode, x.shape.d);
    let mut tape = Tape::new(b, dev);
    let mut bn = Vec::new();
    let mut v: Vec<Var> = Vec::with_capacity(g.nodes.len());
    for n in &g.nodes {
        let a = |k: usize| v[n.inputs[k]];
        let y = match n.op {
            Op::Input => tape.leaf(b.upload(x)?),
            // in float64: x * scale + shift cancels (RI ~1.337, offset 1.337, scale 1 / 0.03), and
            // the max-pools route gradients by which voxel is largest
            Op::Scale { scale, shift } => {
                let mut t = b.download(tape.value(a(0)))?;
                t.data.iter_mut().for_each(|v| *v = (*v as f64 * scale + shift) as f32);
                tape.leaf(b.upload(&t)?)
            }
            Op::Conv { spec, bias } => {
                let bi = if bias { Some(p.idx(&format!("{}.bias", n.name))?) } else { None };
                tape.conv(a(0), p.idx(&format!("{}.weight", n.name))?, bi, spec)?
            }
            Op::BatchNorm if mode == Mode::Eval => bn_eval(&mut tape, p, &n.name, a(0))?,
            Op::BatchNorm => {
                let (gi, bi) = (p.idx(&format!("{}.weight", n.name))?, p.idx(&format!("{}.bias", n.name))?);
                let count = {
                    let s = tape.value(a(0)).shape;
                    s.n * s.voxels()
                };
                let (y, mean, var) = tape.batch_norm(a(0), gi, bi, cfg.bn_eps)?;
                bn.push(BnStat { name: n.name.clone(), mean, var, count });
                y
            }
            Op::Relu => tape.relu(a(0))?,
            Op::Add => tape.add(a(0), a(1))?,
            Op::MaxPool => tape.maxpool2(a(0))?,
            Op::Upsample => tape.upsample(a(0), n.shape.d)?,
            Op::Sigmoid => tape.sigmoid(a(0))?,
            Op::Softmax => tape.softmax(a(0))?,
            Op::Dropout { .. } => match dropout.as_mut() {
                Some((p, rng)) if *p > 0.0 => {
                    let shape = tape.value(a(0)).shape;
                    let keep = 1.0 / (1.0 - *p);
                    let mask: Vec<f32> = (0..shape.len()).map(|_| if rng.uniform() < *p as f64 { 0.0 } else { keep }).collect();
                    let mask = b.upload(&Tensor::new(shape, mask)?)?;
                    tape.mul_mask(a(0), mask)?
                }
                _ => a(0),
            },
        };
        v.push(y);
    }
    let out = v[g.outputs[0]];
    let (c3, c4) = if mode == Mode::Train { (v[g.outputs[1]], v[g.outputs[2]]) } else { (out, out) };
    Ok(Forward { tape, out, c3, c4, bn })
}

/// What one training step computed.
pub struct Step {
    pub loss: f64,
    pub main: f64,
    pub aux: f64,
    /// Gradients in PyTorch layout, indexed as `Params::specs` (None: not used by the graph).
    pub grads: Vec<Option<Vec<f32>>>,
    /// Training-mode head output.
    pub out: Tensor,
    pub c3: Tensor,
    pub c4: Tensor,
    /// The weight map used (distance heads).
    pub weight: Option<Tensor>,
    pub bn: Vec<BnStat>,
}

/// One training step: training-mode forward, the published loss with the loss weights `lw` (the
/// pw = 10 weight map computed from the output unless `weight` is given), backward. Parameters
/// are not changed.
pub fn train_step<B: TrainBackend>(
    b: &B,
    p: &Params,
    x: &Tensor,
    target: &Tensor,
    weight: Option<&Tensor>,
    lw: LossWeights,
    dropout: Option<(f32, &mut Rng)>,
) -> Result<Step> {
    let dev = p.upload(b)?;
    let f = forward_train(b, p, &dev, x, dropout)?;
    finish_step(b, p, f, target, weight, lw)
}

/// The loss and backward of a forward pass made by `forward_train`.
pub fn finish_step<B: TrainBackend>(b: &B, p: &Params, f: Forward<'_, B>, target: &Tensor, weight: Option<&Tensor>, lw: LossWeights) -> Result<Step> {
    let dl = |v: Var| b.download(f.tape.value(v));
    let (out, c3, c4) = (dl(f.out)?, dl(f.c3)?, dl(f.c4)?);
    if target.shape != out.shape {
        return Err(Error::Shape(format!("the target {} does not match the head output {}", target.shape, out.shape)));
    }
    let weight = match (p.cfg.head, weight) {
        (Head::Sigmoid, _) => None,
        (Head::Distance, Some(w)) => Some(w.clone()),
        (Head::Distance, None) => Some(edge_weight(&out, target, EdgeWeight::TRAIN)?),
    };
    let lg = train_loss(&p.cfg, &out, &c3, &c4, target, weight.as_ref(), lw)?;
    let seeds = vec![(f.out, b.upload(&lg.d_out)?), (f.c3, b.upload(&lg.d_c3)?), (f.c4, b.upload(&lg.d_c4)?)];
    let pg = f.tape.backward(seeds)?;
    let mut grads = Vec::with_capacity(pg.len());
    for (s, g) in p.specs.iter().zip(pg) {
        grads.push(match g {
            None => None,
            Some(g) => {
                let g = b.download_param(&g)?;
                Some(if s.kind == ParamKind::ConvWeight { conv_weight_to_torch(&layout_spec(&s.shape), &g) } else { g })
            }
        });
    }
    Ok(Step { loss: lg.loss, main: lg.main, aux: lg.aux, grads, out, c3, c4, weight, bn: f.bn })
}
