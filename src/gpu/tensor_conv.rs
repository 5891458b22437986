//! The tensor-core convolution (kernels/conv3d_tc.cu): channels-last implicit GEMM with f32
//! accumulation and a fused epilogue (bias, residual add, ReLU), on any `Device`, in one of three
//! types: f16 or bf16 inputs and weights (output in f32 or the input's half type), or f32 inputs
//! and weights computed in tf32 (`DType::F32`: the kernel rounds the inputs, cvt.rna.tf32.f32,
//! the weights are rounded here, [`round_tf32`]; output in f32). A [`TcConv`] holds a
//! convolution's weights once, rounded to its type and laid out as the kernel reads them
//! ([`tc_weight_layout`]); [`conv3d_tc`] checks the shapes and types, computes the grid, block and
//! shared memory here, in one place, and launches.
use crate::backend::{ConvSpec, DevTensor};
use crate::error::{Error, Result};
use crate::gpu::{kernels, round_tf32, DType, Device, KArg, LaunchCfg};
use crate::tensor::Shape;

/// Output voxels of one block (`TC_T0 x TC_T1 x TC_T2` of conv3d_tc.cu), its output channels and
/// weight pipeline stages: the kernel's constants, mirrored.
pub const TILE: [usize; 3] = [4, 8, 8];
pub const BLOCK_COUT: usize = 64;
pub const STAGES: usize = 3;
/// Weight stages of the wgmma kernel (`WG_STAGES`): one more, so one tap's wgmmas stay in flight.
pub const WG_STAGES: usize = 4;
/// Input channels of one brick chunk: a multiple of [`mma_channels`], at most this.
const MAX_CHUNK: usize = 64;
/// Shared memory of one block: at most this (sm_80's opt-in limit is 163 KB), and preferably at
/// most this, so that two blocks fit on an sm_90 SM (228 KB, 1 KB reserved per block).
pub const MAX_SMEM: usize = 160 * 1024;
pub const PREFERRED_SMEM: usize = 113 * 1024;

/// The warp tile: with mma.sync, each warp computes 32 (M32: 8 warps per block) or 64 (M64: 4
/// warps, the `wide` kernels) output voxels by 64 channels, any shape, f16 / bf16 / tf32. Same
/// result, bit for bit; which is faster is for a GPU to say. Wgmma: two warpgroups, each 128 voxels
/// by 64 channels with wgmma.m64n64k16 (f16 / bf16) or m64n64k8 (tf32) (sm_90a; stride 1, Cout a
/// multiple of 64, [`wgmma_supports`]); the same sums, rounded at the same points on the emulator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WarpTile {
    #[default]
    M32,
    M64,
    Wgmma,
}

impl WarpTile {
    /// The mma.sync tiles (every shape and type).
    pub const ALL: [WarpTile; 2] = [WarpTile::M32, WarpTile::M64];

    pub fn threads(self) -> u32 {
        match self {
            WarpTile::M32 | WarpTile::Wgmma => 256,
            WarpTile::M64 => 128,
        }
    }
}

/// Why the wgmma kernel cannot compute `spec` (in any of its types), or None when it can.
pub fn wgmma_supports(spec: &ConvSpec) -> Option<String> {
    if spec.stride != [1; 3] {
        Some(format!("stride {:?} (the wgmma kernel takes stride 1)", spec.stride))
    } else if !spec.cout.is_multiple_of(BLOCK_COUT) {
        Some(format!("{} output channels (the wgmma kernel takes a multiple of {BLOCK_COUT})", spec.cout))
    } else {
        None
    }
}

/// Output channels rounded up to whole pairs of n8 mma tiles.
pub fn cout_pad(cout: usize) -> usize {
    cout.div_ceil(16) * 16
}

/// 16-bit words of one element of `dtype` in shared memory (f32: two).
fn words(dtype: DType) -> usize {
    dtype.bytes() / 2
}

/// Input channels of one mma: 16 halves (m16n8k16) or 8 tf32 values (m16n8k8), 32 bytes either way.
pub fn mma_channels(dtype: DType) -> usize {
    16 / words(dtype)
}

