//! Backward of every op of the tape on the CPU backend, on odd shapes (batch 2, odd sizes, odd
//! channel counts, every kernel shape and stride the model uses).
//!
//! - Linear ops (convolution input/weight/bias gradients, up-sampling): the adjoint identity
//!   <A x, r> = <x, A^T r>, both sides summed in float64; tolerance 1e-5 relative to the sum of
//!   |terms| (float32 rounding of the forward and backward ops only).
//! - Non-linear ops (batch norm, ReLU, max-pool, sigmoid, softmax, dropout): central differences of
//!   L = sum r * op(x) in float32 with step h = 1e-2 (1e-3 for batch norm), L summed in float64, at
//!   up to 40 random coordinates; tolerance |fd - g| <= 2e-3 * max(1, max|g|) (the truncation error
//!   of a central difference is O(h^2) and float32 rounding of L is ~1e-7 * sum|r y| / h).
use deepis::backend::{Backend, ConvSpec, DevTensor};
use deepis::cpu::CpuBackend;
use deepis::rng::Rng;
use deepis::tensor::Shape;
use deepis::train::TrainBackend;

type T = DevTensor<Vec<f32>>;

fn rand_t(shape: Shape, rng: &mut Rng) -> T {
    DevTensor { shape, data: (0..shape.len()).map(|_| rng.normal() as f32).collect() }
}

fn dot(a: &[f32], b: &[f32]) -> (f64, f64) {
    a.iter().zip(b).fold((0.0, 0.0), |(s, m), (&x, &y)| (s + x as f64 * y as f64, m + (x as f64 * y as f64).abs()))
}

fn spec(cin: usize, cout: usize, k: [usize; 3], s: usize) -> ConvSpec {
    ConvSpec { cin, cout, k, stride: [s; 3], pad: k.map(|k| (k - 1) / 2) }
}

#[test]
fn conv3d_backward_is_the_adjoint() {
    let b = CpuBackend::new();
    let mut rng = Rng::new(11);
    println!("{:<34} {:>12} {:>12} {:>12}", "conv (cin cout k stride) on d", "input", "weight", "bias");
    let cases: Vec<(ConvSpec, [usize; 3])> = vec![
        (spec(3, 5, [3, 3, 3], 1), [5, 6, 7]),
        (spec(3, 5, [3, 3, 3], 2), [5, 6, 7]),
        (spec(4, 6, [3, 3, 3], 2), [4, 5, 2]),
        (spec(3, 17, [3, 3, 3], 1), [3, 4, 5]),
        (spec(5, 3, [1, 1, 1], 1), [3, 4, 5]),
        (spec(5, 7, [1, 1, 1], 2), [5, 4, 3]),
        (spec(3, 4, [7, 1, 1], 1), [9, 3, 4]),
        (spec(4, 4, [1, 1, 7], 1), [3, 2, 9]),
        (spec(4, 3, [1, 7, 1], 1), [2, 9, 3]),
        (spec(2, 18, [1, 3, 1], 1), [2, 3, 3]),
        (spec(1, 4, [3, 3, 3], 1), [3, 5, 4]),
        (spec(6, 3, [3, 3, 3], 1), [1, 1, 1]),
        // full register blocks of the weight-gradient kernel (4 cin x 16 cout) plus tails
        (spec(9, 33, [3, 3, 3], 2), [5, 4, 7]),
        (spec(20, 16, [1, 1, 1], 1), [3, 3, 5]),
        (spec(16, 16, [1, 7, 1], 1), [2, 7, 3]),
    ];
    for (sp, d) in cases {
        let x = rand_t(Shape::new(2, d, sp.cin), &mut rng);
        let w: Vec<f32> = (0..sp.weight_len()).map(|_| rng.normal() as f32).collect();
        let bias: Vec<f32> = (0..sp.cout).map(|_| rng.normal() as f32).collect();
        let y = b.conv3d(&x, &w, None, &sp).unwrap();
        let yb = b.conv3d(&x, &w, Some(&bias), &sp).unwrap();
        let r = rand_t(y.shape, &mut rng);
        let (lhs, mag) = dot(&y.data, &r.data);
        let dx = b.conv3d_backward_input(&r, &w, &sp, d).unwrap();
        assert_eq!(dx.shape, x.shape);
        let e_in = (dot(&x.data, &dx.data).0 - lhs).abs() / mag;
        let dw = b.conv3d_backward_weight(&x, &r, &sp).unwrap();
        let e_w = (dot(&w, &dw).0 - lhs).abs() / mag;
        // <conv(x) + bias, r> - <conv(x), r> = <bias, sum r>
        let db = b.conv3d_backward_bias(&r).unwrap();
        let e_b = (dot(&yb.data, &r.data).0 - lhs - dot(&bias, &db).0).abs() / mag;
        println!("{:<34} {e_in:>12.2e} {e_w:>12.2e} {e_b:>12.2e}", format!("{} {} {:?} {} on {:?}", sp.cin, sp.cout, sp.k, sp.stride[0], d));
        assert!(e_in < 1e-5 && e_w < 1e-5 && e_b < 1e-5, "{sp:?} on {d:?}");
    }
}

