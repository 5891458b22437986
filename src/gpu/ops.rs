//! The GPU backend: every op of `Backend` as kernel launches on any `Device` (the real GPU or the
//! host emulator run the same code). Each op checks shapes, computes its grid, block, shared memory
//! and argument list here, in one place, then calls `Device::launch`. The argument lists follow the
//! kernel signatures of `kernels/*.cu` exactly.
use crate::backend::{Backend, ConvSpec, DevTensor};
use crate::error::{Error, Result};
use crate::gpu::{kernels as k, DType, Device, KArg, LaunchCfg};
use crate::tensor::{Shape, Tensor};

/// Threads per block of the one-thread-per-element kernels.
pub(crate) const BLOCK: u32 = 256;
/// Tile of `conv3d_tiled`: output voxels x output channels per block (see conv3d.cu).
const TILE_M: usize = 64;
const TILE_N: usize = 64;
const TILED_THREADS: u32 = 256;

/// The kernels that implement conv3d; all take the same arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvVariant {
    /// One thread per output (voxel, cout).
    Direct,
    /// Implicit GEMM, 64x64 output tile per block, staged in shared memory.
    Tiled,
}

impl ConvVariant {
    pub const ALL: [ConvVariant; 2] = [ConvVariant::Direct, ConvVariant::Tiled];

    pub fn kernel(self) -> &'static str {
        match self {
            ConvVariant::Direct => k::CONV3D_DIRECT,
            ConvVariant::Tiled => k::CONV3D_TILED,
        }
    }

    /// The variant for a shape: a tile of 64 output channels wastes most of its work below 16.
    pub fn choose(spec: &ConvSpec, _out: Shape) -> Self {
        if spec.cout >= 16 {
            ConvVariant::Tiled
        } else {
            ConvVariant::Direct
        }
    }

    fn launch_cfg(self, out: Shape) -> LaunchCfg {
        match self {
            ConvVariant::Direct => LaunchCfg::linear(out.len(), BLOCK),
            ConvVariant::Tiled => LaunchCfg {
                grid: [(out.n * out.voxels()).div_ceil(TILE_M) as u32, out.c.div_ceil(TILE_N) as u32, 1],
                block: [TILED_THREADS, 1, 1],
                shmem: 0,
            },
        }
    }
}

/// Threads per block and dynamic shared memory bytes a forward kernel is launched with, from the
/// constants the launches above use (`deepis kernels` computes occupancy from it); None for a
/// name that is not one (the training kernels: `train_ops::launch_block`).
pub fn launch_block(kernel: &str) -> Option<(u32, u32)> {
    match kernel {
        k::CONV3D_TILED => Some((TILED_THREADS, 0)),
        k::CONV3D_TC_F16 | k::CONV3D_TC_BF16 | k::CONV3D_TC_TF32 | k::CONV3D_TC_WIDE_F16 | k::CONV3D_TC_WIDE_BF16 | k::CONV3D_TC_WIDE_TF32
        | k::CONV3D_WGMMA_F16 | k::CONV3D_WGMMA_BF16 | k::CONV3D_WGMMA_TF32 => {
            crate::gpu::tensor_conv::reference_launch_block(kernel)
        }
        k::CONV3D_DIRECT | k::CHANNEL_AFFINE | k::RELU | k::ADD | k::SIGMOID | k::MAXPOOL2 | k::MAXPOOL2_F16 | k::MAXPOOL2_BF16
        | k::UPSAMPLE_TRILINEAR | k::UPSAMPLE_ADD | k::UPSAMPLE_ADD_F16 | k::UPSAMPLE_ADD_BF16
        | k::SOFTMAX_CHANNELS | k::TO_HALF_F16 | k::TO_HALF_BF16 | k::TO_F32_F16 | k::TO_F32_BF16 => Some((BLOCK, 0)),
        _ => None,
    }
}

/// A conv's geometry as the kernels take it: n d0 d1 d2 cin o0 o1 o2 cout k0 k1 k2 s0 s1 s2 p0 p1 p2.
pub(crate) fn conv_dims<'a, B>(n: usize, d: [usize; 3], od: [usize; 3], spec: &ConvSpec) -> Vec<KArg<'a, B>> {
    let (k, s, p) = (spec.k, spec.stride, spec.pad);
    [n, d[0], d[1], d[2], spec.cin, od[0], od[1], od[2], spec.cout, k[0], k[1], k[2], s[0], s[1], s[2], p[0], p[1], p[2]]
        .into_iter()
        .map(int)
        .collect()
}

