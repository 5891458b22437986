//! The published training objective on the host, in float64 (the oracle's `train_loss`,
//! `edge_weight` and `aux_labels`): the values and their gradients with respect to the head
//! output and the two deep-supervision heads, which seed the tape's backward pass.
//! Tensors are channels-last; the heads are small enough that the host does this in milliseconds.
use crate::config::{Config, Head};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Parameters of the published FocalLoss3d_ver1 weight map.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EdgeWeight {
    pub pw: f64,
    pub threshold: f64,
    pub erode: usize,
    pub backzero: bool,
}

impl EdgeWeight {
    /// The training loss's map: the published trainer's FocalLoss3d_ver1(backzero=1), pw = 10.
    pub const TRAIN: EdgeWeight = EdgeWeight { pw: 10.0, threshold: 1.0, erode: 3, backzero: true };
    /// The validation metric's map: FocalLoss3d_ver1(pw=1, backzero=1), as the published trainer validates.
    pub const VALIDATION: EdgeWeight = EdgeWeight { pw: 1.0, ..EdgeWeight::TRAIN };
}

/// Weights of (head term, CE(classifier3), CE(classifier4)) in the total loss.
pub type LossWeights = [f64; 3];

/// The published trainer's loss weights by epoch (0-based, the epoch being trained): the oracle's
/// `LOSS_SCHEDULE`, (first epoch at which the next entry starts, weights).
pub const LOSS_SCHEDULE: [(usize, LossWeights); 4] =
    [(50, [0.2, 0.4, 0.4]), (100, [0.4, 0.3, 0.3]), (150, [0.6, 0.2, 0.2]), (usize::MAX, [0.8, 0.1, 0.1])];

