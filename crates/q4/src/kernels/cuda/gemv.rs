//! Fused dequantize-on-the-fly matmul for batches of 1-64 (`cu/gemv.cu`).
//!
//! Operand types: bf16 activations are used as they are, with bf16 weight operands (exact for
//! NVFP4 and MXFP4, rounded once for NF4/FP4 as bitsandbytes does); f16 activations likewise
//! with f16 operands; f32 activations are converted to f16 with a power-of-two scale per row
//! (so every finite value fits). Accumulation is f32 throughout.

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::DType;

use super::dequant::{codebook_index, device_parts};
use super::module_cache::{self, DeviceKernels};
use super::util::{
    device_ptr, empty_storage, knob, launch_ex, launched, storage_ptr, type_code, Act, TestOverride,
};
use crate::error::Result;
use crate::qtensor::QTensor;
use crate::Format;

/// Warps per block; each owns 16 weight rows, and all walk the same K steps.
const WARPS: usize = 8;
/// Weight steps each thread keeps in flight (see gemv.cu).
const DEPTH: i64 = 2;
/// Weights below which blocks get half the warps (see `warps`).
const SMALL_WEIGHTS: usize = 40 << 20;
/// Split K only while each slice keeps at least this many 128-wide steps.
const MIN_SPLIT_STEPS: usize = 4;
/// Fixed cost of a work item in the split-K plan, in steps (see `plan::gemv_split`).
const ITEM_COST: usize = 2;

// Tuning knobs (`util::knob`, each read once): `Q4_GEMV_WARPS` (warps per block),
// `Q4_GEMV_DEPTH` (2-4), `Q4_GEMV_MIN_STEPS` and `Q4_GEMV_ITEM_COST` (split-K),
// `Q4_GEMV_WSPLIT` (split-K inside the block), `Q4_GEMV_CLAMPED` (loads), `Q4_GEMV_IMAD`
// (E2M1 decode), `Q4_GEMV_XSTAGE` (activation ring), `Q4_GEMV_MT` (M tiles per warp),
// `Q4_GEMV_ADDR` (register-held step addresses), `Q4_GEMV_XB1` (staged batch-1 activation
// row), `Q4_GEMV_XB1LD` (its loads in flight), `Q4_GEMV_LDHINT` (weight-load cache hints),
// `Q4_GEMV_REDUCE_PDL`, for kernel
// development; the defaults are the measured best
// (`scripts/gpu/gemv_knob_sweep.sh`, `scripts/gpu/ab.sh`).
/// Warps per block: with the arithmetic NVFP4 decode, 4 below ~40 M weights, where more,
/// smaller blocks keep more loads in flight (Qwen3-4B's projections 2-5% faster per call, its
/// synthetic decode +2%), else 8 (8192x8192: 24.1 against 28.2 us with 4). The pair-table
/// formats keep 8: each block builds a 32 KiB table, and 4 warps cost NF4's synthetic decode
/// 7% (`scripts/gpu/results/h100-2026-11-26-knobs/`). `Q4_GEMV_WARPS` overrides.
fn warps(w: &QTensor) -> usize {
    let (n, k) = w.rows_cols();
    // Unset, negative or not a number: the shape decides.
    static W: std::sync::LazyLock<Option<usize>> = std::sync::LazyLock::new(|| {
        knob("Q4_GEMV_WARPS")
            .filter(|&set| set >= 0)
            .map(|set| set.clamp(1, 32) as usize)
    });
    W.unwrap_or(if arith(w) && n * k < SMALL_WEIGHTS {
        WARPS / 2
    } else {
        WARPS
    })
}
/// Fewest 128-wide K steps a split-K slice keeps for `w` at `nt` N tiles
/// (`Q4_GEMV_MIN_STEPS` overrides): [`MIN_SPLIT_STEPS`], but 2 for the bitsandbytes formats at
/// batches 1-8, whose pair-table decode makes a step dearer, so shorter slices spread it over
/// more blocks. Same-call sweep on an H200 (`scripts/gpu/results/h200-2026-11-28-s29/`): NF4
/// synthetic decode 483.1-483.7 against 469.7-470.9 tok/s (NVFP4 0.99x, so it keeps 4), NF4
/// batch 1 / 4 on Qwen3-4B's q/k/v 9.6 -> 9.0 / 10.2 -> 9.4 us and its o projection 8.7 ->
/// 8.4 / 9.1 -> 8.9, the large shapes unchanged; at batch 16 it lost (11.0 -> 12.1 us).
fn min_steps(w: &QTensor, nt: usize) -> usize {
    static M: std::sync::LazyLock<Option<usize>> =
        std::sync::LazyLock::new(|| knob("Q4_GEMV_MIN_STEPS").map(|m| m.clamp(1, 64) as usize));
    let bnb = matches!(w.format(), Format::Nf4 | Format::Fp4);
    M.unwrap_or(if bnb && nt == 1 { 2 } else { MIN_SPLIT_STEPS })
}
/// Whether the kernel loads without zero fills (`CLAMPED` in gemv.cu: no predicated loads or
/// zero fills, 20% fewer instructions per step): every format at batches 1-8 (one N tile), and
/// the bitsandbytes formats at every batch. Same-call A/Bs (`scripts/gpu/results/h100-2026-11-26-s6/`):
/// NVFP4 batch 1 0.90-0.95x the time on the H100 (8192x8192, 28672x4096, Qwen3-4B's
/// projections), synthetic decode 385.6 vs 375.4 tok/s; NVFP4 at batch 16 (two N tiles: fewer
/// registers, a third resident block per SM, a partial second wave) up to 19% slower on an H200,
/// and still 5-17% on the H100 with the split plan below; on an H200 since the register-held
/// addresses mixed (0.92-0.98x at 16 and 64, 1.05-1.19x at 12,
/// `scripts/gpu/results/h200-2026-11-28-s27/call11-ab-clamped-batches-9-64.txt`). The pair-table
/// formats ran 2-7% slower with it then; since their step addresses also come from
/// register-held bases (`ADDR`, 254 -> 193 instructions a step for NF4), H200 A/Bs have NF4 and
/// MXFP4 at batches 1-8 at 0.91-0.99x the time on 8192x8192, 28672x4096 and Qwen3-4B's
/// projections, except 19456x2560 at batches 1-4 (1.01-1.05x), NF4's synthetic decode at
/// 471.3-472.3 against 468.9-470.8 tok/s (`call9-ab-clamped-pair-table.txt` there), and NF4 at
/// batches 9-64 at 0.86-0.95x on five shapes (`h200-2026-11-28-s28/call1-ab-clamped-bnb-batches-9-64.txt`).
/// `Q4_GEMV_CLAMPED` overrides: 0 never, 1 at every batch, 2 the arithmetic decode at batches
/// 1-8 only (the rule before the twenty-seventh session), 3 batches 1-8 only (before the
/// twenty-eighth).
fn clamped(w: &QTensor, nt: usize) -> bool {
    static C: std::sync::LazyLock<Option<i64>> =
        std::sync::LazyLock::new(|| knob("Q4_GEMV_CLAMPED"));
    if let Some(on) = CLAMPED_FORCED.flag() {
        return on;
    }
    match *C {
        Some(0) => false,
        Some(1) => true,
        Some(2) => arith(w) && nt == 1,
        Some(3) => nt == 1,
        _ => nt == 1 || w.format() == Format::Nf4 || w.format() == Format::Fp4,
    }
}
static CLAMPED_FORCED: TestOverride = TestOverride::new();

