//! Fusions as graph-to-graph passes over the inference graph with its weights attached (float32,
//! engine layout; the weight algebra of a pass is done in float64 and rounded once). Each pass is
//! a function of `Weighted` that leaves the output unchanged up to rounding and can be switched
//! off alone; "unfused" means "no passes". A pass rewrites nodes in place, appends the nodes it
//! creates and redirects the readers of a node it replaces; nodes nobody reads any more drop out
//! when an engine lowers the graph (`Weighted::order`).
use super::{bn_affine, Graph, Mode, NodeId, Op};
use crate::backend::{conv_weight_layout, ConvSpec};
use crate::error::{Error, Result};
use crate::tensor::Shape;

/// What a conv's epilogue applies after bias and residual.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
    Sigmoid,
}

/// A linear convolution: spec, weights in the engine layout [k0][k1][k2][cin][cout], bias.
#[derive(Clone, Debug)]
pub struct Lin {
    pub spec: ConvSpec,
    pub w: Vec<f32>,
    pub b: Option<Vec<f32>>,
}

impl Lin {
    pub fn without_bias(&self) -> Lin {
        Lin { b: None, ..self.clone() }
    }

    /// The 1x1x1 convolution `self` applied after `a` (no nonlinearity between), as one conv of a's
    /// geometry: w[t][ci][co] = sum_m a.w[t][ci][m] * self.w[m][co]; bias likewise, plus self's
    /// bias when `with_bias`.
    fn after(&self, a: &Lin, with_bias: bool) -> Lin {
        let (m, c) = (a.spec.cout, self.spec.cout);
        // rows of a's weights, then a's bias as one more row
        let rows = a.w.len() / m;
        let zeros = vec![0.0f32; m];
        let mut acc = vec![0.0f64; (rows + 1) * c];
        for (r, x) in a.w.chunks_exact(m).chain([a.b.as_deref().unwrap_or(&zeros)]).enumerate() {
            for (k, &x) in x.iter().enumerate() {
                for o in 0..c {
                    acc[r * c + o] += x as f64 * self.w[k * c + o] as f64;
                }
            }
        }
        if let Some(sb) = self.b.as_ref().filter(|_| with_bias) {
            acc[rows * c..].iter_mut().zip(sb).for_each(|(b, &s)| *b += s as f64);
        }
        let mut w: Vec<f32> = acc.into_iter().map(|v| v as f32).collect();
        let b = w.split_off(rows * c);
        Lin { spec: ConvSpec { cout: c, ..a.spec }, w, b: Some(b) }
    }

    fn is_1x1(&self) -> bool {
        self.spec.k == [1, 1, 1] && self.spec.stride == [1, 1, 1]
    }

    fn in_plane(&self) -> bool {
        self.spec.k[0] == 1 && self.spec.pad[0] == 0 && self.spec.stride == [1, 1, 1]
    }
}

/// The ops of a weighted inference graph.
#[derive(Clone, Debug)]
pub enum WOp {
    Input,
    /// x * scale[c] + shift[c]: the input normalisation.
    Affine { scale: Vec<f64>, shift: Vec<f64> },
    /// An eval-mode batch norm not folded (yet).
    Bn { scale: Vec<f64>, shift: Vec<f64> },
    /// act(conv(x) + bias + inputs[1] if present).
    Conv { lin: Lin, act: Act },
    /// b(a(x)) for two in-plane convs, plane by plane.
    Pair { a: Lin, b: Lin },
    Relu,
    Add,
    MaxPool,
    /// Trilinear (align_corners=True) to the node's size.
    Upsample,
    Sigmoid,
}

#[derive(Clone, Debug)]
pub struct WNode {
    pub name: String,
    pub op: WOp,
    pub inputs: Vec<NodeId>,
    /// One volume (n = 1).
    pub shape: Shape,
}

/// The inference graph with its weights.
#[derive(Clone, Debug)]
pub struct Weighted {
    pub nodes: Vec<WNode>,
    pub input: NodeId,
    pub output: NodeId,
}

/// Which passes run. `Default` is all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Passes {
    pub fold_bn: bool,
    pub move_conv1_low: bool,
    pub merge_1x1: bool,
    pub fuse_epilogue: bool,
    pub fuse_gcn_planes: bool,
}

