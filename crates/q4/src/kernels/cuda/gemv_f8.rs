//! Batch-1 NVFP4 GEMV on Hopper's FP8 tensor cores (`cu/gemv_f8.cu`, sm_90a): E2M1 codes become
//! E4M3 operands in a few integer operations, bf16 activations two E4M3 terms (exact for bf16
//! within twelve binades of the slice's largest value), block scales applied to f32 sums.

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::DType;

use super::dequant::device_parts;
use super::module_cache::{self, DeviceKernels};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};

use super::util::{
    device_ptr, empty_storage, knob, launch_ex, launched, memset, storage_ptr, type_code, Act,
    TestOverride,
};
use crate::error::{Error, Result};
use crate::qtensor::QTensor;
use crate::Format;

/// Rows of a block's tile (one warpgroup's wgmma M).
const TILE_ROWS: usize = 64;
/// Shared memory of a staged step (four 256-byte B tiles).
const STEP_SMEM: usize = 1024;
/// Largest dynamic shared memory a block asks for (96 steps).
const MAX_SMEM: usize = 96 * 1024;
/// Most rows it takes: the LM head of a 150 K vocabulary (151936 x 2560) ran 72-76 us in the
/// probe against the mma.sync kernel's 61.6 (`scripts/gpu/results/h200-2026-11-29-s36/`).
const MAX_ROWS: usize = 65536;

static FORCED: TestOverride = TestOverride::new();
static SPLIT_FORCED: TestOverride = TestOverride::new();

/// Buffers kept per stream across calls: `(stream, kind, u32 words, buffer)`. Calls on one
/// stream run one after another (each writes only after its `pdl_wait`), so they can share them.
#[allow(clippy::type_complexity)]
static BUFFERS: std::sync::Mutex<Vec<(usize, Kept, usize, CudaStorage)>> =
    std::sync::Mutex::new(Vec::new());

/// What a kept buffer holds, and what it is filled with when made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kept {
    /// Per-tile arrival counters (zeros; the last block of a tile resets its counter).
    Counters,
    /// The slices' f32 sums for the last block (no fill).
    Partial,
}

/// The device address of at least `words` u32 of `kind` for `dev`'s stream. A new or larger
/// buffer is allocated (the old one freed in stream order) and filled; inside a stream capture
/// that allocation becomes part of the graph, so callers make their first call outside one.
fn kept(dev: &CudaDevice, kind: Kept, words: usize) -> Result<u64> {
    let stream = dev.cuda_stream().cu_stream() as usize;
    let mut all = BUFFERS
        .lock()
        .map_err(|_| Error::msg("the FP8 GEMV's buffer table was poisoned"))?;
    if let Some((_, _, len, s)) = all.iter().find(|(st, k, _, _)| *st == stream && *k == kind) {
        if *len >= words {
            return storage_ptr(s, 0);
        }
    }
    let len = words.next_power_of_two().max(1024);
    let s = empty_storage(dev, DType::U32, len)?;
    let p = storage_ptr(&s, 0)?;
    match kind {
        Kept::Counters => memset(&p, 0, len * 4, dev)?,
        Kept::Partial => {}
    }
    all.retain(|(st, k, _, _)| !(*st == stream && *k == kind));
    all.push((stream, kind, len, s));
    Ok(p)
}

/// Forces the number of K slices (`None`: the plan or `Q4_GEMV_F8_SPLIT` decides).
#[doc(hidden)]
pub fn set_split_for_tests(split: Option<usize>) {
    SPLIT_FORCED.set(split);
}

/// Forces the FP8 GEMV on or off where it could serve (`None`: the environment decides).
#[doc(hidden)]
pub fn set_enabled_for_tests(on: Option<bool>) {
    FORCED.set_flag(on);
}

