//! f32 <-> f16 / bf16 on the device (kernels/half.cu), for tensors entering and leaving the
//! tensor-core path: channels-last on both sides, so element by element.
use crate::backend::DevTensor;
use crate::error::{Error, Result};
use crate::gpu::{kernels, DType, Device, KArg, LaunchCfg};

const BLOCK: u32 = 256;

fn check<D: Device>(dev: &D, kernel: &str, what: &str, t: &DevTensor<D::Buf>, dtype: DType) -> Result<i32> {
    let (len, have) = (dev.buf_len(&t.data), dev.buf_dtype(&t.data));
    if have != dtype || len != t.shape.len() {
        return Err(Error::Shape(format!(
            "{kernel} {what}: the buffer holds {len} {} values, {} needs {} {} values",
            have.name(), t.shape, t.shape.len(), dtype.name()
        )));
    }
    i32::try_from(len).map_err(|_| Error::Shape(format!("{kernel}: {len} elements exceed the kernels' int indexing")))
}

/// One thread per element: `kernel(y, x, total)` from a `from` buffer into `y`, a `to` buffer of x's shape.
fn convert_into<D: Device>(dev: &D, kernel: &str, x: &DevTensor<D::Buf>, from: DType, to: DType, y: &DevTensor<D::Buf>) -> Result<()> {
    let n = check(dev, kernel, "input", x, from)?;
    check(dev, kernel, "output", y, to)?;
    if y.shape != x.shape {
        return Err(Error::Shape(format!("{kernel}: output {} for input {}", y.shape, x.shape)));
    }
    if n > 0 {
        dev.launch(kernel, LaunchCfg::linear(n as usize, BLOCK), &[KArg::Buf(&y.data), KArg::Buf(&x.data), KArg::I32(n)])?;
    }
    Ok(())
}

fn half_kernel(dtype: DType) -> Result<&'static str> {
    kernels::to_half(dtype).ok_or_else(|| Error::Shape("to_half: f32 is not a half type".into()))
}

fn f32_kernel(dtype: DType) -> Result<&'static str> {
    kernels::to_f32(dtype).ok_or_else(|| Error::Shape("to_f32: the buffer already holds f32".into()))
}

/// `x` (f32) rounded to nearest even in `dtype` (f16 or bf16).
pub fn to_half<D: Device>(dev: &D, x: &DevTensor<D::Buf>, dtype: DType) -> Result<DevTensor<D::Buf>> {
    let k = half_kernel(dtype)?;
    check(dev, k, "input", x, DType::F32)?;
    let y = DevTensor { shape: x.shape, data: dev.alloc_zeros_as(x.shape.len(), dtype)? };
    convert_into(dev, k, x, DType::F32, dtype, &y)?;
    Ok(y)
}

/// `x` (f16 or bf16) as f32, exactly.
pub fn to_f32<D: Device>(dev: &D, x: &DevTensor<D::Buf>) -> Result<DevTensor<D::Buf>> {
    let dtype = dev.buf_dtype(&x.data);
    let k = f32_kernel(dtype)?;
    check(dev, k, "input", x, dtype)?;
    let y = DevTensor { shape: x.shape, data: dev.alloc_zeros_as(x.shape.len(), DType::F32)? };
    convert_into(dev, k, x, dtype, DType::F32, &y)?;
    Ok(y)
}

/// `x` in the type of `y` (an existing buffer of x's shape): f32 -> half rounds to nearest even,
/// half -> f32 is exact.
pub fn convert_to<D: Device>(dev: &D, x: &DevTensor<D::Buf>, y: &DevTensor<D::Buf>) -> Result<()> {
    let (from, to) = (dev.buf_dtype(&x.data), dev.buf_dtype(&y.data));
    let k = match (from, to) {
        (DType::F32, h) if h != DType::F32 => half_kernel(h)?,
        (h, DType::F32) if h != DType::F32 => f32_kernel(h)?,
        _ => return Err(Error::Shape(format!("convert: {} to {} is not a conversion of half.cu", from.name(), to.name()))),
    };
    convert_into(dev, k, x, from, to, y)
}
