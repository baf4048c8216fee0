//! Which CUDA kernel serves which call, as a pure function of the compute capability, format
//! and batch size. Compiled in every build so that `q4 doctor` can say what a CUDA build would
//! do on this machine's GPUs.

use serde::Serialize;

use crate::Format;

/// Largest activation batch the fused dequantize-on-the-fly GEMV serves; larger batches take
/// the fused wgmma GEMM on Hopper (every format, bf16 activations) or dequantize chunks
/// of the weight (128 MB at M >= 2048, up to 512 MB below) and run cuBLAS.
pub const FUSED_MAX_BATCH: usize = 64;

/// The kernels a format uses on one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CudaPlan {
    /// Batches 1..=FUSED_MAX_BATCH.
    pub decode: &'static str,
    /// Larger batches (prefill).
    pub prefill: &'static str,
    /// NVFP4 activation quantization (W4A4); `n/a` for other formats.
    pub w4a4: &'static str,
}

/// NVRTC in CUDA 13 targets sm_75 and newer.
pub fn arch_supported(cc: (u32, u32)) -> bool {
    cc >= (7, 5)
}

/// `mma.sync.m16n8k16` with f16 operands (sm_80+), used by the fused GEMV.
pub fn has_mma_f16(cc: (u32, u32)) -> bool {
    cc >= (8, 0)
}

/// Hopper's warpgroup MMA (`wgmma`, sm_90a only), used by the fused prefill GEMM.
pub fn has_wgmma(cc: (u32, u32)) -> bool {
    cc == (9, 0)
}

/// Largest batch at which bitsandbytes weights (NF4 / FP4) take the fused wgmma GEMM: its
/// codebook decode (a lookup and two multiplies per code byte, for every token tile) outweighs
/// the chunked path's one full decode at larger batches. Same-call A/B on the H100 with the
/// lane-replicated pair table (`scripts/gpu/results/h100-2026-11-28-s23/call10/`), NF4 fused vs
/// chunked: M = 2048 394.4-395.0 vs 409.3-409.5 us (8192x8192) and 720.8-723.9 vs 737.6-738.2
/// (28672x4096), FP4 396.2-396.4 vs 407.7-409.5; M = 3072 592 vs 578 and 1084-1088 vs
/// 1094-1110 (even); M = 4096 791 vs 753-755 and 1437-1471 vs 1357-1367 (chunked ahead).
/// (Before the pair table, 1024: `h100-2026-11-27-s16/final-nf4/`.) NVFP4's decode is cheaper:
/// it takes the fused kernel at every batch.
pub const WGMMA_BNB_MAX_BATCH: usize = 2048;

/// Whether the fused wgmma prefill GEMM serves a call with bf16 activations: a Hopper GPU,
/// NVFP4 with `k` a multiple of 256 (one 16-byte scale copy covers four 64-wide steps), MXFP4
/// with `k` a multiple of 512 (eight steps), or
/// bitsandbytes blocks of `block` >= 64 (a power of two) with `k` a multiple of four blocks
/// (16-byte copies of four f32 absmax values) and at most [`WGMMA_BNB_MAX_BATCH`] rows.
pub fn gemm_wgmma_serves(
    cc: (u32, u32),
    format: Format,
    k: usize,
    block: usize,
    batch: usize,
) -> bool {
    gemm_wgmma_serves_up_to(cc, format, k, block, batch, WGMMA_BNB_MAX_BATCH)
}

/// [`gemm_wgmma_serves`] with another largest batch for bitsandbytes weights (A/B runs).
pub fn gemm_wgmma_serves_up_to(
    cc: (u32, u32),
    format: Format,
    k: usize,
    block: usize,
    batch: usize,
    bnb_max_batch: usize,
) -> bool {
    let shape_ok = match format {
        Format::Nvfp4 => k.is_multiple_of(256),
        Format::Nf4 | Format::Fp4 => {
            block >= 64
                && block.is_power_of_two()
                && k.is_multiple_of(4 * block)
                && batch <= bnb_max_batch
        }
        // Sixteen E8M0 bytes per scale copy: eight 64-wide steps.
        Format::Mxfp4 => k.is_multiple_of(512),
    };
    has_wgmma(cc) && batch > FUSED_MAX_BATCH && shape_ok
}

/// Tokens per block of the fused wgmma GEMM, and of its narrow build (small batches, a short
/// last tile: [`wgmma_token_launches`]).
pub const WGMMA_TOKENS: usize = 256;
pub const WGMMA_NARROW_TOKENS: usize = 128;

/// Time of a narrow tile relative to a wide one in the wave model of
/// [`wgmma_token_launches`]: same-call measurements on an H200 put it at 0.54-0.78 (the choices
/// below come out the same anywhere in that range for 8192x8192 and 28672x4096).
const NARROW_TILE_COST: f64 = 0.7;

