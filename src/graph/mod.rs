//! The DeepIS network (the oracle's `DeepIS`) as one data structure: nodes named by the oracle's
//! module paths, one op enum, every shape and padding computed here once. Every engine consumes it:
//! the op-by-op reference (`model`), the fused CPU plan (`plan`, after the passes of `passes`), the
//! training tape (`train::net`) and the GPU backends through the reference.
//!
//! The structure of the network is `Arch::DEEPIS` and the functions it names (`bottleneck`, `gcn`,
//! `decoder`) plus `Graph::with_arch`: changing a block is an edit of one of those, and a variant
//! `Arch` (another block function) builds a variant graph that every engine runs unchanged.
pub mod passes;

use crate::backend::ConvSpec;
use crate::config::{Config, Downsample, Head};
use crate::tensor::Shape;

/// A node of the graph (an index into `Graph::nodes`).
pub type NodeId = usize;

/// Every op of the network. Parameters are named after the node: a conv has `{name}.weight`
/// (PyTorch layout [cout][cin][k0][k1][k2]) and `{name}.bias` when `bias`; a batch norm has
/// `{name}.weight`, `.bias`, `.running_mean`, `.running_var`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Op {
    /// The raw 1-channel volume.
    Input,
    /// x * scale + shift on every channel (the input normalisation (x - offset) / scale).
    Scale { scale: f64, shift: f64 },
    Conv { spec: ConvSpec, bias: bool },
    BatchNorm,
    Relu,
    /// inputs[0] + inputs[1].
    Add,
    /// 2x2x2, stride 2, floor of odd sizes.
    MaxPool,
    /// Trilinear (align_corners=True) of inputs[0] to the size of inputs[1].
    Upsample,
    Sigmoid,
    /// Over channels.
    Softmax,
    /// Training mode only; the identity in eval mode.
    Dropout { p: f32 },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub name: String,
    pub op: Op,
    pub inputs: Vec<NodeId>,
    /// Output shape of one volume (n = 1).
    pub shape: Shape,
    /// The oracle module paths whose output this node is (forward hooks fire for each).
    pub paths: Vec<String>,
}

/// Eval: the inference graph. Train: adds dropout and the two deep-supervision heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Eval,
    Train,
}

/// The network for one config, mode and input size.
#[derive(Clone, Debug)]
pub struct Graph {
    pub cfg: Config,
    pub mode: Mode,
    pub nodes: Vec<Node>,
    pub input: NodeId,
    /// The head output, then (train mode) classifier3 and classifier4.
    pub outputs: Vec<NodeId>,
}

/// `bottleneck(b, name, x, mid, cout, stride, project)`.
pub type BottleneckFn = fn(&mut Builder, &str, NodeId, usize, usize, usize, bool) -> NodeId;
/// `gcn(b, name, x, cout, k)`.
pub type GcnFn = fn(&mut Builder, &str, NodeId, usize, usize) -> NodeId;
/// `decoder(b, name, low, skip)`.
pub type DecoderFn = fn(&mut Builder, &str, NodeId, NodeId) -> NodeId;

/// The blocks the network is made of.
#[derive(Clone, Copy)]
pub struct Arch {
    pub bottleneck: BottleneckFn,
    pub gcn: GcnFn,
    pub decoder: DecoderFn,
}

impl Arch {
    pub const DEEPIS: Arch = Arch { bottleneck, gcn, decoder };
}

/// Geometry of a convolution with PyTorch's `padding=(k-1)//2`.
pub fn conv_spec(cin: usize, cout: usize, k: [usize; 3], stride: usize) -> ConvSpec {
    ConvSpec { cin, cout, k, stride: [stride; 3], pad: k.map(|k| (k - 1) / 2) }
}

/// The geometry a conv weight of PyTorch shape [cout, cin, k0, k1, k2] has, for changing its
/// layout (stride and padding do not matter there).
pub fn layout_spec(torch_shape: &[usize]) -> ConvSpec {
    conv_spec(torch_shape[1], torch_shape[0], [torch_shape[2], torch_shape[3], torch_shape[4]], 1)
}

/// Eval-mode batch norm as y = x * scale + shift, in float64.
pub fn bn_affine(gamma: &[f32], beta: &[f32], mean: &[f32], var: &[f32], eps: f64) -> (Vec<f64>, Vec<f64>) {
    let scale: Vec<f64> = gamma.iter().zip(var).map(|(&g, &v)| g as f64 / (v as f64 + eps).sqrt()).collect();
    let shift = beta.iter().zip(mean).zip(&scale).map(|((&b, &m), &s)| b as f64 - m as f64 * s).collect();
    (scale, shift)
}

/// Per-channel float64 vectors (a batch norm's scale and shift) rounded to float32 for a kernel.
pub fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Adds nodes, computing each output shape from its inputs.
pub struct Builder {
    pub nodes: Vec<Node>,
}

