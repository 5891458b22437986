//! The op-by-op reference: an interpreter of the inference graph (`graph::Graph`) over any
//! `Backend`. Parameters are uploaded once (batch norm as a per-channel scale and shift); every
//! node runs as one backend op, and forward hooks see each node's output under the oracle's
//! module paths, so every intermediate can be compared with its activations.
use crate::backend::{conv_weight_layout, Backend, DevTensor};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::graph::{bn_affine, f32s, Arch, Graph, Mode, Op};
use crate::tensor::Tensor;
use crate::weights::Weights;

pub use crate::graph::flops;

/// Called with (module path, output) for every module the oracle names, when asked for.
pub type Hook<'a, S> = &'a mut dyn FnMut(&str, &DevTensor<S>) -> Result<()>;

/// A node's parameters on the backend.
enum Param<S> {
    None,
    Conv { w: S, b: Option<S> },
    /// x * scale + shift (batch norm, input scaling).
    Affine { scale: S, shift: S },
}

pub struct Network<B: Backend> {
    backend: B,
    cfg: Config,
    arch: Arch,
    /// By node index (the same for every input size).
    params: Vec<Param<B::S>>,
}

impl<B: Backend> Network<B> {
    /// Uploads the inference tensors of `weights` to `backend` (weights were validated on load).
    pub fn new(backend: B, weights: &Weights) -> Result<Self> {
        Self::with_arch(backend, weights, Arch::DEEPIS)
    }

    /// The network made of `arch`'s blocks (`weights` must hold its parameters).
    pub fn with_arch(backend: B, weights: &Weights, arch: Arch) -> Result<Self> {
        let cfg = weights.config.clone();
        let g = Graph::with_arch(&cfg, Mode::Eval, [16; 3], &arch);
        let mut params = Vec::with_capacity(g.nodes.len());
        for n in &g.nodes {
            let get = |s: &str| weights.get(&format!("{}.{s}", n.name));
            params.push(match n.op {
                Op::Conv { spec, bias } => Param::Conv {
                    w: backend.upload_param(&conv_weight_layout(&spec, &get("weight")?))?,
                    b: if bias { Some(backend.upload_param(&get("bias")?)?) } else { None },
                },
                Op::BatchNorm => {
                    let (scale, shift) = bn_params(&backend, get, cfg.bn_eps)?;
                    Param::Affine { scale, shift }
                }
                Op::Scale { scale, shift } => {
                    Param::Affine { scale: backend.upload_param(&[scale as f32])?, shift: backend.upload_param(&[shift as f32])? }
                }
                _ => Param::None,
            });
        }
        Ok(Network { backend, cfg, arch, params })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Runs N volumes (channels-last N x D0 x D1 x D2 x 1, raw values) to the head output
    /// (N x D0 x D1 x D2 x C: a signed distance map, or sigmoid probabilities).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_hooked(x, None)?;
        checked(self, x, y)
    }

