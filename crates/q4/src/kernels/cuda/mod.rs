//! CUDA kernels (feature `cuda`): CUDA C compiled with NVRTC at first use for the running
//! device, cached per process and on disk (`module_cache`).
//!
//! * `dequant`: whole-tensor decode, bit-exact with the CPU;
//! * `quant`: NVFP4 / MXFP4 / NF4 / FP4 quantization on the device, bit-exact with q4-formats;
//! * `gemv`: fused decode-on-the-fly matmul for batches 1-64 (tensor cores, f32 accumulate);
//! * `gemm_sm90`: larger batches on Hopper with bf16 activations (NVFP4, MXFP4; NF4 / FP4 up
//!   to batch 1024): the weight decoded step by step into `wgmma`'s register operand;
//! * [`gemm`]: larger batches otherwise: chunks of the weight (128 MB at M >= 2048, up to 512 MB
//!   below) decoded to bf16/f16/f32, then cuBLAS;
//! * `w4a4`: exact NVFP4 W4A4 emulation (identical to the CPU) and the native Blackwell path;
//! * [`blackwell`]: the native block-scaled FP4 kernels' addressing, emulated on the CPU as
//!   their test oracle (compiled in every build).
//!
//! [`plan`] (also in every build) says which of these serves a call; `q4 doctor` prints it.

pub mod blackwell;
pub mod plan;

#[cfg(feature = "cuda")]
pub mod dequant;
#[cfg(feature = "cuda")]
pub mod gemm;
#[cfg(feature = "cuda")]
pub mod gemm_sm90;
#[cfg(feature = "cuda")]
pub mod gemv;
#[cfg(feature = "cuda")]
pub mod module_cache;
#[cfg(feature = "cuda")]
pub mod quant;
#[cfg(feature = "cuda")]
mod util;
#[cfg(feature = "cuda")]
pub mod w4a4;

#[cfg(feature = "cuda")]
pub use util::{device_ptr, empty, launch_ex, poison_outputs, Act};

#[cfg(feature = "cuda")]
use candle_core::Tensor;

#[cfg(feature = "cuda")]
use crate::error::Result;
#[cfg(feature = "cuda")]
use crate::qtensor::QTensor;

/// `y = x Wᵀ` for a quantized weight on a CUDA device; `x` is `[batch, k]` (f32, bf16 or f16)
/// and `y` comes back as `[batch, n]` in `x`'s dtype. Small batches run the fused GEMV, larger
/// ones (and shapes the GEMV cannot tile) the dequantize + cuBLAS path.
#[cfg(feature = "cuda")]
pub fn matmul(w: &QTensor, x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let act = Act::from_tensor(&x)?;
    let (batch, n) = (act.batch, w.rows_cols().0);
    let y = matmul_act(w, &act)?;
    Ok(util::tensor_from(y, (batch, n)))
}

/// [`matmul`] on raw activations (the candle custom op's entry point).
#[cfg(feature = "cuda")]
pub fn matmul_act(w: &QTensor, x: &Act<'_>) -> Result<candle_core::cuda_backend::CudaStorage> {
    check_operands(w, x)?;
    let kernels = module_cache::for_device(x.dev)?;
    if x.batch == 0 || w.rows_cols().0 == 0 {
        return util::empty_storage(x.dev, x.dtype, 0);
    }
    if gemv_serves(&kernels, w, x) {
        gemv::matmul_act(&kernels, w, x)
    } else if gemm_sm90::supports(&kernels, w, x) {
        gemm_sm90::matmul_act(&kernels, w, x)
    } else {
        gemm::matmul_act(&kernels, w, x)
    }
}

/// [`matmul`] into `y`, a contiguous `[batch, n]` tensor of `x`'s dtype on `x`'s device, where
/// the fused GEMV serves the call (returns whether it did; `false`: nothing was written, use
/// [`matmul`]). The GEMV then allocates nothing for bf16 / f16 activations, so that a CUDA graph
/// of such calls keeps its kernels adjacent.
#[cfg(feature = "cuda")]
pub fn matmul_into(w: &QTensor, x: &Tensor, y: &Tensor) -> Result<bool> {
    let x = x.contiguous()?;
    let act = Act::from_tensor(&x)?;
    let n = w.rows_cols().0;
    if y.dims() != [act.batch, n] || y.dtype() != act.dtype || !y.is_contiguous() {
        return Err(crate::Error::msg(format!(
            "output buffer {:?} {:?} does not fit a [{}, {n}] {:?} product",
            y.dims(),
            y.dtype(),
            act.batch,
            act.dtype
        )));
    }
    check_operands(w, &act)?;
    if !y.device().same_device(x.device()) {
        return Err(crate::Error::msg(
            "the output buffer and the activations are on different devices",
        ));
    }
    let kernels = module_cache::for_device(act.dev)?;
    if act.batch == 0 || n == 0 || !gemv_serves(&kernels, w, &act) {
        return Ok(false);
    }
    // SAFETY: y is a contiguous [batch, n] tensor of the activations' dtype on their device
    // (checked above), which the caller hands over for writing.
    unsafe { gemv::matmul_act_into(&kernels, w, &act, device_ptr(y)?) }?;
    Ok(true)
}

