//! `TrainBackend` for the GPU backend: the backward ops of the autograd tape as launches of the
//! kernels of kernels/backward.cu, conv3d_backward.cu and batchnorm.cu on any `Device`, so the
//! CUDA device and the host emulator run the same code. As in `ops`, each op checks shapes and
//! computes its grid, block and argument list here, in one place; the argument lists follow the
//! kernel signatures exactly. The reference is the CPU implementation (src/train/cpu.rs).
//!
//! Determinism: reductions (weight, bias, gamma and beta gradients, batch statistics) run in two
//! passes — fixed chunks that depend on the shapes only, each summed in a fixed order, then the
//! chunk sums added in order — so results do not depend on the order threads or blocks run in.
use crate::backend::{Backend, ConvSpec, DevTensor};
use crate::error::{Error, Result};
use crate::gpu::ops::GpuBackend;
use crate::gpu::{kernels as k, Device, KArg, LaunchCfg};
use crate::tensor::Shape;
use crate::backward::{BnSaved, TrainBackend};

/// Threads per block of the one-thread-per-element kernels.
const BLOCK: u32 = 256;
/// Channel reductions (batchnorm.cu): a block is 32 channels x 8 row lanes.
const RED_X: usize = 32;
const RED_Y: u32 = 8;
/// Channel reductions: at most this many chunks, of at least this many rows.
const RED_MAX_CHUNKS: usize = 256;
const RED_MIN_ROWS: usize = 512;
/// Weight gradients: at most this many chunks, of at least this many output voxels, and at most
/// this many partial sums in all (the CPU's bound).
const WGRAD_MAX_CHUNKS: usize = 64;
const WGRAD_MIN_VOX: usize = 256;
const WGRAD_MAX_PARTIALS: usize = 1 << 24;

/// Threads per block and dynamic shared memory of the training kernels (see `ops::launch_block`).
pub(crate) fn launch_block(kernel: &str) -> Option<(u32, u32)> {
    match kernel {
        k::CHANNEL_SUM_PARTIAL | k::BN_SQDEV_PARTIAL | k::BN_BACKWARD_PARTIAL => Some((RED_X as u32 * RED_Y, 0)),
        k::RELU_BACKWARD | k::SIGMOID_BACKWARD | k::MUL | k::ACCUMULATE | k::COPY | k::MAXPOOL2_BACKWARD
        | k::UPSAMPLE_TRILINEAR_BACKWARD | k::SOFTMAX_BACKWARD | k::CONV3D_FLIP_WEIGHTS | k::CONV3D_BACKWARD_INPUT
        | k::CONV3D_WGRAD_PARTIAL | k::SUM_PARTIALS | k::SUM_PARTIALS_F64 | k::BN_STATS | k::BN_BACKWARD_PARAMS
        | k::BN_BACKWARD_DX => Some((BLOCK, 0)),
        _ => None,
    }
}

type T<D> = DevTensor<<D as Device>::Buf>;

/// An `int` kernel argument (sizes are checked against i32 by `fits`).
fn int<'a, B>(v: usize) -> KArg<'a, B> {
    KArg::I32(v as i32)
}

/// Kernels index with `int`: every buffer they touch must fit.
fn fits(what: &str, n: usize) -> Result<()> {
    i32::try_from(n).map(|_| ()).map_err(|_| Error::Shape(format!("{what}: {n} elements exceed the kernels' int indexing")))
}

fn check_buf<D: Device>(dev: &D, what: &str, buf: &D::Buf, len: usize) -> Result<()> {
    let have = dev.buf_len(buf);
    if have != len {
        return Err(Error::Shape(format!("{what}: buffer holds {have} values, expected {len}")));
    }
    fits(what, len)
}

fn check<D: Device>(dev: &D, what: &str, t: &T<D>) -> Result<()> {
    check_buf(dev, what, &t.data, t.shape.len())
}

fn same<D: Device>(dev: &D, what: &str, a: &T<D>, b: &T<D>) -> Result<()> {
    check(dev, what, a)?;
    check(dev, what, b)?;
    if a.shape != b.shape {
        return Err(Error::Shape(format!("{what}: shapes differ, {} and {}", a.shape, b.shape)));
    }
    Ok(())
}

fn zeros<D: Device>(dev: &D, what: &str, len: usize) -> Result<D::Buf> {
    fits(what, len)?;
    dev.alloc_zeros(len)
}