/// The sizes a max-pool or up-sampling kernel (and its backward) takes: n d0 d1 d2 c o0 o1 o2
/// for input `x` and output size `od`.
pub(crate) fn resample_dims<'a, B>(x: Shape, od: [usize; 3]) -> Vec<KArg<'a, B>> {
    [x.n, x.d[0], x.d[1], x.d[2], x.c, od[0], od[1], od[2]].into_iter().map(int).collect()
}

/// align_corners=True from size `d` to `od`: source = out_index * (in - 1) / (out - 1) per axis,
/// the ratio in float32 as PyTorch (0 for an output size of 1).
pub(crate) fn upsample_ratios<'a, B>(d: [usize; 3], od: [usize; 3]) -> [KArg<'a, B>; 3] {
    std::array::from_fn(|a| KArg::F32(if od[a] > 1 { (d[a] - 1) as f32 / (od[a] - 1) as f32 } else { 0.0 }))
}

pub struct GpuBackend<D: Device> {
    dev: D,
    conv_variant: Option<ConvVariant>,
}

/// Kernels index with `int`: every buffer they touch must fit.
fn fits_i32(what: &str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::Shape(format!("{what}: {n} elements exceed the kernels' int indexing")))
}

/// An `int` kernel argument (sizes were checked against i32 by `fits_i32`).
pub(crate) fn int<'a, B>(v: usize) -> KArg<'a, B> {
    KArg::I32(v as i32)
}

impl<D: Device> GpuBackend<D> {
    pub fn new(dev: D) -> Self {
        GpuBackend { dev, conv_variant: None }
    }

    /// Forces one conv variant for every shape (tests and benchmarks); `None` chooses per shape.
    pub fn set_conv_variant(&mut self, v: Option<ConvVariant>) {
        self.conv_variant = v;
    }

    pub fn device(&self) -> &D {
        &self.dev
    }

    pub(crate) fn check_buf(&self, what: &str, buf: &D::Buf, len: usize) -> Result<()> {
        let have = self.dev.buf_len(buf);
        if have != len {
            return Err(Error::Shape(format!("{what}: buffer holds {have} values, expected {len}")));
        }
        fits_i32(what, len)?;
        Ok(())
    }

    pub(crate) fn check_tensor(&self, what: &str, t: &DevTensor<D::Buf>) -> Result<()> {
        self.check_buf(what, &t.data, t.shape.len())
    }

    /// Both tensors valid and of the same shape.
    pub(crate) fn check_same(&self, what: &str, a: &DevTensor<D::Buf>, b: &DevTensor<D::Buf>) -> Result<()> {
        self.check_tensor(what, a)?;
        self.check_tensor(what, b)?;
        if a.shape != b.shape {
            return Err(Error::Shape(format!("{what}: shapes differ, {} and {}", a.shape, b.shape)));
        }
        Ok(())
    }

    /// A zeroed buffer of `len` values (an op's output, partial sums).
    pub(crate) fn zeros(&self, what: &str, len: usize) -> Result<D::Buf> {
        fits_i32(what, len)?;
        self.dev.alloc_zeros(len)
    }

