//! Lowering of the passed inference graph (`graph::passes::Weighted`) to the plan's steps: one
//! value per node (a node the passes merged away has none), in-place steps where the node alone
//! reads its input, up-sampling fused with the add that reads it.
use super::kernel::{Act, Isa, PackedConv};
use super::{Step, V};
use crate::error::{Error, Result};
use crate::graph::f32s;
use crate::graph::passes::{Lin, WOp, Weighted};
use crate::tensor::Shape;

pub(super) struct Lowered {
    pub shapes: Vec<Shape>,
    pub steps: Vec<Step>,
    pub convs: Vec<PackedConv>,
    pub input: V,
    pub output: V,
}

struct Lower<'a> {
    g: &'a Weighted,
    isa: Isa,
    bias_in_epilogue: bool,
    readers: Vec<usize>,
    val: Vec<Option<V>>,
    out: Lowered,
}

impl Lower<'_> {
    fn value(&mut self, s: Shape) -> V {
        self.out.shapes.push(s);
        self.out.shapes.len() - 1
    }

    fn pack(&mut self, l: &Lin) -> usize {
        self.out.convs.push(PackedConv::new(l.spec, &l.w, l.b.as_deref(), self.isa));
        self.out.convs.len() - 1
    }

    fn input(&self, i: usize, k: usize) -> Result<V> {
        let j = self.g.nodes[i].inputs[k];
        self.val[j].ok_or_else(|| Error::Other(format!("plan: {} reads {}, which has no value", self.g.nodes[i].name, self.g.nodes[j].name)))
    }

    /// Input k of node i, to be overwritten: only when node i alone reads it.
    fn in_place(&self, i: usize, k: usize) -> Result<V> {
        let j = self.g.nodes[i].inputs[k];
        if self.readers[j] != 1 {
            return Err(Error::Other(format!("plan: {} would overwrite {}, which other nodes read", self.g.nodes[i].name, self.g.nodes[j].name)));
        }
        self.input(i, k)
    }

    fn steps(&mut self, s: Step) {
        self.out.steps.push(s);
    }

    /// act(conv(x) + bias + res): one step with the epilogue, or (bias not in the epilogue) a
    /// bias-free conv and separate bias / residual / activation steps.
    fn conv(&mut self, x: V, l: &Lin, act: Act, res: Option<V>, shape: Shape) -> V {
        let out = self.value(shape);
        if self.bias_in_epilogue {
            let conv = self.pack(l);
            self.steps(Step::Conv { x, conv, out, res, act });
            return out;
        }
        let conv = self.pack(&l.without_bias());
        self.steps(Step::Conv { x, conv, out, res: None, act: Act::None });
        if let Some(b) = &l.b {
            self.steps(Step::Affine { x: out, scale: vec![1.0; b.len()], shift: b.clone(), relu: false });
        }
        if let Some(r) = res {
            self.steps(Step::Add { acc: out, other: r, relu: act == Act::Relu });
        } else if act == Act::Relu {
            self.steps(Step::Relu { x: out });
        }
        if act == Act::Sigmoid {
            self.steps(Step::Sigmoid { x: out });
        }
        out
    }

    fn node(&mut self, i: usize) -> Result<Option<V>> {
        let n = &self.g.nodes[i];
        let s = n.shape;
        Ok(Some(match &n.op {
            WOp::Input => self.value(s),
            WOp::Affine { scale, shift } | WOp::Bn { scale, shift } => {
                let x = self.in_place(i, 0)?;
                self.steps(Step::Affine { x, scale: f32s(scale), shift: f32s(shift), relu: false });
                x
            }
            WOp::Conv { lin, act } => {
                let x = self.input(i, 0)?;
                let res = if n.inputs.len() > 1 { Some(self.input(i, 1)?) } else { None };
                self.conv(x, lin, *act, res, s)
            }
            WOp::Pair { a, b } => {
                let x = self.input(i, 0)?;
                let out = self.value(s);
                let (a, b) = (self.pack(a), self.pack(b));
                self.steps(Step::Pair { x, a, b, out });
                out
            }
            WOp::Relu | WOp::Sigmoid => {
                let x = self.in_place(i, 0)?;
                self.steps(if matches!(n.op, WOp::Relu) { Step::Relu { x } } else { Step::Sigmoid { x } });
                x
            }
            WOp::Add => {
                let up = (0..2).find(|&k| matches!(self.g.nodes[n.inputs[k]].op, WOp::Upsample));
                if let Some(k) = up {
                    let acc = self.in_place(i, 1 - k)?;
                    let low = self.val[self.g.nodes[n.inputs[k]].inputs[0]].expect("up-sampled value");
                    self.steps(Step::UpAdd { acc, low });
                    acc
                } else {
                    let k = if self.readers[n.inputs[0]] == 1 { 0 } else { 1 };
                    let (acc, other) = (self.in_place(i, k)?, self.input(i, 1 - k)?);
                    self.steps(Step::Add { acc, other, relu: false });
                    acc
                }
            }
            WOp::MaxPool => {
                let x = self.input(i, 0)?;
                let out = self.value(s);
                self.steps(Step::MaxPool { x, out });
                out
            }
            // run by the add that reads it
            WOp::Upsample => {
                let readers_ok = self.readers[i] == 1 && self.g.nodes.iter().any(|m| matches!(m.op, WOp::Add) && m.inputs.contains(&i));
                if !readers_ok {
                    return Err(Error::Other(format!("plan: {} is an up-sampling not added to anything (the plan fuses up-sample + add)", n.name)));
                }
                return Ok(None);
            }
        }))
    }
}

/// The steps of `g` in its order; `bias_in_epilogue` false gives every bias its own step.
pub(super) fn lower(g: &Weighted, isa: Isa, bias_in_epilogue: bool) -> Result<Lowered> {
    let out = Lowered { shapes: Vec::new(), steps: Vec::new(), convs: Vec::new(), input: 0, output: 0 };
    let mut l = Lower { g, isa, bias_in_epilogue, readers: g.consumers(), val: vec![None; g.nodes.len()], out };
    for i in g.order() {
        l.val[i] = l.node(i)?;
    }
    let v = |i: usize| l.val[i].ok_or_else(|| Error::Other("plan: the graph's input or output has no value".into()));
    let (input, output) = (v(g.input)?, v(g.output)?);
    Ok(Lowered { input, output, ..l.out })
}