#[test]
fn upsample_backward_is_the_adjoint() {
    let b = CpuBackend::new();
    let mut rng = Rng::new(12);
    for (din, dout) in [([2, 3, 1], [5, 6, 3]), ([1, 1, 2], [3, 4, 5]), ([3, 3, 3], [7, 5, 6]), ([4, 2, 3], [4, 2, 3])] {
        let x = rand_t(Shape::new(2, din, 3), &mut rng);
        let y = b.upsample(&x, dout).unwrap();
        let r = rand_t(y.shape, &mut rng);
        let (lhs, mag) = dot(&y.data, &r.data);
        let dx = b.upsample_backward(&r, din).unwrap();
        let e = (dot(&x.data, &dx.data).0 - lhs).abs() / mag;
        println!("upsample {din:?} -> {dout:?}: {e:.2e}");
        assert!(e < 1e-5);
    }
}

/// Central differences of L = sum r * f(x) at random coordinates against `g` = dL/dx.
fn fd_check(name: &str, x: &T, r: &[f32], h: f32, g: &[f32], f: &dyn Fn(&T) -> T, rng: &mut Rng) {
    let loss = |x: &T| f(x).data.iter().zip(r).map(|(&y, &r)| y as f64 * r as f64).sum::<f64>();
    let gmax = g.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1.0);
    let mut worst = 0.0f32;
    for _ in 0..40 {
        let i = rng.below(x.data.len() as u64) as usize;
        let mut xp = DevTensor { shape: x.shape, data: x.data.clone() };
        xp.data[i] += h;
        let lp = loss(&xp);
        xp.data[i] -= 2.0 * h;
        let lm = loss(&xp);
        let fd = ((lp - lm) / (2.0 * h as f64)) as f32;
        worst = worst.max((fd - g[i]).abs() / gmax);
    }
    println!("{name:<40} worst |fd - g| / max(1, max|g|) = {worst:.2e}");
    assert!(worst <= 2e-3, "{name}: {worst:.2e}");
}