impl Builder {
    fn push(&mut self, name: &str, op: Op, inputs: Vec<NodeId>, shape: Shape, module: bool) -> NodeId {
        let paths = if module { vec![name.to_string()] } else { Vec::new() };
        self.nodes.push(Node { name: name.to_string(), op, inputs, shape, paths });
        self.nodes.len() - 1
    }

    pub fn shape(&self, x: NodeId) -> Shape {
        self.nodes[x].shape
    }

    /// Marks x as also being the output of module `path`.
    pub fn module(&mut self, x: NodeId, path: &str) -> NodeId {
        self.nodes[x].paths.push(path.to_string());
        x
    }

    /// nn.Conv3d(cin, cout, k, stride, padding=(k-1)//2).
    pub fn conv(&mut self, name: &str, x: NodeId, cout: usize, k: [usize; 3], stride: usize, bias: bool) -> NodeId {
        let s = self.shape(x);
        let spec = conv_spec(s.c, cout, k, stride);
        self.push(name, Op::Conv { spec, bias }, vec![x], spec.out_shape(s), true)
    }

    pub fn batch_norm(&mut self, name: &str, x: NodeId) -> NodeId {
        let s = self.shape(x);
        self.push(name, Op::BatchNorm, vec![x], s, true)
    }

    /// `module`: an nn.ReLU module (hooked), else F.relu.
    pub fn relu(&mut self, name: &str, x: NodeId, module: bool) -> NodeId {
        let s = self.shape(x);
        self.push(name, Op::Relu, vec![x], s, module)
    }

    pub fn add(&mut self, name: &str, a: NodeId, b: NodeId) -> NodeId {
        let s = self.shape(a);
        assert_eq!(s, self.shape(b), "{name}: adding different shapes");
        self.push(name, Op::Add, vec![a, b], s, false)
    }

    pub fn maxpool(&mut self, name: &str, x: NodeId) -> NodeId {
        let s = self.shape(x);
        self.push(name, Op::MaxPool, vec![x], s.with_d(s.d.map(|v| v / 2)), false)
    }

    pub fn upsample(&mut self, name: &str, x: NodeId, like: NodeId) -> NodeId {
        let s = self.shape(x).with_d(self.shape(like).d);
        self.push(name, Op::Upsample, vec![x, like], s, false)
    }

    fn unary(&mut self, name: &str, op: Op, x: NodeId, module: bool) -> NodeId {
        let s = self.shape(x);
        self.push(name, op, vec![x], s, module)
    }

    /// Sequential(conv, BN[, ReLU]) named `name.0`, `name.1`, `name.2`; its output is `name`.
    pub fn conv_bn(&mut self, name: &str, x: NodeId, cout: usize, k: [usize; 3], stride: usize, relu: bool) -> NodeId {
        let y = self.conv(&format!("{name}.0"), x, cout, k, stride, true);
        let mut y = self.batch_norm(&format!("{name}.1"), y);
        if relu {
            y = self.relu(&format!("{name}.2"), y, true);
        }
        self.module(y, name)
    }
}

const K1: [usize; 3] = [1, 1, 1];
const K3: [usize; 3] = [3, 3, 3];

/// Bottleneck: relu(increase(conv3(reduce(x))) + (proj(x) if project else x)).
pub fn bottleneck(b: &mut Builder, name: &str, x: NodeId, mid: usize, cout: usize, stride: usize, project: bool) -> NodeId {
    let h = b.conv_bn(&format!("{name}.reduce"), x, mid, K1, 1, true);
    let h = b.conv_bn(&format!("{name}.conv3"), h, mid, K3, stride, true);
    let h = b.conv_bn(&format!("{name}.increase"), h, cout, K1, 1, false);
    let s = if project { b.conv_bn(&format!("{name}.proj"), x, cout, K1, stride, false) } else { x };
    let y = b.add(&format!("{name}.add"), h, s);
    let y = b.relu(&format!("{name}.relu"), y, false);
    b.module(y, name)
}

/// GCN: l: (k,1,1) -> (1,1,k) -> (1,k,1); r: (1,k,1) -> (1,1,k) -> (k,1,1); out = l + r.
pub fn gcn(b: &mut Builder, name: &str, x: NodeId, cout: usize, k: usize) -> NodeId {
    let (k0, k1, k2) = ([k, 1, 1], [1, k, 1], [1, 1, k]);
    let branch = |b: &mut Builder, side: &str, ks: [[usize; 3]; 3]| {
        (0..3).fold(x, |h, i| b.conv(&format!("{name}.conv_{side}{}", i + 1), h, cout, ks[i], 1, true))
    };
    let l = branch(b, "l", [k0, k2, k1]);
    let r = branch(b, "r", [k1, k2, k0]);
    let y = b.add(&format!("{name}.add"), l, r);
    b.module(y, name)
}

