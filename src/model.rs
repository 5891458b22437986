//! The DeepIS graph (Unet3D_glob of the oracle) over any `Backend`: built once from validated
//! weights (batch norm turned into a per-channel scale and shift), run on batches of volumes.
//! Module names follow the oracle, so every intermediate can be compared with its activations.
use crate::backend::{conv_weight_layout, Backend, ConvSpec, DevTensor};
use crate::config::{Config, Downsample, Head};
use crate::error::{Error, Result};
use crate::tensor::{Shape, Tensor};
use crate::weights::Weights;

/// Called with (module path, output) for every module the oracle names, when asked for.
pub type Hook<'a, S> = &'a mut dyn FnMut(&str, &DevTensor<S>) -> Result<()>;

struct Conv<S> {
    spec: ConvSpec,
    w: S,
    b: Option<S>,
}

/// Eval-mode batch norm as y = x * scale + shift.
struct Bn<S> {
    scale: S,
    shift: S,
}

struct ConvBn<S> {
    conv: Conv<S>,
    bn: Bn<S>,
}

struct Bottleneck<S> {
    reduce: ConvBn<S>,
    conv3: ConvBn<S>,
    increase: ConvBn<S>,
    proj: Option<ConvBn<S>>,
}

struct Gcn<S> {
    l: [Conv<S>; 3],
    r: [Conv<S>; 3],
}

struct ConBr<S> {
    c1: Conv<S>,
    c2: Conv<S>,
    c3: Conv<S>,
}

pub struct Network<B: Backend> {
    backend: B,
    cfg: Config,
    /// (input - offset) / scale as a channel affine, when it is not the identity.
    input: Option<Bn<B::S>>,
    stem: [ConvBn<B::S>; 2],
    layers: Vec<Vec<Bottleneck<B::S>>>,
    gcn1: Conv<B::S>,
    gcn: Vec<Gcn<B::S>>,
    /// ConBR1..ConBR4 (index 0 = ConBR1).
    conbr: Vec<ConBr<B::S>>,
    fin: Conv<B::S>,
}

struct Loader<'a, B: Backend> {
    backend: &'a B,
    w: &'a Weights,
}

impl<B: Backend> Loader<'_, B> {
    fn conv(&self, name: &str, stride: usize, bias: bool) -> Result<Conv<B::S>> {
        let shape = self.w.shape(&format!("{name}.weight")).ok_or_else(|| Error::Weights(format!("{name}.weight is missing")))?;
        let (cout, cin, k) = (shape[0], shape[1], [shape[2], shape[3], shape[4]]);
        let spec = ConvSpec { cin, cout, k, stride: [stride; 3], pad: k.map(|k| (k - 1) / 2) };
        let w = conv_weight_layout(&spec, &self.w.get(&format!("{name}.weight"))?);
        let b = if bias { Some(self.backend.upload_param(&self.w.get(&format!("{name}.bias"))?)?) } else { None };
        Ok(Conv { spec, w: self.backend.upload_param(&w)?, b })
    }

    fn bn(&self, name: &str) -> Result<Bn<B::S>> {
        let g = |s: &str| self.w.get(&format!("{name}.{s}"));
        let (gamma, beta, mean, var) = (g("weight")?, g("bias")?, g("running_mean")?, g("running_var")?);
        let eps = self.w.config.bn_eps;
        let scale: Vec<f64> = gamma.iter().zip(&var).map(|(&g, &v)| g as f64 / (v as f64 + eps).sqrt()).collect();
        let shift: Vec<f32> = beta.iter().zip(&mean).zip(&scale).map(|((&b, &m), &s)| (b as f64 - m as f64 * s) as f32).collect();
        let scale: Vec<f32> = scale.iter().map(|&s| s as f32).collect();
        Ok(Bn { scale: self.backend.upload_param(&scale)?, shift: self.backend.upload_param(&shift)? })
    }

    fn conv_bn(&self, name: &str, stride: usize) -> Result<ConvBn<B::S>> {
        Ok(ConvBn { conv: self.conv(&format!("{name}.0"), stride, true)?, bn: self.bn(&format!("{name}.1"))? })
    }
}

