//! Quantization on the device, bit-exact with q4-formats (same checks, same errors, same bytes).
//! bitsandbytes double quantization (a few thousand statistics) runs on the host.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{DType, Tensor};
use q4_formats::bnb::{self, BnbKind, NestedRounding};
use q4_formats::mxfp4::{self, ScaleRule};
use q4_formats::nvfp4;
use q4_formats::{Format, FormatError, NonFinite};

use super::module_cache::{self, DeviceKernels};
use super::util::{cuda_device, device_ptr, empty, fill_bytes, grid_for, launched};
use crate::error::{Error, Result};
use crate::qtensor::{BlockScales, Buffer, QTensor, QuantSpec};

/// `max |x|` over a device tensor (f32, contiguous) as bits; non-finite values count as 0 with
/// `zero_nonfinite`, else they compare above every finite value.
pub fn amax_bits(k: &DeviceKernels, x: &Tensor, zero_nonfinite: bool) -> Result<Tensor> {
    let dev = cuda_device(x.device())?;
    let out = empty(dev, DType::U32, 1)?;
    fill_bytes(&out, 0)?;
    let n = x.elem_count() as i64;
    let (xp, op, z) = (device_ptr(x)?, device_ptr(&out)?, zero_nonfinite as i32);
    let func = k.function("quant", module_cache::QUANT, &[], "amax_bits")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&xp).arg(&n).arg(&op).arg(&z);
    // SAFETY: `x` holds n f32 values, `out` one u32; argument order matches `amax_bits`.
    launched("amax_bits", unsafe {
        b.launch(grid_for(x.elem_count(), 256, k.sm_count))
    })?;
    Ok(out)
}

/// The error q4-formats reports for the first NaN/Inf of `x` (f32, contiguous, on device).
fn non_finite_error(k: &DeviceKernels, x: &Tensor) -> Result<Error> {
    let dev = cuda_device(x.device())?;
    let out = empty(dev, DType::U32, 2)?;
    fill_bytes(&out, 0xff)?;
    let n = x.elem_count() as i64;
    let (xp, op) = (device_ptr(x)?, device_ptr(&out)?);
    let func = k.function("quant", module_cache::QUANT, &[], "first_nonfinite")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&xp).arg(&n).arg(&op);
    // SAFETY: `x` holds n f32 values; `out` is one u64 (two u32); order matches the kernel.
    launched("first_nonfinite", unsafe {
        b.launch(grid_for(x.elem_count(), 256, k.sm_count))
    })?;
    let w = out.to_vec1::<u32>()?;
    let index = (w[0] as u64 | ((w[1] as u64) << 32)) as usize;
    let value = x.narrow(0, index, 1)?.to_vec1::<f32>()?[0];
    Ok(Error::Format(FormatError::NonFinite { index, value }))
}

fn read_amax(k: &DeviceKernels, x: &Tensor, policy: NonFinite) -> Result<f32> {
    let bits = amax_bits(k, x, policy == NonFinite::Zero)?.to_vec1::<u32>()?[0];
    if bits >= 0x7f80_0000 {
        return Err(non_finite_error(k, x)?);
    }
    Ok(f32::from_bits(bits))
}

