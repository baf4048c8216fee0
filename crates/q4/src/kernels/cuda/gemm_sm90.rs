//! Fused prefill GEMM on Hopper (`cu/gemm_sm90.cu`): the 4-bit weight is decoded step by step
//! straight into `wgmma`'s register operand (bf16, f32 accumulation) while the tokens stream
//! through shared memory, so a large batch never writes a decoded copy of the weight to device
//! memory as the chunked dequantize + cuBLAS path does. Tiles arrive by TMA (tensor maps built
//! here per call).
//!
//! Serves NVFP4 (K a multiple of 256), MXFP4 (K a multiple of 512) and bitsandbytes NF4 / FP4
//! weights (blocks of at least 64 within a row, K a multiple of four blocks, batches up to 2048)
//! with bf16 activations on compute capability 9.0, batches above the GEMV's
//! (`plan::gemm_wgmma_serves`); everything else (f16 / f32 activations, other shapes) keeps the
//! chunked path. `Q4_GEMM_FUSED=0` turns it off (same-process A/B against the chunked path).
//!
//! Tiles are 128 weight rows by 256 tokens, or 128 tokens where that takes fewer waves of blocks
//! (`plan::wgmma_token_launches`: small batches, a short last tile); a producer warpgroup issues
//! the copies and blocks run token tiles fastest (`Q4_GEMM_PRODUCER=0`, `Q4_GEMM_NARROW=0`,
//! `Q4_GEMM_RASTER=0` turn these off for A/B runs).

use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::driver::sys::{
    self as cu, CUfunction_attribute_enum, CUtensorMap, CUtensorMapDataType,
    CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion, CUtensorMapSwizzle,
};
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaStorage;
use candle_core::DType;

use super::dequant::device_parts;
use super::module_cache::{self, DeviceKernels};
use super::plan;
use super::util::{device_ptr, empty_storage, knob, launched, storage_ptr, Act};
use crate::error::{Error, Result};
use crate::qtensor::QTensor;
use crate::Format;

/// Weight rows per block (`BM` in the kernel); tokens per block are `BN`, one of
/// [`plan::WGMMA_TOKENS`] and [`plan::WGMMA_NARROW_TOKENS`] (`plan::wgmma_token_launches`).
const BLOCK_ROWS: usize = 128;
/// K per pipeline step.
const STEP_K: usize = 64;

/// The kernel's environment knobs for A/B measurements, read once per process; the defaults
/// are the measured best (BENCHMARKS.md).
struct Knobs {
    /// Ring stages (`Q4_GEMM_STAGES`, 2-5; 4).
    stages: usize,
    /// Kernel development (`Q4_GEMM_PROBE`): 2 drops the decode, 3 the wgmmas, 4 both (wrong
    /// results; for timing where a step's time goes).
    probe: i64,
    /// A third warpgroup issues the TMA copies (`Q4_GEMM_PRODUCER=0`: the first MMA thread).
    producer: bool,
    /// Largest batch of bitsandbytes weights the kernel takes (`Q4_GEMM_BNB_MAX`;
    /// [`plan::WGMMA_BNB_MAX_BATCH`]).
    bnb_max_batch: usize,
    /// Block order (`Q4_GEMM_RASTER`): 1 token tiles fastest in groups (below), so that the
    /// blocks running at once share weight rows; 0 weight-row tiles fastest.
    raster: i64,
    /// Token tiles per raster group (`Q4_GEMM_RASTER_GROUP`; 4: M = 2048 / 4096 1-2% faster
    /// than 8, 2 or 16 on 8192x8192 and 28672x4096, BENCHMARKS.md).
    raster_group: i64,
    /// Tiles may be narrow (`plan::wgmma_token_launches`; `Q4_GEMM_NARROW=0`: never).
    narrow: bool,
    /// bitsandbytes decode through a lane-replicated table of codebook pairs, one 64-bit load a
    /// code byte (`BNB_PAIRS` in gemm_sm90.cu; `Q4_GEMM_BNB_PAIRS=0`: two lookups in a
    /// 16-entry table).
    bnb_pairs: bool,
}

fn knobs() -> &'static Knobs {
    static K: std::sync::LazyLock<Knobs> = std::sync::LazyLock::new(|| Knobs {
        stages: knob("Q4_GEMM_STAGES")
            .filter(|s| (2..=5).contains(s))
            .unwrap_or(4) as usize,
        probe: knob("Q4_GEMM_PROBE").unwrap_or(0),
        producer: knob("Q4_GEMM_PRODUCER").is_none_or(|v| v != 0),
        bnb_max_batch: knob("Q4_GEMM_BNB_MAX")
            .map_or(plan::WGMMA_BNB_MAX_BATCH, |v| v.max(0) as usize),
        raster: knob("Q4_GEMM_RASTER").unwrap_or(1),
        raster_group: knob("Q4_GEMM_RASTER_GROUP").filter(|&g| g > 0).unwrap_or(4),
        narrow: knob("Q4_GEMM_NARROW").is_none_or(|v| v != 0),
        bnb_pairs: knob("Q4_GEMM_BNB_PAIRS").is_none_or(|v| v != 0),
    });
    &K
}