/// ConBR(up(low -> size of skip) + skip): x = conv1(x); x + conv3(relu(conv2(x))).
pub fn decoder(b: &mut Builder, name: &str, low: NodeId, skip: NodeId) -> NodeId {
    let up = b.upsample(&format!("{name}.up"), low, skip);
    let x = b.add(&format!("{name}.in"), up, skip);
    let t = b.shape(skip).c;
    let x = b.conv(&format!("{name}.conv1"), x, t, K1, 1, true);
    let h = b.conv(&format!("{name}.conv2"), x, t, K3, 1, true);
    let h = b.relu(&format!("{name}.relu"), h, false);
    let h = b.conv(&format!("{name}.conv3"), h, t, K3, 1, true);
    let y = b.add(&format!("{name}.add"), x, h);
    b.module(y, name)
}

/// Deep-supervision head: Sequential(conv3 no bias, BN, ReLU, Dropout, conv1, Softmax).
fn classifier(b: &mut Builder, name: &str, x: NodeId, p: f32) -> NodeId {
    let c = b.shape(x).c / 2;
    let h = b.conv(&format!("{name}.0"), x, c, K3, 1, false);
    let h = b.batch_norm(&format!("{name}.1"), h);
    let h = b.relu(&format!("{name}.2"), h, true);
    let h = b.unary(&format!("{name}.3"), Op::Dropout { p }, h, true);
    let h = b.conv(&format!("{name}.4"), h, 3, K1, 1, true);
    let y = b.unary(&format!("{name}.5"), Op::Softmax, h, true);
    b.module(y, name)
}

/// Dropout probability of the classifier heads, as published.
pub const DROPOUT: f32 = 0.1;

impl Graph {
    /// The published network for `cfg`, in `mode`, for volumes of size `d`.
    pub fn new(cfg: &Config, mode: Mode, d: [usize; 3]) -> Graph {
        Graph::with_arch(cfg, mode, d, &Arch::DEEPIS)
    }

    /// The network made of `arch`'s blocks. Each GCN follows its encoder level so that the
    /// level's features die early (the order every engine runs the nodes in).
    pub fn with_arch(cfg: &Config, mode: Mode, d: [usize; 3], arch: &Arch) -> Graph {
        let mut b = Builder { nodes: Vec::new() };
        let input = b.push("input", Op::Input, vec![], Shape::new(1, d, 1), false);
        let mut x = input;
        if cfg.input_offset != 0.0 || cfg.input_scale != 1.0 {
            let s = 1.0 / cfg.input_scale;
            x = b.unary("input.scale", Op::Scale { scale: s, shift: -cfg.input_offset * s }, x, false);
        }
        let (w, t) = (cfg.widths, cfg.trans_feature);
        let h = b.conv_bn("conv1.conv1", x, w[0], K3, 1, true);
        let mut fm = b.conv_bn("conv1.conv2", h, w[0], K3, 1, true);
        b.module(fm, "conv1");
        let mut gc = vec![b.conv("gcn1", fm, t, K1, 1, true)];
        let stride = if cfg.downsample == Downsample::Stride { 2 } else { 1 };
        for i in 0..4 {
            let layer = format!("layer{}", i + 1);
            if cfg.downsample == Downsample::Maxpool {
                fm = b.maxpool(&format!("{layer}.pool"), fm);
            }
            for j in 0..cfg.blocks[i] {
                let s = if j == 0 { stride } else { 1 };
                fm = (arch.bottleneck)(&mut b, &format!("{layer}.blocks.{j}"), fm, w[i] / 2, w[i + 1], s, j == 0);
            }
            b.module(fm, &format!("{layer}.blocks"));
            b.module(fm, &layer);
            gc.push((arch.gcn)(&mut b, &format!("gcn{}", i + 2), fm, t, cfg.gcn_kernels[i]));
        }
        let mut fs = [gc[4]; 5];
        for lvl in (0..4).rev() {
            fs[lvl] = (arch.decoder)(&mut b, &format!("ConBR{}", lvl + 1), fs[lvl + 1], gc[lvl]);
        }
        let mut out = b.conv("final.0", fs[0], cfg.head_channels(), K1, 1, true);
        if cfg.head == Head::Sigmoid {
            out = b.unary("final.1", Op::Sigmoid, out, false);
        }
        b.module(out, "final");
        let mut outputs = vec![out];
        if mode == Mode::Train {
            outputs.push(classifier(&mut b, "classifier3", fs[2], DROPOUT));
            outputs.push(classifier(&mut b, "classifier4", fs[3], DROPOUT));
        }
        Graph { cfg: cfg.clone(), mode, nodes: b.nodes, input, outputs }
    }