#[test]
fn nonlinear_backward_matches_finite_differences() {
    let b = CpuBackend::new();
    let mut rng = Rng::new(13);
    let s = Shape::new(2, [3, 5, 3], 5);
    let x = rand_t(s, &mut rng);
    let r: Vec<f32> = (0..s.len()).map(|_| rng.normal() as f32).collect();
    let rt = DevTensor { shape: s, data: r.clone() };

    // batch norm, training mode (batch statistics), gamma and beta too
    let gamma: Vec<f32> = (0..s.c).map(|_| 0.5 + rng.uniform() as f32).collect();
    let beta: Vec<f32> = (0..s.c).map(|_| rng.normal() as f32).collect();
    let (y, saved) = b.batch_norm_train(&x, &gamma, &beta, 1e-5).unwrap();
    let (dx, dg, db) = b.batch_norm_backward(&rt, &x, &gamma, &saved).unwrap();
    fd_check("batch_norm_train (x)", &x, &r, 1e-3, &dx.data, &|x| b.batch_norm_train(x, &gamma, &beta, 1e-5).unwrap().0, &mut rng);
    let (e_g, e_b) = {
        let dot_r = |v: &T| v.data.iter().zip(&r).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>();
        let mut worst = (0.0f64, 0.0f64);
        for c in 0..s.c {
            let h = 1e-2f32;
            let mut gp = gamma.clone();
            gp[c] += h;
            let mut gm = gamma.clone();
            gm[c] -= h;
            let fdg = (dot_r(&b.batch_norm_train(&x, &gp, &beta, 1e-5).unwrap().0) - dot_r(&b.batch_norm_train(&x, &gm, &beta, 1e-5).unwrap().0)) / (2.0 * h as f64);
            let mut bp = beta.clone();
            bp[c] += h;
            let mut bm = beta.clone();
            bm[c] -= h;
            let fdb = (dot_r(&b.batch_norm_train(&x, &gamma, &bp, 1e-5).unwrap().0) - dot_r(&b.batch_norm_train(&x, &gamma, &bm, 1e-5).unwrap().0)) / (2.0 * h as f64);
            worst.0 = worst.0.max((fdg - dg[c] as f64).abs() / (dg[c].abs() as f64).max(1.0));
            worst.1 = worst.1.max((fdb - db[c] as f64).abs() / (db[c].abs() as f64).max(1.0));
        }
        worst
    };
    println!("batch_norm_train (gamma, beta)           {e_g:.2e} {e_b:.2e}");
    assert!(e_g < 2e-3 && e_b < 2e-3);
    // batch statistics: biased variance
    let c0: Vec<f64> = x.data.iter().step_by(s.c).map(|&v| v as f64).collect();
    let m = c0.iter().sum::<f64>() / c0.len() as f64;
    let v = c0.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / c0.len() as f64;
    assert!((saved.mean[0] as f64 - m).abs() < 1e-6 && (saved.var[0] as f64 - v).abs() < 1e-6);
    let _ = y;

    // ReLU (away from the kink), sigmoid, softmax over channels
    let xs = DevTensor { shape: s, data: x.data.iter().map(|&v| if v.abs() < 0.05 { v + 0.1 } else { v }).collect() };
    let y = b.relu(&xs).unwrap();
    fd_check("relu", &xs, &r, 1e-2, &b.relu_backward(&rt, &y).unwrap().data, &|x| b.relu(x).unwrap(), &mut rng);
    let y = b.sigmoid(&x).unwrap();
    fd_check("sigmoid", &x, &r, 1e-2, &b.sigmoid_backward(&rt, &y).unwrap().data, &|x| b.sigmoid(x).unwrap(), &mut rng);
    let y = b.softmax(&x).unwrap();
    fd_check("softmax (5 channels)", &x, &r, 1e-2, &b.softmax_backward(&rt, &y).unwrap().data, &|x| b.softmax(x).unwrap(), &mut rng);
    let s3 = Shape::new(2, [3, 2, 5], 3);
    let x3 = rand_t(s3, &mut rng);
    let r3: Vec<f32> = (0..s3.len()).map(|_| rng.normal() as f32).collect();
    let y = b.softmax(&x3).unwrap();
    let g = b.softmax_backward(&DevTensor { shape: s3, data: r3.clone() }, &y).unwrap();
    fd_check("softmax (3 channels)", &x3, &r3, 1e-2, &g.data, &|x| b.softmax(x).unwrap(), &mut rng);

    // dropout: x * mask
    let mask = DevTensor { shape: s, data: (0..s.len()).map(|_| if rng.uniform() < 0.1 { 0.0 } else { 1.0 / 0.9 }).collect() };
    let g = b.mul(&rt, &mask).unwrap();
    fd_check("dropout (x * mask)", &x, &r, 1e-2, &g.data, &|x| b.mul(x, &mask).unwrap(), &mut rng);
}

#[test]
fn maxpool_backward_matches_finite_differences() {
    let b = CpuBackend::new();
    let mut rng = Rng::new(14);
    // odd sizes: the last row/column/slice is cut off by the floor and gets no gradient
    let xs = Shape::new(2, [5, 4, 7], 3);
    let x = rand_t(xs, &mut rng);
    let y = b.maxpool2(&x).unwrap();
    let r: Vec<f32> = (0..y.shape.len()).map(|_| rng.normal() as f32).collect();
    let g = b.maxpool2_backward(&DevTensor { shape: y.shape, data: r.clone() }, &x).unwrap();
    // small steps: random normal windows have no near-ties at this scale
    fd_check("maxpool2 (5x4x7, floored)", &x, &r, 1e-4, &g.data, &|x| b.maxpool2(x).unwrap(), &mut rng);
    let xt = deepis::tensor::Tensor::new(xs, x.data.clone()).unwrap();
    for n in 0..2 {
        for c in 0..3 {
            assert_eq!(g.data[xt.idx(n, [4, 1, 2], c)], 0.0);
            assert_eq!(g.data[xt.idx(n, [1, 1, 6], c)], 0.0);
        }
    }
    // ties (ReLU zeros): the first voxel of the window in scan order takes the gradient, as PyTorch
    let z = DevTensor { shape: Shape::new(1, [2, 2, 2], 1), data: vec![0.0; 8] };
    let g = b.maxpool2_backward(&DevTensor { shape: Shape::new(1, [1, 1, 1], 1), data: vec![1.0] }, &z).unwrap();
    assert_eq!(g.data, vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
}
