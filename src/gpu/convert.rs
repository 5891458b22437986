//! f32 <-> f16 / bf16 on the device (kernels/half.cu), for tensors entering and leaving the
//! tensor-core path: channels-last on both sides, so element by element.
use crate::backend::DevTensor;
use crate::error::{Error, Result};
use crate::gpu::{kernels, DType, Device, KArg, LaunchCfg};

const BLOCK: u32 = 256;

/// One thread per element: `kernel(y, x, total)` from an `from` buffer into a new `to` buffer.
fn convert<D: Device>(dev: &D, kernel: &str, x: &DevTensor<D::Buf>, from: DType, to: DType) -> Result<DevTensor<D::Buf>> {
    let (len, have) = (dev.buf_len(&x.data), dev.buf_dtype(&x.data));
    if have != from || len != x.shape.len() {
        return Err(Error::Shape(format!(
            "{kernel}: the buffer holds {len} {} values, {} needs {} {} values",
            have.name(), x.shape, x.shape.len(), from.name()
        )));
    }
    let n = i32::try_from(len).map_err(|_| Error::Shape(format!("{kernel}: {len} elements exceed the kernels' int indexing")))?;
    let y = dev.alloc_zeros_as(len, to)?;
    if len > 0 {
        dev.launch(kernel, LaunchCfg::linear(len, BLOCK), &[KArg::Buf(&y), KArg::Buf(&x.data), KArg::I32(n)])?;
    }
    Ok(DevTensor { shape: x.shape, data: y })
}

/// `x` (f32) rounded to nearest even in `dtype` (f16 or bf16).
pub fn to_half<D: Device>(dev: &D, x: &DevTensor<D::Buf>, dtype: DType) -> Result<DevTensor<D::Buf>> {
    let k = kernels::to_half(dtype).ok_or_else(|| Error::Shape("to_half: f32 is not a half type".into()))?;
    convert(dev, k, x, DType::F32, dtype)
}

/// `x` (f16 or bf16) as f32, exactly.
pub fn to_f32<D: Device>(dev: &D, x: &DevTensor<D::Buf>) -> Result<DevTensor<D::Buf>> {
    let dtype = dev.buf_dtype(&x.data);
    let k = kernels::to_f32(dtype).ok_or_else(|| Error::Shape("to_f32: the buffer already holds f32".into()))?;
    convert(dev, k, x, dtype, DType::F32)
}
