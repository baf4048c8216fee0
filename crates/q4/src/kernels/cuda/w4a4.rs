//! NVFP4 W4A4 on the device: activations quantized with ModelOpt's arithmetic (`cu/quant.cu`),
//! then either the exact integer emulation (`cu/w4a4.cu`, bit-identical with the CPU's
//! `matmul_exact`) or, on Blackwell with a verified native kernel, the block-scaled FP4 MMA.
//!
//! The native kernel cannot be tested on the machines q4 is developed on, so it is trusted only
//! after a self-check at first use on each device: a random problem must match the exact
//! emulation to f32 rounding, else the device stays on the exact path (and says so in the log).
//! `Q4_W4A4_EXACT=1` forces the exact path everywhere.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::{DType, Device, Tensor};

use super::dequant::device_parts;
use super::module_cache::{self, DeviceKernels};
use super::quant::amax_bits;
use super::util::{cuda_device, device_ptr, empty, fill_bytes, grid_for, launched, type_code};
use crate::error::{Error, Result};
use crate::qlinear::ActQuant;
use crate::qtensor::QTensor;
use crate::Format;

/// Activations quantized on the device: codes `[m][pc/2]`, scales (row-major `[m][pc/16]`, or
/// swizzled), and the tensor scale as a one-element device tensor.
pub struct DeviceActs {
    pub codes: Tensor,
    pub scales: Tensor,
    pub s2: Tensor,
    /// Padded scale columns of the swizzled layout (0: row-major).
    pub swizzle_kp: usize,
}

/// Quantizes `x` (`[m, k]`, any float dtype) to NVFP4 like `cpu::w4a4::quantize_activations`.
pub fn quantize_activations(
    k: &DeviceKernels,
    x: &Tensor,
    act: ActQuant,
    swizzle: bool,
) -> Result<DeviceActs> {
    let dev = cuda_device(x.device())?;
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let (m, cols) = x.dims2()?;
    let pc = cols.div_ceil(16) * 16;
    let (dynamic, s2_fixed, amax) = match act {
        ActQuant::None => return Err(Error::msg("activation quantization is off")),
        ActQuant::Int8 => {
            return Err(Error::msg(
                "int8 activations (W4A8) are not an NVFP4 activation format",
            ))
        }
        ActQuant::Nvfp4Static { input_scale } => {
            if !(input_scale.is_finite() && input_scale > 0.0) {
                return Err(Error::msg(format!(
                    "input_scale {input_scale} must be a positive finite number"
                )));
            }
            (0i32, input_scale, None)
        }
        ActQuant::Nvfp4Dynamic => (1i32, 0f32, Some(amax_bits(k, &x, false)?)),
    };
    let kp = (pc / 16).div_ceil(4) * 4;
    let swizzle_kp = if swizzle { kp } else { 0 };
    let codes = empty(dev, DType::U8, m * pc / 2)?;
    let scales = if swizzle {
        let s = empty(dev, DType::U8, m.div_ceil(128) * 128 * kp)?;
        fill_bytes(&s, 0)?;
        s
    } else {
        empty(dev, DType::U8, m * pc / 16)?
    };
    let s2 = empty(dev, DType::F32, 1)?;
    let func = k.function("quant", module_cache::QUANT, &[], "nvfp4_quant")?;
    let (xp, cp, sp, s2p) = (
        device_ptr(&x)?,
        device_ptr(&codes)?,
        device_ptr(&scales)?,
        device_ptr(&s2)?,
    );
    let ap = match &amax {
        Some(a) => device_ptr(a)?,
        None => 0u64,
    };
    let (m_i, c_i, pc_i, kp_i) = (m as i32, cols as i32, pc as i32, swizzle_kp as i32);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&xp).arg(&cp).arg(&sp).arg(&m_i).arg(&c_i).arg(&pc_i);
    b.arg(&ap).arg(&s2_fixed).arg(&dynamic).arg(&s2p).arg(&kp_i);
    // SAFETY: x holds m*cols f32; codes m*pc/2 bytes; scales m*pc/16 bytes (or the padded
    // swizzled matrix); amax is a device u32 when dynamic; s2 one f32.
    launched("nvfp4_quant", unsafe {
        b.launch(grid_for(m * pc / 16, 128, k.sm_count))
    })?;
    Ok(DeviceActs {
        codes,
        scales,
        s2,
        swizzle_kp,
    })
}

