//! Buffer planning: every value of the plan gets an offset in one arena, decided before the run.
//! A value lives from the first step that touches it to the last; two values may share memory
//! when their lifetimes do not overlap. Greedy placement, largest first, at the lowest offset that
//! clears every placed value it overlaps in time (the usual "greedy by size" of inference engines).

/// Offsets are multiples of this many floats (64 bytes: a cache line, a zmm register).
const ALIGN: usize = 16;

/// A value's size in floats and its lifetime [first, last] in step indices.
#[derive(Clone, Copy, Debug)]
pub struct Life {
    pub len: usize,
    pub first: usize,
    pub last: usize,
}

/// The lifetime of every value of a plan: `lens[v]` units long, from the first of `uses` (the
/// values each step touches, in order) that touches it to the last; the input is live from the
/// start, the output to the end; a value no step touches is empty.
pub fn lifetimes(lens: impl Iterator<Item = usize>, uses: impl Iterator<Item = Vec<usize>>, input: usize, output: usize) -> Vec<Life> {
    let mut lives: Vec<Life> = lens.map(|len| Life { len, first: usize::MAX, last: 0 }).collect();
    let mut steps = 0;
    for (i, vals) in uses.enumerate() {
        for v in vals {
            lives[v].first = lives[v].first.min(i);
            lives[v].last = lives[v].last.max(i);
        }
        steps = i + 1;
    }
    lives[input].first = 0;
    lives[output].last = steps;
    for l in lives.iter_mut().filter(|l| l.first == usize::MAX) {
        *l = Life { len: 0, first: 0, last: 0 };
    }
    lives
}

/// Offsets (floats) per value and the arena size (floats). With `reuse` off, values never share.
pub fn place(lives: &[Life], reuse: bool) -> (Vec<usize>, usize) {
    let size = |l: &Life| l.len.div_ceil(ALIGN) * ALIGN;
    let mut off = vec![0usize; lives.len()];
    if !reuse {
        let mut top = 0;
        for (i, l) in lives.iter().enumerate() {
            off[i] = top;
            top += size(l);
        }
        return (off, top);
    }
    let mut order: Vec<usize> = (0..lives.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(size(&lives[i])), lives[i].first));
    let mut placed: Vec<usize> = Vec::new();
    let mut top = 0;
    for &i in &order {
        let li = &lives[i];
        // busy intervals of the placed values alive at the same time, by offset
        let mut busy: Vec<(usize, usize)> = placed
            .iter()
            .filter(|&&j| lives[j].first <= li.last && li.first <= lives[j].last)
            .map(|&j| (off[j], off[j] + size(&lives[j])))
            .collect();
        busy.sort_unstable();
        let mut at = 0;
        for (s, e) in busy {
            if at + size(li) <= s {
                break;
            }
            at = at.max(e);
        }
        off[i] = at;
        top = top.max(at + size(li));
        placed.push(i);
    }
    (off, top)
}

/// True when no two values alive at the same step overlap in memory (checked by the tests and,
/// in debug builds, by every plan).
pub fn disjoint(lives: &[Life], off: &[usize]) -> bool {
    for i in 0..lives.len() {
        for j in i + 1..lives.len() {
            let (a, b) = (&lives[i], &lives[j]);
            let in_time = a.first <= b.last && b.first <= a.last;
            let in_mem = off[i] < off[j] + b.len && off[j] < off[i] + a.len;
            if in_time && in_mem && a.len > 0 && b.len > 0 {
                return false;
            }
        }
    }
    true
}