/// Input channels of the brick chunks: the fewest chunks of at most 64 channels (multiples of
/// [`mma_channels`]) whose shared memory fits [`PREFERRED_SMEM`], else [`MAX_SMEM`]; an error when
/// even one mma's channels do not.
pub fn choose_chunk(spec: &ConvSpec, dtype: DType) -> Result<usize> {
    let q = mma_channels(dtype);
    let mut best = None;
    for chunks in spec.cin.div_ceil(MAX_CHUNK)..=spec.cin.div_ceil(q).max(1) {
        let ck = spec.cin.div_ceil(chunks).div_ceil(q) * q;
        let bytes = smem_bytes(spec, ck, dtype);
        if bytes <= PREFERRED_SMEM {
            return Ok(ck);
        }
        if bytes <= MAX_SMEM && best.is_none() {
            best = Some(ck);
        }
    }
    best.ok_or_else(|| {
        Error::Shape(format!(
            "conv3d_tc: kernel {:?} stride {:?}: the input brick of a {TILE:?} tile needs {} bytes of shared memory with {q} {} channels (at most {MAX_SMEM})",
            spec.k, spec.stride, smem_bytes(spec, q, dtype), dtype.name()
        ))
    })
}

/// Voxels of the input brick of one output tile: (T - 1) s + k per axis.
fn brick_voxels(spec: &ConvSpec) -> usize {
    (0..3).map(|a| (TILE[a] - 1) * spec.stride[a] + spec.k[a]).product()
}

/// Dynamic shared memory of one block of the mma.sync kernels: the brick and the weight stages,
/// rows of `ck` elements plus a 16-byte pad, in 16-bit words.
pub fn smem_bytes(spec: &ConvSpec, ck: usize, dtype: DType) -> usize {
    (brick_voxels(spec) + STAGES * BLOCK_COUT) * (ck * words(dtype) + 8) * 2
}

/// Dynamic shared memory of one block of `tile`'s kernel: [`smem_bytes`], or for wgmma the same
/// rows without the pad (core matrices are 16-byte rows, read by descriptor, not by ldmatrix) and
/// [`WG_STAGES`] weight stages.
pub fn tile_smem_bytes(spec: &ConvSpec, ck: usize, dtype: DType, tile: WarpTile) -> usize {
    match tile {
        WarpTile::Wgmma => (brick_voxels(spec) + WG_STAGES * BLOCK_COUT) * ck * words(dtype) * 2,
        _ => smem_bytes(spec, ck, dtype),
    }
}

/// The threads and dynamic shared memory `deepis kernels` shows for a tensor-core conv kernel (by
/// name): the published model's widest layer (3x3x3, stride 1, 64 -> 64 channels); None for a
/// name that is not one.
pub fn reference_launch_block(kernel: &str) -> Option<(u32, u32)> {
    let spec = ConvSpec { cin: 64, cout: 64, k: [3; 3], stride: [1; 3], pad: [1; 3] };
    let types = [DType::F16, DType::BF16, DType::F32];
    let tiles = [WarpTile::M32, WarpTile::M64, WarpTile::Wgmma];
    let (dtype, tile) = types.iter().flat_map(|&t| tiles.map(|w| (t, w))).find(|&(t, w)| kernel_for(t, w) == kernel)?;
    let ck = choose_chunk(&spec, dtype).ok()?;
    Some((tile.threads(), tile_smem_bytes(&spec, ck, dtype, tile) as u32))
}

/// The weights `w` ([k0][k1][k2][cin][cout], the engine's layout) as conv3d_tc.cu reads them:
/// [chunk][tap][cout_pad][ck], zero past Cin and Cout.
pub fn tc_weight_layout(spec: &ConvSpec, w: &[f32], ck: usize) -> Vec<f32> {
    let taps = spec.k.iter().product::<usize>();
    let (cin, cout, cp) = (spec.cin, spec.cout, cout_pad(spec.cout));
    let chunks = cin.div_ceil(ck);
    let mut out = vec![0.0f32; chunks * taps * cp * ck];
    for tap in 0..taps {
        for ci in 0..cin {
            let (c, j) = (ci / ck, ci % ck);
            for co in 0..cout {
                out[((c * taps + tap) * cp + co) * ck + j] = w[(tap * cin + ci) * cout + co];
            }
        }
    }
    out
}

/// A convolution ready for the tensor cores: its weights rounded once to `dtype` (f16, bf16, or
/// for F32 to tf32 values stored as f32) in the kernel's layout, and its bias (zeros when it has
/// none) in f32.
pub struct TcConv<B> {
    pub spec: ConvSpec,
    /// The type of its inputs and weights (F32: computed in tf32).
    pub dtype: DType,
    /// Input channels per brick chunk ([`choose_chunk`]).
    pub chunk: usize,
    /// The kernel variant launches use (M32 unless set).
    pub tile: WarpTile,
    weights: B,
    bias: B,
}