/// Dynamic shared memory of the kernel for `stages` and `tokens` per block (its `BN`): per
/// stage the token tile, the code bytes and the scale bytes, at least the epilogue's transpose
/// buffers (two warpgroups' `tokens x 72` bf16, which reuse the ring); 1 KiB of alignment slack.
pub fn smem_bytes(stages: usize, tokens: usize) -> usize {
    let stage = tokens * STEP_K * 2 + BLOCK_ROWS * STEP_K / 2 + BLOCK_ROWS * 16;
    (stages * stage).max(2 * tokens * 72 * 2) + 1024
}

/// Whether the fused kernel is switched on: `Q4_GEMM_FUSED=0` turns it off, unless
/// [`set_enabled_for_tests`] decided.
pub fn enabled() -> bool {
    static ON: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| std::env::var("Q4_GEMM_FUSED").ok().is_none_or(|v| v != "0"));
    FORCED.flag().unwrap_or(*ON)
}

thread_local! {
    /// Fused-kernel launches made by this thread (tests check that the fused path ran; per
    /// thread, as `gemv::reduce_launches`, so that tests running at once do not count each
    /// other's).
    static LAUNCHES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many times this thread has launched the fused kernel.
#[doc(hidden)]
pub fn launches() -> usize {
    LAUNCHES.with(|c| c.get())
}

static FORCED: super::util::TestOverride = super::util::TestOverride::new();

/// Forces the fused kernel on or off (`None`: the environment decides), so that a test can
/// compare it with the chunked path in one process.
#[doc(hidden)]
pub fn set_enabled_for_tests(on: Option<bool>) {
    FORCED.set_flag(on);
}

/// Whether this call can take the fused kernel: [`plan::gemm_wgmma_serves`], the
/// switch, and 16-byte aligned activations, codes and scales (TMA copies need them).
pub fn supports(k: &DeviceKernels, w: &QTensor, x: &Act<'_>) -> bool {
    let (_, kdim) = w.rows_cols();
    let aligned = || {
        device_parts(w).is_ok_and(|p| {
            let ok = |t| device_ptr(t).is_ok_and(|a| a.is_multiple_of(16));
            ok(p.codes) && ok(p.scales)
        })
    };
    enabled()
        && x.dtype == DType::BF16
        && x.ptr.is_multiple_of(16)
        && plan::gemm_wgmma_serves_up_to(
            k.cc,
            w.format(),
            kdim,
            w.block_size(),
            x.batch,
            knobs().bnb_max_batch,
        )
        && aligned()
}

/// A `CUtensorMap` passed by value as a `__grid_constant__` kernel parameter.
#[repr(C, align(64))]
struct TensorMapArg(CUtensorMap);

// SAFETY: a plain 128-byte, 64-byte aligned struct of integers, copied into the kernel's
// parameter space as the kernel's `TensorMap` parameter expects.
unsafe impl DeviceRepr for TensorMapArg {}

/// A 2-D tensor map over `shape` = (rows, cols) elements of `dtype` (u8, bf16 or f32) at device
/// address `ptr` (row stride `cols` elements), copied in boxes of `tile` = (rows, cols); rows
/// past the end read as zeros.
fn tensor_map(
    ptr: u64,
    dtype: CUtensorMapDataType,
    shape: (usize, usize),
    tile: (u32, u32),
    swizzle: CUtensorMapSwizzle,
) -> Result<TensorMapArg> {
    let ((rows, cols), (box_rows, box_cols)) = (shape, tile);
    let elem_bytes = match dtype {
        CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 => 2,
        CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32 => 4,
        _ => 1,
    };
    let dims = [cols as u64, rows as u64];
    let strides = [(cols * elem_bytes) as u64];
    let boxes = [box_cols, box_rows];
    let elem_strides = [1u32, 1];
    let mut map = std::mem::MaybeUninit::<CUtensorMap>::zeroed();
    // SAFETY: all arrays hold `rank` (2) entries (strides rank - 1); `map` is a writable
    // CUtensorMap; the driver only encodes the description (nothing is read from `ptr`).
    let rc = unsafe {
        cu::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            dtype,
            2,
            ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem_strides.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if rc != cu::CUresult::CUDA_SUCCESS {
        return Err(Error::msg(format!(
            "cuTensorMapEncodeTiled failed for a {rows}x{cols} operand (box {box_rows}x{box_cols}): {rc:?}"
        )));
    }
    // SAFETY: initialised by the successful call above.
    Ok(TensorMapArg(unsafe { map.assume_init() }))
}

/// `y[batch, n] = x Wᵀ` (bf16 activations and output, f32 accumulation).
pub fn matmul_act(k: &DeviceKernels, w: &QTensor, x: &Act<'_>) -> Result<CudaStorage> {
    let (n, kdim) = w.rows_cols();
    let m = x.batch;
    let dev = x.dev;
    let fmt = match w.format() {
        Format::Nvfp4 => 0,
        Format::Mxfp4 => 1,
        Format::Nf4 | Format::Fp4 => 2,
    };
    let kn = knobs();
    let producer = kn.producer;
    let kernel = |tokens: usize| -> Result<_> {
        let stages = kn.stages;
        let defines = [
            ("STAGES", stages as i64),
            ("FMT", fmt),
            ("PROBE", kn.probe),
            ("BN", tokens as i64),
            ("PRODUCER", producer as i64),
            ("RASTER", kn.raster),
            ("RASTER_GROUP", kn.raster_group),
            ("BNB_PAIRS", i64::from(kn.bnb_pairs)),
        ];
        let func = k.function_for_arch(
            "gemm_sm90",
            module_cache::GEMM_SM90,
            &defines,
            "gemm_sm90",
            "sm_90a",
        )?;
        let smem = smem_bytes(stages, tokens);
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(|e| {
            Error::msg(format!(
                "the fused GEMM needs {smem} bytes of shared memory per block: {e}"
            ))
        })?;
        Ok((func, smem))
    };
    let parts = device_parts(w)?;
    let (codes, scales) = (device_ptr(parts.codes)?, device_ptr(parts.scales)?);
    if !codes.is_multiple_of(16) || !scales.is_multiple_of(16) {
        // `supports` checked this; a direct caller gets an error, not a bad copy.
        return Err(Error::msg(
            "the fused GEMM needs 16-byte aligned codes and scales",
        ));
    }
    use CUtensorMapDataType::{
        CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 as BF16, CU_TENSOR_MAP_DATA_TYPE_FLOAT32 as F32,
        CU_TENSOR_MAP_DATA_TYPE_UINT8 as U8,
    };
    use CUtensorMapSwizzle::{
        CU_TENSOR_MAP_SWIZZLE_128B as SW128, CU_TENSOR_MAP_SWIZZLE_NONE as FLAT,
    };
    let (br, sk) = (BLOCK_ROWS as u32, STEP_K as u32);
    let code_map = tensor_map(codes, U8, (n, kdim / 2), (br, sk / 2), FLAT)?;
    // NVFP4: 16 E4M3 bytes per row (four steps); MXFP4: 16 E8M0 bytes (eight steps);
    // bitsandbytes: four f32 absmax values.
    let scale_map = match fmt {
        0 => tensor_map(scales, U8, (n, kdim / 16), (br, 16), FLAT)?,
        1 => tensor_map(scales, U8, (n, kdim / 32), (br, 16), FLAT)?,
        _ => tensor_map(scales, F32, (n, kdim / w.block_size()), (br, 4), FLAT)?,
    };
    let y = empty_storage(dev, DType::BF16, m * n)?;
    let yp = storage_ptr(&y, 0)?;
    // NVFP4 operands are value * scale * 2^-7 (see the kernel): 128 and the tensor scale come
    // back here; MXFP4 and bitsandbytes operands are the weights themselves.
    let wfactor = if fmt == 0 { w.scale2() * 128.0 } else { 1.0f32 };
    let cb = super::dequant::codebook_index(w.format());
    let bs_shift = w.block_size().trailing_zeros() as i32;
    let (m_i, n_i, k_i) = (m as i32, n as i32, kdim as i32);
    let stream = dev.cuda_stream();
    let threads = 256 + if producer { 128 } else { 0 };
    let row_blocks = n.div_ceil(BLOCK_ROWS);
    let sms = k.sm_count as usize;
    for (first, tokens, tiles_m) in plan::wgmma_token_launches(m, row_blocks, sms, kn.narrow) {
        let (func, smem) = kernel(tokens)?;
        let x_map = tensor_map(x.ptr, BF16, (m, kdim), (tokens as u32, sk), SW128)?;
        let cfg = LaunchConfig {
            grid_dim: (row_blocks as u32, tiles_m as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let m_base = first as i32;
        let mut b = stream.launch_builder(&func);
        b.arg(&x_map)
            .arg(&code_map)
            .arg(&scale_map)
            .arg(&yp)
            .arg(&m_i)
            .arg(&n_i)
            .arg(&k_i)
            .arg(&wfactor)
            .arg(&cb)
            .arg(&bs_shift)
            .arg(&m_base);
        // SAFETY: the tensor maps describe x (m x k bf16, boxes of `tokens` rows), the codes
        // (n x k/2 bytes) and the scales (n x k/16 E4M3 bytes, n x k/32 E8M0 bytes or n x k/bs
        // f32), all 16-byte aligned, with k a multiple of 256 (MXFP4: of 512; bitsandbytes: of 4
        // bs, bs >= 64); y holds m*n bf16; cb indexes the codebook table; the launch's tiles
        // start at token `first` < m; the block uses `smem` bytes of dynamic shared memory,
        // allowed in `kernel`.
        launched("gemm_sm90", unsafe { b.launch(cfg) })?;
        LAUNCHES.with(|c| c.set(c.get() + 1));
    }
    Ok(y)
}
