//! Prefill (large batches): the weight is decoded chunk by chunk into a scratch buffer (up to
//! 128 MB of operands at m = 2048) and multiplied with cuBLAS on the same stream, writing the
//! chunk's output columns in place. Each chunk's decode is a fraction of its GEMM's time.
//!
//! Operands follow the activations: bf16 (NVFP4/MXFP4 weights exact, NF4/FP4 rounded once),
//! f16 (with the same power-of-two factoring as the GEMV), or f32 (exact f32 weights, TF32
//! tensor-core math). Accumulation is f32.

use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::cublas::{result as cublas, sys as cublas_sys};
use candle_core::cuda_backend::CudaStorage;
use candle_core::DType;

use super::dequant::decode_rows_into;
use super::gemv::scale_factors;
use super::module_cache::DeviceKernels;
use super::util::{empty_storage, knob, storage_ptr, tensor_from, Act};
use crate::error::{Error, Result};
use crate::qtensor::QTensor;
use crate::Format;

/// Decoded bytes per chunk at m >= 2048. Same-call sweep on the H100
/// (`scripts/gpu/results/h100-2026-11-26-s6/chunk_sweep.txt`, NVFP4 / NF4 at m = 2048): 8192x8192
/// 405-409 µs with one 8192-row chunk against 410-415 with 4096 rows; 28672x4096 735-748 µs
/// with two or one chunks against 776-793 with seven of 4096 rows. Fewer, larger cuBLAS GEMMs
/// win more than an L2-resident chunk does.
const CHUNK_BYTES: usize = 128 << 20;

/// Decoded weight rows per chunk: [`CHUNK_BYTES`] of operands at m >= 2048, more at smaller
/// batches (up to 4x) so that each chunk still fills the GPU, then evened out so that the
/// chunks are of equal height. `Q4_GEMM_CHUNK_ROWS` (read once) overrides (for tuning).
fn chunk_rows(m: usize, n: usize, k: usize, operand_bytes: usize) -> usize {
    static SET: std::sync::LazyLock<Option<usize>> = std::sync::LazyLock::new(|| {
        knob("Q4_GEMM_CHUNK_ROWS").and_then(|v| usize::try_from(v).ok())
    });
    let forced = CHUNK_ROWS_FOR_TESTS.load(std::sync::atomic::Ordering::Relaxed);
    let rows = SET.or((forced > 0).then_some(forced)).unwrap_or_else(|| {
        let bytes = (CHUNK_BYTES * 16usize.div_ceil(m.div_ceil(128))).min(4 * CHUNK_BYTES);
        let rows = (bytes / (k.max(1) * operand_bytes)).max(128);
        n.div_ceil(n.div_ceil(rows))
    });
    rows.clamp(1, n.max(1))
}

static CHUNK_ROWS_FOR_TESTS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// Forces the decoded chunk height (0: the default), so that tests reach many chunks and a
/// partial last one on small weights.
#[doc(hidden)]
pub fn set_chunk_rows_for_tests(rows: usize) {
    CHUNK_ROWS_FOR_TESTS.store(rows, std::sync::atomic::Ordering::Relaxed);
}

/// `y[batch, n] = x Wᵀ` in the activations' dtype.
pub fn matmul_act(k: &DeviceKernels, w: &QTensor, x: &Act<'_>) -> Result<CudaStorage> {
    let (n, kdim) = w.rows_cols();
    let m = x.batch;
    let dev = x.dev;
    let (op_dtype, cuda_type, compute) = match x.dtype {
        DType::BF16 => (
            DType::BF16,
            cublas_sys::cudaDataType_t::CUDA_R_16BF,
            cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ),
        DType::F16 => (
            DType::F16,
            cublas_sys::cudaDataType_t::CUDA_R_16F,
            cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ),
        _ => (
            DType::F32,
            cublas_sys::cudaDataType_t::CUDA_R_32F,
            cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        ),
    };
    // Decode parameters: (NVFP4 tensor scale inside the decode, scale multiplier, GEMM alpha).
    let (s2, mul, alpha) = match (w.format(), op_dtype) {
        (Format::Nvfp4, DType::F32) => (w.scale2(), 1.0, 1.0),
        (Format::Nvfp4, _) => (1.0, 1.0, w.scale2()),
        (_, DType::F32) => (1.0, 1.0, 1.0),
        (_, dt) => {
            let (smul, factor) = scale_factors(w, dt);
            (1.0, smul, factor)
        }
    };
    let chunk_rows = chunk_rows(m, n, kdim, op_dtype.size_in_bytes());
    let scratch = tensor_from(
        empty_storage(dev, op_dtype, chunk_rows * kdim)?,
        chunk_rows * kdim,
    );
    let y = empty_storage(dev, x.dtype, m * n)?;
    // f16 operands: cuBLAS writes f32, converted once at the end. With f16 outputs it returned
    // non-finite values for some shapes (128 x 1024 weights, batch 65; CUDA test
    // `chunked_gemm_matches_the_f32_reference`) — apparently partial sums kept in f16, which
    // overflow because the NVFP4 tensor scale / the f16 factor is applied through alpha.
    let y32 = if op_dtype == DType::F16 {
        Some(empty_storage(dev, DType::F32, m * n)?)
    } else {
        None
    };
    let (out_type, yp, out_size) = match &y32 {
        Some(t) => (
            cublas_sys::cudaDataType_t::CUDA_R_32F,
            storage_ptr(t, 0)?,
            4,
        ),
        None => (cuda_type, storage_ptr(&y, 0)?, x.dtype.size_in_bytes()),
    };
    let wp = super::util::device_ptr(&scratch)?;
    let blas = dev.cublas_handle();
    let handle = *blas.handle();
    let beta = 0f32;
    let mut r0 = 0;
    while r0 < n {
        let rows = chunk_rows.min(n - r0);
        decode_rows_into(k, w, r0, rows, s2, mul, &scratch)?;
        let c = yp + (r0 * out_size) as u64;
        // Row-major y[m, n] = x[m, k] W[rows, k]ᵀ is column-major y'[n, m] = W'ᵀ x': A = the
        // decoded chunk (k x rows, transposed), B = x (k x m), C = y at column r0, ldc = n.
        // SAFETY: the handle is candle's, bound to the stream all q4 kernels use; A holds
        // rows*k decoded operands, B m*k activations, C m*n outputs of which columns
        // r0..r0+rows are written; alpha and beta are host f32 (host pointer mode, f32 compute).
        unsafe {
            cublas::gemm_ex(
                handle,
                cublas_sys::cublasOperation_t::CUBLAS_OP_T,
                cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                rows as i32,
                m as i32,
                kdim as i32,
                &alpha as *const f32 as *const c_void,
                wp as *const c_void,
                cuda_type,
                kdim as i32,
                x.ptr as *const c_void,
                cuda_type,
                kdim as i32,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                out_type,
                n as i32,
                compute,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::msg(format!("cuBLAS GEMM of a q4 weight chunk failed: {e:?}")))?;
        r0 += rows;
    }
    if let Some(t) = &y32 {
        // One slice, factor 1: a plain f32 -> f16 conversion (round to nearest even).
        let defines = super::gemv::reduce_only_defines(DType::F16)?;
        // SAFETY: `t` holds m*n f32 written by the GEMMs above, `y` m*n f16; no scales.
        unsafe {
            super::gemv::reduce(
                k,
                &defines,
                dev,
                storage_ptr(t, 0)?,
                0,
                storage_ptr(&y, 0)?,
                m * n,
                1,
                1,
                1.0,
            )
        }?;
    }
    Ok(y)
}