/// Forces the loads without zero fills (`CLAMPED`) on or off at every batch and format (`None`:
/// the rule above decides), so that a test can compare both in one process.
#[doc(hidden)]
pub fn set_clamped_for_tests(on: Option<bool>) {
    CLAMPED_FORCED.set_flag(on);
}

/// The split-K plan ([`super::plan::gemv_split`]) for `nt` N tiles: the fewest waves of the
/// longest slices (fixed cost per item `ITEM_COST` steps) from two N tiles on, the doubling
/// rule at one. Same-call A/B on the H100 (`scripts/gpu/results/h100-2026-11-26-s6/
/// ab_split_plan.txt`): batch 16 0.89-0.97x the time on 8192x8192, 28672x4096, 19456x2560 and
/// 2560x9728 (NF4 0.87x there), but batch 1-4 up to 8% slower (28672x4096, 19456x2560) and the
/// synthetic decode 380 vs 385.5 tok/s. `Q4_GEMV_ITEM_COST` (negative: the doubling rule)
/// overrides for every batch.
fn item_cost(nt: usize) -> Option<usize> {
    static C: std::sync::LazyLock<Option<i64>> =
        std::sync::LazyLock::new(|| knob("Q4_GEMV_ITEM_COST"));
    match *C {
        Some(c) => usize::try_from(c).ok(),
        None => (nt > 1).then_some(ITEM_COST),
    }
}
/// Whether a split-K GEMV at batches 1-16 splits K among the warps of a block (`KWARPS` in
/// gemv.cu: sums meet in shared memory, no partial buffer, no second kernel) rather than across
/// blocks (`gemv_reduce` after the GEMV). Same work per warp either way; same-call A/B on the
/// H100 (`scripts/gpu/results/h100-2026-11-27-s18/call3-ab-knobs.txt`): NVFP4 batch 1 0.78-0.98x
/// the time on 8192x8192, 28672x4096 and Qwen3-4B's projections, synthetic decode 397-400 vs
/// 384 tok/s. `Q4_GEMV_WSPLIT=0` keeps the grid split.
pub fn warp_split() -> bool {
    static W: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| knob("Q4_GEMV_WSPLIT") != Some(0));
    WARP_SPLIT_FORCED.flag().unwrap_or(*W)
}

static WARP_SPLIT_FORCED: TestOverride = TestOverride::new();

/// Forces the warp split on or off (`None`: the environment decides), so that a test can compare
/// it with the grid split in one process; forced on, it keeps the grid plan's number of slices
/// (no halving), so that both add the same slices.
#[doc(hidden)]
pub fn set_warp_split_for_tests(on: Option<bool>) {
    WARP_SPLIT_FORCED.set_flag(on);
}

fn warp_split_forced() -> bool {
    WARP_SPLIT_FORCED.flag() == Some(true)
}

/// Whether a warp split whose blocks would load the busiest multiprocessor more than
/// [`super::plan::WARP_SPLIT_MAX_LOAD`] times the grid split gives way to it
/// (`Q4_GEMV_SPLIT_BALANCE=0`: the fewest waves decide alone, as before).
fn split_balance() -> bool {
    static B: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| knob("Q4_GEMV_SPLIT_BALANCE") != Some(0));
    *B
}

