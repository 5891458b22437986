//! Fusions as graph-to-graph passes over the inference graph with its weights attached (float64,
//! engine layout). Each pass is a function of `Weighted` that leaves the output unchanged up to
//! rounding and can be switched off alone; "unfused" means "no passes". A pass rewrites nodes in
//! place, appends the nodes it creates and redirects the readers of a node it replaces; nodes
//! nobody reads any more drop out when an engine lowers the graph (`Weighted::order`).
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
    pub w: Vec<f64>,
    pub b: Option<Vec<f64>>,
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

impl Weighted {
    /// `g` (eval mode) with the tensors `get` returns by name (PyTorch layout, float32).
    pub fn new(g: &Graph, get: &dyn Fn(&str) -> Result<Vec<f32>>) -> Result<Weighted> {
        if g.mode != Mode::Eval {
            return Err(Error::Other("the weighted graph is the inference graph (eval mode)".into()));
        }
        let f64s = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
        let mut nodes = Vec::with_capacity(g.nodes.len());
        for n in &g.nodes {
            let p = |s: &str| get(&format!("{}.{s}", n.name));
            let (op, inputs) = match n.op {
                Op::Input => (WOp::Input, vec![]),
                Op::Scale { scale, shift } => (WOp::Affine { scale: vec![scale], shift: vec![shift] }, n.inputs.clone()),
                Op::Conv { spec, bias } => {
                    let w = f64s(conv_weight_layout(&spec, &p("weight")?));
                    let b = if bias { Some(f64s(p("bias")?)) } else { None };
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
        for i in 0..self.nodes.len() {
            if self.dead(i) {
                continue;
            }
            let WOp::Bn { scale, shift } = self.nodes[i].op.clone() else { continue };
            let c = self.nodes[i].inputs[0];
            if !self.bare_conv(c, &self.consumers()) {
                continue;
            }
            let l = self.lin_mut(c);
            let cout = l.spec.cout;
            l.w.iter_mut().enumerate().for_each(|(i, w)| *w *= scale[i % cout]);
            let b = l.b.get_or_insert_with(|| vec![0.0; cout]);
            b.iter_mut().zip(scale.iter().zip(&shift)).for_each(|(b, (s, t))| *b = *b * s + t);
            self.replace(i, c);
        }
    }

    /// p(up(a) + s) for a 1x1x1 conv p as up(p_nobias(a)) + p(s): the first on the low-resolution
    /// side (8x fewer voxels), the second next to whatever made s (where `merge_1x1` can absorb it).
    pub fn move_conv1_low(&mut self) {
        for i in 0..self.nodes.len() {
            if self.dead(i) {
                continue;
            }
            let Some(p) = self.lin(i).filter(|l| l.is_1x1()).cloned() else { continue };
            let readers = self.consumers();
            let a = self.nodes[i].inputs[0];
            if self.nodes[i].inputs.len() != 1 || !matches!(self.nodes[a].op, WOp::Add) || readers[a] != 1 {
                continue;
            }
            let (mut up, mut s) = (self.nodes[a].inputs[0], self.nodes[a].inputs[1]);
            if matches!(self.nodes[s].op, WOp::Upsample) {
                std::mem::swap(&mut up, &mut s);
            }
            if !matches!(self.nodes[up].op, WOp::Upsample) || readers[up] != 1 {
                continue;
            }
            let (low, name) = (self.nodes[up].inputs[0], self.nodes[i].name.clone());
            let (ls, ss) = (self.nodes[low].shape, self.nodes[s].shape);
            let lo = self.push(format!("{name}.low"), WOp::Conv { lin: p.without_bias(), act: Act::None }, vec![low], ls.with_c(p.spec.cout));
            let up2 = self.push(format!("{name}.up"), WOp::Upsample, vec![lo], ss.with_c(p.spec.cout));
            let sk = self.push(format!("{name}.skip"), WOp::Conv { lin: p, act: Act::None }, vec![s], ss.with_c(self.nodes[i].shape.c));
            self.nodes[i].op = WOp::Add;
            self.nodes[i].inputs = vec![up2, sk];
            self.nodes[a].inputs.clear();
            self.nodes[up].inputs.clear();
        }
    }

    /// A 1x1x1 conv p that reads only a conv (or the sum of two convs) merged into it (them):
    /// p(a(x)) = (p.a)(x); p(l + r) = (p.l)(x) + (p_nobias.r)(x). Only where p does not widen.
    pub fn merge_1x1(&mut self) {
        for i in 0..self.nodes.len() {
            if self.dead(i) {
                continue;
            }
            let Some(p) = self.lin(i).filter(|l| l.is_1x1() && l.spec.cout <= l.spec.cin).cloned() else { continue };
            let readers = self.consumers();
            let a = self.nodes[i].inputs[0];
            if self.nodes[i].inputs.len() != 1 || !matches!(self.nodes[i].op, WOp::Conv { act: Act::None, .. }) {
                continue;
            }
            if self.bare_conv(a, &readers) {
                let m = p.after(self.lin(a).expect("conv"), true);
                *self.lin_mut(a) = m;
                self.nodes[a].shape.c = p.spec.cout;
                self.replace(i, a);
            } else if matches!(self.nodes[a].op, WOp::Add) && readers[a] == 1 {
                let (l, r) = (self.nodes[a].inputs[0], self.nodes[a].inputs[1]);
                if l == r || !self.bare_conv(l, &readers) || !self.bare_conv(r, &readers) {
                    continue;
                }
                for (j, with_bias) in [(l, true), (r, false)] {
                    let m = p.after(self.lin(j).expect("conv"), with_bias);
                    *self.lin_mut(j) = m;
                    self.nodes[j].shape.c = p.spec.cout;
                }
                self.nodes[a].shape.c = p.spec.cout;
                self.replace(i, a);
            }
        }
    }

    /// Residual add, then ReLU or sigmoid, in the epilogue of the conv that makes their input.
    /// The add goes into a unit-stride operand's conv (the later one of two: the earlier is then
    /// ready when it runs), not a stride-2 projection's; an up-sampled operand is left to the add
    /// (the plan fuses up-sample + add).
    pub fn fuse_epilogue(&mut self) {
        for i in 0..self.nodes.len() {
            if self.dead(i) {
                continue;
            }
            let readers = self.consumers();
            let ins = self.nodes[i].inputs.clone();
            match self.nodes[i].op {
                WOp::Add => {
                    if ins.iter().any(|&j| matches!(self.nodes[j].op, WOp::Upsample)) || ins[0] == ins[1] {
                        continue;
                    }
                    let unit = |k: usize| self.lin(ins[k]).is_some_and(|l| l.spec.stride == [1, 1, 1]);
                    let cands: Vec<usize> = [1, 0].into_iter().filter(|&k| self.bare_conv(ins[k], &readers)).collect();
                    let Some(k) = cands.iter().copied().find(|&k| unit(k)).or(cands.first().copied()) else { continue };
                    let (c, other) = (ins[k], ins[1 - k]);
                    self.nodes[c].inputs.push(other);
                    self.replace(i, c);
                }
                WOp::Relu | WOp::Sigmoid => {
                    let c = ins[0];
                    let conv_no_act = readers[c] == 1 && matches!(self.nodes[c].op, WOp::Conv { act: Act::None, .. });
                    if !conv_no_act {
                        continue;
                    }
                    let new = if matches!(self.nodes[i].op, WOp::Relu) { Act::Relu } else { Act::Sigmoid };
                    if let WOp::Conv { act, .. } = &mut self.nodes[c].op {
                        *act = new;
                    }
                    self.replace(i, c);
                }
                _ => {}
            }
        }
    }

    /// b(a(x)) for two in-plane convs as one plane-by-plane pair.
    pub fn fuse_gcn_planes(&mut self) {
        for i in 0..self.nodes.len() {
            if self.dead(i) {
                continue;
            }
            let readers = self.consumers();
            let Some(b) = self.lin(i).filter(|l| l.in_plane()).cloned() else { continue };
            let a = self.nodes[i].inputs[0];
            if !self.bare_conv(i, &vec![1; self.nodes.len()]) || !self.bare_conv(a, &readers) {
                continue;
            }
            let Some(al) = self.lin(a).filter(|l| l.in_plane()).cloned() else { continue };
            self.nodes[i].op = WOp::Pair { a: al, b };
            self.nodes[i].inputs = std::mem::take(&mut self.nodes[a].inputs);
        }
    }
}