    /// `forward`, calling `hook` with every module's output (oracle module paths).
    pub fn forward_hooked(&self, x: &Tensor, mut hook: Option<Hook<'_, B::S>>) -> Result<Tensor> {
        self.cfg.check_input(x.shape)?;
        let g = Graph::with_arch(&self.cfg, Mode::Eval, x.shape.d, &self.arch);
        let b = &self.backend;
        let mut readers = g.consumers();
        let mut vals: Vec<Option<DevTensor<B::S>>> = (0..g.nodes.len()).map(|_| None).collect();
        let mut i = 0;
        while i < g.nodes.len() {
            let n = &g.nodes[i];
            let a = |k: usize| vals[n.inputs[k]].as_ref().ok_or_else(|| Error::Other(format!("{}: input not computed", n.name)));
            // without hooks, a ReLU that alone reads an affine or an add runs in that op
            let next = g.nodes.get(i + 1);
            let relu = hook.is_none() && readers[i] == 1 && next.is_some_and(|m| m.op == Op::Relu && m.inputs == [i]);
            let y = match (&n.op, &self.params[i]) {
                (Op::Input, _) => b.upload(x)?,
                (Op::Conv { spec, .. }, Param::Conv { w, b: bias }) => b.conv3d(a(0)?, w, bias.as_ref(), spec)?,
                (Op::BatchNorm | Op::Scale { .. }, Param::Affine { scale, shift }) => b.channel_affine(a(0)?, scale, shift, relu)?,
                (Op::Add, _) => b.add(a(0)?, a(1)?, relu)?,
                (Op::Relu, _) => b.relu(a(0)?)?,
                (Op::MaxPool, _) => b.maxpool2(a(0)?)?,
                (Op::Upsample, _) => b.upsample(a(0)?, n.shape.d)?,
                (Op::Sigmoid, _) => b.sigmoid(a(0)?)?,
                (Op::Softmax, _) => b.softmax(a(0)?)?,
                (op, _) => return Err(Error::Other(format!("{}: {op:?} has no inference op", n.name))),
            };
            let fused = relu && matches!(n.op, Op::BatchNorm | Op::Scale { .. } | Op::Add);
            for &j in &n.inputs {
                readers[j] -= 1;
                if readers[j] == 0 {
                    vals[j] = None;
                }
            }
            if let Some(h) = hook.as_mut() {
                for p in &n.paths {
                    h(p, &y)?;
                }
            }
            if fused {
                // the ReLU node's value is this op's
                i += 1;
                readers[i - 1] = 0;
            }
            vals[i] = Some(y);
            i += 1;
        }
        let out = vals[g.outputs[0]].take().ok_or_else(|| Error::Other("the graph has no output".into()))?;
        b.download(&out)
    }
}

/// Eval-mode batch norm of the tensors `get` returns by suffix (`weight`, `bias`, `running_mean`,
/// `running_var`), on `b` as a per-channel scale and shift.
pub(crate) fn bn_params<B: Backend, T: AsRef<[f32]>>(b: &B, get: impl Fn(&str) -> Result<T>, eps: f64) -> Result<(B::S, B::S)> {
    let (g, bt, m, v) = (get("weight")?, get("bias")?, get("running_mean")?, get("running_var")?);
    let (scale, shift) = bn_affine(g.as_ref(), bt.as_ref(), m.as_ref(), v.as_ref(), eps);
    Ok((b.upload_param(&f32s(&scale))?, b.upload_param(&f32s(&shift))?))
}

/// `y`, the output of `net` for `x`, when it is finite; otherwise the error naming the first
/// module whose output is not (the reference interpreter's hook).
fn checked<B: Backend>(net: &Network<B>, x: &Tensor, y: Tensor) -> Result<Tensor> {
    if crate::finite::first_non_finite(&y.data).is_none() {
        return Ok(y);
    }
    let mut first: Option<(String, usize, f32)> = None;
    let mut hook = |name: &str, t: &crate::backend::DevTensor<B::S>| -> Result<()> {
        let host = net.backend().download(t)?;
        if let Some((i, v)) = crate::finite::first_non_finite(&host.data) {
            first = Some((name.to_string(), i, v));
            return Err(Error::NonFinite(String::new()));
        }
        Ok(())
    };
    match net.forward_hooked(x, Some(&mut hook)) {
        Ok(_) | Err(Error::NonFinite(_)) => {}
        Err(e) => return Err(e),
    }
    Err(crate::finite::non_finite(Some(x), &y, first))
}

/// Runs the fused plan; a non-finite output is an error naming the first layer, found by the
/// reference interpreter on the CPU.
pub fn run_plan(plan: &crate::plan::Plan, weights: &Weights, x: &Tensor) -> Result<Tensor> {
    match plan.run(x) {
        Err(Error::NonFinite(m)) => {
            let net = Network::new(crate::cpu::CpuBackend::new(), weights)?;
            let y_ref = net.forward_hooked(x, None)?;
            checked(&net, x, y_ref).and(Err(Error::NonFinite(m)))
        }
        r => r,
    }
}