    /// Launches unless there is no work (a grid of zero blocks is not a launch).
    pub(crate) fn launch(&self, kernel: &str, work: usize, cfg: LaunchCfg, args: &[KArg<'_, D::Buf>]) -> Result<()> {
        if work == 0 {
            return Ok(());
        }
        self.dev.launch(kernel, cfg, args)
    }

    /// One thread per element: y = f(inputs) for the kernels with signature (y, inputs..., total).
    pub(crate) fn elementwise(&self, kernel: &str, inputs: &[&DevTensor<D::Buf>]) -> Result<DevTensor<D::Buf>> {
        self.check_tensor(kernel, inputs[0])?;
        for t in &inputs[1..] {
            self.check_same(kernel, inputs[0], t)?;
        }
        let shape = inputs[0].shape;
        let n = shape.len();
        let y = self.zeros(kernel, n)?;
        let mut a = vec![KArg::Buf(&y)];
        a.extend(inputs.iter().map(|t| KArg::Buf(&t.data)));
        a.push(int(n));
        self.launch(kernel, n, LaunchCfg::linear(n, BLOCK), &a)?;
        Ok(DevTensor { shape, data: y })
    }

    /// A zeroed output tensor of `shape`.
    fn new_out(&self, what: &str, shape: Shape) -> Result<DevTensor<D::Buf>> {
        Ok(DevTensor { shape, data: self.zeros(what, shape.len())? })
    }

    /// An output tensor given to an `_into` op: of shape `want`, its buffer of that length.
    fn check_out(&self, what: &str, y: &DevTensor<D::Buf>, want: Shape) -> Result<()> {
        if y.shape != want {
            return Err(Error::Shape(format!("{what}: output {} for a result of {want}", y.shape)));
        }
        self.check_tensor(what, y)
    }

    /// The one element type of `ts`, or an error naming `what`.
    fn same_dtype(&self, what: &str, ts: &[&DevTensor<D::Buf>]) -> Result<DType> {
        let t = self.dev.buf_dtype(&ts[0].data);
        if ts.iter().any(|x| self.dev.buf_dtype(&x.data) != t) {
            let names: Vec<&str> = ts.iter().map(|x| self.dev.buf_dtype(&x.data).name()).collect();
            return Err(Error::Shape(format!("{what}: buffers of different types ({})", names.join(", "))));
        }
        Ok(t)
    }

    /// y = f(x) into `y` for the unary kernels with signature (y, x, total); `y` may be `x`.
    fn unary_into(&self, kernel: &str, x: &DevTensor<D::Buf>, y: &DevTensor<D::Buf>) -> Result<()> {
        self.check_tensor(kernel, x)?;
        self.check_out(kernel, y, x.shape)?;
        let n = x.shape.len();
        self.launch(kernel, n, LaunchCfg::linear(n, BLOCK), &[KArg::Buf(&y.data), KArg::Buf(&x.data), int(n)])
    }

    pub fn relu_into(&self, x: &DevTensor<D::Buf>, y: &DevTensor<D::Buf>) -> Result<()> {
        self.unary_into(k::RELU, x, y)
    }

    pub fn sigmoid_into(&self, x: &DevTensor<D::Buf>, y: &DevTensor<D::Buf>) -> Result<()> {
        self.unary_into(k::SIGMOID, x, y)
    }

    /// The output shape of `conv3d`, after checking its arguments.
    fn conv3d_shape(&self, x: &DevTensor<D::Buf>, w: &D::Buf, bias: Option<&D::Buf>, spec: &ConvSpec) -> Result<Shape> {
        self.check_tensor("conv3d input", x)?;
        let out = spec.check(x.shape)?;
        self.check_buf("conv3d weight", w, spec.weight_len())?;
        if let Some(b) = bias {
            self.check_buf("conv3d bias", b, spec.cout)?;
        }
        Ok(out)
    }

    /// `conv3d` into `y` (every element written; `y` may not alias `x`).
    pub fn conv3d_into(&self, x: &DevTensor<D::Buf>, w: &D::Buf, bias: Option<&D::Buf>, spec: &ConvSpec, y: &DevTensor<D::Buf>) -> Result<()> {
        let out = self.conv3d_shape(x, w, bias, spec)?;
        let v = self.conv_variant.unwrap_or_else(|| ConvVariant::choose(spec, out));
        self.check_out(v.kernel(), y, out)?;
        // Without a bias the kernel never reads `bias`; any live buffer stands in.
        let (bias_buf, has_bias) = match bias {
            Some(b) => (b, 1),
            None => (w, 0),
        };
        let mut a = vec![KArg::Buf(&y.data), KArg::Buf(&x.data), KArg::Buf(w), KArg::Buf(bias_buf), int(has_bias)];
        a.extend(conv_dims(x.shape.n, x.shape.d, out.d, spec));
        self.launch(v.kernel(), out.len(), v.launch_cfg(out), &a)
    }

    /// `channel_affine` into `y` (which may be `x` itself: one thread per element).
    pub fn channel_affine_into(&self, x: &DevTensor<D::Buf>, scale: &D::Buf, shift: &D::Buf, relu: bool, y: &DevTensor<D::Buf>) -> Result<()> {
        self.check_tensor("channel_affine", x)?;
        self.check_buf("channel_affine scale", scale, x.shape.c)?;
        self.check_buf("channel_affine shift", shift, x.shape.c)?;
        self.check_out(k::CHANNEL_AFFINE, y, x.shape)?;
        let n = x.shape.len();
        let a = [
            KArg::Buf(&y.data), KArg::Buf(&x.data), KArg::Buf(scale), KArg::Buf(shift),
            int(n), int(x.shape.c), int(relu as usize),
        ];
        self.launch(k::CHANNEL_AFFINE, n, LaunchCfg::linear(n, BLOCK), &a)
    }

    /// `add` into `y` (which may be `a` or `b`: one thread per element).
    pub fn add_into(&self, a: &DevTensor<D::Buf>, b: &DevTensor<D::Buf>, relu: bool, y: &DevTensor<D::Buf>) -> Result<()> {
        self.check_same("add", a, b)?;
        self.check_out(k::ADD, y, a.shape)?;
        let n = a.shape.len();
        let args = [KArg::Buf(&y.data), KArg::Buf(&a.data), KArg::Buf(&b.data), int(n), int(relu as usize)];
        self.launch(k::ADD, n, LaunchCfg::linear(n, BLOCK), &args)
    }

    /// `maxpool2` into `y` (of the pooled shape and x's type: f32, f16 or bf16).
    pub fn maxpool2_into(&self, x: &DevTensor<D::Buf>, y: &DevTensor<D::Buf>) -> Result<()> {
        self.check_tensor("maxpool2", x)?;
        let od = x.shape.d.map(|d| d / 2);
        if od.contains(&0) {
            return Err(Error::Shape(format!("maxpool2: input {} has a spatial size below 2", x.shape)));
        }
        let kernel = k::maxpool2(self.same_dtype("maxpool2", &[x, y])?);
        let out = x.shape.with_d(od);
        self.check_out(kernel, y, out)?;
        let mut a = vec![KArg::Buf(&y.data), KArg::Buf(&x.data)];
        a.extend(resample_dims(x.shape, od));
        self.launch(kernel, out.len(), LaunchCfg::linear(out.len(), BLOCK), &a)
    }

    fn check_upsample(x: Shape, size: [usize; 3]) -> Result<Shape> {
        if size.contains(&0) || x.d.contains(&0) {
            return Err(Error::Shape(format!("upsample: {} to {:?}", x, size)));
        }
        Ok(x.with_d(size))
    }

    /// `upsample` into `y`, to y's spatial size.
    pub fn upsample_into(&self, x: &DevTensor<D::Buf>, y: &DevTensor<D::Buf>) -> Result<()> {
        self.check_tensor("upsample", x)?;
        let out = Self::check_upsample(x.shape, y.shape.d)?;
        self.check_out(k::UPSAMPLE_TRILINEAR, y, out)?;
        let mut a = vec![KArg::Buf(&y.data), KArg::Buf(&x.data)];
        a.extend(resample_dims(x.shape, out.d));
        a.extend(upsample_ratios(x.shape.d, out.d));
        self.launch(k::UPSAMPLE_TRILINEAR, out.len(), LaunchCfg::linear(out.len(), BLOCK), &a)
    }

    /// y = skip + trilinear up-sampling of `low` to skip's size, in f32 from the stored values,
    /// rounded once to the buffers' one type (f32, f16 or bf16); `y` may be `skip`.
    pub fn upsample_add_into(&self, skip: &DevTensor<D::Buf>, low: &DevTensor<D::Buf>, y: &DevTensor<D::Buf>) -> Result<()> {
        self.check_tensor("upsample_add skip", skip)?;
        self.check_tensor("upsample_add low", low)?;
        let kernel = k::upsample_add(self.same_dtype("upsample_add", &[skip, low, y])?);
        let out = Self::check_upsample(low.shape, skip.shape.d)?;
        if out != skip.shape {
            return Err(Error::Shape(format!("upsample_add: {} up-sampled is {out}, the skip is {}", low.shape, skip.shape)));
        }
        self.check_out(kernel, y, out)?;
        let mut a = vec![KArg::Buf(&y.data), KArg::Buf(&skip.data), KArg::Buf(&low.data)];
        a.extend(resample_dims(low.shape, out.d));
        a.extend(upsample_ratios(low.shape.d, out.d));
        self.launch(kernel, out.len(), LaunchCfg::linear(out.len(), BLOCK), &a)
    }
}

impl<D: Device> Backend for GpuBackend<D> {
    type S = D::Buf;

