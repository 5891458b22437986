//! 3D connected components (26-connectivity) and the removal of small spurious ones.

/// A volume of `d` voxels with a border of one voxel on every side: every voxel of the volume has
/// its 26 neighbours at fixed offsets, with no bounds to check. The volume's voxels keep their C
/// order in the padded one.
pub struct Padded {
    d: [usize; 3],
    p: [usize; 3],
    /// The 26 neighbours' offsets.
    pub offsets: [isize; 26],
}

impl Padded {
    pub fn new(d: [usize; 3]) -> Padded {
        let p = d.map(|n| n + 2);
        let mut offsets = [0isize; 26];
        let mut n = 0;
        for a in -1isize..=1 {
            for b in -1isize..=1 {
                for c in -1isize..=1 {
                    if (a, b, c) != (0, 0, 0) {
                        offsets[n] = (a * p[1] as isize + b) * p[2] as isize + c;
                        n += 1;
                    }
                }
            }
        }
        Padded { d, p, offsets }
    }

    /// Voxels of the padded volume.
    pub fn voxels(&self) -> usize {
        self.p.iter().product()
    }

    /// The padded index of the first voxel of row (i, j) of the volume.
    fn row(&self, i: usize, j: usize) -> usize {
        ((i + 1) * self.p[1] + j + 1) * self.p[2] + 1
    }

    /// `v` (the volume, C order) padded with `border`.
    pub fn pad<T: Copy>(&self, v: &[T], border: T) -> Vec<T> {
        let mut out = vec![border; self.voxels()];
        let n2 = self.d[2];
        for (r, src) in v.chunks_exact(n2.max(1)).enumerate() {
            let q = self.row(r / self.d[1], r % self.d[1]);
            out[q..q + n2].copy_from_slice(src);
        }
        out
    }

    /// The volume's voxels of `padded` into `v`.
    pub fn unpad<T: Copy>(&self, padded: &[T], v: &mut [T]) {
        let n2 = self.d[2];
        for (r, dst) in v.chunks_exact_mut(n2.max(1)).enumerate() {
            let q = self.row(r / self.d[1], r % self.d[1]);
            dst.copy_from_slice(&padded[q..q + n2]);
        }
    }

    /// The neighbours of padded index `p` (a voxel of the volume).
    pub fn neighbours(&self, p: usize) -> impl Iterator<Item = usize> + '_ {
        self.offsets.iter().map(move |&o| p.wrapping_add_signed(o))
    }
}

/// The 26-connected components of the voxels of a padded volume `v` that `wanted` picks, each of
/// voxels of one value: per-voxel component ids (0 = not picked, 1.. = components, numbered in the
/// C order of their first voxel) and each component's voxel count (index 0 unused).
fn components<T: Copy + PartialEq>(g: &Padded, v: &[T], wanted: impl Fn(T) -> bool) -> (Vec<u32>, Vec<usize>) {
    let mut id = vec![0u32; v.len()];
    let mut sizes = vec![0usize];
    let mut stack = Vec::new();
    for start in 0..v.len() {
        let c = v[start];
        if id[start] != 0 || !wanted(c) {
            continue;
        }
        let label = sizes.len() as u32;
        let mut count = 0usize;
        id[start] = label;
        stack.push(start);
        while let Some(p) = stack.pop() {
            count += 1;
            for q in g.neighbours(p) {
                if v[q] == c && id[q] == 0 {
                    id[q] = label;
                    stack.push(q);
                }
            }
        }
        sizes.push(count);
    }
    (id, sizes)
}

/// Labels the 26-connected components of `mask`: returns per-voxel component ids (0 = not in the
/// mask, 1.. = components, numbered in the C order of their first voxel) and the voxel count of
/// each component (index 0 unused).
pub fn label_components(mask: &[bool], dims: [usize; 3]) -> (Vec<u32>, Vec<usize>) {
    assert_eq!(mask.len(), dims.iter().product::<usize>(), "label_components: mask length");
    let g = Padded::new(dims);
    let (pid, sizes) = components(&g, &g.pad(mask, false), |m| m);
    let mut id = vec![0u32; mask.len()];
    g.unpad(&pid, &mut id);
    (id, sizes)
}

/// In a label volume (0 background, 1.. classes), sets to 0 the components of each class in
/// `classes` (other than 0) smaller than `min_size` voxels, always keeping the largest component
/// of each class. Returns the number of voxels removed.
pub fn remove_small_components(labels: &mut [u8], dims: [usize; 3], classes: &[u8], min_size: usize) -> usize {
    assert_eq!(labels.len(), dims.iter().product::<usize>(), "remove_small_components: labels length");
    let g = Padded::new(dims);
    let mut l = g.pad(labels, 0);
    // the components of every class at once: each is of one class
    let (id, sizes) = components(&g, &l, |v| v != 0 && classes.contains(&v));
    let mut class = vec![0u8; sizes.len()];
    for (p, &c) in id.iter().enumerate() {
        class[c as usize] = l[p];
    }
    let mut keep: Vec<bool> = sizes.iter().map(|&n| n >= min_size).collect();
    for &k in classes.iter().filter(|&&k| k != 0) {
        // the largest of the class, the first met among equals
        if let Some(c) = (1..sizes.len()).filter(|&c| class[c] == k).max_by_key(|&c| (sizes[c], std::cmp::Reverse(c))) {
            keep[c] = true;
        }
    }
    let mut removed = 0;
    for (v, &c) in l.iter_mut().zip(&id) {
        if c != 0 && !keep[c as usize] {
            *v = 0;
            removed += 1;
        }
    }
    g.unpad(&l, labels);
    removed
}
