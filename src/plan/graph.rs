//! From weights to the plan's steps: the oracle's graph with each fusion of `PlanOptions` applied
//! (or not). Weight algebra (BN folding, 1x1x1 merging) is done in float64.
use super::kernel::{Act, Isa, PackedConv};
use super::{PlanOptions, Step, V};
use crate::backend::{conv_weight_layout, ConvSpec};
use crate::config::{Downsample, Head};
use crate::error::{Error, Result};
use crate::tensor::Shape;
use crate::weights::Weights;

/// A linear convolution: spec, weights in the engine layout [k0][k1][k2][cin][cout], bias.
#[derive(Clone)]
struct Lin {
    spec: ConvSpec,
    w: Vec<f64>,
    b: Option<Vec<f64>>,
}

impl Lin {
    fn without_bias(&self) -> Lin {
        Lin { b: None, ..self.clone() }
    }

    /// The 1x1x1 convolution `self` applied after `a` (no nonlinearity between), as one conv of a's
    /// geometry: w[t][ci][co] = sum_m a.w[t][ci][m] * self.w[m][co]; bias likewise, plus self's
    /// bias when `with_bias`.
    fn after(&self, a: &Lin, with_bias: bool) -> Lin {
        assert!(self.spec.k == [1, 1, 1] && self.spec.stride == [1, 1, 1] && self.spec.cin == a.spec.cout);
        let (m, c) = (a.spec.cout, self.spec.cout);
        let rows = a.w.len() / m;
        let mut w = vec![0.0f64; rows * c];
        for r in 0..rows {
            for k in 0..m {
                let x = a.w[r * m + k];
                for o in 0..c {
                    w[r * c + o] += x * self.w[k * c + o];
                }
            }
        }
        let mut b = vec![0.0f64; c];
        if let Some(ab) = &a.b {
            for k in 0..m {
                for o in 0..c {
                    b[o] += ab[k] * self.w[k * c + o];
                }
            }
        }
        if with_bias {
            if let Some(sb) = &self.b {
                b.iter_mut().zip(sb).for_each(|(b, s)| *b += s);
            }
        }
        Lin { spec: ConvSpec { cout: c, ..a.spec }, w, b: Some(b) }
    }
}

pub(super) struct Builder<'a> {
    w: &'a Weights,
    opt: PlanOptions,
    isa: Isa,
    pub shapes: Vec<Shape>,
    pub steps: Vec<Step>,
    pub convs: Vec<PackedConv>,
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

impl<'a> Builder<'a> {
    pub fn new(w: &'a Weights, opt: PlanOptions, isa: Isa) -> Self {
        Builder { w, opt, isa, shapes: Vec::new(), steps: Vec::new(), convs: Vec::new() }
    }

    pub fn val(&mut self, s: Shape) -> V {
        self.shapes.push(s);
        self.shapes.len() - 1
    }

    fn lin(&self, name: &str, stride: usize, bias: bool) -> Result<Lin> {
        let wname = format!("{name}.weight");
        let shape = self.w.shape(&wname).ok_or_else(|| Error::Weights(format!("{wname} is missing")))?;
        let (cout, cin, k) = (shape[0], shape[1], [shape[2], shape[3], shape[4]]);
        let spec = ConvSpec { cin, cout, k, stride: [stride; 3], pad: k.map(|k| (k - 1) / 2) };
        let w = conv_weight_layout(&spec, &self.w.get(&wname)?).into_iter().map(f64::from).collect();
        let b = if bias { Some(self.w.get(&format!("{name}.bias"))?.into_iter().map(f64::from).collect()) } else { None };
        Ok(Lin { spec, w, b })
    }

    /// Eval-mode batch norm as (scale, shift).
    fn bn(&self, name: &str) -> Result<(Vec<f64>, Vec<f64>)> {
        let g = |s: &str| self.w.get(&format!("{name}.{s}"));
        let (gamma, beta, mean, var) = (g("weight")?, g("bias")?, g("running_mean")?, g("running_var")?);
        let eps = self.w.config.bn_eps;
        let scale: Vec<f64> = gamma.iter().zip(&var).map(|(&g, &v)| g as f64 / (v as f64 + eps).sqrt()).collect();
        let shift = beta.iter().zip(&mean).zip(&scale).map(|((&b, &m), &s)| b as f64 - m as f64 * s).collect();
        Ok((scale, shift))
    }