/// The launches covering `m` tokens over `row_blocks` tiles of weight rows on a GPU of `sms`
/// multiprocessors (one block each): `(first token, tokens per tile, token tiles)`. Of all
/// wide tiles ([`WGMMA_TOKENS`]), all narrow ones ([`WGMMA_NARROW_TOKENS`]: twice the blocks,
/// each with half the MMA work) and wide ones with a narrow last tile (where at most
/// [`WGMMA_NARROW_TOKENS`] tokens remain), the one with the fewest waves of blocks, a narrow
/// wave counting `NARROW_TILE_COST`. `narrow: false` keeps every tile wide (A/B runs).
pub fn wgmma_token_launches(
    m: usize,
    row_blocks: usize,
    sms: usize,
    narrow: bool,
) -> Vec<(usize, usize, usize)> {
    let waves = |tiles: usize| (row_blocks * tiles).div_ceil(sms.max(1)) as f64;
    let wide = m.div_ceil(WGMMA_TOKENS);
    let mut best = (waves(wide), vec![(0, WGMMA_TOKENS, wide)]);
    if !narrow {
        return best.1;
    }
    let all_narrow = m.div_ceil(WGMMA_NARROW_TOKENS);
    let cost = waves(all_narrow) * NARROW_TILE_COST;
    if cost < best.0 {
        best = (cost, vec![(0, WGMMA_NARROW_TOKENS, all_narrow)]);
    }
    let (full, rest) = (m / WGMMA_TOKENS, m % WGMMA_TOKENS);
    if full > 0 && (1..=WGMMA_NARROW_TOKENS).contains(&rest) {
        let cost = waves(full) + waves(1) * NARROW_TILE_COST;
        if cost < best.0 {
            best = (
                cost,
                vec![
                    (0, WGMMA_TOKENS, full),
                    (full * WGMMA_TOKENS, WGMMA_NARROW_TOKENS, 1),
                ],
            );
        }
    }
    best.1
}

/// Blackwell FP4 tensor cores.
pub fn has_fp4_tensor_cores(cc: (u32, u32)) -> bool {
    matches!(cc.0, 10..=12)
}

/// The target q4's native block-scaled FP4 kernel is compiled for on this device: the warp-level
/// `mma.sync ... kind::mxf4nvf4.block_scale` of sm_120a / sm_121a. Data-center Blackwell
/// (sm_100a / sm_103a) only has the block-scaled MMA as `tcgen05.mma`, for which q4 has no
/// kernel yet: those devices use the exact emulation.
pub fn native_fp4_target(cc: (u32, u32)) -> Option<&'static str> {
    match cc {
        (12, 0) => Some("sm_120a"),
        (12, 1) => Some("sm_121a"),
        _ => None,
    }
}

/// Kernel names (also used in logs and benchmarks).
pub mod names {
    pub const GEMV_MMA: &str =
        "gemv-mma (fused 4-bit decode via pair table, bf16/f16 mma.sync, f32 accumulate)";
    pub const GEMV_MMA_ARITH: &str =
        "gemv-mma (fused arithmetic E2M1 decode, bf16/f16 mma.sync, f32 accumulate)";
    pub const DEQUANT_CUBLAS: &str = "dequant (chunks of <= 512 MB) + cuBLAS GEMM";
    pub const GEMM_WGMMA: &str = "gemm-wgmma (fused 4-bit decode into wgmma registers, TMA, f32 accumulate; bf16 activations and K % 256 == 0 (MXFP4: K % 512 == 0; bitsandbytes: blocks >= 64, K % (4 x block) == 0, batch <= 2048), else dequant + cuBLAS)";
    pub const W4A4_NATIVE_SM120: &str = "native FP4 mma.sync block_scale (sm_120a/121a)";
    pub const W4A4_EXACT: &str = "exact integer emulation (i64 accumulate)";
    pub const NOT_APPLICABLE: &str = "n/a";
}

/// Whether the fused GEMV decodes NVFP4 arithmetically (E2M1 bits placed into the operand's
/// exponent field) rather than through its shared-memory pair table: the default, measured
/// faster on the H100; `Q4_GEMV_ARITH=0` selects the table (kernel development).
pub fn nvfp4_arith_decode() -> bool {
    static ON: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| std::env::var("Q4_GEMV_ARITH").ok().is_none_or(|v| v != "0"));
    *ON
}

/// K slices per row tile of the fused GEMV (split-K), for `tiles` row tiles of `steps` 128-wide
/// steps on a GPU that holds `resident` blocks at once; each slice keeps at least `min_steps`
/// steps (unless the row has fewer).
///
/// A work item (tile, slice) costs its steps plus `item_cost` steps of fixed overhead (pipeline
/// fill, partial store); items beyond the resident blocks run as further waves. The split with
/// the fewest step-times `waves * (steps per slice + item_cost)` wins, the smaller on ties, and
/// is then trimmed so that no slice is empty. With `item_cost = None` the earlier rule: double
/// the split while the items do not yet fill the GPU.
pub fn gemv_split(
    tiles: usize,
    steps: usize,
    resident: usize,
    min_steps: usize,
    item_cost: Option<usize>,
) -> usize {
    let (tiles, steps, resident, min_steps) = (
        tiles.max(1),
        steps.max(1),
        resident.max(1),
        min_steps.max(1),
    );
    let Some(c) = item_cost else {
        let mut split = 1usize;
        while tiles * split < resident && steps >= split * 2 * min_steps {
            split *= 2;
        }
        return split;
    };
    let mut best = (usize::MAX, 1usize);
    for split in 1..=(steps / min_steps).max(1) {
        let per = steps.div_ceil(split);
        let cost = (tiles * split).div_ceil(resident) * (per + c);
        if cost < best.0 {
            best = (cost, split);
        }
    }
    steps.div_ceil(steps.div_ceil(best.1))
}

/// Whether `slices` K slices of a row tile can be summed inside one block by the fused GEMV's
/// warp split (`KWARPS` in gemv.cu) for blocks of `warps` warps: the slices divide the warps
/// (blocks of `warps / slices` row groups) or are a multiple of them, at most 16 (one row group
/// of `slices` warps).
pub fn warp_split_fits(slices: usize, warps: usize) -> bool {
    slices >= 2 && (warps.is_multiple_of(slices) || (slices.is_multiple_of(warps) && slices <= 16))
}