/// Whether the grid split's partial sums go to a buffer kept per thread and device between
/// calls (`Q4_GEMV_PARTIAL_CACHE=0`: a fresh buffer each call). Inside a captured CUDA graph a
/// fresh buffer is an allocation node and a free node around the GEMV, which keep the kernel
/// after it from starting early (thirty-eighth session: the FP8 GEMV build's decode 517 against
/// 549 tok/s).
fn partial_cache() -> bool {
    static P: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| knob("Q4_GEMV_PARTIAL_CACHE") != Some(0));
    *P
}

thread_local! {
    /// The grid split's partial-sum buffer of each device this thread has used, the largest it
    /// has needed (see [`partial_sums`]).
    static PARTIALS: std::cell::RefCell<Vec<(candle_core::cuda_backend::DeviceId, CudaStorage)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// A device pointer to `len` f32 for the grid split's partial sums, and the storage behind it
/// when that is not the thread's kept buffer (the caller keeps it until the launches are queued;
/// freed, it is released in stream order). Reusing one buffer across calls is safe in stream
/// order, and with early starts too: the GEMV writes its partial sums only after its
/// `pdl_wait`, that is once the kernel before it, and so the last reduction that read the
/// buffer, has finished. The buffer grows only outside a stream capture: an allocation there
/// would belong to the graph.
fn partial_sums(dev: &CudaDevice, len: usize) -> Result<(u64, Option<CudaStorage>)> {
    if partial_cache() {
        let id = dev.id();
        let kept = PARTIALS.with(|p| -> Result<Option<u64>> {
            for (d, s) in p.borrow().iter() {
                if *d == id && s.as_cuda_slice::<f32>()?.len() >= len {
                    return Ok(Some(storage_ptr(s, 0)?));
                }
            }
            Ok(None)
        })?;
        if let Some(ptr) = kept {
            return Ok((ptr, None));
        }
        let capturing = dev
            .cuda_stream()
            .capture_status()
            .map_err(|e| crate::error::Error::msg(format!("cuStreamGetCaptureInfo failed: {e}")))?
            != candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        if !capturing {
            let s = empty_storage(dev, DType::F32, len)?;
            let ptr = storage_ptr(&s, 0)?;
            PARTIALS.with(|p| {
                let mut p = p.borrow_mut();
                p.retain(|(d, _)| *d != id);
                p.push((id, s));
            });
            return Ok((ptr, None));
        }
    }
    let s = empty_storage(dev, DType::F32, len)?;
    Ok((storage_ptr(&s, 0)?, Some(s)))
}

thread_local! {
    /// `gemv_reduce` launches made by this thread (tests check which split ran; per thread, so
    /// that tests running at once do not count each other's).
    static REDUCES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many times this thread has launched the split-K reduction kernel.
#[doc(hidden)]
pub fn reduce_launches() -> usize {
    REDUCES.with(|c| c.get())
}
/// The arithmetic NVFP4 decode with one integer multiply-add per pair (`IMADDEC` in gemv.cu,
/// bf16 operands, 7% fewer instructions per step) at one N tile (batches 1-8): same-call A/B
/// on the H100 (`scripts/gpu/results/h100-2026-11-27-s18/call4-ab-imad.txt`): batch 1
/// 0.97-0.99x the time on 8192x8192, 28672x4096 and Qwen3-4B's projections, synthetic decode
/// 401 vs 398 tok/s; at batch 16 (two N tiles) up to 4% slower, so not there.
/// `Q4_GEMV_IMAD=0` turns it off.
fn imad_decode(nt: i64) -> bool {
    static I: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| knob("Q4_GEMV_IMAD") != Some(0));
    nt == 1 && *I
}
/// Whether the GEMV is launched early (programmatic dependent launch, compute capability 9.0
/// on): its blocks start while the kernel before it in the stream finishes, building their
/// tables and issuing their first weight loads, and wait for it only before reading the
/// activations. Same-call A/B on the H100 (`scripts/gpu/results/h100-2026-11-27-s19/
/// call5-final/ab.txt`): 0.76-0.97x the time on all six benchmark shapes at batches 1 and 16
/// (NVFP4 8192x8192 batch 1 17.5 against 19.6 us), synthetic decode 432 against 401 tok/s
/// (NF4 410 against 347). `Q4_GEMV_PDL=0` turns it off.
fn early_start(k: &DeviceKernels) -> bool {
    static P: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| knob("Q4_GEMV_PDL") != Some(0));
    k.cc.0 >= 9 && EARLY_START_FORCED.flag().unwrap_or(*P)
}

static EARLY_START_FORCED: TestOverride = TestOverride::new();