impl<B: Backend> Network<B> {
    /// Uploads the inference tensors of `weights` to `backend` (weights were validated on load).
    pub fn new(backend: B, weights: &Weights) -> Result<Self> {
        let cfg = weights.config.clone();
        let ld = Loader { backend: &backend, w: weights };
        let stride = if cfg.downsample == Downsample::Stride { 2 } else { 1 };
        let input = if cfg.input_offset != 0.0 || cfg.input_scale != 1.0 {
            let s = 1.0 / cfg.input_scale;
            Some(Bn {
                scale: backend.upload_param(&[s as f32])?,
                shift: backend.upload_param(&[(-cfg.input_offset * s) as f32])?,
            })
        } else {
            None
        };
        let stem = [ld.conv_bn("conv1.conv1", 1)?, ld.conv_bn("conv1.conv2", 1)?];
        let mut layers = Vec::new();
        for i in 0..4 {
            let mut blocks = Vec::new();
            for j in 0..cfg.blocks[i] {
                let p = format!("layer{}.blocks.{j}", i + 1);
                let s = if j == 0 { stride } else { 1 };
                blocks.push(Bottleneck {
                    reduce: ld.conv_bn(&format!("{p}.reduce"), 1)?,
                    conv3: ld.conv_bn(&format!("{p}.conv3"), s)?,
                    increase: ld.conv_bn(&format!("{p}.increase"), 1)?,
                    proj: if j == 0 { Some(ld.conv_bn(&format!("{p}.proj"), s)?) } else { None },
                });
            }
            layers.push(blocks);
        }
        let gcn1 = ld.conv("gcn1", 1, true)?;
        let mut gcn = Vec::new();
        for i in 2..=5 {
            let c = |n: &str| ld.conv(&format!("gcn{i}.conv_{n}"), 1, true);
            gcn.push(Gcn { l: [c("l1")?, c("l2")?, c("l3")?], r: [c("r1")?, c("r2")?, c("r3")?] });
        }
        let mut conbr = Vec::new();
        for i in 1..=4 {
            let c = |n: &str| ld.conv(&format!("ConBR{i}.{n}"), 1, true);
            conbr.push(ConBr { c1: c("conv1")?, c2: c("conv2")?, c3: c("conv3")? });
        }
        let fin = ld.conv("final.0", 1, true)?;
        Ok(Network { backend, cfg, input, stem, layers, gcn1, gcn, conbr, fin })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Runs N volumes (channels-last N x D0 x D1 x D2 x 1, raw values) to the head output
    /// (N x D0 x D1 x D2 x C: a signed distance map, or sigmoid probabilities).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_hooked(x, None)?;
        crate::finite::checked(self, x, y)
    }

    /// `forward`, calling `hook` with every module's output (oracle module paths).
    pub fn forward_hooked(&self, x: &Tensor, hook: Option<Hook<'_, B::S>>) -> Result<Tensor> {
        if x.shape.c != 1 {
            return Err(Error::Shape(format!("the network takes 1-channel volumes, got {} channels", x.shape.c)));
        }
        self.cfg.check_input_size(x.shape.d)?;
        let mut run = Run { b: &self.backend, hook };
        let out = run.graph(self, x)?;
        self.backend.download(&out)
    }
}

/// One forward pass: the backend and the optional hook.
struct Run<'h, 'b, B: Backend> {
    b: &'b B,
    hook: Option<Hook<'h, B::S>>,
}

type T<B> = DevTensor<<B as Backend>::S>;

impl<B: Backend> Run<'_, '_, B> {
    fn emit(&mut self, name: &str, t: &T<B>) -> Result<()> {
        match self.hook.as_mut() {
            Some(h) => h(name, t),
            None => Ok(()),
        }
    }

    fn conv(&mut self, name: &str, c: &Conv<B::S>, x: &T<B>) -> Result<T<B>> {
        let y = self.b.conv3d(x, &c.w, c.b.as_ref(), &c.spec)?;
        self.emit(name, &y)?;
        Ok(y)
    }