impl<B> TcConv<B> {
    /// `w` in the engine's layout [k0][k1][k2][cin][cout], `bias` of Cout values.
    pub fn new<D: Device<Buf = B>>(dev: &D, spec: &ConvSpec, w: &[f32], bias: Option<&[f32]>, dtype: DType) -> Result<Self> {
        if spec.cin == 0 || spec.cout == 0 || (0..3).any(|a| spec.k[a] == 0 || spec.stride[a] == 0) {
            return Err(Error::Shape(format!("conv3d_tc: degenerate {spec:?}")));
        }
        if w.len() != spec.weight_len() {
            return Err(Error::Shape(format!("conv3d_tc: {} weights, {spec:?} needs {}", w.len(), spec.weight_len())));
        }
        let zeros = vec![0.0; spec.cout];
        let bias = bias.unwrap_or(&zeros);
        if bias.len() != spec.cout {
            return Err(Error::Shape(format!("conv3d_tc: {} bias values for {} output channels", bias.len(), spec.cout)));
        }
        let chunk = choose_chunk(spec, dtype)?;
        let mut laid = tc_weight_layout(spec, w, chunk);
        if dtype == DType::F32 {
            laid.iter_mut().for_each(|v| *v = round_tf32(*v));
        }
        fits_i32("conv3d_tc weights", laid.len())?;
        Ok(TcConv { spec: *spec, dtype, chunk, tile: WarpTile::default(), weights: dev.htod_as(&laid, dtype)?, bias: dev.htod(bias)? })
    }

    /// The laid-out weights (tests plant faults in a copy of them).
    pub fn weights(&self) -> &B {
        &self.weights
    }

    /// The same convolution with other laid-out weights (same length and type).
    pub fn with_weights<D: Device<Buf = B>>(self, dev: &D, weights: B) -> Result<Self> {
        if dev.buf_len(&weights) != dev.buf_len(&self.weights) || dev.buf_dtype(&weights) != self.dtype {
            return Err(Error::Shape("conv3d_tc: replacement weights differ in length or type".into()));
        }
        Ok(TcConv { weights, ..self })
    }
}

/// The kernel of `tile` in `dtype`.
fn kernel_for(dtype: DType, tile: WarpTile) -> &'static str {
    match tile {
        WarpTile::Wgmma => kernels::conv3d_wgmma(dtype),
        _ => kernels::conv3d_tc(dtype, tile == WarpTile::M64),
    }
}

fn fits_i32(what: &str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::Shape(format!("{what}: {n} elements exceed the kernels' int indexing")))
}

/// What follows the convolution in the same kernel: y = relu?(conv(x) + bias + residual), stored
/// in `out` (f32, or the conv's half type; the residual, when given, is in `out`'s type).
pub struct Epilogue<'a, B> {
    pub residual: Option<&'a DevTensor<B>>,
    pub relu: bool,
    pub out: DType,
}

impl<B> Epilogue<'_, B> {
    pub fn plain(out: DType) -> Self {
        Epilogue { residual: None, relu: false, out }
    }
}

/// The grid of a launch: one block per output tile and 64 output channels.
pub fn launch_cfg(spec: &ConvSpec, out: Shape, chunk: usize, dtype: DType, tile: WarpTile) -> LaunchCfg {
    let tiles: usize = out.n * (0..3).map(|a| out.d[a].div_ceil(TILE[a])).product::<usize>();
    LaunchCfg {
        grid: [tiles as u32, spec.cout.div_ceil(BLOCK_COUT) as u32, 1],
        block: [tile.threads(), 1, 1],
        shmem: tile_smem_bytes(spec, chunk, dtype, tile) as u32,
    }
}

fn check_tensor<D: Device>(dev: &D, what: &str, t: &DevTensor<D::Buf>, dtype: DType) -> Result<()> {
    let (len, have) = (dev.buf_len(&t.data), dev.buf_dtype(&t.data));
    if len != t.shape.len() || have != dtype {
        return Err(Error::Shape(format!(
            "conv3d_tc {what}: the buffer holds {len} {} values, {} needs {} {} values",
            have.name(), t.shape, t.shape.len(), dtype.name()
        )));
    }
    fits_i32(what, len).map(|_| ())
}

/// The output shape of `conv` on an input of shape `x`.
pub fn out_shape(spec: &ConvSpec, x: Shape) -> Shape {
    Shape::new(x.n, spec.out_dims(x.d), spec.cout)
}

