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
use crate::backward::{BnSaved, TrainBackend};
use crate::error::{Error, Result};
use crate::gpu::ops::{conv_dims, int, resample_dims, upsample_ratios, GpuBackend, BLOCK};
use crate::gpu::{kernels as k, Device, KArg, LaunchCfg};
use crate::tensor::Shape;

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

impl<D: Device> GpuBackend<D> {
    /// Per-channel sums over `rows` rows of `c` channels by one of batchnorm.cu's `*_partial`
    /// kernels (its arguments: part, `inputs`..., rows, c, chunk_rows), `sums` values per channel,
    /// added over chunks by `sum_partials_f64_f32`. Returns `sums * c` doubles (as 2 floats each) or
    /// floats.
    fn channel_sums(&self, kernel: &str, inputs: &[&D::Buf], rows: usize, c: usize, sums: usize, out_double: bool) -> Result<D::Buf> {
        let len = sums * c;
        let out = self.zeros(kernel, if out_double { 2 * len } else { len })?;
        if len == 0 {
            return Ok(out);
        }
        let (chunks, per) = red_chunks(rows);
        let part = self.zeros(kernel, 2 * chunks * len)?;
        let mut a = vec![KArg::Buf(&part)];
        a.extend(inputs.iter().map(|b| KArg::Buf(*b)));
        a.extend([int(rows), int(c), int(per)]);
        let cfg = LaunchCfg { grid: [c.div_ceil(RED_X) as u32, chunks as u32, 1], block: [RED_X as u32, RED_Y, 1], shmem: 0 };
        self.launch(kernel, len, cfg, &a)?;
        let a = [KArg::Buf(&out), KArg::Buf(&part), int(chunks), int(len), int(out_double as usize)];
        self.launch(k::SUM_PARTIALS_F64, len, LaunchCfg::linear(len, BLOCK), &a)?;
        Ok(out)
    }

    fn acc_buf(&self, what: &str, acc: &D::Buf, g: &D::Buf, n: usize) -> Result<()> {
        self.check_buf(what, acc, n)?;
        self.check_buf(what, g, n)?;
        self.launch(k::ACCUMULATE, n, LaunchCfg::linear(n, BLOCK), &[KArg::Buf(acc), KArg::Buf(g), int(n)])
    }
}

impl<D: Device> TrainBackend for GpuBackend<D> {
    fn download_param(&self, s: &D::Buf) -> Result<Vec<f32>> {
        self.device().dtoh(s)
    }

    fn duplicate(&self, t: &T<D>) -> Result<T<D>> {
        self.elementwise(k::COPY, &[t])
    }

    fn accumulate(&self, acc: &mut T<D>, g: &T<D>) -> Result<()> {
        self.check_same("accumulate", acc, g)?;
        self.acc_buf("accumulate", &acc.data, &g.data, acc.shape.len())
    }

    fn accumulate_param(&self, acc: &mut D::Buf, g: &D::Buf) -> Result<()> {
        let n = self.device().buf_len(acc);
        self.acc_buf("accumulate_param", acc, g, n)
    }

    fn mul(&self, a: &T<D>, b: &T<D>) -> Result<T<D>> {
        self.elementwise(k::MUL, &[a, b])
    }

    fn conv3d_backward_input(&self, dy: &T<D>, w: &D::Buf, spec: &ConvSpec, in_d: [usize; 3]) -> Result<T<D>> {
        self.check_tensor("conv3d_backward_input", dy)?;
        self.check_buf("conv3d_backward_input weight", w, spec.weight_len())?;
        if dy.shape.c != spec.cout || spec.out_dims(in_d) != dy.shape.d || (0..3).any(|a| spec.pad[a] >= spec.k[a]) {
            return Err(Error::Shape(format!(
                "conv3d_backward_input: gradient {} does not match {spec:?} on input size {in_d:?}",
                dy.shape
            )));
        }
        if spec.stride == [1; 3] {
            // A forward conv of dy with flipped, transposed weights (the fast forward variants).
            let wl = spec.weight_len();
            let wf = self.zeros(k::CONV3D_FLIP_WEIGHTS, wl)?;
            let mut a = vec![KArg::Buf(&wf), KArg::Buf(w)];
            a.extend([spec.k[0], spec.k[1], spec.k[2], spec.cin, spec.cout].into_iter().map(int));
            self.launch(k::CONV3D_FLIP_WEIGHTS, wl, LaunchCfg::linear(wl, BLOCK), &a)?;
            let fk = ConvSpec { cin: spec.cout, cout: spec.cin, k: spec.k, stride: [1; 3], pad: std::array::from_fn(|i| spec.k[i] - 1 - spec.pad[i]) };
            return self.conv3d(dy, &wf, None, &fk);
        }
        let xs = Shape::new(dy.shape.n, in_d, spec.cin);
        let n = xs.len();
        let dx = self.zeros(k::CONV3D_BACKWARD_INPUT, n)?;
        let mut a = vec![KArg::Buf(&dx), KArg::Buf(&dy.data), KArg::Buf(w)];
        a.extend(conv_dims(dy.shape.n, in_d, dy.shape.d, spec));
        self.launch(k::CONV3D_BACKWARD_INPUT, n, LaunchCfg::linear(n, BLOCK), &a)?;
        Ok(DevTensor { shape: xs, data: dx })
    }