    /// How many nodes read each node's output (outputs count as one more reader).
    pub fn consumers(&self) -> Vec<usize> {
        let mut n = vec![0; self.nodes.len()];
        self.nodes.iter().flat_map(|v| &v.inputs).for_each(|&i| n[i] += 1);
        self.outputs.iter().for_each(|&o| n[o] += 1);
        n
    }

    /// Every parameter tensor the graph's nodes read, in node order.
    pub fn params(&self) -> Vec<ParamSpec> {
        let mut v = Vec::new();
        let used = if self.mode == Mode::Eval { Use::Inference } else { Use::Training };
        for n in &self.nodes {
            let p = |suffix: &str, shape: Vec<usize>, kind| ParamSpec { name: format!("{}.{suffix}", n.name), shape, kind, used };
            match n.op {
                Op::Conv { spec, bias } => {
                    let [k0, k1, k2] = spec.k;
                    v.push(p("weight", vec![spec.cout, spec.cin, k0, k1, k2], ParamKind::ConvWeight));
                    if bias {
                        v.push(p("bias", vec![spec.cout], ParamKind::ConvBias));
                    }
                }
                Op::BatchNorm => {
                    let c = n.shape.c;
                    for (s, kind) in [("weight", ParamKind::BnWeight), ("bias", ParamKind::BnBias), ("running_mean", ParamKind::BnMean), ("running_var", ParamKind::BnVar)] {
                        v.push(p(s, vec![c], kind));
                    }
                }
                _ => {}
            }
        }
        v
    }

    /// Convolution FLOPs (2 per multiply-add) of one volume.
    pub fn flops(&self) -> f64 {
        self.nodes
            .iter()
            .map(|n| match n.op {
                Op::Conv { spec, .. } => spec.flops(n.shape),
                _ => 0.0,
            })
            .sum()
    }
}

/// What a tensor is, which decides how it is initialised and whether it is learnable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    ConvWeight,
    ConvBias,
    BnWeight,
    BnBias,
    BnMean,
    BnVar,
}

impl ParamKind {
    pub fn learnable(self) -> bool {
        !matches!(self, ParamKind::BnMean | ParamKind::BnVar)
    }
}

/// Where a tensor is used: by the inference graph, only in training (deep-supervision heads),
/// or never (ConBR0 exists in the published model but is unused).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    Inference,
    Training,
    Unused,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    /// PyTorch shape (a conv weight is [cout, cin, k0, k1, k2]).
    pub shape: Vec<usize>,
    pub kind: ParamKind,
    pub used: Use,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The oracle's top-level modules in declaration (`state_dict()`) order.
const MODULE_ORDER: [&str; 18] = [
    "conv1", "layer1", "layer2", "layer3", "layer4", "gcn1", "gcn2", "gcn3", "gcn4", "gcn5", "ConBR0", "ConBR1", "ConBR2",
    "ConBR3", "ConBR4", "final", "classifier3", "classifier4",
];

/// Every tensor of the model for `cfg`, in `state_dict()` order: the training graph's parameters,
/// those of the inference graph marked `Inference`, and ConBR0, which the oracle declares and
/// never calls.
pub fn param_specs(cfg: &Config) -> Vec<ParamSpec> {
    let d = [16; 3];
    let eval: std::collections::HashSet<String> = Graph::new(cfg, Mode::Eval, d).params().into_iter().map(|p| p.name).collect();
    let mut b = Builder { nodes: Vec::new() };
    let x = b.push("x", Op::Input, vec![], Shape::new(1, d, cfg.trans_feature), false);
    decoder(&mut b, "ConBR0", x, x);
    let unused = Graph { cfg: cfg.clone(), mode: Mode::Eval, nodes: b.nodes, input: x, outputs: vec![] }.params();
    let mut v = Graph::new(cfg, Mode::Train, d).params();
    for p in &mut v {
        if eval.contains(&p.name) {
            p.used = Use::Inference;
        }
    }
    v.extend(unused.into_iter().map(|p| ParamSpec { used: Use::Unused, ..p }));
    let rank = |p: &ParamSpec| MODULE_ORDER.iter().position(|m| p.name.split('.').next() == Some(m)).unwrap_or(MODULE_ORDER.len());
    v.sort_by_key(rank);
    v
}

/// Learnable parameter count of the whole model for `cfg`.
pub fn param_count(cfg: &Config) -> usize {
    param_specs(cfg).iter().filter(|s| s.kind.learnable()).map(ParamSpec::numel).sum()
}

/// Convolution FLOPs of one volume of size `d` through the inference graph: the figure the
/// benchmarks divide by.
pub fn flops(cfg: &Config, d: [usize; 3]) -> f64 {
    Graph::new(cfg, Mode::Eval, d).flops()
}