/// The blocks of a warp split of `slices` slices over `n` rows for a kernel of `warps` warps:
/// `(warps per block, blocks)` — blocks of `warps / slices` row groups of 16 rows, or of one row
/// group of `slices` warps where the split is the larger.
pub fn warp_split_blocks(n: usize, warps: usize, slices: usize) -> (usize, usize) {
    let block_warps = warps.max(slices);
    (block_warps, n.div_ceil(16 * (block_warps / slices)))
}

/// The split to try in place of a split-K plan of `split` slices that the warp split cannot sum
/// (5, 6 or 3 slices on blocks of 4 or 8 warps): the largest that it can, no shorter than two
/// thirds of `split` (each slice at most 1.5x as long), or `None`. Summed in shared memory, the
/// slices need no partial buffer and no second kernel. Same-call sweep on the H100 at batches 12
/// and 16 (`scripts/gpu/results/h100-2026-11-28-s22/`): NVFP4 6144x2560 split 4 in-block against
/// the plan's 5 across blocks 9.5 against 10.9 us, 19456x2560 2 against 3 24.9 against 26.7.
pub fn warp_split_round_down(split: usize, warps: usize) -> Option<usize> {
    if split < 3 || warp_split_fits(split, warps) {
        return None;
    }
    (2..split)
        .rev()
        .take_while(|&s| 3 * s >= 2 * split)
        .find(|&s| warp_split_fits(s, warps))
}

/// The busiest multiprocessor's share of a GEMV launch, in warp-steps: `blocks` blocks of
/// `block_warps` warps spread evenly over `sms` multiprocessors, each warp walking
/// `steps_per_warp` 128-wide steps.
pub fn busiest_sm_load(
    blocks: usize,
    sms: usize,
    block_warps: usize,
    steps_per_warp: usize,
) -> usize {
    blocks.div_ceil(sms.max(1)) * block_warps * steps_per_warp
}

/// How much more the busiest multiprocessor may carry under a rounded-down warp split
/// ([`warp_split_round_down`]) than under the grid split it replaces, which also writes partial
/// sums and runs a second kernel. From the same-call A/B of the rounding on the H100 (batches
/// 9-16, 14 shapes, `scripts/gpu/results/h100-2026-11-28-s22/call4-fit-split/`): the rounding
/// won at load ratios up to 1.07 (19456x2560 1.07, 0.94-0.97x the time; 6144x2560 0.94, 0.87-0.91x;
/// 8192x3072 0.96, 0.86-0.89x) and lost from 1.12 (3584x18944 1.06x the time, 11008x4096 at 1.45
/// 1.25x, 5120x27648 at 1.5 1.40-1.46x).
pub const ROUNDED_SPLIT_MAX_LOAD: f64 = 1.08;

/// The warp split to try instead of a grid split of `split` slices for `n` rows of `steps`
/// steps on blocks of `warps` warps (row tiles of `16 * warps` rows) over `sms`
/// multiprocessors: the split rounded down to one a block can sum ([`warp_split_round_down`])
/// where its blocks load the busiest multiprocessor at most [`ROUNDED_SPLIT_MAX_LOAD`] times the
/// grid split's items.
pub fn rounded_warp_split(
    split: usize,
    warps: usize,
    n: usize,
    steps: usize,
    sms: usize,
) -> Option<usize> {
    warp_split_round_down(split, warps).filter(|&s| {
        let tiles = n.div_ceil(16 * warps);
        let grid = busiest_sm_load(tiles * split, sms, warps, steps.div_ceil(split));
        let (block_warps, blocks) = warp_split_blocks(n, warps, s);
        let rounded = busiest_sm_load(blocks, sms, block_warps, steps.div_ceil(s));
        rounded as f64 <= ROUNDED_SPLIT_MAX_LOAD * grid as f64
    })
}

/// How much more the busiest multiprocessor may carry under a warp split (K slices summed inside
/// a block) than under the grid split of the same slices (partial sums and `gemv_reduce`) before
/// the grid split is taken instead. A warp split's blocks are `slices` times larger, so where
/// there are somewhat more of them than multiprocessors, some carry two and the rest one. Same
/// call on an H200 (thirty-eighth session, `scripts/gpu/results/h200-2026-11-29-s38-f8-library/
/// call10-mma-split-sweep.txt`), NVFP4 batch 1, 16 slices: 2560x9728 at a load ratio of 1.6 ran
/// 10.2 us on the warp split against 8.5 on the grid split; 1536x8960 at 1.33 ran 7.2 against
/// 7.7 (the reduction's own cost).
pub const WARP_SPLIT_MAX_LOAD: f64 = 1.4;

/// Whether a warp split of `slices` slices (blocks of `block_warps` warps, `blocks` of them) loads
/// the busiest of `sms` multiprocessors at most [`WARP_SPLIT_MAX_LOAD`] times the grid split of
/// `split` slices over `tiles` row tiles of `warps` warps does, for rows of `steps` steps.
#[allow(clippy::too_many_arguments)]
pub fn warp_split_balanced(
    tiles: usize,
    warps: usize,
    split: usize,
    steps: usize,
    sms: usize,
    slices: usize,
    block_warps: usize,
    blocks: usize,
) -> bool {
    let grid = busiest_sm_load(tiles * split, sms, warps, steps.div_ceil(split));
    let warp = busiest_sm_load(blocks, sms, block_warps, steps.div_ceil(slices));
    warp as f64 <= WARP_SPLIT_MAX_LOAD * grid as f64
}