impl Default for Passes {
    fn default() -> Self {
        Passes { fold_bn: true, move_conv1_low: true, merge_1x1: true, fuse_epilogue: true, fuse_gcn_planes: true }
    }
}

impl Passes {
    /// No pass: the graph as built.
    pub fn none() -> Self {
        Passes { fold_bn: false, move_conv1_low: false, merge_1x1: false, fuse_epilogue: false, fuse_gcn_planes: false }
    }
}

impl Weighted {
    /// `g` (eval mode) with the tensors `get` returns by name (PyTorch layout, float32).
    pub fn new(g: &Graph, get: &dyn Fn(&str) -> Result<Vec<f32>>) -> Result<Weighted> {
        if g.mode != Mode::Eval {
            return Err(Error::Other("the weighted graph is the inference graph (eval mode)".into()));
        }
        let mut nodes = Vec::with_capacity(g.nodes.len());
        for n in &g.nodes {
            let p = |s: &str| get(&format!("{}.{s}", n.name));
            let (op, inputs) = match n.op {
                Op::Input => (WOp::Input, vec![]),
                Op::Scale { scale, shift } => (WOp::Affine { scale: vec![scale], shift: vec![shift] }, n.inputs.clone()),
                Op::Conv { spec, bias } => {
                    let w = conv_weight_layout(&spec, &p("weight")?);
                    let b = if bias { Some(p("bias")?) } else { None };
                    (WOp::Conv { lin: Lin { spec, w, b }, act: Act::None }, n.inputs.clone())
                }
                Op::BatchNorm => {
                    let (scale, shift) = bn_affine(&p("weight")?, &p("bias")?, &p("running_mean")?, &p("running_var")?, g.cfg.bn_eps);
                    (WOp::Bn { scale, shift }, n.inputs.clone())
                }
                Op::Relu => (WOp::Relu, n.inputs.clone()),
                Op::Add => (WOp::Add, n.inputs.clone()),
                Op::MaxPool => (WOp::MaxPool, n.inputs.clone()),
                Op::Upsample => (WOp::Upsample, vec![n.inputs[0]]),
                Op::Sigmoid => (WOp::Sigmoid, n.inputs.clone()),
                Op::Dropout { .. } | Op::Softmax => {
                    return Err(Error::Other(format!("{}: {:?} is not an op of the inference plan", n.name, n.op)))
                }
            };
            nodes.push(WNode { name: n.name.clone(), op, inputs, shape: n.shape });
        }
        Ok(Weighted { nodes, input: g.input, output: g.outputs[0] })
    }

    /// Applies the passes `p` switches on, in their one valid order.
    pub fn optimise(&mut self, p: Passes) {
        if p.fold_bn {
            self.fold_bn();
        }
        if p.move_conv1_low {
            self.move_conv1_low();
        }
        if p.merge_1x1 {
            self.merge_1x1();
        }
        if p.fuse_epilogue {
            self.fuse_epilogue();
        }
        if p.fuse_gcn_planes {
            self.fuse_gcn_planes();
        }
    }

    /// Readers of every node (the output counts as one).
    pub fn consumers(&self) -> Vec<usize> {
        let mut n = vec![0; self.nodes.len()];
        self.nodes.iter().flat_map(|v| &v.inputs).for_each(|&i| n[i] += 1);
        n[self.output] += 1;
        n
    }

    /// The nodes the output depends on, each after its inputs, in the graph's order otherwise.
    pub fn order(&self) -> Vec<NodeId> {
        fn visit(g: &Weighted, i: NodeId, done: &mut [bool], out: &mut Vec<NodeId>) {
            if done[i] {
                return;
            }
            done[i] = true;
            for &j in &g.nodes[i].inputs {
                visit(g, j, done, out);
            }
            out.push(i);
        }
        let mut live = vec![false; self.nodes.len()];
        let mut stack = vec![self.output];
        while let Some(i) = stack.pop() {
            if !std::mem::replace(&mut live[i], true) {
                stack.extend(&self.nodes[i].inputs);
            }
        }
        let (mut done, mut out) = (vec![false; self.nodes.len()], Vec::new());
        for i in (0..self.nodes.len()).filter(|&i| live[i]) {
            visit(self, i, &mut done, &mut out);
        }
        out
    }