    fn pack(&mut self, l: &Lin) -> usize {
        let b = l.b.as_ref().map(|b| f32s(b));
        self.convs.push(PackedConv::new(l.spec, &f32s(&l.w), b.as_deref(), self.isa));
        self.convs.len() - 1
    }

    fn out_shape(&self, x: V, spec: &ConvSpec) -> Shape {
        let s = self.shapes[x];
        Shape::new(s.n, spec.out_dims(s.d), spec.cout)
    }

    /// act(conv(x) + bias + res): one step with the epilogue fused, else a bias-free conv and
    /// separate bias / residual / activation steps.
    fn conv(&mut self, x: V, l: &Lin, act: Act, res: Option<V>) -> V {
        let out = self.val(self.out_shape(x, &l.spec));
        if self.opt.fuse_epilogue {
            let conv = self.pack(l);
            self.steps.push(Step::Conv { x, conv, out, res, act });
            return out;
        }
        let conv = self.pack(&l.without_bias());
        self.steps.push(Step::Conv { x, conv, out, res: None, act: Act::None });
        let mut relu_done = false;
        if let Some(b) = &l.b {
            let relu = act == Act::Relu && res.is_none();
            self.steps.push(Step::Affine { x: out, scale: vec![1.0; b.len()], shift: f32s(b), relu });
            relu_done = relu;
        }
        if let Some(r) = res {
            self.steps.push(Step::Add { acc: out, other: r, relu: act == Act::Relu });
            relu_done = act == Act::Relu;
        }
        match act {
            Act::Relu if !relu_done => self.steps.push(Step::Relu { x: out }),
            Act::Sigmoid => self.steps.push(Step::Sigmoid { x: out }),
            _ => {}
        }
        out
    }

    /// act(BN(conv(x)) + res), with BN folded into the conv or as its own step.
    fn conv_bn(&mut self, x: V, name: &str, stride: usize, act: Act, res: Option<V>) -> Result<V> {
        let mut l = self.lin(&format!("{name}.0"), stride, true)?;
        let (scale, shift) = self.bn(&format!("{name}.1"))?;
        if self.opt.fold_bn {
            let cout = l.spec.cout;
            l.w.iter_mut().enumerate().for_each(|(i, w)| *w *= scale[i % cout]);
            let b = l.b.get_or_insert_with(|| vec![0.0; cout]);
            b.iter_mut().zip(scale.iter().zip(&shift)).for_each(|(b, (s, t))| *b = *b * s + t);
            return Ok(self.conv(x, &l, act, res));
        }
        let y = self.conv(x, &l, Act::None, None);
        let relu = act == Act::Relu && res.is_none();
        self.steps.push(Step::Affine { x: y, scale: f32s(&scale), shift: f32s(&shift), relu });
        if let Some(r) = res {
            self.steps.push(Step::Add { acc: y, other: r, relu: act == Act::Relu });
        }
        Ok(y)
    }

    fn bottleneck(&mut self, x: V, p: &str, stride: usize, project: bool) -> Result<V> {
        let h = self.conv_bn(x, &format!("{p}.reduce"), 1, Act::Relu, None)?;
        let h = self.conv_bn(h, &format!("{p}.conv3"), stride, Act::Relu, None)?;
        let res = if project { self.conv_bn(x, &format!("{p}.proj"), stride, Act::None, None)? } else { x };
        self.conv_bn(h, &format!("{p}.increase"), 1, Act::Relu, Some(res))
    }

    /// b(a(x)) for two in-plane convs: fused plane by plane, or as two convs.
    fn chain(&mut self, x: V, a: &Lin, b: &Lin) -> V {
        if self.opt.fuse_gcn_planes {
            let mid = self.out_shape(x, &a.spec);
            let out = self.val(Shape::new(mid.n, b.spec.out_dims(mid.d), b.spec.cout));
            let (a, b) = (self.pack(a), self.pack(b));
            self.steps.push(Step::Pair { x, a, b, out });
            out
        } else {
            let h = self.conv(x, a, Act::None, None);
            self.conv(h, b, Act::None, None)
        }
    }