/// Weights (`n * k`) from which the fused GEMV gives each warp two 16-row M tiles at the batches
/// [`gemv_m_tiles`] names.
pub const GEMV_M_TILES_LARGE: usize = 40 << 20;
/// Weights from which [`gemv_m_tiles`] takes two M tiles at more batches.
pub const GEMV_M_TILES_HUGE: usize = 64 << 20;

/// 16-row M tiles per warp of the fused GEMV (`MT` in gemv.cu) for a weight of `n` x `k` at
/// `batch` activation rows: two where each B fragment serving two A tiles (half the activation
/// loads and regroupings per weight) outweighs having half as many warps and work items.
/// Same-call A/Bs on an H200 (`scripts/gpu/results/h200-2026-11-28-s26/`, µs with two / one):
/// - from batch 17 every shape (8192x8192 at 64 46.0 / 62.7, 28672x4096 83.1 / 124.4,
///   6144x2560 18.7 / 25.7);
/// - the pair-table formats (`pair_table`) from batch 9 (NF4 8192x8192 at 16 25.2 / 28.4,
///   28672x4096 42.9 / 54.4, 6144x2560 12.0 / 12.6), below it with K >= 4096 on weights of 64 M
///   and more (8192x8192 at batch 1 20.3 / 21.8, 28672x4096 35.1 / 38.0) or of 40 M from batch
///   5 (11008x4096 at 8 20.1 / 22.3, at 1 18.3 / 17.6; with K = 2560, 19456x2560 at 1 20.5 /
///   17.8);
/// - the arithmetic NVFP4 decode on weights of 40 M and more at batches 15-16 (8192x8192 at 16
///   25.9 / 28.0, 28672x4096 43.1 / 50.8, 19456x2560 23.3 / 25.0; 11008x4096 even at 15,
///   slower at 13-14) and, on 64 M and more, at 6-8 (8192x8192 at 8 17.3 / 18.7);
/// - one everywhere else (NVFP4 6144x2560 at batch 1 8.7 / 7.0, 19456x2560 17.3 / 13.8).
pub fn gemv_m_tiles(pair_table: bool, batch: usize, n: usize, k: usize) -> usize {
    let weights = n.saturating_mul(k);
    let (large, huge) = (weights >= GEMV_M_TILES_LARGE, weights >= GEMV_M_TILES_HUGE);
    let two = match batch {
        17.. => true,
        9..=16 if pair_table => true,
        _ if pair_table => large && k >= 4096 && (batch >= 5 || huge),
        15..=16 => large,
        6..=8 => huge,
        _ => false,
    };
    if two {
        2
    } else {
        1
    }
}

/// Static shared memory of a GEMV kernel (gemv.cu) with `warps` warps of `tiles` accumulator
/// tiles each (N tiles times M tiles): the pair table (32 KiB, none for the arithmetic NVFP4
/// decode), the scale table (1 KiB) and, when its warps split K, their f32 sums
/// (`warps x tiles x 4 x 32`). Kernels above [`GEMV_STATIC_SMEM_LIMIT`] do not compile.
pub fn gemv_static_smem(pair_table: bool, warps: usize, tiles: usize, warp_split: bool) -> usize {
    let table = if pair_table { 256 * 32 * 4 } else { 0 };
    let sums = if warp_split {
        warps * tiles * 4 * 32 * 4
    } else {
        0
    };
    table + 256 * 4 + sums
}
/// Whether the GEMV's weight loads ask L2 for whole 128-byte lines (`L2::128B`) rather than
/// the 64 bytes of a row a warp reads per step: on weights of at least [`GEMV_M_TILES_HUGE`]
/// values. Each request then also brings the row's next step into L2 — twice the bytes in
/// flight per load, without registers. Same-call A/B on an H200
/// (`scripts/gpu/results/h200-2026-11-28-s27/`), NVFP4 batch 1 with / without: 8192x8192 13.8
/// / 14.4 us, 28672x4096 22.5 / 24.6, 151936x2560 60.3 / 69.9 (NF4 19.4 / 20.3, 33.9 / 35.3),
/// batches 4-32 up to 4% faster; synthetic Qwen3-4B decode 571.7 / 569.7 tok/s. On every
/// weight the decode lost (554 against 567 tok/s: 19456x2560 and the smaller projections no
/// faster, 2560x9728 slower), and 256-byte lines were slower everywhere.
pub fn gemv_l2_line_loads(weights: usize) -> bool {
    weights >= GEMV_M_TILES_HUGE
}

/// Most 128-wide steps of an activation row the batch-1 GEMV stages in shared memory (`XB1` in
/// gemv.cu): 36 KiB, leaving room for the tables and the sums of a 16-warp split.
pub const GEMV_STAGED_ROW_MAX_STEPS: usize = 144;