/// Forces the GEMV's early start on or off (`None`: the environment decides), so that a test can
/// compare both in one process.
#[doc(hidden)]
pub fn set_early_start_for_tests(on: Option<bool>) {
    EARLY_START_FORCED.set_flag(on);
}
/// Whether `gemv_reduce` is launched early after its GEMV, like the GEMV itself: its launch
/// then hides behind the GEMV's tail. Same-call A/B on the H100
/// (`scripts/gpu/results/h100-2026-11-27-s20/`): split-K GEMVs 0.84-0.98x the time (6144x2560
/// at batch 16 10.8 against 12.9 us, 2560x9728 14.4 against 16.5). `Q4_GEMV_REDUCE_PDL=0`: not.
fn reduce_early_start(k: &DeviceKernels) -> bool {
    static P: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| knob("Q4_GEMV_REDUCE_PDL") != Some(0));
    early_start(k) && *P
}
/// Where the GEMV lets the next early-launched kernel start (`TRIGGER` in gemv.cu): at its
/// blocks' exit (2, no explicit trigger), unless `Q4_GEMV_TRIGGER` says 0 (at the start) or 1
/// (after each block's last step loop). Same-call A/B on the H100
/// (`scripts/gpu/results/h100-2026-11-27-s19/call4-ab-trigger.txt`): triggering at the start
/// ran 8192x8192 at batch 16 1.29x (NVFP4) / 1.32x (NF4) slower than no early start at all,
/// and the synthetic decode 402.6 against 429 tok/s at the exit (NF4 330 against 407): blocks
/// of later kernels, launched long before they can run, stand in the way. At the exit, every
/// GEMV of that A/B ran at most as long as without the early start.
fn trigger() -> i64 {
    static T: std::sync::LazyLock<i64> =
        std::sync::LazyLock::new(|| knob("Q4_GEMV_TRIGGER").unwrap_or(2).clamp(0, 2));
    *T
}
/// Stages of the GEMV's shared-memory activation ring for a kernel with `nt` N tiles, `mt` M
/// tiles per warp and `warps` warps ([`super::plan::gemv_ring_stages`]); `Q4_GEMV_XSTAGE`
/// overrides: 0 off, 2-4 stages at every batch.
fn xstage(w: &QTensor, nt: usize, mt: usize, warps: usize) -> usize {
    static X: std::sync::LazyLock<Option<i64>> =
        std::sync::LazyLock::new(|| knob("Q4_GEMV_XSTAGE"));
    let set = XSTAGE_FORCED.get().map(|s| s as i64).or(*X);
    super::plan::gemv_ring_stages(!arith(w), nt, mt, warps, warps >= WARPS, set)
}

static SPLIT_FORCED: TestOverride = TestOverride::new();

/// Forces the number of K slices of the grid split (`None`: the plan decides), so that a test
/// can compare kernels whose occupancy, and so whose plan, differs, with the same sums.
#[doc(hidden)]
pub fn set_split_for_tests(slices: Option<usize>) {
    SPLIT_FORCED.set(slices);
}

/// The forced number of K slices: the test's, else `Q4_GEMV_SPLIT` (kernel development).
fn split_forced() -> Option<usize> {
    static S: std::sync::LazyLock<Option<usize>> =
        std::sync::LazyLock::new(|| knob("Q4_GEMV_SPLIT").filter(|&s| s > 0).map(|s| s as usize));
    SPLIT_FORCED.get().filter(|&s| s > 0).or(*S)
}

static XSTAGE_FORCED: TestOverride = TestOverride::new();

/// Forces the activation ring's stages (`Some(0)`: off; `None`: the environment decides), so
/// that a test can compare staged and unstaged GEMVs in one process.
#[doc(hidden)]
pub fn set_xstage_for_tests(stages: Option<u8>) {
    XSTAGE_FORCED.set(stages.map(|s| usize::from(s.min(4))));
}

thread_local! {
    /// GEMV launches with the activation ring made by this thread (tests check that it ran).
    static STAGED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many GEMVs with the shared-memory activation ring this thread has launched.
#[doc(hidden)]
pub fn staged_launches() -> usize {
    STAGED.with(|c| c.get())
}

/// Whether the GEMV at two N tiles rounds a split-K plan its blocks cannot sum down to one they
/// can ([`super::plan::rounded_warp_split`]); `Q4_GEMV_FIT_SPLIT=0` turns it off.
fn fit_split() -> bool {
    static F: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| knob("Q4_GEMV_FIT_SPLIT") != Some(0));
    *F
}

/// 16-row M tiles per warp (`MT` in gemv.cu) for `w` at `batch` rows: the plan's
/// ([`super::plan::gemv_m_tiles`]), unless a test or `Q4_GEMV_MT` (1 or 2) forces it.
fn m_tiles(w: &QTensor, batch: usize) -> usize {
    static M: std::sync::LazyLock<Option<usize>> = std::sync::LazyLock::new(|| {
        knob("Q4_GEMV_MT")
            .filter(|&m| m > 0)
            .map(|m| m.clamp(1, 2) as usize)
    });
    let (n, k) = w.rows_cols();
    M_TILES_FORCED
        .get()
        .or(*M)
        .unwrap_or_else(|| super::plan::gemv_m_tiles(!arith(w), batch, n, k))
}

static M_TILES_FORCED: TestOverride = TestOverride::new();

/// Forces the GEMV's M tiles per warp (1 or 2; `None`: the plan decides), so that a test can
/// compare both tilings in one process.
#[doc(hidden)]
pub fn set_m_tiles_for_tests(m: Option<usize>) {
    M_TILES_FORCED.set(m.map(|m| m.clamp(1, 2)));
}

fn depth() -> i64 {
    static D: std::sync::LazyLock<i64> =
        std::sync::LazyLock::new(|| knob("Q4_GEMV_DEPTH").unwrap_or(DEPTH).clamp(2, 4));
    *D
}