    /// Sequential(conv, BN[, ReLU]) named `name.0`, `name.1`, `name.2`, and `name`.
    fn conv_bn(&mut self, name: &str, c: &ConvBn<B::S>, x: &T<B>, relu: bool) -> Result<T<B>> {
        let y = self.conv(&format!("{name}.0"), &c.conv, x)?;
        let y = if self.hook.is_some() {
            // Unfused, so that BN and ReLU outputs can be compared separately.
            let z = self.b.channel_affine(&y, &c.bn.scale, &c.bn.shift, false)?;
            self.emit(&format!("{name}.1"), &z)?;
            if relu {
                let r = self.b.relu(&z)?;
                self.emit(&format!("{name}.2"), &r)?;
                r
            } else {
                z
            }
        } else {
            self.b.channel_affine(&y, &c.bn.scale, &c.bn.shift, relu)?
        };
        self.emit(name, &y)?;
        Ok(y)
    }

    fn bottleneck(&mut self, name: &str, bl: &Bottleneck<B::S>, x: &T<B>) -> Result<T<B>> {
        let h = self.conv_bn(&format!("{name}.reduce"), &bl.reduce, x, true)?;
        let h = self.conv_bn(&format!("{name}.conv3"), &bl.conv3, &h, true)?;
        let h = self.conv_bn(&format!("{name}.increase"), &bl.increase, &h, false)?;
        let y = match &bl.proj {
            Some(p) => {
                let s = self.conv_bn(&format!("{name}.proj"), p, x, false)?;
                self.b.add(&h, &s, true)?
            }
            None => self.b.add(&h, x, true)?,
        };
        self.emit(name, &y)?;
        Ok(y)
    }

    fn gcn(&mut self, name: &str, g: &Gcn<B::S>, x: &T<B>) -> Result<T<B>> {
        let mut l = self.conv(&format!("{name}.conv_l1"), &g.l[0], x)?;
        l = self.conv(&format!("{name}.conv_l2"), &g.l[1], &l)?;
        l = self.conv(&format!("{name}.conv_l3"), &g.l[2], &l)?;
        let mut r = self.conv(&format!("{name}.conv_r1"), &g.r[0], x)?;
        r = self.conv(&format!("{name}.conv_r2"), &g.r[1], &r)?;
        r = self.conv(&format!("{name}.conv_r3"), &g.r[2], &r)?;
        let y = self.b.add(&l, &r, false)?;
        self.emit(name, &y)?;
        Ok(y)
    }

    /// ConBR(up(low -> size of skip) + skip).
    fn decode(&mut self, name: &str, c: &ConBr<B::S>, low: &T<B>, skip: &T<B>) -> Result<T<B>> {
        let up = self.b.upsample(low, skip.shape.d)?;
        let x = self.b.add(&up, skip, false)?;
        let x = self.conv(&format!("{name}.conv1"), &c.c1, &x)?;
        let h = self.conv(&format!("{name}.conv2"), &c.c2, &x)?;
        let h = self.b.relu(&h)?;
        let h = self.conv(&format!("{name}.conv3"), &c.c3, &h)?;
        let y = self.b.add(&x, &h, false)?;
        self.emit(name, &y)?;
        Ok(y)
    }

    fn graph(&mut self, net: &Network<B>, input: &Tensor) -> Result<T<B>> {
        let mut x = self.b.upload(input)?;
        if let Some(s) = &net.input {
            x = self.b.channel_affine(&x, &s.scale, &s.shift, false)?;
        }
        let h = self.conv_bn("conv1.conv1", &net.stem[0], &x, true)?;
        let f0 = self.conv_bn("conv1.conv2", &net.stem[1], &h, true)?;
        self.emit("conv1", &f0)?;
        let mut fm = vec![f0];
        for (i, blocks) in net.layers.iter().enumerate() {
            let pooled = if net.cfg.downsample == Downsample::Maxpool { Some(self.b.maxpool2(&fm[i])?) } else { None };
            let mut cur: Option<T<B>> = None;
            for (j, bl) in blocks.iter().enumerate() {
                let input = cur.as_ref().or(pooled.as_ref()).unwrap_or(&fm[i]);
                cur = Some(self.bottleneck(&format!("layer{}.blocks.{j}", i + 1), bl, input)?);
            }
            let out = cur.ok_or_else(|| Error::Config(format!("layer{} has no blocks", i + 1)))?;
            self.emit(&format!("layer{}.blocks", i + 1), &out)?;
            self.emit(&format!("layer{}", i + 1), &out)?;
            fm.push(out);
        }
        let mut gc = vec![self.conv("gcn1", &net.gcn1, &fm[0])?];
        for (i, g) in net.gcn.iter().enumerate() {
            gc.push(self.gcn(&format!("gcn{}", i + 2), g, &fm[i + 1])?);
        }
        drop(fm);
        let mut fs = gc.pop().expect("gc5");
        for lvl in (0..4).rev() {
            fs = self.decode(&format!("ConBR{}", lvl + 1), &net.conbr[lvl], &fs, &gc[lvl])?;
        }
        let mut out = self.conv("final.0", &net.fin, &fs)?;
        if net.cfg.head == Head::Sigmoid {
            out = self.b.sigmoid(&out)?;
        }
        self.emit("final", &out)?;
        Ok(out)
    }
}