/// Steps of shared memory the batch-1 GEMV reserves for its staged activation row (`XB1` in
/// gemv.cu) when a block's K slice has `slice_steps` steps: the slice rounded up to a multiple of
/// 16 (fewer kernel variants), or `None` where staging does not apply (`eligible`: the arithmetic
/// decode with one N and one M tile, whole 128-wide steps, no activation ring) or the slice is
/// longer than [`GEMV_STAGED_ROW_MAX_STEPS`].
pub fn gemv_staged_row_steps(batch: usize, eligible: bool, slice_steps: usize) -> Option<usize> {
    (batch == 1 && eligible && (1..=GEMV_STAGED_ROW_MAX_STEPS).contains(&slice_steps))
        .then(|| slice_steps.next_multiple_of(16))
}
/// Static shared memory of the batch-1 staged activation row for `steps` steps (16-byte word
/// groups of 4 threads x 4 per step).
pub fn gemv_staged_row_smem(steps: usize) -> usize {
    steps * 16 * 16
}
/// Static shared memory of the GEMV's activation ring (`XSTAGE` in gemv.cu): `stages` steps of
/// `nt * 8` rows of 128 16-bit operands.
pub fn gemv_stage_smem(nt: usize, stages: usize) -> usize {
    stages * nt * 8 * 128 * 2
}
/// Stages of the GEMV's shared-memory activation ring (`XSTAGE` in gemv.cu) for a kernel with
/// `nt` N tiles, `m_tiles` M tiles per warp and `warps` warps, or 0 for none: two, where it was
/// measured faster than each warp loading its activations from global memory — the pair-table
/// formats from two N tiles (batches 9-16; at four their 32 KiB table leaves no room), the
/// arithmetic NVFP4 decode from eight (batches 33-64), from four (17-32) in blocks of the large
/// weights (`large`: 8 warps, 40 M weights and more) or with two M tiles, and at two (9-16) with
/// two M tiles. Same-call A/B on the H100 (`scripts/gpu/results/h100-2026-11-27-s20/`), one M
/// tile: NVFP4 batch 64 0.47x / 0.43x the time on 8192x8192 / 28672x4096, batch 32 0.78x /
/// 0.82x, NF4 batch 16 0.85-0.98x; NVFP4 at batch 16 and small weights at batch 32 were as fast
/// or faster without it. With two M tiles, on an H200
/// (`scripts/gpu/results/h200-2026-11-28-s26/`): NVFP4 batch 16 0.88x / 0.94x on 8192x8192 /
/// 28672x4096 (0.95x on 19456x2560), 6144x2560 at batch 32 0.93x. `set` (a knob) overrides: 0
/// or less off, else 2-4 stages at every batch. Never more stages than fit the static shared
/// memory beside the kernel's tables.
pub fn gemv_ring_stages(
    pair_table: bool,
    nt: usize,
    m_tiles: usize,
    warps: usize,
    large: bool,
    set: Option<i64>,
) -> usize {
    let want = match set {
        Some(v) if v <= 0 => return 0,
        Some(v) => v.clamp(2, 4) as usize,
        None if pair_table && nt >= 2 => 2,
        None if !pair_table
            && (nt >= 8 || (nt >= 4 && (large || m_tiles == 2)) || (nt == 2 && m_tiles == 2)) =>
        {
            2
        }
        None => return 0,
    };
    (2..=want)
        .rev()
        .find(|&stages| {
            gemv_static_smem(pair_table, warps, nt, false) + gemv_stage_smem(nt, stages)
                <= GEMV_STATIC_SMEM_LIMIT
        })
        .unwrap_or(0)
}
/// The static shared memory a kernel may declare (48 KiB).
pub const GEMV_STATIC_SMEM_LIMIT: usize = 48 << 10;