    fn name(&self) -> String {
        self.dev.name()
    }

    fn upload(&self, t: &Tensor) -> Result<DevTensor<Self::S>> {
        if t.data.len() != t.shape.len() {
            return Err(Error::Shape(format!("upload: {} needs {} values, got {}", t.shape, t.shape.len(), t.data.len())));
        }
        Ok(DevTensor { shape: t.shape, data: self.dev.htod(&t.data)? })
    }

    fn download(&self, t: &DevTensor<Self::S>) -> Result<Tensor> {
        self.check_tensor("download", t)?;
        Tensor::new(t.shape, self.dev.dtoh(&t.data)?)
    }

    fn upload_param(&self, data: &[f32]) -> Result<Self::S> {
        self.dev.htod(data)
    }

    fn conv3d(&self, x: &DevTensor<Self::S>, w: &Self::S, bias: Option<&Self::S>, spec: &ConvSpec)
        -> Result<DevTensor<Self::S>> {
        let y = self.new_out("conv3d", self.conv3d_shape(x, w, bias, spec)?)?;
        self.conv3d_into(x, w, bias, spec, &y)?;
        Ok(y)
    }

    fn channel_affine(&self, x: &DevTensor<Self::S>, scale: &Self::S, shift: &Self::S, relu: bool)
        -> Result<DevTensor<Self::S>> {
        let y = self.new_out(k::CHANNEL_AFFINE, x.shape)?;
        self.channel_affine_into(x, scale, shift, relu, &y)?;
        Ok(y)
    }

