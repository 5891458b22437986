//! 3D connected components (26-connectivity) and the removal of small spurious ones.
//!
//! A volume is read as runs: the voxels of one value in a row along the last axis. Two runs of
//! the same value touch when their rows are neighbours (the row itself, or one of the 8 around
//! it) and their spans come within one voxel of each other; the components are the runs joined
//! by a union-find, so the work goes with the number of runs, not of voxels and their 26
//! neighbours.

/// The runs of the voxels of a volume of `d` whose value `wanted` picks, in C order, and how the
/// touching ones join.
pub struct Runs<T> {
    d: [usize; 3],
    /// Each run: its row (i * d1 + j), span [s, e) along the last axis, and value.
    pub runs: Vec<(usize, usize, usize, T)>,
    /// The first run of each row (and the end, at `d0 * d1`).
    first: Vec<usize>,
    parent: Vec<usize>,
}

impl<T: Copy + PartialEq> Runs<T> {
    /// The runs of `v` (C order, `d`) that `wanted` picks, joined into components.
    pub fn new(v: &[T], d: [usize; 3], wanted: impl Fn(T) -> bool) -> Runs<T> {
        assert_eq!(v.len(), d.iter().product::<usize>(), "runs: volume length");
        let (rows, n2) = (d[0] * d[1], d[2]);
        let mut runs = Vec::new();
        let mut first = Vec::with_capacity(rows + 1);
        for r in 0..rows {
            first.push(runs.len());
            let row = &v[r * n2..(r + 1) * n2];
            let mut k = 0;
            while k < n2 {
                let x = row[k];
                let s = k;
                while k < n2 && row[k] == x {
                    k += 1;
                }
                if wanted(x) {
                    runs.push((r, s, k, x));
                }
            }
        }
        first.push(runs.len());
        let parent = (0..runs.len()).collect();
        let mut g = Runs { d, runs, first, parent };
        g.join();
        g
    }

    /// Joins every run with the touching runs of the rows before it among its neighbours.
    fn join(&mut self) {
        let n1 = self.d[1];
        for r in 0..self.d[0] * self.d[1] {
            let (i, j) = (r / n1, r % n1);
            let mut before = Vec::with_capacity(4);
            if j > 0 {
                before.push(r - 1);
            }
            if i > 0 {
                let up = r - n1;
                before.extend([up.checked_sub(1).filter(|_| j > 0), Some(up), Some(up + 1).filter(|_| j + 1 < n1)].into_iter().flatten());
            }
            for q in before {
                self.join_rows(r, q);
            }
        }
    }

    /// Joins the touching runs of the same value of rows `a` and `b`.
    fn join_rows(&mut self, a: usize, b: usize) {
        let (bs, be) = (self.first[b], self.first[b + 1]);
        let mut lo = bs;
        for x in self.first[a]..self.first[a + 1] {
            let (_, s, e, v) = self.runs[x];
            // runs of b that end before this one's reach end before every later one's too
            while lo < be && self.runs[lo].2 < s {
                lo += 1;
            }
            let mut y = lo;
            while y < be && self.runs[y].1 <= e {
                if self.runs[y].3 == v {
                    self.union(x, y);
                }
                y += 1;
            }
        }
    }

    fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] != x {
            self.parent[x] = self.parent[self.parent[x]];
            x = self.parent[x];
        }
        x
    }

    fn union(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            self.parent[a.max(b)] = a.min(b);
        }
    }

    /// Each run's component (1.., numbered in the C order of the components' first voxels) and
    /// each component's voxel count (index 0 unused).
    pub fn components(&mut self) -> (Vec<u32>, Vec<usize>) {
        let mut id_of_root = vec![0u32; self.runs.len()];
        let mut sizes = vec![0usize];
        let mut comp = Vec::with_capacity(self.runs.len());
        for x in 0..self.runs.len() {
            let root = self.find(x);
            if id_of_root[root] == 0 {
                id_of_root[root] = sizes.len() as u32;
                sizes.push(0);
            }
            let c = id_of_root[root];
            sizes[c as usize] += self.runs[x].2 - self.runs[x].1;
            comp.push(c);
        }
        (comp, sizes)
    }

    /// The flat voxel range of run `x`.
    pub fn span(&self, x: usize) -> std::ops::Range<usize> {
        let (r, s, e, _) = self.runs[x];
        r * self.d[2] + s..r * self.d[2] + e
    }
}

/// Labels the 26-connected components of `mask`: returns per-voxel component ids (0 = not in the
/// mask, 1.. = components, numbered in the C order of their first voxel) and the voxel count of
/// each component (index 0 unused).
pub fn label_components(mask: &[bool], dims: [usize; 3]) -> (Vec<u32>, Vec<usize>) {
    let mut g = Runs::new(mask, dims, |m| m);
    let (comp, sizes) = g.components();
    let mut id = vec![0u32; mask.len()];
    for (x, &c) in comp.iter().enumerate() {
        id[g.span(x)].fill(c);
    }
    (id, sizes)
}

/// In a label volume (0 background, 1.. classes), sets to 0 the components of each class in
/// `classes` (other than 0) smaller than `min_size` voxels, always keeping the largest component
/// of each class. Returns the number of voxels removed.
pub fn remove_small_components(labels: &mut [u8], dims: [usize; 3], classes: &[u8], min_size: usize) -> usize {
    // the components of every class at once: each is of one class
    let mut g = Runs::new(labels, dims, |v| v != 0 && classes.contains(&v));
    let (comp, sizes) = g.components();
    let mut class = vec![0u8; sizes.len()];
    for (x, &c) in comp.iter().enumerate() {
        class[c as usize] = g.runs[x].3;
    }
    let mut keep: Vec<bool> = sizes.iter().map(|&n| n >= min_size).collect();
    for &k in classes.iter().filter(|&&k| k != 0) {
        // the largest of the class, the first met among equals
        if let Some(c) = (1..sizes.len()).filter(|&c| class[c] == k).max_by_key(|&c| (sizes[c], std::cmp::Reverse(c))) {
            keep[c] = true;
        }
    }
    let mut removed = 0;
    for (x, &c) in comp.iter().enumerate() {
        if !keep[c as usize] {
            let span = g.span(x);
            removed += span.len();
            labels[span].fill(0);
        }
    }
    removed
}