/// The loss weights of `epoch` (the oracle's `loss_weights`).
pub fn loss_weights(epoch: usize) -> LossWeights {
    LOSS_SCHEDULE.iter().find(|(below, _)| epoch < *below).map_or(LOSS_SCHEDULE[3].1, |e| e.1)
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

/// Trilinear resize with align_corners=True of one-channel volumes (n x d, row-major) to `size`,
/// in float64 and in the order of PyTorch's CPU kernel (outermost axis first, weights 1 - l and l),
/// so that values landing exactly on the label thresholds fall on the same side as in the oracle.
fn resize_trilinear(v: &[f64], n: usize, d: [usize; 3], size: [usize; 3]) -> Vec<f64> {
    // per axis and output index: (low index, high index, weight of low, weight of high)
    let taps = |i: usize| -> Vec<(usize, usize, f64, f64)> {
        let (inp, out) = (d[i], size[i]);
        let scale = if out > 1 { (inp - 1) as f64 / (out - 1) as f64 } else { 0.0 };
        (0..out)
            .map(|o| {
                let src = scale * o as f64;
                let lo = (src as usize).min(inp - 1);
                let l = (src - lo as f64).clamp(0.0, 1.0);
                (lo, lo + (lo < inp - 1) as usize, 1.0 - l, l)
            })
            .collect()
    };
    let (t0, t1, t2) = (taps(0), taps(1), taps(2));
    let at = |b: usize, x: usize, y: usize, z: usize| v[b + (x * d[1] + y) * d[2] + z];
    let mut out = Vec::with_capacity(n * size.iter().product::<usize>());
    for b in (0..n).map(|k| k * d.iter().product::<usize>()) {
        for &(x0, x1, wx0, wx1) in &t0 {
            for &(y0, y1, wy0, wy1) in &t1 {
                for &(z0, z1, wz0, wz1) in &t2 {
                    let line = |x: usize, y: usize| at(b, x, y, z0) * wz0 + at(b, x, y, z1) * wz1;
                    let plane = |x: usize| line(x, y0) * wy0 + line(x, y1) * wy1;
                    out.push(plane(x0) * wx0 + plane(x1) * wx1);
                }
            }
        }
    }
    out
}

/// 3-class labels (0 background/IS, 1 effector, 2 target) of a deep-supervision head of spatial
/// size `size`, as the published trainer's interTarget: +1 on the effector (distance > 0.1, or
/// mask 0 > 0.5), -1 on the target (distance < -0.1, or mask 1 > 0.5 outside the effector), that
/// field resized trilinearly (align_corners=True) to the head's size, then 1 where > 0.25 and 2
/// where < -0.25. Returns dims [N, size...] and the labels, row-major.
pub fn aux_labels(target: &Tensor, head: Head, size: [usize; 3]) -> (Vec<usize>, Vec<u8>) {
    let s = target.shape;
    let c = s.c;
    let field: Vec<f64> = target
        .data
        .chunks_exact(c)
        .map(|t| match head {
            Head::Distance => (t[0] > 0.1) as i32 as f64 - (t[0] < -0.1) as i32 as f64,
            Head::Sigmoid => {
                let eff = t[0] > 0.5;
                eff as i32 as f64 - (!eff && c > 1 && t[1] > 0.5) as i32 as f64
            }
        })
        .collect();
    let r = resize_trilinear(&field, s.n, s.d, size);
    let labels = r.iter().map(|&v| if v > 0.25 { 1 } else if v < -0.25 { 2 } else { 0 }).collect();
    (vec![s.n, size[0], size[1], size[2]], labels)
}

/// Cross-entropy of a head's softmax probabilities `p` (N x d x 3, channels-last) taken as logits
/// (nn.CrossEntropyLoss on probabilities, as published), against labels of dims `ld` (the
/// head's). Returns the mean loss and d loss / d p.
pub fn ce_on_probs(p: &Tensor, ld: &[usize], labels: &[u8]) -> Result<(f64, Tensor)> {
    let s = p.shape;
    if ld[0] != s.n || (0..3).any(|i| ld[i + 1] != s.d[i]) {
        return Err(Error::Shape(format!("aux labels {ld:?} do not match the head {}", s)));
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
    /// weights[0] x main + weights[1] x ce3 + weights[2] x ce4.
    pub loss: f64,
    /// The head term (weighted L1, or BCE + soft Dice).
    pub main: f64,
    /// CE(c3) + CE(c4), unweighted.
    pub aux: f64,
    pub ce3: f64,
    pub ce4: f64,
    pub d_out: Tensor,
    pub d_c3: Tensor,
    pub d_c4: Tensor,
}

/// The head term of the loss and its gradient with respect to the head output: distance head
/// mean(weight x |out - target|), sigmoid head BCE + mean(1 - soft Dice). Training and validation
/// both use it (validation with `EdgeWeight::VALIDATION`'s map).
pub fn head_loss(cfg: &Config, out: &Tensor, target: &Tensor, weight: Option<&Tensor>) -> Result<(f64, Tensor)> {
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
        Head::Sigmoid => bce_dice(out, target, &mut d_out),
    };
    Ok((main, Tensor::new(out.shape, d_out)?))
}

/// BCE + mean over (volume, channel) of 1 - soft Dice; adds its gradient into `d_out`.
fn bce_dice(out: &Tensor, target: &Tensor, d_out: &mut [f32]) -> f64 {
    let numel = out.data.len() as f64;
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

/// The oracle's `train_loss` given the head output `out`, the heads `c3`, `c4` (probabilities),
/// the target, for distance heads the weight map, and the loss weights (`loss_weights(epoch)`).
pub fn train_loss(cfg: &Config, out: &Tensor, c3: &Tensor, c4: &Tensor, target: &Tensor, weight: Option<&Tensor>, lw: LossWeights) -> Result<LossGrads> {
    let (main, d_out) = head_loss(cfg, out, target, weight)?;
    let (l3d, l3) = aux_labels(target, cfg.head, c3.shape.d);
    let (l4d, l4) = aux_labels(target, cfg.head, c4.shape.d);
    let (ce3, d_c3) = ce_on_probs(c3, &l3d, &l3)?;
    let (ce4, d_c4) = ce_on_probs(c4, &l4d, &l4)?;
    let scale = |t: Tensor, k: f64| Tensor::new(t.shape, t.data.iter().map(|&g| (g as f64 * k) as f32).collect());
    Ok(LossGrads {
        loss: lw[0] * main + lw[1] * ce3 + lw[2] * ce4,
        main,
        aux: ce3 + ce4,
        ce3,
        ce4,
        d_out: scale(d_out, lw[0])?,
        d_c3: scale(d_c3, lw[1])?,
        d_c4: scale(d_c4, lw[2])?,
    })
}