    /// GCN `gcn{i}` on x; `post` is a 1x1x1 conv applied to its output (with or without its bias),
    /// merged into the last convs of both branches when `merge_1x1`.
    fn gcn(&mut self, x: V, i: usize, post: Option<(Lin, bool)>) -> Result<V> {
        let c = |n: &str| self.lin(&format!("gcn{i}.conv_{n}"), 1, true);
        let (l1, l2, mut l3, r1, r2, mut r3) = (c("l1")?, c("l2")?, c("l3")?, c("r1")?, c("r2")?, c("r3")?);
        let mut after = None;
        match post {
            Some((p, with_bias)) if self.opt.merge_1x1 => {
                l3 = p.after(&l3, with_bias);
                r3 = p.after(&r3, false);
            }
            p => after = p,
        }
        let a = self.conv(x, &l1, Act::None, None);
        let l = self.chain(a, &l2, &l3);
        let r = self.chain(x, &r1, &r2);
        let mut y = self.conv(r, &r3, Act::None, Some(l));
        if let Some((p, with_bias)) = after {
            let p = if with_bias { p } else { p.without_bias() };
            y = self.conv(y, &p, Act::None, None);
        }
        Ok(y)
    }

    /// The whole network for one volume of size `d`; returns (input value, output value).
    pub fn network(&mut self, d: [usize; 3]) -> Result<(V, V)> {
        let cfg = self.w.config.clone();
        let input = self.val(Shape::new(1, d, 1));
        if cfg.input_offset != 0.0 || cfg.input_scale != 1.0 {
            let s = 1.0 / cfg.input_scale;
            self.steps.push(Step::Affine { x: input, scale: vec![s as f32], shift: vec![(-cfg.input_offset * s) as f32], relu: false });
        }
        let h = self.conv_bn(input, "conv1.conv1", 1, Act::Relu, None)?;
        let mut fm = self.conv_bn(h, "conv1.conv2", 1, Act::Relu, None)?;
        let mv = self.opt.move_conv1_low;
        let c1 = |b: &Self, i: usize| b.lin(&format!("ConBR{i}.conv1"), 1, true);

        // skips[l]: the decoder's input at level l (after ConBR{l+1}.conv1 when it was moved there)
        let gcn1 = self.lin("gcn1", 1, true)?;
        let mut skips = vec![if !mv {
            self.conv(fm, &gcn1, Act::None, None)
        } else if self.opt.merge_1x1 {
            let m = c1(self, 1)?.after(&gcn1, true);
            self.conv(fm, &m, Act::None, None)
        } else {
            let g = self.conv(fm, &gcn1, Act::None, None);
            let p = c1(self, 1)?;
            self.conv(g, &p, Act::None, None)
        }];
        let stride = if cfg.downsample == Downsample::Stride { 2 } else { 1 };
        for i in 0..4 {
            let mut x = fm;
            if cfg.downsample == Downsample::Maxpool {
                let s = self.shapes[fm];
                let out = self.val(s.with_d(s.d.map(|v| v / 2)));
                self.steps.push(Step::MaxPool { x: fm, out });
                x = out;
            }
            for j in 0..cfg.blocks[i] {
                let s = if j == 0 { stride } else { 1 };
                x = self.bottleneck(x, &format!("layer{}.blocks.{j}", i + 1), s, j == 0)?;
            }
            fm = x;
            // gcn{i+2}'s output is the skip of ConBR{i+2}, or (gcn5) the low side of ConBR4
            let post = if !mv {
                None
            } else if i < 3 {
                Some((c1(self, i + 2)?, true))
            } else {
                Some((c1(self, 4)?, false))
            };
            let g = self.gcn(fm, i + 2, post)?;
            skips.push(g);
        }
        let mut low = skips[4];
        for lvl in (0..4).rev() {
            let name = format!("ConBR{}", lvl + 1);
            let t = skips[lvl];
            if mv {
                // conv1(up(a) + b) = up(conv1_nobias(a)) + conv1(b): conv1(b) is already in the skip
                let a = if lvl == 3 { low } else { self.conv(low, &c1(self, lvl + 1)?.without_bias(), Act::None, None) };
                self.steps.push(Step::UpAdd { acc: t, low: a });
            } else {
                self.steps.push(Step::UpAdd { acc: t, low });
            }
            let t = if mv { t } else { self.conv(t, &c1(self, lvl + 1)?, Act::None, None) };
            let c2 = self.lin(&format!("{name}.conv2"), 1, true)?;
            let c3 = self.lin(&format!("{name}.conv3"), 1, true)?;
            let h = self.conv(t, &c2, Act::Relu, None);
            low = self.conv(h, &c3, Act::None, Some(t));
        }
        let fin = self.lin("final.0", 1, true)?;
        let act = if cfg.head == Head::Sigmoid { Act::Sigmoid } else { Act::None };
        let out = self.conv(low, &fin, act, None);
        Ok((input, out))
    }
}