/// The weight and the activations agree in K and share a CUDA device.
#[cfg(feature = "cuda")]
fn check_operands(w: &QTensor, x: &Act<'_>) -> Result<()> {
    let k = w.rows_cols().1;
    if k != x.k {
        return Err(crate::Error::msg(format!(
            "activations have {} features, the weight {k}",
            x.k
        )));
    }
    if !w
        .device()
        .same_device(&candle_core::Device::Cuda(x.dev.clone()))
    {
        return Err(crate::Error::msg(
            "the weight and the activations are on different CUDA devices",
        ));
    }
    Ok(())
}

/// Whether the fused GEMV takes this (non-empty) product: small batches, tensor cores with f16
/// / bf16 `mma`, a weight it can tile, 16-byte aligned activations.
#[cfg(feature = "cuda")]
fn gemv_serves(kernels: &module_cache::DeviceKernels, w: &QTensor, x: &Act<'_>) -> bool {
    x.batch <= plan::FUSED_MAX_BATCH
        && plan::has_mma_f16(kernels.cc)
        && gemv::supports(w)
        && x.ptr.is_multiple_of(16)
}

/// Fills the `q4 doctor` report's CUDA-build-only fields: free memory (needs a context) and an
/// actual NVRTC compile for each device.
#[cfg(feature = "cuda")]
pub fn enrich_report(r: &mut crate::probe::CudaReport) {
    if r.status != "ok" {
        return;
    }
    r.nvrtc.kernel_cache = Some(match module_cache::disk::dir() {
        Some(dir) => {
            let kept = std::fs::read_dir(&dir).map_or(0, |entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "cubin"))
                    .count()
            });
            format!("{} ({kept} kept)", dir.display())
        }
        None => "off".to_string(),
    });
    match module_cache::nvrtc_version() {
        Ok((a, b)) => r.nvrtc.version = Some(format!("{a}.{b}")),
        Err(e) => {
            r.nvrtc.status = "error";
            r.nvrtc.detail = Some(e.to_string());
        }
    }
    for d in &mut r.devices {
        if !d.usable {
            continue;
        }
        let dev = match candle_core::Device::new_cuda(d.ordinal) {
            Ok(dev) => dev,
            Err(e) => {
                d.usable = false;
                r.detail = Some(format!("device {}: {e}", d.ordinal));
                continue;
            }
        };
        let Ok(cuda) = util::cuda_device(&dev) else {
            continue;
        };
        if let Ok((free, _)) = cuda.cuda_stream().context().mem_get_info() {
            d.free_memory_bytes = Some(free);
        }
        let t = std::time::Instant::now();
        // Compiled here with NVRTC itself (not taken from the kernel cache, which would hide a
        // broken NVRTC), then loaded on the device.
        let arch = module_cache::arch_for(plan_cc(&d.compute_capability));
        let probe_src = module_cache::source(module_cache::DEQUANT, &[("OUT_T", 0)]);
        match module_cache::compile_cubin("dequant", &probe_src, &arch).and_then(|cubin| {
            let k = module_cache::for_device(cuda)?;
            k.ctx
                .load_module(candle_core::cuda_backend::cudarc::nvrtc::Ptx::from_binary(
                    cubin,
                ))
                .and_then(|m| m.load_function("dequant_rows"))
                .map_err(|e| crate::Error::msg(format!("loading the probe kernel failed: {e}")))
        }) {
            Ok(_) => {
                r.nvrtc.detail = Some(format!(
                    "compiled and loaded a q4 kernel for {arch} in {:.0} ms",
                    t.elapsed().as_secs_f64() * 1e3
                ));
            }
            Err(e) => {
                d.usable = false;
                r.nvrtc.status = "error";
                r.nvrtc.detail = Some(e.to_string());
            }
        }
    }
}

#[cfg(feature = "cuda")]
fn plan_cc(s: &str) -> (u32, u32) {
    let mut it = s.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}