/// y = epilogue(conv(x)) on the tensor cores, in a new buffer; `x` holds `conv.dtype` values,
/// channels-last.
pub fn conv3d_tc<D: Device>(dev: &D, conv: &TcConv<D::Buf>, x: &DevTensor<D::Buf>, ep: &Epilogue<'_, D::Buf>) -> Result<DevTensor<D::Buf>> {
    let out = out_shape(&conv.spec, x.shape);
    fits_i32("conv3d_tc output", out.len())?;
    let y = DevTensor { shape: out, data: dev.alloc_zeros_as(out.len(), ep.out)? };
    conv3d_tc_into(dev, conv, x, ep, &y)?;
    Ok(y)
}

/// As [`conv3d_tc`], into `y` (of the output's shape and `ep.out`'s type; every element is written).
pub fn conv3d_tc_into<D: Device>(dev: &D, conv: &TcConv<D::Buf>, x: &DevTensor<D::Buf>, ep: &Epilogue<'_, D::Buf>, y: &DevTensor<D::Buf>) -> Result<()> {
    let spec = &conv.spec;
    if conv.tile == WarpTile::Wgmma {
        if let Some(why) = wgmma_supports(spec) {
            return Err(Error::Shape(format!("conv3d_wgmma: {why}")));
        }
    }
    let kernel = kernel_for(conv.dtype, conv.tile);
    if !dev.has_tensor_cores() {
        return Err(Error::kernel(kernel, format!("{}: needs sm_80 or newer (mma.sync, cp.async)", dev.name())));
    }
    if conv.tile == WarpTile::Wgmma && !dev.has_wgmma() {
        return Err(Error::kernel(kernel, format!("{}: needs sm_90 (wgmma, built for sm_90a)", dev.name())));
    }
    check_tensor(dev, "input", x, conv.dtype)?;
    if x.shape.c != spec.cin {
        return Err(Error::Shape(format!("conv3d_tc: input {} has {} channels, the conv takes {}", x.shape, x.shape.c, spec.cin)));
    }
    if (0..3).any(|a| x.shape.d[a] + 2 * spec.pad[a] < spec.k[a]) {
        return Err(Error::Shape(format!("conv3d_tc: kernel {:?} larger than padded input {}", spec.k, x.shape)));
    }
    if ep.out != DType::F32 && ep.out != conv.dtype {
        return Err(Error::Shape(format!("conv3d_tc: output in {} from {} inputs (f32 or the input's type)", ep.out.name(), conv.dtype.name())));
    }
    let out = out_shape(spec, x.shape);
    check_tensor(dev, "output", y, ep.out)?;
    if y.shape != out {
        return Err(Error::Shape(format!("conv3d_tc: output buffer {} for output {out}", y.shape)));
    }
    if let Some(r) = ep.residual {
        check_tensor(dev, "residual", r, ep.out)?;
        if r.shape != out {
            return Err(Error::Shape(format!("conv3d_tc: residual {} for output {out}", r.shape)));
        }
    }
    if out.is_empty() {
        return Ok(());
    }
    // The kernel takes both output and both residual pointers; the unused ones are any live
    // buffer of their type and are never touched (out_half and has_res say which are used).
    let half_out = ep.out != DType::F32;
    let (yf, yh) = if half_out { (&conv.bias, &y.data) } else { (&y.data, &x.data) };
    let res = ep.residual.map(|r| &r.data);
    let (rf, rh) = match (res, half_out) {
        (Some(r), true) => (&conv.bias, r),
        (Some(r), false) => (r, &x.data),
        (None, _) => (&conv.bias, &x.data),
    };
    let mut a = vec![KArg::Buf(yf), KArg::Buf(yh), KArg::Buf(&x.data), KArg::Buf(&conv.weights), KArg::Buf(&conv.bias), KArg::Buf(rf), KArg::Buf(rh)];
    let [d0, d1, d2] = x.shape.d;
    let [o0, o1, o2] = out.d;
    let scalars = [
        x.shape.n, d0, d1, d2, spec.cin, o0, o1, o2, spec.cout, spec.k[0], spec.k[1], spec.k[2],
        spec.stride[0], spec.stride[1], spec.stride[2], spec.pad[0], spec.pad[1], spec.pad[2],
        conv.chunk, cout_pad(spec.cout), half_out as usize, res.is_some() as usize, ep.relu as usize,
    ];
    a.extend(scalars.into_iter().map(|v| KArg::I32(v as i32)));
    dev.launch(kernel, launch_cfg(spec, out, conv.chunk, conv.dtype, conv.tile), &a)
}