/// Exact W4A4 product of an NVFP4 weight and device-quantized activations into `out_dtype`.
pub fn matmul_exact(
    k: &DeviceKernels,
    w: &QTensor,
    xq: &DeviceActs,
    m: usize,
    out_dtype: DType,
) -> Result<Tensor> {
    let (n, cols) = w.rows_cols();
    let blocks = cols.div_ceil(16);
    let dev = cuda_device(w.device())?;
    let parts = device_parts(w)?;
    let y = empty(dev, out_dtype, (m, n))?;
    let func = k.function(
        "w4a4",
        module_cache::W4A4,
        &[("OUT_T", type_code(out_dtype)?)],
        "w4a4_exact",
    )?;
    let (wp, wsp) = (device_ptr(parts.codes)?, device_ptr(parts.scales)?);
    let (xp, xsp, s2p, yp) = (
        device_ptr(&xq.codes)?,
        device_ptr(&xq.scales)?,
        device_ptr(&xq.s2)?,
        device_ptr(&y)?,
    );
    let s2w = w.scale2();
    let (n_i, m_i, b_i) = (n as i32, m as i32, blocks as i32);
    let warps = n * m;
    let cfg = LaunchConfig {
        grid_dim: (warps.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&wp)
        .arg(&wsp)
        .arg(&xp)
        .arg(&xsp)
        .arg(&s2p)
        .arg(&s2w)
        .arg(&yp)
        .arg(&n_i)
        .arg(&m_i)
        .arg(&b_i);
    // SAFETY: weight codes/scales hold n rows of `blocks` blocks, activations m rows of the same
    // geometry with row-major scales, s2x one f32, y m*n outputs; one warp per output.
    launched("w4a4_exact", unsafe { b.launch(cfg) })?;
    Ok(y)
}

/// Native block-scaled FP4 product (sm_120a / sm_121a); `xq` must use swizzled scales.
pub fn matmul_native(
    k: &DeviceKernels,
    w: &QTensor,
    xq: &DeviceActs,
    m: usize,
    out_dtype: DType,
    arch: &str,
) -> Result<Tensor> {
    let (n, cols) = w.rows_cols();
    let blocks = cols / 16;
    let w_kp = blocks.div_ceil(4) * 4;
    let dev = cuda_device(w.device())?;
    let stream = dev.cuda_stream();
    let parts = device_parts(w)?;
    // The weight's scales in the swizzled layout (a pass over 1/16 of the weight bytes).
    let wsw = empty(dev, DType::U8, n.div_ceil(128) * 128 * w_kp)?;
    {
        let func = k.function("quant", module_cache::QUANT, &[], "swizzle_scales")?;
        let (src, dst) = (device_ptr(parts.scales)?, device_ptr(&wsw)?);
        let (r, c, kp) = (n as i32, blocks as i32, w_kp as i32);
        let mut b = stream.launch_builder(&func);
        b.arg(&src).arg(&dst).arg(&r).arg(&c).arg(&kp);
        // SAFETY: src holds n*blocks bytes, dst the padded swizzled matrix.
        launched("swizzle_scales", unsafe {
            b.launch(grid_for(wsw.elem_count(), 256, k.sm_count))
        })?;
    }
    let y = empty(dev, out_dtype, (m, n))?;
    let func = k.function_for_arch(
        "w4a4_native",
        module_cache::SM120,
        &[("OUT_T", type_code(out_dtype)?)],
        "w4a4_sm120",
        arch,
    )?;
    let (wp, wsp) = (device_ptr(parts.codes)?, device_ptr(&wsw)?);
    let (xp, xsp, s2p, yp) = (
        device_ptr(&xq.codes)?,
        device_ptr(&xq.scales)?,
        device_ptr(&xq.s2)?,
        device_ptr(&y)?,
    );
    let s2w = w.scale2();
    let (wkp, xkp, n_i, m_i, k_i) = (
        w_kp as i32,
        xq.swizzle_kp as i32,
        n as i32,
        m as i32,
        cols as i32,
    );
    let warps = n.div_ceil(16) * m.div_ceil(8);
    let cfg = LaunchConfig {
        grid_dim: (warps.div_ceil(4) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = stream.launch_builder(&func);
    b.arg(&wp)
        .arg(&wsp)
        .arg(&wkp)
        .arg(&xp)
        .arg(&xsp)
        .arg(&xkp)
        .arg(&s2p)
        .arg(&s2w)
        .arg(&yp);
    b.arg(&n_i).arg(&m_i).arg(&k_i);
    // SAFETY: k % 64 == 0 (checked by the caller); codes hold n (m) rows of k/2 bytes; both
    // scale matrices are swizzled with the given padded widths; y holds m*n outputs.
    launched("w4a4_sm120", unsafe { b.launch(cfg) })?;
    Ok(y)
}

/// Whether the native kernel passed its self-check on this device (run once per device).
fn native_verified(k: &DeviceKernels, dev: &Device, arch: &'static str) -> bool {
    static VERIFIED: OnceLock<Mutex<HashMap<usize, bool>>> = OnceLock::new();
    let ordinal = k.ctx.ordinal();
    let map = VERIFIED.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(&ok) = map.lock().unwrap_or_else(|e| e.into_inner()).get(&ordinal) {
        return ok;
    }
    let ok = match self_check(k, dev, arch) {
        Ok(rel) if rel <= 1e-5 => {
            tracing::info!(
                "native FP4 W4A4 kernel verified on device {ordinal} (rel. error {rel:.1e})"
            );
            true
        }
        Ok(rel) => {
            tracing::warn!(
                "native FP4 W4A4 kernel disagrees with the exact emulation on device {ordinal} \
                 (rel. error {rel:.1e}); using the exact emulation"
            );
            false
        }
        Err(e) => {
            tracing::warn!("native FP4 W4A4 kernel unavailable on device {ordinal}: {e}; using the exact emulation");
            false
        }
    };
    map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(ordinal, ok);
    ok
}

fn self_check(k: &DeviceKernels, dev: &Device, arch: &str) -> Result<f32> {
    let (n, m, kd) = (256usize, 8usize, 512usize);
    let w = Tensor::randn(0f32, 1.0, (n, kd), dev)?;
    let x = Tensor::randn(0f32, 1.0, (m, kd), dev)?;
    let wq = QTensor::quantize(&w, &crate::QuantSpec::new(Format::Nvfp4))?;
    let exact_acts = quantize_activations(k, &x, ActQuant::Nvfp4Dynamic, false)?;
    let native_acts = quantize_activations(k, &x, ActQuant::Nvfp4Dynamic, true)?;
    let a = matmul_exact(k, &wq, &exact_acts, m, DType::F32)?;
    let b = matmul_native(k, &wq, &native_acts, m, DType::F32, arch)?;
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
    let den = a.sqr()?.sum_all()?.to_scalar::<f32>()?;
    let rel = (num / den.max(f32::MIN_POSITIVE)).sqrt();
    Ok(if rel.is_finite() { rel } else { f32::INFINITY })
}

/// `y = W4A4(x, W)` for an NVFP4 weight on a CUDA device; `x` is `[m, k]`, `y` `[m, n]` in
/// `x`'s dtype.
pub fn matmul(w: &QTensor, x: &Tensor, act: ActQuant) -> Result<Tensor> {
    if w.format() != Format::Nvfp4 {
        return Err(Error::msg("W4A4 needs an NVFP4 weight"));
    }
    let (m, cols) = x.dims2()?;
    if cols != w.rows_cols().1 {
        return Err(Error::msg(format!(
            "activations have {cols} features, the weight {}",
            w.rows_cols().1
        )));
    }
    let dev = cuda_device(x.device())?;
    let k = module_cache::for_device(dev)?;
    let out_dtype = match x.dtype() {
        DType::F32 | DType::BF16 | DType::F16 => x.dtype(),
        _ => DType::F32,
    };
    let native = super::plan::native_fp4_target(k.cc)
        .filter(|t| t.starts_with("sm_12"))
        .filter(|_| cols.is_multiple_of(64))
        .filter(|_| std::env::var_os("Q4_W4A4_EXACT").is_none())
        .filter(|t| native_verified(&k, x.device(), t));
    match native {
        Some(arch) => {
            let xq = quantize_activations(&k, x, act, true)?;
            matmul_native(&k, w, &xq, m, out_dtype, arch)
        }
        None => {
            let xq = quantize_activations(&k, x, act, false)?;
            matmul_exact(&k, w, &xq, m, out_dtype)
        }
    }
}
