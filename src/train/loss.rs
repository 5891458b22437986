//! The published training objective on the host, in float64 (the oracle's `train_loss`,
//! `edge_weight` and `aux_labels`): the values and their gradients with respect to the head
//! output and the two deep-supervision heads, which seed the tape's backward pass.
//! Tensors are channels-last; the heads are small enough that the host does this in milliseconds.
use crate::config::{Config, Head};
use crate::error::{Error, Result};
use crate::tensor::{Shape, Tensor};

/// Parameters of the published FocalLoss3d_ver1 weight map (the oracle's defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EdgeWeight {
    pub pw: f64,
    pub threshold: f64,
    pub erode: usize,
    pub backzero: bool,
}

impl Default for EdgeWeight {
    fn default() -> Self {
        EdgeWeight { pw: 1.0, threshold: 1.0, erode: 3, backzero: true }
    }
}

/// Any-of over a window of radius r along one axis of an n x a x b x c boolean volume (axis 0..3).
fn dilate_axis(v: &[bool], d: [usize; 3], n: usize, axis: usize, r: usize) -> Vec<bool> {
    let strides = [d[1] * d[2], d[2], 1];
    let st = strides[axis];
    let len = d[axis];
    let mut out = vec![false; v.len()];
    let vol = d[0] * d[1] * d[2];
    for (base, o) in out.iter_mut().enumerate().take(n * vol) {
        let pos = (base % vol) / st % len;
        let lo = pos.saturating_sub(r);
        let hi = (pos + r).min(len - 1);
        let start = base - pos * st;
        *o = (lo..=hi).any(|j| v[start + j * st]);
    }
    out
}

/// The edge weight map of a distance head: 1 + pw within `erode` voxels (a box) of a voxel with
/// 0 < target < threshold, and 0 where the target is background and the prediction negative.
pub fn edge_weight(pred: &Tensor, target: &Tensor, p: EdgeWeight) -> Result<Tensor> {
    if pred.shape != target.shape || target.shape.c != 1 {
        return Err(Error::Shape(format!("edge_weight: prediction {} and target {} must be one-channel and equal", pred.shape, target.shape)));
    }
    let s = target.shape;
    let thr = p.threshold;
    let seed: Vec<bool> = target
        .data
        .iter()
        .map(|&t| {
            let w = (t as f64).clamp(0.0, thr);
            let w = if w == thr { w - thr } else { w };
            w > 0.0
        })
        .collect();
    let mut m = seed;
    if p.erode > 0 {
        for axis in 0..3 {
            m = dilate_axis(&m, s.d, s.n, axis, p.erode);
        }
    }
    let data = m
        .iter()
        .zip(&pred.data)
        .zip(&target.data)
        .map(|((&e, &y), &t)| {
            let w = 1.0 + if e { p.pw } else { 0.0 };
            let w = if p.backzero && y < 0.0 && t == 0.0 { 0.0 } else { w };
            w as f32
        })
        .collect();
    Tensor::new(s, data)
}

/// 3-class labels (0 background/IS, 1 effector, 2 target) of every `factor`-th voxel from index 0:
/// dims [N, ceil(D0/f), ceil(D1/f), ceil(D2/f)], row-major.
pub fn aux_labels(target: &Tensor, head: Head, factor: usize) -> (Vec<usize>, Vec<u8>) {
    let s = target.shape;
    let c = s.c;
    let sub = s.d.map(|d| d.div_ceil(factor));
    let mut out = Vec::with_capacity(s.n * sub[0] * sub[1] * sub[2]);
    for n in 0..s.n {
        for a in 0..sub[0] {
            for b in 0..sub[1] {
                for e in 0..sub[2] {
                    let i = target.idx(n, [a * factor, b * factor, e * factor], 0);
                    let t0 = target.data[i];
                    let l = match head {
                        Head::Distance => {
                            if t0 > 0.1 {
                                1
                            } else if t0 < -0.1 {
                                2
                            } else {
                                0
                            }
                        }
                        Head::Sigmoid => {
                            let t1 = if c > 1 { target.data[i + 1] } else { 0.0 };
                            if t0 > 0.5 {
                                1
                            } else if t1 > 0.5 {
                                2
                            } else {
                                0
                            }
                        }
                    };
                    out.push(l);
                }
            }
        }
    }
    (vec![s.n, sub[0], sub[1], sub[2]], out)
}

/// Cross-entropy of a head's softmax probabilities `p` (N x d x 3, channels-last) taken as logits
/// (nn.CrossEntropyLoss on probabilities, as published), against labels of dims `ld` cropped to
/// the head's size. Returns the mean loss and d loss / d p.
pub fn ce_on_probs(p: &Tensor, ld: &[usize], labels: &[u8]) -> Result<(f64, Tensor)> {
    let s = p.shape;
    if ld[0] != s.n || (0..3).any(|i| ld[i + 1] < s.d[i]) {
        return Err(Error::Shape(format!("aux labels {ld:?} are smaller than the head {}", s)));
    }
    let c = s.c;
    let m = (s.n * s.voxels()) as f64;
    let mut loss = 0.0f64;
    let mut g = vec![0.0f32; p.data.len()];
    for n in 0..s.n {
        for a in 0..s.d[0] {
            for b in 0..s.d[1] {
                for e in 0..s.d[2] {
                    let lab = labels[((n * ld[1] + a) * ld[2] + b) * ld[3] + e] as usize;
                    let i = p.idx(n, [a, b, e], 0);
                    let v = &p.data[i..i + c];
                    let mx = v.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
                    let se: f64 = v.iter().map(|&x| (x as f64 - mx).exp()).sum();
                    let lse = mx + se.ln();
                    loss -= v[lab] as f64 - lse;
                    for k in 0..c {
                        let sm = (v[k] as f64 - lse).exp();
                        g[i + k] = ((sm - if k == lab { 1.0 } else { 0.0 }) / m) as f32;
                    }
                }
            }
        }
    }
    Ok((loss / m, Tensor::new(s, g)?))
}

