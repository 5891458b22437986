//! 3D connected components (26-connectivity) and the removal of small spurious ones.

/// Labels the 26-connected components of `mask`: returns per-voxel component ids (0 = not in the
/// mask, 1.. = components) and the voxel count of each component (index 0 unused).
pub fn label_components(mask: &[bool], dims: [usize; 3]) -> (Vec<u32>, Vec<usize>) {
    let [n0, n1, n2] = dims;
    assert_eq!(mask.len(), n0 * n1 * n2, "label_components: mask length");
    let mut id = vec![0u32; mask.len()];
    let mut sizes = vec![0usize];
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || id[start] != 0 {
            continue;
        }
        let label = sizes.len() as u32;
        let mut count = 0usize;
        id[start] = label;
        stack.push(start);
        while let Some(p) = stack.pop() {
            count += 1;
            let (i, j, k) = (p / (n1 * n2), p / n2 % n1, p % n2);
            for di in -1isize..=1 {
                let a = i as isize + di;
                if a < 0 || a >= n0 as isize {
                    continue;
                }
                for dj in -1isize..=1 {
                    let b = j as isize + dj;
                    if b < 0 || b >= n1 as isize {
                        continue;
                    }
                    for dk in -1isize..=1 {
                        let c = k as isize + dk;
                        if c < 0 || c >= n2 as isize {
                            continue;
                        }
                        let q = (a as usize * n1 + b as usize) * n2 + c as usize;
                        if mask[q] && id[q] == 0 {
                            id[q] = label;
                            stack.push(q);
                        }
                    }
                }
            }
        }
        sizes.push(count);
    }
    (id, sizes)
}

/// In a label volume (0 background, 1.. classes), sets to 0 the components of each class in
/// `classes` smaller than `min_size` voxels, always keeping the largest component of each class.
/// Returns the number of voxels removed.
pub fn remove_small_components(labels: &mut [u8], dims: [usize; 3], classes: &[u8], min_size: usize) -> usize {
    let mut removed = 0;
    for &class in classes {
        let mask: Vec<bool> = labels.iter().map(|&l| l == class).collect();
        let (id, sizes) = label_components(&mask, dims);
        if sizes.len() <= 1 {
            continue;
        }
        let largest = (1..sizes.len()).max_by_key(|&c| (sizes[c], std::cmp::Reverse(c))).expect("one component");
        let keep: Vec<bool> = (0..sizes.len()).map(|c| c == largest || sizes[c] >= min_size).collect();
        for (l, &c) in labels.iter_mut().zip(&id) {
            if c != 0 && !keep[c as usize] {
                *l = 0;
                removed += 1;
            }
        }
    }
    removed
}
