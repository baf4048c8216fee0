//! Decode of a device-resident QTensor: whole tensor (bit-exact with the CPU) or a chunk of rows
//! with a factored-out scale (the GEMM path).

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::{DType, Tensor};

use super::module_cache::{self, DeviceKernels};
use super::util::{cuda_device, device_ptr, empty, launched, type_code};
use crate::error::{Error, Result};
use crate::qtensor::{BlockScales, Buffer, QTensor};
use crate::Format;

/// Codebook index of a format in the generated CB_BITS table.
pub fn codebook_index(f: Format) -> i32 {
    match f {
        Format::Nvfp4 => 0,
        Format::Mxfp4 => 1,
        Format::Nf4 => 2,
        Format::Fp4 => 3,
    }
}

/// The device tensors of a QTensor: packed codes and block scales (bytes or f32).
pub struct DeviceParts<'a> {
    pub codes: &'a Tensor,
    pub scales: &'a Tensor,
}

pub fn device_parts(q: &QTensor) -> Result<DeviceParts<'_>> {
    let (codes, scales) = q.buffers();
    let Buffer::Device(codes) = codes else {
        return Err(Error::msg("the quantized tensor is not on a CUDA device"));
    };
    let scales = match scales {
        BlockScales::Table {
            bytes: Buffer::Device(t),
            ..
        } => t,
        BlockScales::F32 {
            device: Some(t), ..
        } => t,
        _ => {
            return Err(Error::msg(
                "the quantized tensor's scales are not on the device",
            ))
        }
    };
    Ok(DeviceParts { codes, scales })
}

/// Decodes rows `row0 .. row0 + rows` of `q` into `out` (contiguous `[rows, cols]` of dtype
/// f32 / bf16 / f16): `codebook[c] * block_scale * mul`, where the NVFP4 block scale is
/// `e4m3 * s2`. `s2 = q.scale2()` and `mul = 1` reproduce the CPU decode bit for bit.
pub fn decode_rows_into(
    k: &DeviceKernels,
    q: &QTensor,
    row0: usize,
    rows: usize,
    s2: f32,
    mul: f32,
    out: &Tensor,
) -> Result<()> {
    let (_, cols) = q.rows_cols();
    let parts = device_parts(q)?;
    let out_t = type_code(out.dtype())?;
    let defines = [("OUT_T", out_t)];
    let func_rows = k.function("dequant", module_cache::DEQUANT, &defines, "dequant_rows")?;
    let func = k.function("dequant", module_cache::DEQUANT, &defines, "dequant_flat")?;
    let dev = cuda_device(out.device())?;
    let stream = dev.cuda_stream();
    let (codes, scales, outp) = (
        device_ptr(parts.codes)?,
        device_ptr(parts.scales)?,
        device_ptr(out)?,
    );
    let cb = codebook_index(q.format());
    let bs = q.block_size();
    // bitsandbytes rows of whole 16-element units take the row kernel too (no 64-bit flat
    // indexing); other shapes the flat kernel.
    let table_format = matches!(q.format(), Format::Nvfp4 | Format::Mxfp4);
    match q.format() {
        _ if table_format || cols.is_multiple_of(16) => {
            let (row_bytes, row_blocks, block_arg, scale_kind, scales) = match q.format() {
                Format::Nvfp4 | Format::Mxfp4 => {
                    let pc = cols.div_ceil(bs) * bs;
                    let kind: i32 = if q.format() == Format::Nvfp4 { 0 } else { 1 };
                    (
                        pc / 2,
                        pc / bs,
                        bs as i32,
                        kind,
                        scales + (row0 * (pc / bs)) as u64,
                    )
                }
                _ => (cols / 2, 0, bs.trailing_zeros() as i32, 2, scales),
            };
            let codes = codes + (row0 * row_bytes) as u64;
            let (rows_i, cols_i, rb, rbl, row0_i) = (
                rows as i32,
                cols as i32,
                row_bytes as i32,
                row_blocks as i32,
                row0 as i32,
            );
            let threads = (row_bytes / 8).clamp(32, 256).next_power_of_two().min(256) as u32;
            let cfg = LaunchConfig {
                grid_dim: (rows.min(k.sm_count as usize * 32) as u32, 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = stream.launch_builder(&func_rows);
            b.arg(&codes)
                .arg(&scales)
                .arg(&outp)
                .arg(&rows_i)
                .arg(&cols_i)
                .arg(&rb)
                .arg(&rbl);
            b.arg(&block_arg)
                .arg(&scale_kind)
                .arg(&cb)
                .arg(&s2)
                .arg(&mul)
                .arg(&row0_i);
            // SAFETY: argument types and order match `dequant_rows`; every pointer covers the
            // rows it is offset to (lengths validated when the QTensor was built; bitsandbytes
            // absmax is indexed from the tensor's start); `out` holds rows * cols elements of
            // the type OUT_T names.
            launched("dequant_rows", unsafe { b.launch(cfg) })
        }
        _ => {
            let (e_begin, e_end) = ((row0 * cols) as i64, ((row0 + rows) * cols) as i64);
            let code_len = parts.codes.elem_count() as i64;
            let bs_shift = bs.trailing_zeros() as i32;
            let units = ((e_end - (e_begin & !15)) as usize).div_ceil(16);
            let cfg: LaunchConfig = super::util::grid_for(units, 256, k.sm_count);
            let mut b = stream.launch_builder(&func);
            b.arg(&codes)
                .arg(&scales)
                .arg(&outp)
                .arg(&e_begin)
                .arg(&e_end)
                .arg(&code_len);
            b.arg(&bs_shift).arg(&cb).arg(&mul);
            // SAFETY: argument types and order match `dequant_flat`; reads stay below
            // `code_len` bytes and `absmax[e / bs]` for e < numel; `out` holds e_end - e_begin
            // elements of OUT_T.
            launched("dequant_flat", unsafe { b.launch(cfg) })
        }
    }
}

/// Dense copy of a device-resident QTensor (bit-exact with `QTensor::dequantize` on the CPU).
pub fn dequantize(q: &QTensor, dtype: DType) -> Result<Tensor> {
    let dev = cuda_device(q.device())?;
    let k = module_cache::for_device(dev)?;
    let kernel_dtype = match dtype {
        DType::F32 | DType::BF16 | DType::F16 => dtype,
        _ => DType::F32,
    };
    let (rows, cols) = q.rows_cols();
    let out = empty(dev, kernel_dtype, (rows, cols))?;
    if rows * cols > 0 {
        decode_rows_into(&k, q, 0, rows, q.scale2(), 1.0, &out)?;
    }
    let out = out.reshape(q.shape().clone())?;
    Ok(if kernel_dtype == dtype {
        out
    } else {
        out.to_dtype(dtype)?
    })
}