    fn relu(&self, x: &DevTensor<Self::S>) -> Result<DevTensor<Self::S>> {
        self.elementwise(k::RELU, &[x])
    }

    fn add(&self, a: &DevTensor<Self::S>, b: &DevTensor<Self::S>, relu: bool) -> Result<DevTensor<Self::S>> {
        self.check_same("add", a, b)?;
        let y = self.new_out(k::ADD, a.shape)?;
        self.add_into(a, b, relu, &y)?;
        Ok(y)
    }

    fn maxpool2(&self, x: &DevTensor<Self::S>) -> Result<DevTensor<Self::S>> {
        self.check_tensor("maxpool2", x)?;
        let y = self.new_out(k::MAXPOOL2, x.shape.with_d(x.shape.d.map(|d| d / 2)))?;
        self.maxpool2_into(x, &y)?;
        Ok(y)
    }

    fn upsample(&self, x: &DevTensor<Self::S>, size: [usize; 3]) -> Result<DevTensor<Self::S>> {
        self.check_tensor("upsample", x)?;
        let y = self.new_out(k::UPSAMPLE_TRILINEAR, Self::check_upsample(x.shape, size)?)?;
        self.upsample_into(x, &y)?;
        Ok(y)
    }

    fn sigmoid(&self, x: &DevTensor<Self::S>) -> Result<DevTensor<Self::S>> {
        self.elementwise(k::SIGMOID, &[x])
    }

    fn softmax(&self, x: &DevTensor<Self::S>) -> Result<DevTensor<Self::S>> {
        self.check_tensor("softmax", x)?;
        if x.shape.c == 0 {
            return Err(Error::Shape(format!("softmax: {} has no channels", x.shape)));
        }
        let voxels = x.shape.n * x.shape.voxels();
        let y = self.zeros(k::SOFTMAX_CHANNELS, x.shape.len())?;
        let a = [KArg::Buf(&y), KArg::Buf(&x.data), int(voxels), int(x.shape.c)];
        self.launch(k::SOFTMAX_CHANNELS, x.shape.len(), LaunchCfg::linear(voxels, BLOCK), &a)?;
        Ok(DevTensor { shape: x.shape, data: y })
    }
}
