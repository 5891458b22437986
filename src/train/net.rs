//! The network in training mode on the tape: batch norm on batch statistics (running stats
//! updated as PyTorch does), dropout in the classifier heads, and the two deep-supervision heads.
//! `Params` is the host master copy of every tensor (PyTorch layout and names); `train_step` runs
//! one forward + loss + backward and returns the gradients in PyTorch layout.
use super::backend::TrainBackend;
use super::loss::{edge_weight, train_loss, EdgeWeight, LossWeights};
use super::tape::{Tape, Var};
use crate::backend::{conv_weight_layout, ConvSpec};
use crate::config::{Config, Downsample, Head};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::weights::{param_specs, ParamKind, ParamSpec, Use, Weights};
use std::collections::HashMap;

/// BN momentum of PyTorch's default.
pub const BN_MOMENTUM: f64 = 0.1;
/// Dropout probability of the classifier heads, as published.
pub const DROPOUT: f32 = 0.1;

/// Every tensor of the model on the host, float32, PyTorch layout, in `param_specs` order.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub cfg: Config,
    pub specs: Vec<ParamSpec>,
    pub data: Vec<Vec<f32>>,
    index: HashMap<String, usize>,
}

/// From the engine layout [k0][k1][k2][cin][cout] back to PyTorch's [cout][cin][k0][k1][k2].
pub fn conv_weight_to_torch(spec: &ConvSpec, engine: &[f32]) -> Vec<f32> {
    let kv = spec.k[0] * spec.k[1] * spec.k[2];
    let (ci, co) = (spec.cin, spec.cout);
    let mut out = vec![0.0f32; engine.len()];
    for o in 0..co {
        for i in 0..ci {
            for t in 0..kv {
                out[(o * ci + i) * kv + t] = engine[(t * ci + i) * co + o];
            }
        }
    }
    out
}