    /// Every reader of `old` reads `new` instead.
    fn replace(&mut self, old: NodeId, new: NodeId) {
        for n in &mut self.nodes {
            n.inputs.iter_mut().filter(|i| **i == old).for_each(|i| *i = new);
        }
        if self.output == old {
            self.output = new;
        }
        self.nodes[old].inputs.clear();
    }

    /// A node a pass replaced (it reads nothing any more).
    fn dead(&self, i: NodeId) -> bool {
        self.nodes[i].inputs.is_empty() && !matches!(self.nodes[i].op, WOp::Input)
    }

    fn push(&mut self, name: String, op: WOp, inputs: Vec<NodeId>, shape: Shape) -> NodeId {
        self.nodes.push(WNode { name, op, inputs, shape });
        self.nodes.len() - 1
    }

    /// Calls `rewrite` on every node no pass has replaced, in order (not on those it appends).
    fn each_live(&mut self, mut rewrite: impl FnMut(&mut Weighted, NodeId)) {
        for i in 0..self.nodes.len() {
            if !self.dead(i) {
                rewrite(self, i);
            }
        }
    }

    /// A plain conv (no residual, no activation) read only by one node.
    fn bare_conv(&self, i: NodeId, readers: &[usize]) -> bool {
        readers[i] == 1 && self.nodes[i].inputs.len() == 1 && matches!(self.nodes[i].op, WOp::Conv { act: Act::None, .. })
    }

    fn lin_mut(&mut self, i: NodeId) -> &mut Lin {
        match &mut self.nodes[i].op {
            WOp::Conv { lin, .. } => lin,
            _ => unreachable!("not a conv"),
        }
    }

    fn lin(&self, i: NodeId) -> Option<&Lin> {
        match &self.nodes[i].op {
            WOp::Conv { lin, .. } => Some(lin),
            _ => None,
        }
    }

    /// BN(conv(x)) as one conv: w *= scale[cout], b = b * scale + shift.
    pub fn fold_bn(&mut self) {
        self.each_live(|g, i| {
            let WOp::Bn { scale, shift } = g.nodes[i].op.clone() else { return };
            let c = g.nodes[i].inputs[0];
            if !g.bare_conv(c, &g.consumers()) {
                return;
            }
            let l = g.lin_mut(c);
            let cout = l.spec.cout;
            l.w.iter_mut().enumerate().for_each(|(i, w)| *w = (*w as f64 * scale[i % cout]) as f32);
            let b = l.b.get_or_insert_with(|| vec![0.0; cout]);
            b.iter_mut().zip(scale.iter().zip(&shift)).for_each(|(b, (s, t))| *b = (*b as f64 * s + t) as f32);
            g.replace(i, c);
        });
    }

    /// p(up(a) + s) for a 1x1x1 conv p as up(p_nobias(a)) + p(s): the first on the low-resolution
    /// side (8x fewer voxels), the second next to whatever made s (where `merge_1x1` can absorb it).
    pub fn move_conv1_low(&mut self) {
        self.each_live(|g, i| {
            let Some(p) = g.lin(i).filter(|l| l.is_1x1()).cloned() else { return };
            let readers = g.consumers();
            let a = g.nodes[i].inputs[0];
            if g.nodes[i].inputs.len() != 1 || !matches!(g.nodes[a].op, WOp::Add) || readers[a] != 1 {
                return;
            }
            let (mut up, mut s) = (g.nodes[a].inputs[0], g.nodes[a].inputs[1]);
            if matches!(g.nodes[s].op, WOp::Upsample) {
                std::mem::swap(&mut up, &mut s);
            }
            if !matches!(g.nodes[up].op, WOp::Upsample) || readers[up] != 1 {
                return;
            }
            let (low, name) = (g.nodes[up].inputs[0], g.nodes[i].name.clone());
            let (ls, ss) = (g.nodes[low].shape, g.nodes[s].shape);
            let lo = g.push(format!("{name}.low"), WOp::Conv { lin: p.without_bias(), act: Act::None }, vec![low], ls.with_c(p.spec.cout));
            let up2 = g.push(format!("{name}.up"), WOp::Upsample, vec![lo], ss.with_c(p.spec.cout));
            let sk = g.push(format!("{name}.skip"), WOp::Conv { lin: p, act: Act::None }, vec![s], ss.with_c(g.nodes[i].shape.c));
            g.nodes[i].op = WOp::Add;
            g.nodes[i].inputs = vec![up2, sk];
            g.nodes[a].inputs.clear();
            g.nodes[up].inputs.clear();
        });
    }

