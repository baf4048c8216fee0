//! Larger batches: decode a tile of weights (a few hundred rows by a slice of K, sized for the
//! L2 cache) into f32, then run a dense micro-kernel on it (q4's AVX2 dot-product kernel, or the
//! `gemm` crate's elsewhere), accumulating over the K slices. Only one tile per thread exists at
//! a time. On AVX-512 hosts most batches go to [`super::lanes`] instead (see
//! `lanes::applies`), which decodes a chunk of a group of rows at a time.

use std::cell::RefCell;

use super::aligned::AlignedBuf;
use super::parallel::for_each_index;
use super::rows::Rows;

/// Columns of K per decoded tile: the activation slice the micro-kernel packs per call
/// (batch x KC) stays small next to the tile it multiplies.
const KC: usize = 256;
/// Most rows per tile.
const MAX_TILE_ROWS: usize = 128;
/// Rows up to this wide are decoded whole by either micro-kernel (a 128-row tile of them
/// fits [`TILE_VALUES`]); wider ones only by the dot-product kernel.
const NARROW_K: usize = 1024;
/// Most decoded values per tile (512 KiB of f32, this machine's L2): wide rows get fewer rows
/// per tile instead of being cut into K slices.
const TILE_VALUES: usize = 128 * 1024;
/// Rows up to this wide are decoded whole (at least 8 rows of them fit `TILE_VALUES`); wider
/// ones in K slices. Slices cost every tile a partial-sum pass per slice: same-process A/B
/// (`examples/ab_tile_decode slices`) timed whole rows at 0.57-0.80x the time of 256-wide
/// slices at batches 12-32 on 576x1536, 4096x4096, 2560x9728 and 11008x4096 (dot-product
/// kernel; the `gemm` crate keeps slices).
pub const UNSLICED_MAX_K: usize = 16 * 1024;

static UNSLICED: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(UNSLICED_MAX_K);

/// Sets the widest rows decoded whole (default [`UNSLICED_MAX_K`]), for same-process A/B
/// measurements.
pub fn set_unsliced_max_k(k: usize) {
    UNSLICED.store(k, std::sync::atomic::Ordering::Relaxed);
}

/// Largest batch for the dot-product micro-kernel (its 3 x 4 blocks: 3 activation rows by 4
/// tile rows). Same-process A/B against the `gemm` crate's packed kernel
/// (`examples/ab_tile_decode dotN`, NVFP4 unless noted): 0.78-0.86x the time at batches 48-64
/// on 1536x576, 576x576 and 49152x576 (NF4 0.81-0.83x), 0.82-0.91x at 96-128 on 1536x576 and
/// 576x1536, 0.88x / 1.00x on 4096x4096 at 96 / 128; from 192 on mixed (0.90-1.02x). With 3 x 3
/// blocks it had been mixed from 64 over 576-wide rows.
pub const DOT_MAX_BATCH: usize = 128;

/// Largest batch for the dot-product micro-kernel on AVX-512 hosts (16-wide blocks) over rows
/// up to [`DOT_WIDE_MAX_K`] wide. Same-process A/B against the `gemm` crate (`ab_tile_decode
/// dot512`, NF4, 2-core Xeon): 0.70-0.89x the time at batches 192 and 256 on 960x576, 3072x576
/// and 576x1536; at 384 0.84x / 1.05x on 960x576 / 576x1536, at 512 0.97-0.99x; on 4096x4096
/// already 1.30x at 160 (so wider rows keep [`DOT_MAX_BATCH`]).
pub const DOT_WIDE_MAX_BATCH: usize = 256;

/// Widest rows for [`DOT_WIDE_MAX_BATCH`].
pub const DOT_WIDE_MAX_K: usize = 2048;

static DOT_MAX: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Sets the largest batch of the dot-product micro-kernel (0: [`DOT_MAX_BATCH`]), for
/// same-process A/B measurements. No effect without AVX2.
pub fn set_dot_max_batch(batch: usize) {
    DOT_MAX.store(batch, std::sync::atomic::Ordering::Relaxed);
}