fn spec_of(shape: &[usize], stride: usize) -> ConvSpec {
    let k = [shape[2], shape[3], shape[4]];
    ConvSpec { cin: shape[1], cout: shape[0], k, stride: [stride; 3], pad: k.map(|k| (k - 1) / 2) }
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
                let v = if s.kind == ParamKind::ConvWeight { conv_weight_layout(&spec_of(&s.shape, 1), d) } else { d.clone() };
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

struct Builder<'a, 'r, B: TrainBackend> {
    p: &'a Params,
    tape: Tape<'a, B>,
    bn: Vec<BnStat>,
    dropout: Option<(f32, &'r mut Rng)>,
    /// Eval mode: batch norm on the running statistics, no gradient (validation).
    eval: bool,
}

impl<B: TrainBackend> Builder<'_, '_, B> {
    fn conv(&mut self, name: &str, x: Var, stride: usize) -> Result<Var> {
        let wi = self.p.idx(&format!("{name}.weight"))?;
        let bi = self.p.idx(&format!("{name}.bias")).ok();
        let spec = spec_of(&self.p.specs[wi].shape, stride);
        self.tape.conv(x, wi, bi, spec)
    }

    fn bn(&mut self, name: &str, x: Var) -> Result<Var> {
        if self.eval {
            let g = |s: &str| self.p.get(&format!("{name}.{s}"));
            let (gamma, beta, mean, var) = (g("weight")?, g("bias")?, g("running_mean")?, g("running_var")?);
            let eps = self.p.cfg.bn_eps;
            let scale: Vec<f64> = gamma.iter().zip(var).map(|(&g, &v)| g as f64 / (v as f64 + eps).sqrt()).collect();
            let shift: Vec<f32> = beta.iter().zip(mean).zip(&scale).map(|((&b, &m), &s)| (b as f64 - m as f64 * s) as f32).collect();
            let scale: Vec<f32> = scale.iter().map(|&s| s as f32).collect();
            let b = self.tape.backend();
            let y = b.channel_affine(self.tape.value(x), &b.upload_param(&scale)?, &b.upload_param(&shift)?, false)?;
            return Ok(self.tape.leaf(y));
        }
        let (g, b) = (self.p.idx(&format!("{name}.weight"))?, self.p.idx(&format!("{name}.bias"))?);
        let count = {
            let s = self.tape.value(x).shape;
            s.n * s.voxels()
        };
        let (y, mean, var) = self.tape.batch_norm(x, g, b, self.p.cfg.bn_eps)?;
        self.bn.push(BnStat { name: name.to_string(), mean, var, count });
        Ok(y)
    }

    fn conv_bn(&mut self, name: &str, x: Var, stride: usize, relu: bool) -> Result<Var> {
        let y = self.conv(&format!("{name}.0"), x, stride)?;
        let y = self.bn(&format!("{name}.1"), y)?;
        if relu {
            self.tape.relu(y)
        } else {
            Ok(y)
        }
    }

    fn bottleneck(&mut self, name: &str, x: Var, stride: usize, project: bool) -> Result<Var> {
        let h = self.conv_bn(&format!("{name}.reduce"), x, 1, true)?;
        let h = self.conv_bn(&format!("{name}.conv3"), h, stride, true)?;
        let h = self.conv_bn(&format!("{name}.increase"), h, 1, false)?;
        let s = if project { self.conv_bn(&format!("{name}.proj"), x, stride, false)? } else { x };
        let y = self.tape.add(h, s)?;
        self.tape.relu(y)
    }

    fn gcn(&mut self, name: &str, x: Var) -> Result<Var> {
        let mut l = self.conv(&format!("{name}.conv_l1"), x, 1)?;
        l = self.conv(&format!("{name}.conv_l2"), l, 1)?;
        l = self.conv(&format!("{name}.conv_l3"), l, 1)?;
        let mut r = self.conv(&format!("{name}.conv_r1"), x, 1)?;
        r = self.conv(&format!("{name}.conv_r2"), r, 1)?;
        r = self.conv(&format!("{name}.conv_r3"), r, 1)?;
        self.tape.add(l, r)
    }

    fn decode(&mut self, name: &str, low: Var, skip: Var) -> Result<Var> {
        let size = self.tape.value(skip).shape.d;
        let up = self.tape.upsample(low, size)?;
        let x = self.tape.add(up, skip)?;
        let x = self.conv(&format!("{name}.conv1"), x, 1)?;
        let h = self.conv(&format!("{name}.conv2"), x, 1)?;
        let h = self.tape.relu(h)?;
        let h = self.conv(&format!("{name}.conv3"), h, 1)?;
        self.tape.add(x, h)
    }

    fn classifier(&mut self, name: &str, x: Var) -> Result<Var> {
        let h = self.conv(&format!("{name}.0"), x, 1)?;
        let h = self.bn(&format!("{name}.1"), h)?;
        let mut h = self.tape.relu(h)?;
        if let Some((p, rng)) = self.dropout.as_mut() {
            if *p > 0.0 {
                let shape = self.tape.value(h).shape;
                let keep = 1.0 / (1.0 - *p);
                let mask: Vec<f32> = (0..shape.len()).map(|_| if rng.uniform() < *p as f64 { 0.0 } else { keep }).collect();
                let b = self.tape.backend();
                let mask = b.upload(&Tensor::new(shape, mask)?)?;
                h = self.tape.mul_mask(h, mask)?;
            }
        }
        let h = self.conv(&format!("{name}.4"), h, 1)?;
        self.tape.softmax(h)
    }
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
    graph(b, p, dev, x, dropout, false)
}

/// The eval-mode head output (batch norm on the running statistics, no dropout, no aux heads),
/// as `model::Network` computes it, on any `TrainBackend` (validation during training).
pub fn forward_eval<B: TrainBackend>(b: &B, p: &Params, x: &Tensor) -> Result<Tensor> {
    let dev = p.upload(b)?;
    let f = graph(b, p, &dev, x, None, true)?;
    b.download(f.tape.value(f.out))
}

fn graph<'a, B: TrainBackend>(
    b: &'a B,
    p: &'a Params,
    dev: &'a [Option<B::S>],
    x: &Tensor,
    dropout: Option<(f32, &mut Rng)>,
    eval: bool,
) -> Result<Forward<'a, B>> {
    let cfg = &p.cfg;
    if x.shape.c != 1 {
        return Err(Error::Shape(format!("the network takes 1-channel volumes, got {} channels", x.shape.c)));
    }
    cfg.check_input_size(x.shape.d)?;
    let (off, sc) = (cfg.input_offset, cfg.input_scale);
    let xs = Tensor::new(x.shape, x.data.iter().map(|&v| ((v as f64 - off) / sc) as f32).collect())?;
    let mut g = Builder { p, tape: Tape::new(b, dev), bn: Vec::new(), dropout, eval };
    let x = g.tape.leaf(b.upload(&xs)?);
    let h = g.conv_bn("conv1.conv1", x, 1, true)?;
    let mut fm = vec![g.conv_bn("conv1.conv2", h, 1, true)?];
    let stride = if cfg.downsample == Downsample::Stride { 2 } else { 1 };
    for i in 0..4 {
        let mut cur = if cfg.downsample == Downsample::Maxpool { g.tape.maxpool2(fm[i])? } else { fm[i] };
        for j in 0..cfg.blocks[i] {
            cur = g.bottleneck(&format!("layer{}.blocks.{j}", i + 1), cur, if j == 0 { stride } else { 1 }, j == 0)?;
        }
        fm.push(cur);
    }
    let mut gc = vec![g.conv("gcn1", fm[0], 1)?];
    for i in 0..4 {
        gc.push(g.gcn(&format!("gcn{}", i + 2), fm[i + 1])?);
    }
    let fs4 = g.decode("ConBR4", gc[4], gc[3])?;
    let fs3 = g.decode("ConBR3", fs4, gc[2])?;
    let fs2 = g.decode("ConBR2", fs3, gc[1])?;
    let fs1 = g.decode("ConBR1", fs2, gc[0])?;
    let mut out = g.conv("final.0", fs1, 1)?;
    if cfg.head == Head::Sigmoid {
        out = g.tape.sigmoid(out)?;
    }
    if eval {
        return Ok(Forward { tape: g.tape, out, c3: out, c4: out, bn: g.bn });
    }
    let c3 = g.classifier("classifier3", fs3)?;
    let c4 = g.classifier("classifier4", fs4)?;
    Ok(Forward { tape: g.tape, out, c3, c4, bn: g.bn })
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
                Some(if s.kind == ParamKind::ConvWeight { conv_weight_to_torch(&spec_of(&s.shape, 1), &g) } else { g })
            }
        });
    }
    Ok(Step { loss: lg.loss, main: lg.main, aux: lg.aux, grads, out, c3, c4, weight, bn: f.bn })
}