    /// A 1x1x1 conv p that reads only a conv (or the sum of two convs) merged into it (them):
    /// p(a(x)) = (p.a)(x); p(l + r) = (p.l)(x) + (p_nobias.r)(x). Only where p does not widen.
    pub fn merge_1x1(&mut self) {
        self.each_live(|g, i| {
            let Some(p) = g.lin(i).filter(|l| l.is_1x1() && l.spec.cout <= l.spec.cin).cloned() else { return };
            let readers = g.consumers();
            let a = g.nodes[i].inputs[0];
            if g.nodes[i].inputs.len() != 1 || !matches!(g.nodes[i].op, WOp::Conv { act: Act::None, .. }) {
                return;
            }
            // the convs p merges into, and whether each takes p's bias
            let into = if g.bare_conv(a, &readers) {
                vec![(a, true)]
            } else if matches!(g.nodes[a].op, WOp::Add) && readers[a] == 1 {
                let (l, r) = (g.nodes[a].inputs[0], g.nodes[a].inputs[1]);
                if l == r || !g.bare_conv(l, &readers) || !g.bare_conv(r, &readers) {
                    return;
                }
                vec![(l, true), (r, false)]
            } else {
                return;
            };
            for (j, with_bias) in into {
                let m = p.after(g.lin(j).expect("conv"), with_bias);
                *g.lin_mut(j) = m;
                g.nodes[j].shape.c = p.spec.cout;
            }
            g.nodes[a].shape.c = p.spec.cout;
            g.replace(i, a);
        });
    }

    /// Residual add, then ReLU or sigmoid, in the epilogue of the conv that makes their input.
    /// The add goes into a unit-stride operand's conv (the later one of two: the earlier is then
    /// ready when it runs), not a stride-2 projection's; an up-sampled operand is left to the add
    /// (the plan fuses up-sample + add).
    pub fn fuse_epilogue(&mut self) {
        self.each_live(|g, i| {
            let readers = g.consumers();
            let ins = g.nodes[i].inputs.clone();
            match g.nodes[i].op {
                WOp::Add => {
                    if ins.iter().any(|&j| matches!(g.nodes[j].op, WOp::Upsample)) || ins[0] == ins[1] {
                        return;
                    }
                    let unit = |k: usize| g.lin(ins[k]).is_some_and(|l| l.spec.stride == [1, 1, 1]);
                    let cands: Vec<usize> = [1, 0].into_iter().filter(|&k| g.bare_conv(ins[k], &readers)).collect();
                    let Some(k) = cands.iter().copied().find(|&k| unit(k)).or(cands.first().copied()) else { return };
                    let (c, other) = (ins[k], ins[1 - k]);
                    g.nodes[c].inputs.push(other);
                    g.replace(i, c);
                }
                WOp::Relu | WOp::Sigmoid => {
                    let c = ins[0];
                    let conv_no_act = readers[c] == 1 && matches!(g.nodes[c].op, WOp::Conv { act: Act::None, .. });
                    if !conv_no_act {
                        return;
                    }
                    let new = if matches!(g.nodes[i].op, WOp::Relu) { Act::Relu } else { Act::Sigmoid };
                    if let WOp::Conv { act, .. } = &mut g.nodes[c].op {
                        *act = new;
                    }
                    g.replace(i, c);
                }
                _ => {}
            }
        });
    }

    /// b(a(x)) for two in-plane convs as one plane-by-plane pair.
    pub fn fuse_gcn_planes(&mut self) {
        self.each_live(|g, i| {
            let readers = g.consumers();
            let Some(b) = g.lin(i).filter(|l| l.in_plane()).cloned() else { return };
            let a = g.nodes[i].inputs[0];
            if !g.bare_conv(i, &vec![1; g.nodes.len()]) || !g.bare_conv(a, &readers) {
                return;
            }
            let Some(al) = g.lin(a).filter(|l| l.in_plane()).cloned() else { return };
            g.nodes[i].op = WOp::Pair { a: al, b };
            g.nodes[i].inputs = std::mem::take(&mut g.nodes[a].inputs);
        });
    }
}