/// `Q4_TILE_GEMM_CRATE=1`: the `gemm` crate's micro-kernel even where q4's AVX2 one runs (for
/// same-binary comparisons).
#[cfg(target_arch = "x86_64")]
static USE_GEMM_CRATE: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| std::env::var_os("Q4_TILE_GEMM_CRATE").is_some_and(|v| v != "0"));

/// Whether `batch` activation rows of rows `k` wide use q4's dot-product micro-kernel (AVX2
/// hosts, up to [`DOT_MAX_BATCH`], on AVX-512 hosts up to [`DOT_WIDE_MAX_BATCH`] for rows up to
/// [`DOT_WIDE_MAX_K`]: no packing of the tile, rows up to [`UNSLICED_MAX_K`] wide decoded
/// whole); larger batches, and other hosts, use the `gemm` crate's.
pub(super) fn dot_kernel(batch: usize, k: usize) -> bool {
    let max = match DOT_MAX.load(std::sync::atomic::Ordering::Relaxed) {
        #[cfg(target_arch = "x86_64")]
        0 if k <= DOT_WIDE_MAX_K && super::avx512::usable() => DOT_WIDE_MAX_BATCH,
        0 => DOT_MAX_BATCH,
        set => set,
    };
    #[cfg(target_arch = "x86_64")]
    return batch <= max && super::x86::available() && !*USE_GEMM_CRATE;
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (batch, max, k);
        false
    }
}

/// Smallest batch the AMX tile GEMM takes: every tiled batch. Same-process A/B against the AVX2
/// kernels (`examples/ab_tile_decode amx`, NVFP4, 2-core Xeon with AMX, tiles decoded straight
/// to bf16): AMX / AVX2 time 0.85-0.99x at batch 9, 0.74-0.91x at 12, 0.55-0.74x at 16 and
/// 0.44-0.71x at 32 on 4096x4096, 11008x4096, 1536x576, 576x1536 and 576x576. (With tiles
/// decoded to f32 and packed, the 576-row weights had lost up to batch 32.)
#[cfg(target_arch = "x86_64")]
pub const AMX_MIN_BATCH: usize = super::GEMV_MAX_BATCH + 1;

thread_local! {
    static TILE: RefCell<AlignedBuf<f32>> = const { RefCell::new(AlignedBuf::new()) };
}