/// The plan for `format` on a device of compute capability `cc`.
pub fn plan(cc: (u32, u32), format: Format) -> CudaPlan {
    // Before sm_80 (Turing) every batch takes the dequantize + cuBLAS path.
    let decode = if !has_mma_f16(cc) {
        names::DEQUANT_CUBLAS
    } else if format == Format::Nvfp4 && nvfp4_arith_decode() {
        names::GEMV_MMA_ARITH
    } else {
        names::GEMV_MMA
    };
    let w4a4 = match (format, native_fp4_target(cc)) {
        (Format::Nvfp4, Some(_)) => names::W4A4_NATIVE_SM120,
        (Format::Nvfp4, None) => names::W4A4_EXACT,
        _ => names::NOT_APPLICABLE,
    };
    let prefill = if has_wgmma(cc) {
        names::GEMM_WGMMA
    } else {
        names::DEQUANT_CUBLAS
    };
    CudaPlan {
        decode,
        prefill,
        w4a4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l2_line_loads_only_on_large_weights() {
        // The measured shapes: 8192x8192, 28672x4096 and the LM head took the 128-byte lines;
        // Qwen3-4B's layer projections (up to 19456x2560) did not.
        assert!(gemv_l2_line_loads(8192 * 8192));
        assert!(gemv_l2_line_loads(28672 * 4096));
        assert!(gemv_l2_line_loads(151936 * 2560));
        assert!(!gemv_l2_line_loads(19456 * 2560));
        assert!(!gemv_l2_line_loads(6144 * 2560));
        assert!(!gemv_l2_line_loads(2560 * 9728));
    }

    #[test]
    fn staged_row_only_at_batch_one_and_within_the_limit() {
        assert_eq!(gemv_staged_row_steps(1, true, 64), Some(64));
        assert_eq!(gemv_staged_row_steps(1, true, 20), Some(32));
        assert_eq!(gemv_staged_row_steps(1, true, 1), Some(16));
        assert_eq!(
            gemv_staged_row_steps(1, true, GEMV_STAGED_ROW_MAX_STEPS),
            Some(GEMV_STAGED_ROW_MAX_STEPS)
        );
        assert_eq!(
            gemv_staged_row_steps(1, true, GEMV_STAGED_ROW_MAX_STEPS + 1),
            None
        );
        assert_eq!(gemv_staged_row_steps(2, true, 64), None);
        assert_eq!(gemv_staged_row_steps(1, false, 64), None);
        // The largest staged row fits the static shared memory beside the tables and the
        // warp split's sums of 16 warps.
        assert!(
            gemv_static_smem(false, 16, 1, true) + gemv_staged_row_smem(GEMV_STAGED_ROW_MAX_STEPS)
                <= GEMV_STATIC_SMEM_LIMIT
        );
    }

    #[test]
    fn gemv_m_tiles_follow_the_measured_wins() {
        // (pair table, batch, n, k, M tiles): the A/Bs' wins and losses.
        let cases = [
            (false, 1, 8192, 8192, 1),
            (false, 8, 8192, 8192, 2),
            (false, 8, 11008, 4096, 1),
            (false, 9, 28672, 4096, 1),
            (false, 14, 11008, 4096, 1),
            (false, 15, 8192, 8192, 2),
            (false, 16, 19456, 2560, 2),
            (false, 16, 6144, 2560, 1),
            (false, 32, 6144, 2560, 2),
            (false, 64, 2560, 4096, 2),
            (true, 1, 8192, 8192, 2),
            (true, 1, 28672, 4096, 2),
            (true, 1, 19456, 2560, 1),
            (true, 1, 11008, 4096, 1),
            (true, 5, 11008, 4096, 2),
            (true, 8, 2560, 9728, 1),
            (true, 9, 6144, 2560, 2),
            (true, 12, 2560, 9728, 2),
            (true, 64, 6144, 2560, 2),
        ];
        for (table, b, n, k, mt) in cases {
            assert_eq!(
                gemv_m_tiles(table, b, n, k),
                mt,
                "{table} batch {b} {n}x{k}"
            );
        }
    }

    /// The batch-1 plans on an H200 (132 multiprocessors), as `gemv.rs` makes them: of the
    /// measured shapes only 2560x9728 leaves the warp split.
    #[test]
    fn the_warp_split_yields_where_its_blocks_crowd_some_multiprocessors() {
        // (n, k, warps a block, the grid plan's slices)
        for (n, k, warps, split, balanced) in [
            (2560usize, 9728usize, 4usize, 16usize, false),
            (1536, 8960, 4, 16, true),
            (3584, 18944, 8, 16, true),
            (4096, 14336, 8, 16, true),
            (19456, 2560, 8, 2, true),
            (6144, 2560, 4, 4, true),
            (2560, 4096, 4, 8, true),
            (8192, 8192, 8, 8, true),
            (28672, 4096, 8, 4, true),
        ] {
            let (tiles, steps) = (n.div_ceil(16 * warps), k.div_ceil(128));
            let (bw, blocks) = warp_split_blocks(n, warps, split);
            assert_eq!(
                warp_split_balanced(tiles, warps, split, steps, 132, split, bw, blocks),
                balanced,
                "{n}x{k}"
            );
        }
    }

    #[test]
    fn plans_follow_the_hardware() {
        let h100 = plan((9, 0), Format::Nvfp4);
        assert_eq!(h100.decode, names::GEMV_MMA_ARITH);
        assert_eq!(plan((9, 0), Format::Nf4).decode, names::GEMV_MMA);
        assert_eq!(h100.w4a4, names::W4A4_EXACT);
        // The fused prefill GEMM needs wgmma (sm_90a only) and serves every format.
        assert_eq!(h100.prefill, names::GEMM_WGMMA);
        assert_eq!(plan((9, 0), Format::Nf4).prefill, names::GEMM_WGMMA);
        assert_eq!(plan((9, 0), Format::Mxfp4).prefill, names::GEMM_WGMMA);
        assert_eq!(plan((12, 0), Format::Nvfp4).prefill, names::DEQUANT_CUBLAS);
        assert_eq!(plan((8, 0), Format::Nvfp4).prefill, names::DEQUANT_CUBLAS);
        assert_eq!(plan((12, 1), Format::Nvfp4).w4a4, names::W4A4_NATIVE_SM120);
        // sm_100 has FP4 tensor cores but no q4 kernel for them (tcgen05): exact emulation.
        assert!(has_fp4_tensor_cores((10, 0)));
        assert_eq!(plan((10, 0), Format::Nvfp4).w4a4, names::W4A4_EXACT);
        assert_eq!(plan((12, 1), Format::Nf4).w4a4, names::NOT_APPLICABLE);
        assert_eq!(plan((7, 5), Format::Nf4).decode, names::DEQUANT_CUBLAS);
        assert!(!arch_supported((7, 0)));
        assert_eq!(native_fp4_target((9, 0)), None);
        assert!(has_fp4_tensor_cores((11, 0)));
    }

    #[test]
    fn wgmma_token_launches_cover_every_token_once_in_the_fewest_waves() {
        for (row_blocks, sms) in [(64, 132), (224, 132), (1, 8), (300, 132)] {
            for narrow in [false, true] {
                for m in 1..1100 {
                    let launches = wgmma_token_launches(m, row_blocks, sms, narrow);
                    let mut next = 0;
                    for (i, &(first, tokens, tiles)) in launches.iter().enumerate() {
                        assert_eq!(first, next, "m {m}: launches contiguous");
                        assert!(tiles > 0);
                        if tokens == WGMMA_NARROW_TOKENS {
                            // All narrow, or one narrow last tile after wide ones.
                            assert!(narrow && (launches.len() == 1 || (i == 1 && tiles == 1)));
                        } else {
                            assert_eq!(tokens, WGMMA_TOKENS);
                        }
                        next = first + tokens * tiles;
                    }
                    // Covers m, wasting less than one tile of its kind.
                    let (_, last_tokens, _) = *launches.last().unwrap();
                    assert!(next >= m && next - m < last_tokens, "m {m}: {launches:?}");
                    if !narrow {
                        assert_eq!(launches.len(), 1);
                        assert_eq!(last_tokens, WGMMA_TOKENS);
                    }
                }
            }
        }
        // The choices measured (BENCHMARKS.md, seventeenth session): 8192 rows (64 row tiles)
        // on 132 SMs ...
        let h100 = |m, rows: usize| wgmma_token_launches(m, rows / 128, 132, true);
        assert_eq!(h100(128, 8192), vec![(0, 128, 1)]);
        assert_eq!(h100(256, 8192), vec![(0, 128, 2)]);
        assert_eq!(h100(384, 8192), vec![(0, 256, 2)]);
        assert_eq!(h100(640, 8192), vec![(0, 256, 2), (512, 128, 1)]);
        assert_eq!(h100(2048, 8192), vec![(0, 256, 8)]);
        // ... and 28672 rows (224 row tiles).
        assert_eq!(h100(128, 28672), vec![(0, 128, 1)]);
        assert_eq!(h100(256, 28672), vec![(0, 256, 1)]);
        assert_eq!(h100(384, 28672), vec![(0, 256, 1), (256, 128, 1)]);
        assert_eq!(h100(640, 28672), vec![(0, 256, 2), (512, 128, 1)]);
        assert_eq!(h100(2048, 28672), vec![(0, 256, 8)]);
    }

    #[test]
    fn the_wgmma_gemm_serves_hopper_prefill_of_supported_shapes() {
        let h100 = (9, 0);
        // NVFP4 at any prefill batch with K a multiple of 256.
        assert!(gemm_wgmma_serves(h100, Format::Nvfp4, 4096, 16, 65));
        assert!(gemm_wgmma_serves(h100, Format::Nvfp4, 4096, 16, 8192));
        assert!(!gemm_wgmma_serves(h100, Format::Nvfp4, 4096, 16, 64));
        assert!(!gemm_wgmma_serves(h100, Format::Nvfp4, 576, 16, 512));
        // bitsandbytes: blocks of >= 64 inside rows, K a multiple of four blocks, batch <= 2048.
        assert!(gemm_wgmma_serves(h100, Format::Nf4, 4096, 64, 2048));
        assert!(!gemm_wgmma_serves(h100, Format::Nf4, 4096, 64, 2049));
        assert!(!gemm_wgmma_serves(h100, Format::Nf4, 4096, 32, 512));
        assert!(!gemm_wgmma_serves(h100, Format::Fp4, 1280, 128, 512));
        assert!(gemm_wgmma_serves(h100, Format::Fp4, 2048, 128, 512));
        // MXFP4 with K a multiple of 512 (gpt-oss's 2880 is not); nothing that is not Hopper.
        assert!(gemm_wgmma_serves(h100, Format::Mxfp4, 4096, 32, 512));
        assert!(gemm_wgmma_serves(h100, Format::Mxfp4, 9728, 32, 4096));
        assert!(!gemm_wgmma_serves(h100, Format::Mxfp4, 2880, 32, 512));
        assert!(!gemm_wgmma_serves(h100, Format::Mxfp4, 4096, 32, 64));
        assert!(!gemm_wgmma_serves((8, 0), Format::Nvfp4, 4096, 16, 512));
        assert!(!gemm_wgmma_serves((12, 0), Format::Nvfp4, 4096, 16, 512));
    }

    #[test]
    fn gemv_warp_split_and_activation_ring_fit_static_shared_memory_where_taken() {
        // Blocks up to 16 warps: the arithmetic kernel fits at every N tile count it takes;
        // the pair-table kernel at one N tile, not at two with 16 warps (32 + 1 + 16 KiB).
        let fits = |t, w, nt| gemv_static_smem(t, w, nt, true) <= GEMV_STATIC_SMEM_LIMIT;
        assert!(fits(false, 16, 2) && fits(true, 16, 1) && fits(true, 8, 2));
        assert!(!fits(true, 16, 2));
        assert_eq!(gemv_static_smem(true, 8, 1, false), 33 << 10);
        // The activation ring (no warp split): two stages fit beside the pair table at two N
        // tiles, not at four; the arithmetic decode takes two at eight N tiles, four at four.
        let ring = |t, nt, s| {
            gemv_static_smem(t, 8, nt, false) + gemv_stage_smem(nt, s) <= GEMV_STATIC_SMEM_LIMIT
        };
        assert!(ring(true, 2, 2) && ring(true, 2, 3) && !ring(true, 2, 4) && !ring(true, 4, 2));
        assert!(ring(false, 8, 2) && !ring(false, 8, 3) && ring(false, 4, 4));
        assert_eq!(gemv_stage_smem(2, 2), 8 << 10);
    }

    #[test]
    fn gemv_ring_where_measured_faster_and_where_it_fits() {
        // (pair table, N tiles, warps, large weights) -> stages by default, one M tile.
        let ring = |t, nt, w, large| gemv_ring_stages(t, nt, 1, w, large, None);
        // Pair-table formats: batches 9-16 only (no room beside the table at four N tiles).
        assert_eq!(ring(true, 1, 8, true), 0);
        assert_eq!(ring(true, 2, 8, true), 2);
        assert_eq!(ring(true, 2, 8, false), 2);
        assert_eq!(ring(true, 4, 8, true), 0);
        // NVFP4 (arithmetic decode): batches 33-64, and 17-32 for large weights.
        assert_eq!(ring(false, 1, 4, false), 0);
        assert_eq!(ring(false, 2, 8, true), 0);
        assert_eq!(ring(false, 4, 8, true), 2);
        assert_eq!(ring(false, 4, 4, false), 0);
        assert_eq!(ring(false, 8, 4, false), 2);
        // With two M tiles: NVFP4 from two N tiles.
        assert_eq!(gemv_ring_stages(false, 2, 2, 8, true, None), 2);
        assert_eq!(gemv_ring_stages(false, 4, 2, 4, false, None), 2);
        assert_eq!(gemv_ring_stages(true, 4, 2, 8, true, None), 0);
        // The knob: off, or as many stages as asked where they fit.
        assert_eq!(gemv_ring_stages(false, 8, 1, 8, true, Some(0)), 0);
        assert_eq!(gemv_ring_stages(false, 1, 1, 8, true, Some(4)), 4);
        assert_eq!(gemv_ring_stages(false, 8, 1, 8, true, Some(4)), 2);
        assert_eq!(gemv_ring_stages(true, 2, 1, 8, true, Some(4)), 3);
        assert_eq!(gemv_ring_stages(true, 4, 1, 8, true, Some(3)), 0);
        assert_eq!(gemv_ring_stages(false, 2, 1, 8, true, Some(9)), 4);
    }

    #[test]
    fn splits_round_down_to_what_a_block_can_sum() {
        for warps in [4, 8] {
            for split in 1..=40 {
                let fits = warp_split_fits(split, warps);
                match warp_split_round_down(split, warps) {
                    Some(s) => {
                        assert!(!fits && warp_split_fits(s, warps) && s < split);
                        assert!(3 * s >= 2 * split, "{split} -> {s}");
                        assert!((s + 1..split).all(|t| !warp_split_fits(t, warps)));
                    }
                    None => assert!(
                        fits || split < 3
                            || (2..split).all(|s| 3 * s < 2 * split || !warp_split_fits(s, warps)),
                        "{split} with {warps} warps"
                    ),
                }
            }
        }
        // 4 and 8 warps: 2, 4, 8 and 16 slices fit, and 12 on 4 warps.
        let fitting: Vec<usize> = (1..=20).filter(|&s| warp_split_fits(s, 4)).collect();
        assert_eq!(fitting, [2, 4, 8, 12, 16]);
        let fitting: Vec<usize> = (1..=20).filter(|&s| warp_split_fits(s, 8)).collect();
        assert_eq!(fitting, [2, 4, 8, 16]);
        assert_eq!(warp_split_round_down(5, 4), Some(4));
        assert_eq!(warp_split_round_down(3, 8), Some(2));
        assert_eq!(warp_split_round_down(6, 8), Some(4));
        assert_eq!(warp_split_round_down(7, 4), None);
        assert_eq!(warp_split_round_down(11, 4), Some(8));
        assert_eq!(warp_split_round_down(13, 4), Some(12));
        assert_eq!(warp_split_round_down(4, 4), None);
        assert_eq!(warp_split_round_down(20, 4), Some(16));
        assert_eq!(warp_split_round_down(25, 8), None);
    }

    /// The shapes of the A/B that set the load limit (H100: 132 multiprocessors; 4 warps below
    /// 40 M weights): where the rounding won it is taken, where it lost it is not.
    #[test]
    fn rounded_warp_splits_follow_the_measured_wins() {
        let case = |n: usize, k: usize, split: usize| {
            let warps = if n * k < 40 << 20 { 4 } else { 8 };
            rounded_warp_split(split, warps, n, k.div_ceil(128), 132)
        };
        assert_eq!(case(6144, 2560, 5), Some(4));
        assert_eq!(case(8192, 3072, 5), Some(4));
        assert_eq!(case(19456, 2560, 3), Some(2));
        assert_eq!(case(18944, 3584, 3), Some(2));
        assert_eq!(case(11008, 4096, 3), None);
        assert_eq!(case(5120, 27648, 6), None);
        assert_eq!(case(3584, 18944, 9), None);
        assert_eq!(case(576, 1536, 3), None);
        assert_eq!(case(8192, 8192, 4), None); // fits already
    }

    #[test]
    fn gemv_split_fills_one_wave_without_empty_slices() {
        // 8192x8192 on an H100 (64 tiles of 128 rows, 64 steps, 4 blocks per SM): eight slices
        // of eight steps fill 512 of 528 block slots in one wave, where the doubling rule takes
        // sixteen (two waves of four-step items).
        assert_eq!(gemv_split(64, 64, 528, 4, Some(2)), 8);
        assert_eq!(gemv_split(64, 64, 528, 4, None), 16);
        // 28672x4096: 224 tiles, 32 steps -> two slices (448 items, one wave).
        assert_eq!(gemv_split(224, 32, 528, 4, Some(2)), 2);
        // Enough tiles to fill the GPU: no split.
        assert_eq!(gemv_split(2000, 64, 528, 4, Some(2)), 1);
        for tiles in [1, 3, 17, 64, 100, 224, 700] {
            for steps in [1, 2, 5, 9, 20, 33, 63, 64, 77, 224] {
                for resident in [132, 396, 528, 1056] {
                    let split = gemv_split(tiles, steps, resident, 4, Some(2));
                    let per = steps.div_ceil(split);
                    assert!(split >= 1 && (split - 1) * per < steps, "empty slice");
                    assert!(split == 1 || per >= 4, "slices of fewer than 4 steps");
                }
            }
        }
    }
}