/// Blocks of `warps` warps of `func` that fit on the device at once.
fn resident_blocks(k: &DeviceKernels, func: &CudaFunction, warps: usize) -> usize {
    let per_sm = func
        .occupancy_max_active_blocks_per_multiprocessor((warps * 32) as u32, 0, None)
        .unwrap_or(1)
        .max(1) as usize;
    k.sm_count as usize * per_sm
}

/// Whether the fused kernel can tile this weight: rows of whole 32-element chunks.
pub fn supports(w: &QTensor) -> bool {
    let (n, k) = w.rows_cols();
    let aligned = match device_parts(w) {
        Ok(p) => device_ptr(p.codes).is_ok_and(|a| a.is_multiple_of(16)),
        Err(_) => false,
    };
    n > 0 && k > 0 && k.is_multiple_of(32) && aligned
}

/// `(scale multiplier, output factor)`: the kernels multiply block scales by the first (a power
/// of two, exact) and the result by the second. NVFP4 factors out its tensor scale so that the
/// weight operands `E2M1 * E4M3` are exact; f16 operands of the other formats factor out a
/// power of two that brings the largest block scale to (2^7, 2^8].
pub fn scale_factors(w: &QTensor, operand: DType) -> (f32, f32) {
    match w.format() {
        Format::Nvfp4 => (1.0, w.scale2()),
        _ if operand == DType::BF16 => (1.0, 1.0),
        _ => {
            let m = w.scale_max();
            let t = if m > 0.0 && m.is_finite() {
                (m.log2().ceil() as i32 - 8).clamp(-120, 120)
            } else {
                0
            };
            (2f32.powi(-t), 2f32.powi(t))
        }
    }
}

fn fmt_code(f: Format) -> i64 {
    match f {
        Format::Nvfp4 => 0,
        Format::Mxfp4 => 1,
        Format::Nf4 | Format::Fp4 => 2,
    }
}

/// `y[batch, n] = x Wᵀ` in the activations' dtype.
pub fn matmul_act(k: &DeviceKernels, w: &QTensor, x: &Act<'_>) -> Result<CudaStorage> {
    let y = empty_storage(x.dev, x.dtype, x.batch * w.rows_cols().0)?;
    // SAFETY: y was just allocated with batch * n elements of the activations' dtype.
    unsafe { matmul_act_into(k, w, x, storage_ptr(&y, 0)?) }?;
    Ok(y)
}