/// Every convolution of the inference graph for input size `d`: (module path, spec, input dims).
pub fn conv_plan(cfg: &Config, d: [usize; 3]) -> Vec<(String, ConvSpec, [usize; 3])> {
    let mut v = Vec::new();
    let lv = cfg.level_sizes(d);
    let w = cfg.widths;
    let t = cfg.trans_feature;
    let sp = |cin, cout, k: [usize; 3], s| ConvSpec { cin, cout, k, stride: [s; 3], pad: k.map(|k| (k - 1) / 2) };
    let (k1, k3) = ([1, 1, 1], [3, 3, 3]);
    v.push(("conv1.conv1.0".into(), sp(1, w[0], k3, 1), d));
    v.push(("conv1.conv2.0".into(), sp(w[0], w[0], k3, 1), d));
    let stride = if cfg.downsample == Downsample::Stride { 2 } else { 1 };
    for i in 0..4 {
        let mid = w[i] / 2;
        let din = if stride == 2 { lv[i] } else { lv[i + 1] };
        for j in 0..cfg.blocks[i] {
            let p = format!("layer{}.blocks.{j}", i + 1);
            let (cin, s, dd) = if j == 0 { (w[i], stride, din) } else { (w[i + 1], 1, lv[i + 1]) };
            v.push((format!("{p}.reduce.0"), sp(cin, mid, k1, 1), dd));
            v.push((format!("{p}.conv3.0"), sp(mid, mid, k3, s), dd));
            v.push((format!("{p}.increase.0"), sp(mid, w[i + 1], k1, 1), lv[i + 1]));
            if j == 0 {
                v.push((format!("{p}.proj.0"), sp(cin, w[i + 1], k1, s), dd));
            }
        }
    }
    v.push(("gcn1".into(), sp(w[0], t, k1, 1), d));
    for i in 0..4 {
        let k = cfg.gcn_kernels[i];
        let dd = lv[i + 1];
        for (n, cin, kk) in [("l1", w[i + 1], [k, 1, 1]), ("l2", t, [1, 1, k]), ("l3", t, [1, k, 1]), ("r1", w[i + 1], [1, k, 1]), ("r2", t, [1, 1, k]), ("r3", t, [k, 1, 1])] {
            v.push((format!("gcn{}.conv_{n}", i + 2), sp(cin, t, kk, 1), dd));
        }
    }
    for i in 1..=4 {
        for (n, k) in [("conv1", k1), ("conv2", k3), ("conv3", k3)] {
            v.push((format!("ConBR{i}.{n}"), sp(t, t, k, 1), lv[i - 1]));
        }
    }
    v.push(("final.0".into(), sp(t, cfg.head_channels(), k1, 1), d));
    v
}

/// Convolution FLOPs (2 per multiply-add) of one volume of size `d`: the figure the benchmarks divide by.
pub fn flops(cfg: &Config, d: [usize; 3]) -> f64 {
    conv_plan(cfg, d)
        .iter()
        .map(|(_, spec, din)| spec.flops(Shape::new(1, spec.out_dims(*din), spec.cout)))
        .sum()
}