/// The loss terms and the gradients that seed the backward pass.
pub struct LossGrads {
    pub loss: f64,
    /// The head term (weighted L1, or BCE + soft Dice).
    pub main: f64,
    /// CE(c3) + CE(c4), before the 0.5 factor.
    pub aux: f64,
    pub d_out: Tensor,
    pub d_c3: Tensor,
    pub d_c4: Tensor,
}

/// Weight of the deep-supervision term, as published.
pub const AUX_WEIGHT: f64 = 0.5;

/// The oracle's `train_loss` given the head output `out`, the heads `c3`, `c4` (probabilities),
/// the target and, for distance heads, the weight map.
pub fn train_loss(cfg: &Config, out: &Tensor, c3: &Tensor, c4: &Tensor, target: &Tensor, weight: Option<&Tensor>) -> Result<LossGrads> {
    if out.shape != target.shape {
        return Err(Error::Shape(format!("the target {} does not match the head output {}", target.shape, out.shape)));
    }
    let numel = out.data.len() as f64;
    let mut d_out = vec![0.0f32; out.data.len()];
    let main = match cfg.head {
        Head::Distance => {
            let w = weight.ok_or_else(|| Error::Other("a distance head needs a weight map".into()))?;
            if w.shape != out.shape {
                return Err(Error::Shape(format!("the weight map {} does not match the head output {}", w.shape, out.shape)));
            }
            let mut l = 0.0f64;
            for (i, ((&y, &t), &wv)) in out.data.iter().zip(&target.data).zip(&w.data).enumerate() {
                let d = y as f64 - t as f64;
                l += wv as f64 * d.abs();
                let sign = if d > 0.0 { 1.0 } else if d < 0.0 { -1.0 } else { 0.0 };
                d_out[i] = (wv as f64 * sign / numel) as f32;
            }
            l / numel
        }
        Head::Sigmoid => {
            let mut bce = 0.0f64;
            for (i, (&o, &t)) in out.data.iter().zip(&target.data).enumerate() {
                let (o, t) = (o as f64, t as f64);
                bce -= t * o.ln().max(-100.0) + (1.0 - t) * (1.0 - o).ln().max(-100.0);
                d_out[i] = ((o - t) / ((1.0 - o) * o).max(1e-12) / numel) as f32;
            }
            bce /= numel;
            let s = out.shape;
            let (nc, v) = ((s.n * s.c) as f64, s.voxels());
            let mut dice_loss = 0.0f64;
            for n in 0..s.n {
                for ch in 0..s.c {
                    let (mut ot, mut so, mut st) = (0.0f64, 0.0f64, 0.0f64);
                    for p in 0..v {
                        let i = (n * v + p) * s.c + ch;
                        let (o, t) = (out.data[i] as f64, target.data[i] as f64);
                        ot += o * t;
                        so += o;
                        st += t;
                    }
                    let (num, den) = (2.0 * ot + 1.0, so + st + 1.0);
                    dice_loss += (1.0 - num / den) / nc;
                    for p in 0..v {
                        let i = (n * v + p) * s.c + ch;
                        let t = target.data[i] as f64;
                        let dd = (2.0 * t * den - num) / (den * den);
                        d_out[i] = (d_out[i] as f64 - dd / nc) as f32;
                    }
                }
            }
            bce + dice_loss
        }
    };
    let (l3d, l3) = aux_labels(target, cfg.head, 4);
    let (l4d, l4) = aux_labels(target, cfg.head, 8);
    let (ce3, d_c3) = ce_on_probs(c3, &l3d, &l3)?;
    let (ce4, d_c4) = ce_on_probs(c4, &l4d, &l4)?;
    let aux = ce3 + ce4;
    let d_c3 = Tensor::new(d_c3.shape, d_c3.data.iter().map(|&g| (g as f64 * AUX_WEIGHT) as f32).collect())?;
    let d_c4 = Tensor::new(d_c4.shape, d_c4.data.iter().map(|&g| (g as f64 * AUX_WEIGHT) as f32).collect())?;
    Ok(LossGrads { loss: main + AUX_WEIGHT * aux, main, aux, d_out: Tensor::new(out.shape, d_out)?, d_c3, d_c4 })
}

/// Shape helper for callers building targets: the head output shape of a batch.
pub fn head_shape(cfg: &Config, n: usize, d: [usize; 3]) -> Shape {
    Shape::new(n, d, cfg.head_channels())
}