thread_local! {
    static LAUNCHES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many FP8 GEMVs this thread has launched (tests check it ran).
#[doc(hidden)]
pub fn launches() -> usize {
    LAUNCHES.with(|c| c.get())
}

/// Whether the FP8 GEMV takes this product: batch 1 of bf16 activations on an NVFP4 weight of
/// at most `MAX_ROWS` (65,536) rows of whole 128-wide steps, on compute capability 9.0 (wgmma), where
/// [`super::plan::gemv_f8_fits`] (few row tiles over a long K), unless `Q4_GEMV_F8=0`; a test
/// that forces it on skips the shape rule.
pub fn serves(k: &DeviceKernels, w: &QTensor, x: &Act<'_>) -> bool {
    let (n, kdim) = w.rows_cols();
    let usable = super::plan::has_wgmma(k.cc)
        && x.batch == 1
        && x.dtype == DType::BF16
        && w.format() == Format::Nvfp4
        && n <= MAX_ROWS
        && kdim.is_multiple_of(128);
    usable
        && FORCED.flag().unwrap_or_else(|| {
            super::plan::gemv_f8_enabled()
                && super::plan::gemv_f8_fits(n.div_ceil(TILE_ROWS), kdim / 128, k.sm_count as usize)
        })
}

/// K slices for `n x k` on `sms` multiprocessors ([`super::plan::gemv_f8_split`]), at most 96
/// steps each (the staged slice's shared memory); a test or `Q4_GEMV_F8_SPLIT` overrides.
fn split(n: usize, k: usize, sms: usize) -> usize {
    let steps = k / 128;
    let wanted = SPLIT_FORCED
        .get()
        .or_else(|| knob("Q4_GEMV_F8_SPLIT").map(|s| s as usize))
        .filter(|&s| s > 0)
        .unwrap_or_else(|| super::plan::gemv_f8_split(n.div_ceil(TILE_ROWS), steps, sms));
    let most = MAX_SMEM / STEP_SMEM;
    // As many slices as asked (at least enough for the shared memory), none empty.
    let per = steps.div_ceil(wanted.clamp(1, steps)).min(most);
    steps.div_ceil(per)
}

/// [`super::gemv::matmul_act_into`] on the FP8 kernel.
///
/// # Safety
/// As for `gemv::matmul_act_into`: `y` holds `n` bf16 values on `x.dev`, free for this call's
/// stream to write.
pub unsafe fn matmul_act_into(
    k: &DeviceKernels,
    w: &QTensor,
    x: &Act<'_>,
    yp: u64,
    early: bool,
) -> Result<()> {
    let (n, kdim) = w.rows_cols();
    let steps = kdim / 128;
    let grid_split = split(n, kdim, k.sm_count as usize);
    let smem = steps.div_ceil(grid_split) * STEP_SMEM;
    let out_t = type_code(x.dtype)?;
    let defines = [("OUT_T", out_t)];
    let func = k.function_for_arch(
        "gemv_f8",
        module_cache::GEMV_F8,
        &defines,
        "gemv_f8",
        "sm_90a",
    )?;
    func.set_attribute(
        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .map_err(|e| {
        Error::msg(format!(
            "the FP8 GEMV needs {smem} bytes of shared memory: {e}"
        ))
    })?;
    let parts = device_parts(w)?;
    let (codes, scales) = (device_ptr(parts.codes)?, device_ptr(parts.scales)?);
    // The slices' sums and the tiles' arrival counters, kept across calls on this stream.
    let (pp, cp) = if grid_split == 1 {
        (0u64, 0u64)
    } else {
        (
            kept(x.dev, Kept::Partial, grid_split * n)?,
            kept(x.dev, Kept::Counters, n.div_ceil(TILE_ROWS))?,
        )
    };
    let wfactor = w.scale2();
    let (n_i, k_i, split_i) = (n as i32, kdim as i32, grid_split as i32);
    let cfg = LaunchConfig {
        grid_dim: ((n.div_ceil(TILE_ROWS) * grid_split) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let xp = x.ptr;
    let mut args =
        crate::kernel_args![&codes, &scales, &xp, &yp, &pp, &cp, &n_i, &k_i, &wfactor, &split_i];
    let stream = x.dev.cuda_stream();
    // SAFETY: argument order and types match `gemv_f8`; codes hold n rows of k/2 bytes and
    // scales n rows of k/16 E4M3 bytes (k % 128 == 0, `serves`), x k bf16 values, y n bf16
    // values (the caller's contract), partial grid_split * n f32 and counters one zeroed u32
    // per row tile (this stream's, `kept`) when grid_split > 1; each
    // block's slice of at most 96 steps fits its `smem` bytes (allowed above). Started early,
    // it reads only the weight before `pdl_wait` and writes nothing before it.
    launched("gemv_f8", unsafe {
        launch_ex(&stream, &func, cfg, &mut args, early)
    })?;
    LAUNCHES.with(|c| c.set(c.get() + 1));
    Ok(())
}