/// `y[m, n] = sum_k x[m, k] W[n, k]` for `batch > 8`.
pub fn matmul(w: &Rows<'_>, x: &[f32], batch: usize, y: &mut [f32]) {
    // Where the GEMV's SIMD decode applies, tiles are decoded in that kernel's chunk order
    // (half the decode instructions of element order) and the activations permuted once to
    // match, so the dot products see the same pairs: the AVX-512F decoder where present, else
    // the AVX2 one.
    #[cfg(target_arch = "x86_64")]
    if let Some(dec) = super::avx512::TileDecoder::new(w).filter(|_| super::chunk_order_tiles()) {
        let mut xp = AlignedBuf::new();
        let xp = xp.slice(x.len());
        super::avx512::permute_activations(x, w.k, w.high_first, xp);
        if super::lanes::applies(w, batch) {
            let (lanes, k, n) = (super::lanes::lanes_rows(batch), w.k, w.n);
            super::lanes::matmul(w, &xp[..lanes * k], lanes, &mut y[..lanes * n]);
            if lanes < batch {
                super::gemv::matmul(w, &x[lanes * k..], batch - lanes, &mut y[lanes * n..]);
            }
            return;
        }
        return matmul_decoded(w.n, w.k, |r, k0, out| dec.decode(r, k0, out), xp, batch, y);
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(dec) = super::x86::ChunkDecoder::new(w).filter(|_| super::chunk_order_tiles()) {
        let mut xp = AlignedBuf::new();
        let xp = xp.slice(x.len());
        super::x86::permute_activations(x, w.k, w.high_first, xp);
        return matmul_decoded(w.n, w.k, |r, k0, out| dec.decode(r, k0, out), xp, batch, y);
    }
    matmul_decoded(
        w.n,
        w.k,
        |r, k0, out| w.decode_range(r, k0, out),
        x,
        batch,
        y,
    )
}

/// The tiled GEMM over any weight whose row pieces `decode(r, k0, out)` can write as f32
/// (`out.len()` columns starting at `k0`).
pub fn matmul_decoded<D: Fn(usize, usize, &mut [f32]) + Sync + Send>(
    n: usize,
    k: usize,
    decode: D,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
) {
    let threads = rayon::current_num_threads();
    let simd = dot_kernel(batch, k);
    // For the dot-product kernel, rows up to UNSLICED wide are decoded whole; otherwise (and
    // for the `gemm` crate, which blocks K itself: whole 4096-wide rows cost it 14-23% at batch
    // 64) in equal slices (in whole 64-column steps) rather than a short last one: every slice
    // starts on a 64-chunk, as the chunk-order decode needs.
    let kc = if k <= NARROW_K || (simd && k <= UNSLICED.load(std::sync::atomic::Ordering::Relaxed))
    {
        k
    } else {
        k.div_ceil(k.div_ceil(KC)).next_multiple_of(64).min(k)
    };
    // Tall enough tiles that the micro-kernel's per-call costs stay small, at most
    // TILE_VALUES decoded values (at least 8 rows), and enough tiles for every thread to get
    // several.
    let tile_rows = (n.div_ceil(4 * threads))
        .next_multiple_of(8)
        .clamp(8, MAX_TILE_ROWS)
        .min((TILE_VALUES / kc / 8 * 8).max(8))
        .min(n);
    let tiles = n.div_ceil(tile_rows);
    // Each tile writes its own columns r0..r0+rows of every output row of `y` straight away
    // (no transposed staging buffer); the pointer crosses threads as an address.
    let y_addr = y.as_mut_ptr() as usize;
    debug_assert_eq!(y.len(), batch * n);
    for_each_index(tiles, n * k * batch / 8, |t| {
        TILE.with_borrow_mut(|tile| {
            // One tile buffer per thread, kept across calls: repeated forwards allocate nothing
            // weight-sized. Aligned, so that no vector load of it straddles two lines.
            let tile = tile.slice(tile_rows * kc);
            let r0 = t * tile_rows;
            let rows = tile_rows.min(n - r0);
            let mut k0 = 0;
            while k0 < k {
                let w = kc.min(k - k0);
                for r in 0..rows {
                    decode(r0 + r, k0, &mut tile[r * w..(r + 1) * w]);
                }
                // SAFETY (both arms): plain f32 GEMM on valid buffers. dst is the batch x rows
                // block of `y` at column r0 (element (m, j) at m * n + r0 + j): in bounds, and
                // disjoint from every other tile's block, so concurrent tiles never write the
                // same element. lhs is the batch x w slice of `x` at column k0 (row stride k);
                // rhs is the tile viewed as w x rows (element (kk, j) at j * w + kk); all in
                // bounds. The AVX2 arm runs only where `x86::available()` says AVX2+FMA exist.
                #[cfg(target_arch = "x86_64")]
                if simd {
                    unsafe {
                        super::x86::tile_gemm(
                            x.as_ptr().add(k0),
                            k,
                            &tile[..rows * w],
                            w,
                            rows,
                            batch,
                            (y_addr as *mut f32).add(r0),
                            n,
                            k0 > 0,
                        );
                    }
                    k0 += w;
                    continue;
                }
                unsafe {
                    gemm::gemm(
                        batch,
                        rows,
                        w,
                        (y_addr as *mut f32).add(r0),
                        1,
                        n as isize,
                        k0 > 0,
                        x.as_ptr().add(k0),
                        1,
                        k as isize,
                        tile.as_ptr(),
                        w as isize,
                        1,
                        1.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                k0 += w;
            }
        })
    });
}