    fn conv3d_backward_weight(&self, x: &T<D>, dy: &T<D>, spec: &ConvSpec) -> Result<D::Buf> {
        self.check_tensor("conv3d_backward_weight input", x)?;
        self.check_tensor("conv3d_backward_weight gradient", dy)?;
        let want = spec.out_shape(x.shape);
        if x.shape.c != spec.cin || dy.shape != want {
            return Err(Error::Shape(format!("conv3d_backward_weight: input {} and gradient {} do not match {spec:?}", x.shape, dy.shape)));
        }
        let wl = spec.weight_len();
        let m = want.n * want.voxels();
        let (chunks, per) = wgrad_chunks(m, wl);
        let part = self.zeros(k::CONV3D_WGRAD_PARTIAL, chunks * wl)?;
        let mut a = vec![KArg::Buf(&part), KArg::Buf(&x.data), KArg::Buf(&dy.data)];
        a.extend(conv_dims(x.shape.n, x.shape.d, want.d, spec));
        a.push(int(per));
        let cfg = LaunchCfg { grid: [wl.div_ceil(BLOCK as usize) as u32, chunks as u32, 1], block: [BLOCK, 1, 1], shmem: 0 };
        self.launch(k::CONV3D_WGRAD_PARTIAL, wl, cfg, &a)?;
        let dw = self.zeros(k::SUM_PARTIALS, wl)?;
        let a = [KArg::Buf(&dw), KArg::Buf(&part), int(chunks), int(wl)];
        self.launch(k::SUM_PARTIALS, wl, LaunchCfg::linear(wl, BLOCK), &a)?;
        Ok(dw)
    }

    fn conv3d_backward_bias(&self, dy: &T<D>) -> Result<D::Buf> {
        self.check_tensor("conv3d_backward_bias", dy)?;
        let rows = dy.shape.n * dy.shape.voxels();
        self.channel_sums(k::CHANNEL_SUM_PARTIAL, &[&dy.data], rows, dy.shape.c, 1, false)
    }

    fn batch_norm_train(&self, x: &T<D>, gamma: &D::Buf, beta: &D::Buf, eps: f64) -> Result<(T<D>, BnSaved<D::Buf>)> {
        self.check_tensor("batch_norm_train", x)?;
        let c = x.shape.c;
        self.check_buf("batch_norm_train gamma", gamma, c)?;
        self.check_buf("batch_norm_train beta", beta, c)?;
        let rows = x.shape.n * x.shape.voxels();
        if rows == 0 || c == 0 {
            return Err(Error::Shape(format!("batch_norm_train: empty input {}", x.shape)));
        }
        let sum = self.channel_sums(k::CHANNEL_SUM_PARTIAL, &[&x.data], rows, c, 1, true)?;
        let sq = self.channel_sums(k::BN_SQDEV_PARTIAL, &[&x.data, &sum], rows, c, 1, true)?;
        let [mean, invstd, var, scale, shift] = [(); 5].map(|_| self.zeros(k::BN_STATS, c));
        let (mean, invstd, var, scale, shift) = (mean?, invstd?, var?, scale?, shift?);
        // eps as two floats whose sum is eps in double (kernels take float scalars only).
        let eps_hi = eps as f32;
        let eps_lo = (eps - eps_hi as f64) as f32;
        let a = [
            KArg::Buf(&mean), KArg::Buf(&invstd), KArg::Buf(&var), KArg::Buf(&scale), KArg::Buf(&shift),
            KArg::Buf(&sum), KArg::Buf(&sq), KArg::Buf(gamma), KArg::Buf(beta), int(rows), int(c),
            KArg::F32(eps_hi), KArg::F32(eps_lo),
        ];
        self.launch(k::BN_STATS, c, LaunchCfg::linear(c, BLOCK), &a)?;
        let y = self.channel_affine(x, &scale, &shift, false)?;
        Ok((y, BnSaved { mean, invstd, var }))
    }