/// [`matmul_act`] into `y`, `batch * n` values of the activations' dtype (no allocation of its
/// own unless f32 activations need f16 copies or the plan splits K across blocks: a CUDA graph
/// of such calls holds no memory nodes between its kernels, which would keep them from starting
/// early).
///
/// # Safety
/// `y` is the device address of `x.batch * n` elements of `x.dtype` on `x.dev`, free for this
/// call's stream to write.
pub unsafe fn matmul_act_into(k: &DeviceKernels, w: &QTensor, x: &Act<'_>, yp: u64) -> Result<()> {
    let (n, kdim) = w.rows_cols();
    let batch = x.batch;
    let dev = x.dev;
    let stream = dev.cuda_stream();
    let out_t = type_code(x.dtype)?;
    // Operands: bf16 and f16 activations are used as they are; f32 ones become f16 with a
    // per-row power-of-two scale.
    let (opt, x16_storage, xscale_storage) = match x.dtype {
        DType::BF16 => (DType::BF16, None, None),
        DType::F16 => (DType::F16, None, None),
        _ => {
            let x16 = empty_storage(dev, DType::F16, batch * kdim)?;
            let xs = empty_storage(dev, DType::F32, batch)?;
            let mut defines = gemv_defines(w, DType::F16, 0, 1, 1, 8);
            defines.push(("IN_T", type_code(x.dtype)?));
            let func = k.function("gemv", module_cache::GEMV, &defines, "x_to_f16")?;
            let (xp, x16p, xsp, kk) = (
                x.ptr,
                storage_ptr(&x16, 0)?,
                storage_ptr(&xs, 0)?,
                kdim as i32,
            );
            let cfg = LaunchConfig {
                grid_dim: (batch as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = stream.launch_builder(&func);
            b.arg(&xp).arg(&x16p).arg(&xsp).arg(&kk);
            // SAFETY: x holds batch*k values of type IN_T, x16 batch*k f16, xscale batch f32;
            // one block a row.
            launched("x_to_f16", unsafe { b.launch(cfg) })?;
            (DType::F16, Some(x16), Some(xs))
        }
    };
    let xp = match &x16_storage {
        Some(s) => storage_ptr(s, 0)?,
        None => x.ptr,
    };
    let xsp = match &xscale_storage {
        Some(s) => storage_ptr(s, 0)?,
        None => 0u64,
    };
    let nt = batch.div_ceil(8).next_power_of_two().min(8);
    let warps = warps(w);
    let mt = m_tiles(w, batch);
    // The plan below counts rows in units of a warp's M tiles.
    let n_units = n.div_ceil(mt);
    let tiles = n.div_ceil(16 * mt * warps);
    let steps = kdim.div_ceil(128);
    let mut defines = gemv_defines(w, opt, out_t, nt as i64, mt as i64, warps as i64);
    let clamped = clamped(w, nt);
    defines.push(("CLAMPED", i64::from(clamped)));
    let stages = xstage(w, nt, mt, warps);
    defines.push(("XSTAGE", stages as i64));
    // Rows of whole 128-wide steps: the clamped kernel drops its K-tail checks.
    let kfull = clamped && kdim.is_multiple_of(128);
    defines.push(("KFULL", i64::from(kfull)));
    let func = k.function("gemv", module_cache::GEMV, &defines, "gemv")?;
    // Persistent blocks: as many as fit on the GPU at once, over (tile, K slice) items of >= 4
    // steps each (see `item_cost` for how K is split).
    let resident = resident_blocks(k, &func, warps);
    let mut split =
        super::plan::gemv_split(tiles, steps, resident, min_steps(w, nt), item_cost(nt));
    if let Some(forced) = split_forced() {
        // As many slices as asked, none empty.
        split = steps.div_ceil(steps.div_ceil(forced.clamp(1, steps)));
    }
    let mut grid_x = (tiles * split).min(resident).max(1);
    let mut func = func;
    let mut block_warps = warps;
    // The warp split walks different steps in each warp: no shared activation ring.
    if nt <= 2 && split > 1 && stages == 0 && warp_split() {
        // The same warps and steps per warp, the slices summed inside each block: blocks of
        // `warps / s` row groups, or of one row group of `s` warps where the split is the
        // larger. Such larger blocks fit fewer to an SM, so half the split is tried too (8192^2
        // at batch 1: sixteen 16-warp slices took two waves, eight 8-warp slices one, 19.4
        // against 21.0 us; `scripts/gpu/results/h100-2026-11-27-s18/call9-ab-plan.txt`). The
        // fewest waves win, ties the larger split, and none that takes more waves than the
        // grid split.
        let grid_waves = (tiles * split).div_ceil(resident);
        // At two N tiles, a split the blocks cannot sum is also tried rounded down to one they
        // can, where its blocks load the busiest multiprocessor about as much as the grid
        // split's items do (`plan::rounded_warp_split`).
        let rounded = (nt == 2 && fit_split() && !warp_split_forced())
            .then(|| {
                super::plan::rounded_warp_split(split, warps, n_units, steps, k.sm_count as usize)
            })
            .flatten();
        let mut best = None; // (waves, kernel, block warps, defines, grid)
        for (i, s) in [Some(split), Some(split / 2), rounded]
            .into_iter()
            .enumerate()
        {
            let Some(s) = s else { continue };
            // Halving (i == 1): one N tile only (at two, 2560x9728 and 6144x2560 ran 5-8%
            // slower), and not when a test forces the warp split to compare it with the grid
            // split's slices.
            let halved = i == 1;
            if !super::plan::warp_split_fits(s, warps)
                || (halved && (split <= warps || nt > 1 || warp_split_forced()))
            {
                continue;
            }
            let (bw, row_tiles) = super::plan::warp_split_blocks(n_units, warps, s);
            // Not where its larger blocks crowd some multiprocessors while the grid split's
            // items spread evenly (the rounded split has its own load check; a test that forces
            // the warp split gets it).
            if i < 2
                && !warp_split_forced()
                && split_balance()
                && !super::plan::warp_split_balanced(
                    tiles,
                    warps,
                    split,
                    steps,
                    k.sm_count as usize,
                    s,
                    bw,
                    row_tiles,
                )
            {
                continue;
            }
            let smem = super::plan::gemv_static_smem(!arith(w), bw, nt * mt, true);
            if smem > super::plan::GEMV_STATIC_SMEM_LIMIT {
                continue;
            }
            let mut kdefines = defines.clone();
            kdefines.retain(|(name, _)| name != &"WARPS");
            kdefines.extend([("WARPS", bw as i64), ("KWARPS", s as i64)]);
            let kfunc = k.function("gemv", module_cache::GEMV, &kdefines, "gemv")?;
            let kresident = resident_blocks(k, &kfunc, bw);
            let waves = row_tiles.div_ceil(kresident);
            if waves <= grid_waves
                && best
                    .as_ref()
                    .is_none_or(|b: &(usize, _, _, _, _)| waves < b.0)
            {
                best = Some((waves, kfunc, bw, kdefines, row_tiles.min(kresident).max(1)));
            }
        }
        if let Some((_, kfunc, bw, kdefines, grid)) = best {
            (func, block_warps, defines, grid_x) = (kfunc, bw, kdefines, grid);
            split = 1;
        }
    }
    // Batch 1 of the arithmetic decode: the block's slice of the activation row staged once in
    // shared memory, regrouped into operand pairs (`XB1` in gemv.cu), where it fits beside the
    // tables and keeps as many blocks resident.
    if let Some(xb1) = super::plan::gemv_staged_row_steps(
        batch,
        arith(w) && kfull && stages == 0 && nt == 1 && mt == 1,
        steps.div_ceil(split),
    )
    .filter(|_| staged_row())
    {
        let kwarps = defines.iter().any(|(name, v)| *name == "KWARPS" && *v > 1);
        let smem = super::plan::gemv_static_smem(false, block_warps, 1, kwarps)
            + super::plan::gemv_staged_row_smem(xb1);
        if smem <= super::plan::GEMV_STATIC_SMEM_LIMIT {
            let mut xdefines = defines.clone();
            xdefines.extend([("XB1", xb1 as i64), ("XB1LD", staged_row_batch())]);
            let xfunc = k.function("gemv", module_cache::GEMV, &xdefines, "gemv")?;
            if resident_blocks(k, &xfunc, block_warps) >= grid_x {
                (func, defines) = (xfunc, xdefines);
                STAGED_ROWS.with(|c| c.set(c.get() + 1));
            }
        }
    }
    tracing::trace!(
        n,
        k = kdim,
        batch,
        m_tiles = mt,
        split,
        block_warps,
        grid_x,
        kwarps = ?defines.iter().find(|(name, _)| *name == "KWARPS").map(|d| d.1),
        xb1 = ?defines.iter().find(|(name, _)| *name == "XB1").map(|d| d.1),
        "gemv plan"
    );
    // The grid split's partial sums, and their storage where it is not the kept buffer.
    let (pp, _partial_owned) = if split > 1 {
        partial_sums(dev, split * batch * n)?
    } else {
        (0u64, None)
    };
    let parts = device_parts(w)?;
    let (codes, scales) = (device_ptr(parts.codes)?, device_ptr(parts.scales)?);
    let (smul, wfactor) = scale_factors(w, opt);
    let (n_i, k_i, b_i, split_i) = (n as i32, kdim as i32, batch as i32, split as i32);
    let row_bytes = (kdim / 2) as i64;
    // bitsandbytes block sizes are powers of two: the kernel shifts instead of dividing.
    let bs_shift = w.block_size().trailing_zeros() as i32;
    let cb = codebook_index(w.format());
    let cfg = LaunchConfig {
        grid_dim: (grid_x as u32, 1, 1),
        block_dim: ((block_warps * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut args = crate::kernel_args![
        &codes, &scales, &xp, &xsp, &yp, &pp, &n_i, &k_i, &b_i, &row_bytes, &bs_shift, &cb,
        &wfactor, &smul, &split_i,
    ];
    // SAFETY: argument order and types match `gemv`; codes hold n rows of k/2 bytes (k % 32 ==
    // 0, 16-byte aligned, checked by `supports`), scales one entry per block, x batch rows of k
    // operands, y batch*n outputs, partial split*batch*n f32 when split > 1; the kernel's
    // static shared memory (`plan::gemv_static_smem`: 33 KiB at most without KWARPS or the
    // activation ring, checked above with either) is within the 48 KiB limit. Started early,
    // it reads only the weight and its own tables before `pdl_wait` (a QTensor's device storage
    // is complete once built: its constructors wait for the device) and writes nothing before
    // it.
    launched("gemv", unsafe {
        launch_ex(&stream, &func, cfg, &mut args, early_start(k))
    })?;
    if stages > 0 {
        STAGED.with(|c| c.set(c.get() + 1));
    }
    if split > 1 {
        // SAFETY: pp holds split*batch*n f32 written by `gemv`; y batch*n outputs.
        unsafe { reduce(k, &defines, dev, pp, xsp, yp, n, batch, split, wfactor) }?;
    }
    Ok(())
}

/// `y[b, i] = factor * gain * xscale[b] * sum over the `splits` f32 slices of `partial[s, b, i]`
/// in the output type, with `gemv_reduce` of the GEMV module compiled with `defines` (`gain` is
/// 2^7 / 2^14 when they set ARITH, else 1; `xscale` may be null, read as 1).
///
/// # Safety
/// `partial` holds `splits * batch * n` f32, `y` `batch * n` values of the type OUT_T names,
/// `xscale` (unless null) `batch` f32.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn reduce(
    k: &DeviceKernels,
    defines: &[(&str, i64)],
    dev: &CudaDevice,
    partial: u64,
    xscale: u64,
    y: u64,
    n: usize,
    batch: usize,
    splits: usize,
    factor: f32,
) -> Result<()> {
    let func = k.function("gemv", module_cache::GEMV, defines, "gemv_reduce")?;
    let (n_i, b_i, s_i) = (n as i32, batch as i32, splits as i32);
    let cfg = LaunchConfig {
        grid_dim: ((batch * n).div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = dev.cuda_stream();
    let mut args = crate::kernel_args![&partial, &xscale, &y, &n_i, &b_i, &s_i, &factor];
    REDUCES.with(|c| c.set(c.get() + 1));
    // SAFETY: argument order and types match `gemv_reduce`; buffer sizes are the caller's
    // contract above. Started early, it reads and writes nothing before its `pdl_wait`.
    launched("gemv_reduce", unsafe {
        launch_ex(&stream, &func, cfg, &mut args, reduce_early_start(k))
    })
}

/// The GEMV module's defines when only `gemv_reduce` is wanted, as a plain f32 -> `out`
/// conversion (no ARITH gain).
pub(super) fn reduce_only_defines(out: DType) -> Result<Vec<(&'static str, i64)>> {
    Ok(vec![
        ("FMT", 0),
        ("OPT", 2),
        ("OUT_T", type_code(out)?),
        ("NT", 1),
        ("MT", 1),
        ("WARPS", 8),
        ("DEPTH", 2),
        ("ARITH", 0),
    ])
}

/// Whether the fused kernel decodes this weight arithmetically (no shared-memory table): NVFP4,
/// whose E2M1 codes are f16/bf16 bit fields, unless `Q4_GEMV_ARITH=0` (see
/// [`super::plan::nvfp4_arith_decode`]).
pub fn arith(w: &QTensor) -> bool {
    w.format() == Format::Nvfp4 && super::plan::nvfp4_arith_decode()
}

fn gemv_defines(
    w: &QTensor,
    opt: DType,
    out_t: i64,
    nt: i64,
    mt: i64,
    warps: i64,
) -> Vec<(&'static str, i64)> {
    vec![
        ("FMT", fmt_code(w.format())),
        ("OPT", if opt == DType::BF16 { 1 } else { 2 }),
        ("OUT_T", out_t),
        ("NT", nt),
        ("MT", mt),
        ("WARPS", warps),
        ("DEPTH", depth()),
        ("ARITH", i64::from(arith(w))),
        ("IMADDEC", i64::from(imad_decode(nt))),
        ("TRIGGER", trigger()),
        ("LDHINT", ld_hint(w.rows_cols().0 * w.rows_cols().1)),
        // bitsandbytes blocks longer than a step do not advance by a constant per step.
        (
            "ADDR",
            addr_mode()
                * i64::from(
                    w.format() == Format::Nvfp4
                        || w.format() == Format::Mxfp4
                        || w.block_size() <= 128,
                ),
        ),
    ]
}

/// Whether the clamped kernel (batches 1-8) computes its step addresses from
/// per-thread bases held in registers (`ADDR` in gemv.cu, 11% fewer instructions a step).
/// Same-call A/B on an H200 (`scripts/gpu/results/h200-2026-11-28-s27/call4-ab-addresses.txt`),
/// NVFP4 batch 1: 0.87-0.97x the time on 8192x8192, 28672x4096 and Qwen3-4B's projections,
/// synthetic decode 551 against 546 tok/s. `Q4_GEMV_ADDR=0` turns it off.
fn addr_mode() -> i64 {
    static A: std::sync::LazyLock<i64> =
        std::sync::LazyLock::new(|| i64::from(knob("Q4_GEMV_ADDR") != Some(0)));
    ADDR_FORCED.flag().map_or(*A, i64::from)
}

/// Whether batch-1 GEMVs of the arithmetic decode stage their activations in shared memory
/// (`XB1` in gemv.cu: no activation loads or regrouping byte permutes in the step loop, 188
/// instead of 206 instructions a step). Same-call A/B on an H200 with `ADDR`
/// (`scripts/gpu/results/h200-2026-11-28-s27/call5-ab-staged-row.txt`): 8192x8192 14.5 against
/// 14.8 us, 28672x4096 24.5 against 25.5, 6144x2560 6.2 against 6.6, 19456x2560 12.5 against
/// 13.4 (2560x9728 10.3 against 10.1), synthetic decode 567.6 against 551.2 tok/s.
/// `Q4_GEMV_XB1=0` turns it off.
fn staged_row() -> bool {
    static X: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| knob("Q4_GEMV_XB1") != Some(0));
    STAGED_ROW_FORCED.flag().unwrap_or(*X)
}

/// Activation chunks each thread loads at once while staging the batch-1 row (`XB1LD` in
/// gemv.cu). Same-call A/B on an H200 (`scripts/gpu/results/h200-2026-11-28-s28/call5-ab-staging-loads.txt`):
/// synthetic decode 569.7 / 568.8 tok/s with 1 (each chunk waited for before the next is
/// loaded, as before), 578.6 / 578.4 with 2, 586.1 / 586.8 with 4, 588.5 / 588.4 with 8; the
/// standalone GEMVs within 2% either way (8192x8192 14.0-14.5 us). `Q4_GEMV_XB1LD` (1-8)
/// overrides.
fn staged_row_batch() -> i64 {
    static B: std::sync::LazyLock<i64> =
        std::sync::LazyLock::new(|| knob("Q4_GEMV_XB1LD").map_or(8, |b| b.clamp(1, 8)));
    *B
}

static STAGED_ROW_FORCED: TestOverride = TestOverride::new();
static ADDR_FORCED: TestOverride = TestOverride::new();

/// Forces the batch-1 staged activation row (`XB1`) and the register-held step addresses
/// (`ADDR`) on or off (`None`: the environment decides), so that a test can compare them with
/// the plain kernel in one process.
#[doc(hidden)]
pub fn set_batch_one_paths_for_tests(addresses: Option<bool>, staged_row: Option<bool>) {
    ADDR_FORCED.set_flag(addresses);
    STAGED_ROW_FORCED.set_flag(staged_row);
}

thread_local! {
    /// GEMV launches with a staged activation row made by this thread (tests check it ran).
    static STAGED_ROWS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many GEMVs with a staged activation row (`XB1`) this thread has launched.
#[doc(hidden)]
pub fn staged_row_launches() -> usize {
    STAGED_ROWS.with(|c| c.get())
}

/// Whether the GEMV's weight loads ask L2 for 128-byte lines (`LDHINT` in gemv.cu) on a weight of
/// `weights` values ([`super::plan::gemv_l2_line_loads`]); `Q4_GEMV_LDHINT` overrides: 0 never,
/// 1 always (2-4: the other hints tried, see gemv.cu).
fn ld_hint(weights: usize) -> i64 {
    static H: std::sync::LazyLock<Option<i64>> =
        std::sync::LazyLock::new(|| knob("Q4_GEMV_LDHINT").map(|h| h.clamp(0, 4)));
    H.unwrap_or(i64::from(super::plan::gemv_l2_line_loads(weights)))
}