/// Quantizes a tensor that lives on a CUDA device; the result stays there.
pub fn quantize(t: &Tensor, spec: &QuantSpec) -> Result<QTensor> {
    let dev = cuda_device(t.device())?;
    let k = module_cache::for_device(dev)?;
    let shape = t.shape().clone();
    let dims = shape.dims();
    let cols = *dims
        .last()
        .ok_or_else(|| Error::msg("a quantized tensor needs at least one dimension"))?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let bf16_input = t.dtype() == DType::BF16;
    let x = t.to_dtype(DType::F32)?.flatten_all()?.contiguous()?;
    let stream = dev.cuda_stream();
    let device = t.device().clone();
    match spec.format {
        Format::Nvfp4 | Format::Mxfp4 => {
            let block = if spec.format == Format::Nvfp4 {
                nvfp4::BLOCK
            } else {
                mxfp4::BLOCK
            };
            if spec.block_size != block {
                return Err(Error::msg(format!(
                    "{} uses blocks of {block}; block size {} is not supported",
                    spec.format, spec.block_size
                )));
            }
            if cols == 0 {
                return Err(Error::Format(FormatError::Invalid(format!(
                    "{} elements do not form rows of {cols}",
                    x.elem_count()
                ))));
            }
            if !cols.is_multiple_of(block) && !spec.pad {
                return Err(Error::Format(FormatError::NotBlockMultiple { cols, block }));
            }
            let pc = cols.div_ceil(block) * block;
            let codes = empty(dev, DType::U8, rows * pc / 2)?;
            let scales = empty(dev, DType::U8, rows * pc / block)?;
            let (xp, cp, sp) = (device_ptr(&x)?, device_ptr(&codes)?, device_ptr(&scales)?);
            let (rows_i, cols_i, pc_i) = (rows as i32, cols as i32, pc as i32);
            let cfg = grid_for(rows * pc / block, 128, k.sm_count);
            if spec.format == Format::Nvfp4 {
                let amax = read_amax(&k, &x, spec.non_finite)?;
                let s2 = spec.scale2.unwrap_or_else(|| nvfp4::tensor_scale(amax));
                if !(s2.is_finite() && s2 >= 0.0) {
                    return Err(Error::Format(FormatError::Invalid(format!(
                        "tensor scale {s2} is not a finite non-negative number"
                    ))));
                }
                let func = k.function("quant", module_cache::QUANT, &[], "nvfp4_quant")?;
                let (null, dynamic, swz) = (0u64, 0i32, 0i32);
                let mut b = stream.launch_builder(&func);
                b.arg(&xp)
                    .arg(&cp)
                    .arg(&sp)
                    .arg(&rows_i)
                    .arg(&cols_i)
                    .arg(&pc_i);
                b.arg(&null).arg(&s2).arg(&dynamic).arg(&null).arg(&swz);
                // SAFETY: x holds rows*cols f32, codes rows*pc/2 bytes, scales rows*pc/16
                // bytes; the amax and s2_out pointers are unused (null) when dynamic == 0.
                launched("nvfp4_quant", unsafe { b.launch(cfg) })?;
                QTensor::from_device_parts(
                    Format::Nvfp4,
                    block,
                    shape,
                    codes,
                    BlockScales::Table {
                        bytes: Buffer::Device(scales),
                        table: Arc::new(nvfp4::scale_table(s2)),
                    },
                    s2,
                    None,
                )
            } else {
                if spec.non_finite == NonFinite::Reject {
                    read_amax(&k, &x, NonFinite::Reject)?;
                }
                let rule: i32 = match spec.mx_rule {
                    ScaleRule::Rceil => 0,
                    ScaleRule::Floor => 1,
                    ScaleRule::Even => 2,
                };
                let bf = bf16_input as i32;
                let func = k.function("quant", module_cache::QUANT, &[], "mxfp4_quant")?;
                let mut b = stream.launch_builder(&func);
                b.arg(&xp)
                    .arg(&cp)
                    .arg(&sp)
                    .arg(&rows_i)
                    .arg(&cols_i)
                    .arg(&pc_i)
                    .arg(&rule)
                    .arg(&bf);
                // SAFETY: x holds rows*cols f32, codes rows*pc/2 bytes, scales rows*pc/32.
                launched("mxfp4_quant", unsafe { b.launch(cfg) })?;
                QTensor::from_device_parts(
                    Format::Mxfp4,
                    block,
                    shape,
                    codes,
                    BlockScales::Table {
                        bytes: Buffer::Device(scales),
                        table: Arc::new(mxfp4::scale_table()),
                    },
                    1.0,
                    None,
                )
            }
        }
        Format::Nf4 | Format::Fp4 => {
            let bs = spec.block_size;
            bnb::check_block_size(bs)?;
            if spec.non_finite == NonFinite::Reject {
                read_amax(&k, &x, NonFinite::Reject)?;
            }
            let n = x.elem_count();
            let nblocks = n.div_ceil(bs);
            let codes = empty(dev, DType::U8, n.div_ceil(2))?;
            let absmax = empty(dev, DType::F32, nblocks)?;
            let (xp, cp, ap) = (device_ptr(&x)?, device_ptr(&codes)?, device_ptr(&absmax)?);
            let (n_i, bs_i, nf4) = (n as i64, bs as i32, (spec.format == Format::Nf4) as i32);
            let func = k.function("quant", module_cache::QUANT, &[], "bnb_quant")?;
            let mut b = stream.launch_builder(&func);
            b.arg(&xp).arg(&cp).arg(&ap).arg(&n_i).arg(&bs_i).arg(&nf4);
            // SAFETY: x holds n f32, codes ceil(n/2) bytes, absmax one f32 per block; one
            // warp per block (block counts are multiples of 32 threads).
            launched("bnb_quant", unsafe {
                b.launch(grid_for(nblocks * 32, 256, k.sm_count))
            })?;
            let (absmax, nested) = if spec.double_quant {
                let host = absmax.to_vec1::<f32>()?;
                let nested = bnb::quantize_absmax(&host, NestedRounding::Exact);
                let expanded = nested.dequantize()?;
                (Tensor::from_vec(expanded, nblocks, &device)?, Some(nested))
            } else {
                (absmax, None)
            };
            let kind = if spec.format == Format::Nf4 {
                BnbKind::Nf4
            } else {
                BnbKind::Fp4
            };
            debug_assert_eq!(kind.name(), spec.format.name());
            QTensor::from_device_parts(
                spec.format,
                bs,
                shape,
                codes,
                BlockScales::F32 {
                    host: None,
                    device: Some(absmax),
                },
                1.0,
                nested,
            )
        }
    }
}