    fn batch_norm_backward(&self, dy: &T<D>, x: &T<D>, gamma: &D::Buf, saved: &BnSaved<D::Buf>) -> Result<(T<D>, D::Buf, D::Buf)> {
        self.check_same("batch_norm_backward", dy, x)?;
        let c = x.shape.c;
        self.check_buf("batch_norm_backward gamma", gamma, c)?;
        self.check_buf("batch_norm_backward invstd", &saved.invstd, c)?;
        let rows = x.shape.n * x.shape.voxels();
        if rows == 0 || c == 0 {
            return Err(Error::Shape(format!("batch_norm_backward: empty input {}", x.shape)));
        }
        // The mean again in double from x, as the CPU does (see src/train/cpu.rs).
        let xsum = self.channel_sums(k::CHANNEL_SUM_PARTIAL, &[&x.data], rows, c, 1, true)?;
        let sums = self.channel_sums(k::BN_BACKWARD_PARTIAL, &[&dy.data, &x.data, &xsum, &saved.invstd], rows, c, 2, true)?;
        let dgamma = self.zeros(k::BN_BACKWARD_PARAMS, c)?;
        let dbeta = self.zeros(k::BN_BACKWARD_PARAMS, c)?;
        let coef = self.zeros(k::BN_BACKWARD_PARAMS, 8 * c)?;
        let a = [
            KArg::Buf(&dgamma), KArg::Buf(&dbeta), KArg::Buf(&coef), KArg::Buf(&sums), KArg::Buf(&xsum),
            KArg::Buf(gamma), KArg::Buf(&saved.invstd), int(rows), int(c),
        ];
        self.launch(k::BN_BACKWARD_PARAMS, c, LaunchCfg::linear(c, BLOCK), &a)?;
        let n = x.shape.len();
        let dx = self.zeros(k::BN_BACKWARD_DX, n)?;
        let a = [KArg::Buf(&dx), KArg::Buf(&dy.data), KArg::Buf(&x.data), KArg::Buf(&coef), KArg::Buf(&saved.invstd), int(n), int(c)];
        self.launch(k::BN_BACKWARD_DX, n, LaunchCfg::linear(n, BLOCK), &a)?;
        Ok((DevTensor { shape: x.shape, data: dx }, dgamma, dbeta))
    }

    fn relu_backward(&self, dy: &T<D>, y: &T<D>) -> Result<T<D>> {
        self.elementwise(k::RELU_BACKWARD, &[dy, y])
    }

    fn maxpool2_backward(&self, dy: &T<D>, x: &T<D>) -> Result<T<D>> {
        self.check_tensor("maxpool2_backward gradient", dy)?;
        self.check_tensor("maxpool2_backward input", x)?;
        let xs = x.shape;
        let os = xs.with_d(xs.d.map(|d| d / 2));
        if dy.shape != os {
            return Err(Error::Shape(format!("maxpool2_backward: gradient {} for input {}", dy.shape, xs)));
        }
        let n = xs.len();
        let dx = self.zeros(k::MAXPOOL2_BACKWARD, n)?;
        let mut a = vec![KArg::Buf(&dx), KArg::Buf(&dy.data), KArg::Buf(&x.data)];
        a.extend(resample_dims(xs, os.d));
        self.launch(k::MAXPOOL2_BACKWARD, n, LaunchCfg::linear(n, BLOCK), &a)?;
        Ok(DevTensor { shape: xs, data: dx })
    }

    fn upsample_backward(&self, dy: &T<D>, in_d: [usize; 3]) -> Result<T<D>> {
        self.check_tensor("upsample_backward", dy)?;
        if in_d.contains(&0) {
            return Err(Error::Shape(format!("upsample_backward: empty input size {in_d:?}")));
        }
        let os = dy.shape;
        let xs = os.with_d(in_d);
        let n = xs.len();
        let dx = self.zeros(k::UPSAMPLE_TRILINEAR_BACKWARD, n)?;
        let mut a = vec![KArg::Buf(&dx), KArg::Buf(&dy.data)];
        a.extend(resample_dims(xs, os.d));
        // align_corners=True: the forward's ratios
        a.extend(upsample_ratios(in_d, os.d));
        // An empty gradient leaves dx all zeros.
        self.launch(k::UPSAMPLE_TRILINEAR_BACKWARD, if os.is_empty() { 0 } else { n }, LaunchCfg::linear(n, BLOCK), &a)?;
        Ok(DevTensor { shape: xs, data: dx })
    }

    fn sigmoid_backward(&self, dy: &T<D>, y: &T<D>) -> Result<T<D>> {
        self.elementwise(k::SIGMOID_BACKWARD, &[dy, y])
    }

    fn softmax_backward(&self, dy: &T<D>, y: &T<D>) -> Result<T<D>> {
        self.check_same("softmax_backward", dy, y)?;
        let voxels = y.shape.n * y.shape.voxels();
        let dx = self.zeros(k::SOFTMAX_BACKWARD, y.shape.len())?;
        let a = [KArg::Buf(&dx), KArg::Buf(&dy.data), KArg::Buf(&y.data), int(voxels), int(y.shape.c)];
        self.launch(k::SOFTMAX_BACKWARD, y.shape.len(), LaunchCfg::linear(voxels, BLOCK), &a)?;
        Ok(DevTensor { shape: y.shape, data: dx })
    }
}