/// Launches unless there is no work (a grid of zero blocks is not a launch).
fn launch<D: Device>(dev: &D, kernel: &str, work: usize, cfg: LaunchCfg, args: &[KArg<'_, D::Buf>]) -> Result<()> {
    if work == 0 {
        return Ok(());
    }
    dev.launch(kernel, cfg, args)
}

/// (chunks, rows per chunk) of a channel reduction over `rows` rows.
fn red_chunks(rows: usize) -> (usize, usize) {
    let per = rows.div_ceil(rows.div_ceil(RED_MIN_ROWS).clamp(1, RED_MAX_CHUNKS)).max(1);
    (rows.div_ceil(per).max(1), per)
}

/// (chunks, output voxels per chunk) of a weight gradient over `m` output voxels.
fn wgrad_chunks(m: usize, wlen: usize) -> (usize, usize) {
    let chunks = m.div_ceil(WGRAD_MIN_VOX).clamp(1, WGRAD_MAX_CHUNKS).min((WGRAD_MAX_PARTIALS / wlen.max(1)).max(1));
    let per = m.div_ceil(chunks).max(1);
    (m.div_ceil(per).max(1), per)
}

/// Per-channel sums over `rows` rows of `c` channels by one of batchnorm.cu's `*_partial` kernels
/// (its arguments: part, `inputs`..., rows, c, chunk_rows), `sums` values per channel, added over
/// chunks by `sum_partials_f64_f32`. Returns `sums * c` doubles (as 2 floats each) or floats.
fn channel_sums<D: Device>(dev: &D, kernel: &str, inputs: &[&D::Buf], rows: usize, c: usize, sums: usize, out_double: bool)
    -> Result<D::Buf> {
    let len = sums * c;
    let out = zeros(dev, kernel, if out_double { 2 * len } else { len })?;
    if len == 0 {
        return Ok(out);
    }
    let (chunks, per) = red_chunks(rows);
    let part = zeros(dev, kernel, 2 * chunks * len)?;
    let mut a = vec![KArg::Buf(&part)];
    a.extend(inputs.iter().map(|b| KArg::Buf(*b)));
    a.extend([int(rows), int(c), int(per)]);
    let cfg = LaunchCfg { grid: [c.div_ceil(RED_X) as u32, chunks as u32, 1], block: [RED_X as u32, RED_Y, 1], shmem: 0 };
    launch(dev, kernel, len, cfg, &a)?;
    let a = [KArg::Buf(&out), KArg::Buf(&part), int(chunks), int(len), int(out_double as usize)];
    launch(dev, k::SUM_PARTIALS_F64, len, LaunchCfg::linear(len, BLOCK), &a)?;
    Ok(out)
}

impl<D: Device> GpuBackend<D> {
    /// y[i] = f(a[i], b[i]) for the kernels with signature (y, a, b, total).
    fn binary_op(&self, kernel: &str, a: &T<D>, b: &T<D>) -> Result<T<D>> {
        let dev = self.device();
        same(dev, kernel, a, b)?;
        let n = a.shape.len();
        let y = zeros(dev, kernel, n)?;
        launch(dev, kernel, n, LaunchCfg::linear(n, BLOCK), &[KArg::Buf(&y), KArg::Buf(&a.data), KArg::Buf(&b.data), int(n)])?;
        Ok(DevTensor { shape: a.shape, data: y })
    }

    fn acc_buf(&self, what: &str, acc: &D::Buf, g: &D::Buf, n: usize) -> Result<()> {
        let dev = self.device();
        check_buf(dev, what, acc, n)?;
        check_buf(dev, what, g, n)?;
        launch(dev, k::ACCUMULATE, n, LaunchCfg::linear(n, BLOCK), &[KArg::Buf(acc), KArg::Buf(g), int(n)])
    }
}

/// The conv's spatial arguments as the kernels take them: d0 d1 d2 cin o0 o1 o2 cout k s p.
fn conv_dims<'a, B>(n: usize, d: [usize; 3], od: [usize; 3], spec: &ConvSpec) -> Vec<KArg<'a, B>> {
    [
        n, d[0], d[1], d[2], spec.cin, od[0], od[1], od[2], spec.cout,
        spec.k[0], spec.k[1], spec.k[2], spec.stride[0], spec.stride[1], spec.stride[2], spec.pad[0], spec.pad[1], spec.pad[2],
    ]
    .into_iter()
    .map(int)
    .collect()
}

impl<D: Device> TrainBackend for GpuBackend<D> {
    fn download_param(&self, s: &D::Buf) -> Result<Vec<f32>> {
        self.device().dtoh(s)
    }

    fn duplicate(&self, t: &T<D>) -> Result<T<D>> {
        let dev = self.device();
        check(dev, "duplicate", t)?;
        let n = t.shape.len();
        let y = zeros(dev, k::COPY, n)?;
        launch(dev, k::COPY, n, LaunchCfg::linear(n, BLOCK), &[KArg::Buf(&y), KArg::Buf(&t.data), int(n)])?;
        Ok(DevTensor { shape: t.shape, data: y })
    }

    fn accumulate(&self, acc: &mut T<D>, g: &T<D>) -> Result<()> {
        same(self.device(), "accumulate", acc, g)?;
        self.acc_buf("accumulate", &acc.data, &g.data, acc.shape.len())
    }

    fn accumulate_param(&self, acc: &mut D::Buf, g: &D::Buf) -> Result<()> {
        let n = self.device().buf_len(acc);
        self.acc_buf("accumulate_param", acc, g, n)
    }

    fn mul(&self, a: &T<D>, b: &T<D>) -> Result<T<D>> {
        self.binary_op(k::MUL, a, b)
    }

    fn conv3d_backward_input(&self, dy: &T<D>, w: &D::Buf, spec: &ConvSpec, in_d: [usize; 3]) -> Result<T<D>> {
        let dev = self.device();
        check(dev, "conv3d_backward_input", dy)?;
        check_buf(dev, "conv3d_backward_input weight", w, spec.weight_len())?;
        if dy.shape.c != spec.cout || spec.out_dims(in_d) != dy.shape.d || (0..3).any(|a| spec.pad[a] >= spec.k[a]) {
            return Err(Error::Shape(format!(
                "conv3d_backward_input: gradient {} does not match {spec:?} on input size {in_d:?}",
                dy.shape
            )));
        }
        if spec.stride == [1; 3] {
            // A forward conv of dy with flipped, transposed weights (the fast forward variants).
            let wl = spec.weight_len();
            let wf = zeros(dev, k::CONV3D_FLIP_WEIGHTS, wl)?;
            let mut a = vec![KArg::Buf(&wf), KArg::Buf(w)];
            a.extend([spec.k[0], spec.k[1], spec.k[2], spec.cin, spec.cout].into_iter().map(int));
            launch(dev, k::CONV3D_FLIP_WEIGHTS, wl, LaunchCfg::linear(wl, BLOCK), &a)?;
            let fk = ConvSpec { cin: spec.cout, cout: spec.cin, k: spec.k, stride: [1; 3], pad: std::array::from_fn(|i| spec.k[i] - 1 - spec.pad[i]) };
            return self.conv3d(dy, &wf, None, &fk);
        }
        let xs = Shape::new(dy.shape.n, in_d, spec.cin);
        let n = xs.len();
        let dx = zeros(dev, k::CONV3D_BACKWARD_INPUT, n)?;
        let mut a = vec![KArg::Buf(&dx), KArg::Buf(&dy.data), KArg::Buf(w)];
        a.extend(conv_dims(dy.shape.n, in_d, dy.shape.d, spec));
        launch(dev, k::CONV3D_BACKWARD_INPUT, n, LaunchCfg::linear(n, BLOCK), &a)?;
        Ok(DevTensor { shape: xs, data: dx })
    }

    fn conv3d_backward_weight(&self, x: &T<D>, dy: &T<D>, spec: &ConvSpec) -> Result<D::Buf> {
        let dev = self.device();
        check(dev, "conv3d_backward_weight input", x)?;
        check(dev, "conv3d_backward_weight gradient", dy)?;
        let want = Shape::new(x.shape.n, spec.out_dims(x.shape.d), spec.cout);
        if x.shape.c != spec.cin || dy.shape != want {
            return Err(Error::Shape(format!("conv3d_backward_weight: input {} and gradient {} do not match {spec:?}", x.shape, dy.shape)));
        }
        let wl = spec.weight_len();
        let m = want.n * want.voxels();
        let (chunks, per) = wgrad_chunks(m, wl);
        let part = zeros(dev, k::CONV3D_WGRAD_PARTIAL, chunks * wl)?;
        let mut a = vec![KArg::Buf(&part), KArg::Buf(&x.data), KArg::Buf(&dy.data)];
        a.extend(conv_dims(x.shape.n, x.shape.d, want.d, spec));
        a.push(int(per));
        let cfg = LaunchCfg { grid: [wl.div_ceil(BLOCK as usize) as u32, chunks as u32, 1], block: [BLOCK, 1, 1], shmem: 0 };
        launch(dev, k::CONV3D_WGRAD_PARTIAL, wl, cfg, &a)?;
        let dw = zeros(dev, k::SUM_PARTIALS, wl)?;
        let a = [KArg::Buf(&dw), KArg::Buf(&part), int(chunks), int(wl)];
        launch(dev, k::SUM_PARTIALS, wl, LaunchCfg::linear(wl, BLOCK), &a)?;
        Ok(dw)
    }

    fn conv3d_backward_bias(&self, dy: &T<D>) -> Result<D::Buf> {
        let dev = self.device();
        check(dev, "conv3d_backward_bias", dy)?;
        let rows = dy.shape.n * dy.shape.voxels();
        channel_sums(dev, k::CHANNEL_SUM_PARTIAL, &[&dy.data], rows, dy.shape.c, 1, false)
    }

    fn batch_norm_train(&self, x: &T<D>, gamma: &D::Buf, beta: &D::Buf, eps: f64) -> Result<(T<D>, BnSaved<D::Buf>)> {
        let dev = self.device();
        check(dev, "batch_norm_train", x)?;
        let c = x.shape.c;
        check_buf(dev, "batch_norm_train gamma", gamma, c)?;
        check_buf(dev, "batch_norm_train beta", beta, c)?;
        let rows = x.shape.n * x.shape.voxels();
        if rows == 0 || c == 0 {
            return Err(Error::Shape(format!("batch_norm_train: empty input {}", x.shape)));
        }
        let sum = channel_sums(dev, k::CHANNEL_SUM_PARTIAL, &[&x.data], rows, c, 1, true)?;
        let sq = channel_sums(dev, k::BN_SQDEV_PARTIAL, &[&x.data, &sum], rows, c, 1, true)?;
        let [mean, invstd, var, scale, shift] = [(); 5].map(|_| zeros(dev, k::BN_STATS, c));
        let (mean, invstd, var, scale, shift) = (mean?, invstd?, var?, scale?, shift?);
        // eps as two floats whose sum is eps in double (kernels take float scalars only).
        let eps_hi = eps as f32;
        let eps_lo = (eps - eps_hi as f64) as f32;
        let a = [
            KArg::Buf(&mean), KArg::Buf(&invstd), KArg::Buf(&var), KArg::Buf(&scale), KArg::Buf(&shift),
            KArg::Buf(&sum), KArg::Buf(&sq), KArg::Buf(gamma), KArg::Buf(beta), int(rows), int(c),
            KArg::F32(eps_hi), KArg::F32(eps_lo),
        ];
        launch(dev, k::BN_STATS, c, LaunchCfg::linear(c, BLOCK), &a)?;
        let y = self.channel_affine(x, &scale, &shift, false)?;
        Ok((y, BnSaved { mean, invstd, var }))
    }

    fn batch_norm_backward(&self, dy: &T<D>, x: &T<D>, gamma: &D::Buf, saved: &BnSaved<D::Buf>) -> Result<(T<D>, D::Buf, D::Buf)> {
        let dev = self.device();
        same(dev, "batch_norm_backward", dy, x)?;
        let c = x.shape.c;
        check_buf(dev, "batch_norm_backward gamma", gamma, c)?;
        check_buf(dev, "batch_norm_backward invstd", &saved.invstd, c)?;
        let rows = x.shape.n * x.shape.voxels();
        if rows == 0 || c == 0 {
            return Err(Error::Shape(format!("batch_norm_backward: empty input {}", x.shape)));
        }
        // The mean again in double from x, as the CPU does (see src/train/cpu.rs).
        let xsum = channel_sums(dev, k::CHANNEL_SUM_PARTIAL, &[&x.data], rows, c, 1, true)?;
        let sums = channel_sums(dev, k::BN_BACKWARD_PARTIAL, &[&dy.data, &x.data, &xsum, &saved.invstd], rows, c, 2, true)?;
        let dgamma = zeros(dev, k::BN_BACKWARD_PARAMS, c)?;
        let dbeta = zeros(dev, k::BN_BACKWARD_PARAMS, c)?;
        let coef = zeros(dev, k::BN_BACKWARD_PARAMS, 8 * c)?;
        let a = [
            KArg::Buf(&dgamma), KArg::Buf(&dbeta), KArg::Buf(&coef), KArg::Buf(&sums), KArg::Buf(&xsum),
            KArg::Buf(gamma), KArg::Buf(&saved.invstd), int(rows), int(c),
        ];
        launch(dev, k::BN_BACKWARD_PARAMS, c, LaunchCfg::linear(c, BLOCK), &a)?;
        let n = x.shape.len();
        let dx = zeros(dev, k::BN_BACKWARD_DX, n)?;
        let a = [KArg::Buf(&dx), KArg::Buf(&dy.data), KArg::Buf(&x.data), KArg::Buf(&coef), KArg::Buf(&saved.invstd), int(n), int(c)];
        launch(dev, k::BN_BACKWARD_DX, n, LaunchCfg::linear(n, BLOCK), &a)?;
        Ok((DevTensor { shape: x.shape, data: dx }, dgamma, dbeta))
    }

    fn relu_backward(&self, dy: &T<D>, y: &T<D>) -> Result<T<D>> {
        self.binary_op(k::RELU_BACKWARD, dy, y)
    }

    fn maxpool2_backward(&self, dy: &T<D>, x: &T<D>) -> Result<T<D>> {
        let dev = self.device();
        check(dev, "maxpool2_backward gradient", dy)?;
        check(dev, "maxpool2_backward input", x)?;
        let xs = x.shape;
        let os = xs.with_d(xs.d.map(|d| d / 2));
        if dy.shape != os {
            return Err(Error::Shape(format!("maxpool2_backward: gradient {} for input {}", dy.shape, xs)));
        }
        let n = xs.len();
        let dx = zeros(dev, k::MAXPOOL2_BACKWARD, n)?;
        let mut a = vec![KArg::Buf(&dx), KArg::Buf(&dy.data), KArg::Buf(&x.data)];
        a.extend([xs.n, xs.d[0], xs.d[1], xs.d[2], xs.c, os.d[0], os.d[1], os.d[2]].into_iter().map(int));
        launch(dev, k::MAXPOOL2_BACKWARD, n, LaunchCfg::linear(n, BLOCK), &a)?;
        Ok(DevTensor { shape: xs, data: dx })
    }

    fn upsample_backward(&self, dy: &T<D>, in_d: [usize; 3]) -> Result<T<D>> {
        let dev = self.device();
        check(dev, "upsample_backward", dy)?;
        if in_d.contains(&0) {
            return Err(Error::Shape(format!("upsample_backward: empty input size {in_d:?}")));
        }
        let os = dy.shape;
        let xs = os.with_d(in_d);
        // align_corners=True: the forward's ratio, in float32 (see GpuBackend::upsample).
        let ratio = |a: usize| if os.d[a] > 1 { (in_d[a] - 1) as f32 / (os.d[a] - 1) as f32 } else { 0.0 };
        let n = xs.len();
        let dx = zeros(dev, k::UPSAMPLE_TRILINEAR_BACKWARD, n)?;
        let mut a = vec![KArg::Buf(&dx), KArg::Buf(&dy.data)];
        a.extend([xs.n, in_d[0], in_d[1], in_d[2], xs.c, os.d[0], os.d[1], os.d[2]].into_iter().map(int));
        a.extend([KArg::F32(ratio(0)), KArg::F32(ratio(1)), KArg::F32(ratio(2))]);
        // An empty gradient leaves dx all zeros.
        launch(dev, k::UPSAMPLE_TRILINEAR_BACKWARD, if os.is_empty() { 0 } else { n }, LaunchCfg::linear(n, BLOCK), &a)?;
        Ok(DevTensor { shape: xs, data: dx })
    }

    fn sigmoid_backward(&self, dy: &T<D>, y: &T<D>) -> Result<T<D>> {
        self.binary_op(k::SIGMOID_BACKWARD, dy, y)
    }

    fn softmax_backward(&self, dy: &T<D>, y: &T<D>) -> Result<T<D>> {
        let dev = self.device();
        same(dev, "softmax_backward", dy, y)?;
        let voxels = y.shape.n * y.shape.voxels();
        let dx = zeros(dev, k::SOFTMAX_BACKWARD, y.shape.len())?;
        let a = [KArg::Buf(&dx), KArg::Buf(&dy.data), KArg::Buf(&y.data), int(voxels), int(y.shape.c)];
        launch(dev, k::SOFTMAX_BACKWARD, y.shape.len(), LaunchCfg::linear(voxels, BLOCK), &a)?;
        Ok(DevTensor { shape: y.shape, data: dx })
    }
}
