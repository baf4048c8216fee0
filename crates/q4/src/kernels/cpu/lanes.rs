//! Batches of 10 rows and more on AVX-512 hosts (over rows from [`MIN_K`] wide, or larger
//! batches over narrower ones; see [`applies`]): the activation rows lie in the vector lanes.
//!
//! The dot-product micro-kernel (`x86::tile_gemm`) loads a vector of decoded weights
//! and one of activations for every pair of FMAs and reduces across lanes at the end. Over
//! 4096-wide rows neither its decoded tile (up to 512 KiB) nor its activation rows stay in L1,
//! so its loads come from L2, and at batch 16 it ran at about a third of the two cores' FMA
//! rate. Here the activations are transposed once per call (`xt[k][m]`, the batch padded to
//! whole vectors of 16 rows) and each decoded weight is broadcast from memory into one FMA per
//! vector of activation rows: `acc[j][v] += W[j, k] * xt[k][v]`. A group of `NG` weight rows
//! keeps its `NG x MV` accumulators in registers over the whole K slice; per 64-column chunk its
//! rows are decoded (the GEMV's decode, scaled) into a few KiB of scratch that the FMAs read
//! back at once from L1. Each weight is read from memory once per call and nothing
//! weight-sized is written.

use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::atomic::Ordering;

use super::aligned::AlignedBuf;
use super::avx512::{chunk_scales, decode64, scale_chunk, CHUNK};
use super::parallel::for_each_index;
use super::rows::{Rows, Scales};

/// Activation rows per vector.
const LANES: usize = 16;

/// Most activation rows per pass over the weights (four vectors of them); larger batches take
/// several passes.
pub const PASS_ROWS: usize = 64;

/// Narrowest rows this kernel takes. Same-process A/B against the dot-product micro-kernel
/// (`examples/ab_tile_decode lanes`, NVFP4, cache-cold, 2-core Xeon without AMX), time ratio at
/// batches 12-64: 0.63-0.74x on 4096- and 8192-wide rows, 0.72-0.92x at 2560, 0.87-0.89x at
/// 3072, mixed at 2048 (0.93-1.02x); at 576-1536 the dot kernel's operands stay in cache and it
/// wins (lanes 1.0-1.6x the time).
pub const MIN_K: usize = 2560;

/// Smallest batch this kernel takes: at 9 rows seven of sixteen lanes idle (1.03-1.17x the
/// dot kernel's time at K >= 2560; 10-11 rows 0.90-0.92x).
pub const MIN_BATCH: usize = 10;

/// Largest batch this kernel takes: every batch. Same-process A/B (`ab_tile_decode lanesN`,
/// NVFP4 unless noted; `scripts/cpu/results/ab-lanes-large-batches-2026-11-28-s24.txt`) against
/// the dot-product kernel (up to 128 rows, 256 over rows up to 2048 wide) and the `gemm` crate's
/// packed kernel above it, time ratio: 0.54-0.77x at batches 96-2048 on 4096x4096, 11008x4096
/// and 2560x2560 (NF4 0.54-0.81x at 128-512); over rows of 576-1536, where the `gemm` crate
/// runs (from 384 rows), 0.65-0.87x.
pub const MAX_BATCH: usize = usize::MAX;

/// Rows from this wide take the kernel from [`WIDE_MIN_BATCH`] rows even below [`MIN_K`]:
/// 2048x2048 and 2048x5632 0.50-0.87x at batches 96-1024, but 0.76-1.03x at 16-64.
pub const WIDE_MIN_K: usize = 2048;

/// See [`WIDE_MIN_K`].
pub const WIDE_MIN_BATCH: usize = 96;

/// Most bytes of transposed activations per K slice: wider rows are cut into slices whose
/// partial sums are added into the output.
const XT_MAX_BYTES: usize = 1 << 20;

/// Bytes ahead along each row that the group prefetches (eight chunks): the rows of a group
/// are read side by side, so the GEMV's distance (the next rows) would fetch lines this group
/// already reads. 256 and 1024 measured alike, 2048 slower (one run each, separate processes,
/// at batches 16 and 64 on 4096x4096, through a knob since removed).
const AHEAD: usize = 256;

/// Most activation rows past a multiple of 16 (above 16) that go to the GEMV instead of a
/// mostly idle vector of lanes. Same A/B as [`MIN_K`] on 4096x4096 and 2560x2560: 17 rows as 32
/// lanes took 1.12-1.14x the dot kernel's time, as 16 lanes plus a GEMV row 0.83x; 20 rows
/// 0.81-0.84x split; 21 rows 0.89-0.93x split against 0.99-1.07x padded; 24 rows 0.93-0.97x
/// split against 0.89x padded.
pub const GEMV_REMAINDER: usize = 5;

static SWITCH: super::switch::Switch = super::switch::Switch::new("Q4_LANES");

/// Turns the kernel on or off for the whole process (for same-process A/B measurements; off,
/// these batches take the dot-product micro-kernel).
#[doc(hidden)]
pub fn set_enabled(on: bool) {
    SWITCH.set(on);
}

static MINK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(MIN_K);

/// Sets the narrowest rows this kernel takes (default [`MIN_K`]), for same-process A/B
/// measurements.
#[doc(hidden)]
pub fn set_min_k(k: usize) {
    MINK.store(k, Ordering::Relaxed);
}

static MAX: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(MAX_BATCH);

/// Sets the largest batch this kernel takes (default [`MAX_BATCH`]), for same-process A/B
/// measurements.
#[doc(hidden)]
pub fn set_max_batch(batch: usize) {
    MAX.store(batch, Ordering::Relaxed);
}

/// Whether AVX-512F and the GEMV's decode geometry (`simd_fits`) let this kernel run on `w`.
pub fn fits(w: &Rows<'_>) -> bool {
    super::avx512::TileDecoder::new(w).is_some()
}

/// Whether this host runs the kernel at all: AVX-512F, and not turned off by `Q4_LANES=0` or
/// [`set_enabled`].
pub fn host_usable() -> bool {
    SWITCH.on() && super::avx512::usable()
}

/// Whether `batch` activation rows over `w` take this kernel (for [`lanes_rows`] of them; never
/// with `Q4_LANES=0` or after [`set_enabled`]`(false)`): from
/// [`MIN_BATCH`] rows over rows from [`MIN_K`] wide, from [`WIDE_MIN_BATCH`] over rows from
/// [`WIDE_MIN_K`], and every batch the dot-product kernel does not take (there it replaces the
/// `gemm` crate).
pub fn applies(w: &Rows<'_>, batch: usize) -> bool {
    host_usable()
        && (MIN_BATCH..=MAX.load(Ordering::Relaxed)).contains(&batch)
        && (w.k >= MINK.load(Ordering::Relaxed)
            || (w.k >= WIDE_MIN_K && batch >= WIDE_MIN_BATCH)
            || !super::gemm::dot_kernel(batch, w.k))
        && fits(w)
}

/// How many of `batch` rows this kernel computes; the rest (at most [`GEMV_REMAINDER`]) go to
/// the GEMV.
pub fn lanes_rows(batch: usize) -> usize {
    let rest = batch % LANES;
    if batch > LANES && rest <= GEMV_REMAINDER {
        batch - rest
    } else {
        batch
    }
}

thread_local! {
    static XT: RefCell<AlignedBuf<f32>> = const { RefCell::new(AlignedBuf::new()) };
}

/// `y[m, n] = sum_k x[m, k] W[n, k]` with `xp` the activations permuted by
/// [`super::avx512::permute_activations`], for any batch where [`fits`] holds (passes of up to
/// [`PASS_ROWS`] rows).
pub fn matmul(w: &Rows<'_>, xp: &[f32], batch: usize, y: &mut [f32]) {
    let (k, n) = (w.k, w.n);
    let mut m0 = 0;
    while m0 < batch {
        let b = (batch - m0).min(PASS_ROWS);
        let (x, y) = (&xp[m0 * k..(m0 + b) * k], &mut y[m0 * n..(m0 + b) * n]);
        matmul_sliced(w, x, b, y, XT_MAX_BYTES);
        m0 += b;
    }
}

fn matmul_sliced(w: &Rows<'_>, xp: &[f32], batch: usize, y: &mut [f32], xt_max: usize) {
    assert!(
        fits(w) && (1..=PASS_ROWS).contains(&batch),
        "lanes::matmul outside its batches or geometry"
    );
    assert!(xp.len() == batch * w.k && y.len() == batch * w.n);
    // Groups of weight rows: as many accumulators as leave registers for the activation
    // vectors (32 zmm registers).
    match batch.div_ceil(LANES) {
        1 => run::<1, 28>(w, xp, batch, y, xt_max),
        2 => run::<2, 14>(w, xp, batch, y, xt_max),
        3 => run::<3, 9>(w, xp, batch, y, xt_max),
        _ => run::<4, 6>(w, xp, batch, y, xt_max),
    }
}

fn run<const MV: usize, const NG: usize>(
    w: &Rows<'_>,
    xp: &[f32],
    batch: usize,
    y: &mut [f32],
    xt_max: usize,
) {
    let (n, k) = (w.n, w.k);
    let width = MV * LANES;
    // Chunks of 64 columns, the last one possibly partial (decoded in element order and padded
    // with zeros, as are the activations).
    let chunks = k.div_ceil(CHUNK);
    let most = (xt_max / (CHUNK * width * 4)).max(1);
    let slices = chunks.div_ceil(most);
    let per_slice = chunks.div_ceil(slices);
    let groups = n.div_ceil(NG);
    let y_addr = y.as_mut_ptr() as usize;
    // Taken out of the thread's slot for the call: while this thread waits in the parallel loop
    // below, rayon may run another matmul on it, which then finds the slot empty and uses a
    // buffer of its own (a borrow held across the loop would panic).
    let mut buf = XT.take();
    {
        let xt = buf.slice(per_slice * CHUNK * width);
        for s in 0..slices {
            let (c0, c1) = (s * per_slice, ((s + 1) * per_slice).min(chunks));
            transpose(xp, k, batch, c0 * CHUNK, c1 * CHUNK, width, xt);
            let xt = &xt[..(c1 - c0) * CHUNK * width];
            for_each_index(groups, n * (c1 - c0) * CHUNK * batch / 8, |g| {
                let r0 = g * NG;
                let live = NG.min(n - r0);
                let mut sums = [[0f32; LANES]; 64];
                let sums = &mut sums[..NG * MV];
                // SAFETY: `fits` checked AVX-512F and the decode geometry; rows r0..r0+live
                // exist; chunks c0..c1 lie in the rows; `xt` holds (c1 - c0) * 64 columns of
                // `width` values and `sums` NG x MV vectors.
                unsafe { group_dispatch::<MV, NG>(w, xt, Span { r0, live, c0, c1 }, sums) };
                // Each group writes its own columns r0..r0+live of every output row (disjoint
                // from every other group's), along the row, gathering from the sums.
                for m in 0..batch {
                    // SAFETY: m < batch and r0 + live <= n: the `live` values from (m, r0) lie
                    // inside `y` (batch x n), and only this group writes them.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut((y_addr as *mut f32).add(m * n + r0), live)
                    };
                    let (v, l) = (m / LANES, m % LANES);
                    for (j, o) in out.iter_mut().enumerate() {
                        let sum = sums[j * MV + v][l];
                        *o = if s == 0 { sum } else { *o + sum };
                    }
                }
            });
        }
    }
    XT.set(buf);
}

/// `xt[(p - p0) * width + m] = xp[m * k + p]` for columns `p0..p1` (zero past `k` and for the
/// padding rows `batch..width`).
///
/// Column by column: each column's `width` values are written together (one or a few cache
/// lines) while the rows are read along. Row by row, with the buffer zeroed first, every store
/// went to another line of a buffer larger than L1 (`scripts/cpu/results/
/// ab-lanes-transpose-2026-11-28-s26.txt`: whole calls 0.94-0.99x the time at batches 16-64).
fn transpose(
    xp: &[f32],
    k: usize,
    batch: usize,
    p0: usize,
    p1: usize,
    width: usize,
    xt: &mut [f32],
) {
    let xt = &mut xt[..(p1 - p0) * width];
    let end = p1.min(k).max(p0);
    let (cols, past_k) = xt.split_at_mut((end - p0) * width);
    for (p, dst) in (p0..end).zip(cols.chunks_exact_mut(width)) {
        let (live, pad) = dst.split_at_mut(batch);
        for (d, row) in live.iter_mut().zip(xp.chunks_exact(k)) {
            *d = row[p];
        }
        pad.fill(0.0);
    }
    past_k.fill(0.0);
}

/// The part of the weight one [`group`] call covers: rows `r0..r0 + live` (of a group of `NG`;
/// the missing rows count as zeros) over chunks `c0..c1`.
#[derive(Clone, Copy)]
struct Span {
    r0: usize,
    live: usize,
    c0: usize,
    c1: usize,
}

/// [`group`] monomorphised for the weight's block class and scale storage.
///
/// # Safety
/// As for [`group`].
unsafe fn group_dispatch<const MV: usize, const NG: usize>(
    w: &Rows<'_>,
    xt: &[f32],
    span: Span,
    sums: &mut [[f32; LANES]],
) {
    super::rows::with_scales!(w, |BK, scales| group::<BK, _, MV, NG>(
        w, scales, xt, span, sums
    ))
}

/// Decoded weights of one chunk for a group: `[quarter][row][16 values]`, the four vectors the
/// decode produces per row stored a group apart, so that one quarter's broadcasts for all rows
/// are a fixed offset from one pointer.
#[repr(C, align(64))]
struct Scratch<const NG: usize>([[[f32; LANES]; NG]; 4]);

/// The span's rows times the transposed activations over its chunks: `sums[j * MV + v][l]` is
/// the sum for weight row `r0 + j` and activation row `16 v + l`.
///
/// # Safety
/// AVX-512F present; the GEMV's `simd_fits` geometry; rows `r0..r0 + live` exist, `live <= NG`;
/// chunks `c0..c1` lie in the rows (the last may be partial); `xt` holds `(c1 - c0) * 64`
/// columns of `MV * 16` values; `sums` holds `NG * MV` vectors.
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)]
unsafe fn group<const BK: u8, S: Scales, const MV: usize, const NG: usize>(
    w: &Rows<'_>,
    scales: S,
    xt: &[f32],
    span: Span,
    sums: &mut [[f32; LANES]],
) {
    let Span { r0, live, c0, c1 } = span;
    debug_assert!(live <= NG && r0 + live <= w.n && c1 * CHUNK < w.k + CHUNK);
    debug_assert!(xt.len() >= (c1 - c0) * CHUNK * MV * LANES && sums.len() >= NG * MV);
    let lut = _mm512_loadu_ps(w.lut.as_ptr());
    let shift = w.block.trailing_zeros();
    let whole = w.k / CHUNK;
    let prefetch = super::prefetch::enabled();
    let mut sc = Scratch::<NG>([[[0.0; LANES]; NG]; 4]);
    let mut acc = [[_mm512_setzero_ps(); MV]; NG];
    let xt = xt.as_ptr();
    for c in c0..c1 {
        for j in 0..live {
            let row = r0 + j;
            if c < whole {
                let codes = w.codes.as_ptr().add(row * w.row_bytes + c * CHUNK / 2);
                // The group reads its rows side by side: prefetch along each row, one line
                // (two chunks) at a time.
                if prefetch && c.is_multiple_of(2) {
                    super::prefetch::prefetch(codes.wrapping_add(AHEAD));
                    // A line of scales covers 16 chunks or more in every format.
                    if c.is_multiple_of(8) {
                        let col = c * CHUNK + 2 * AHEAD;
                        scales.prefetch(row * w.row_blocks + (col >> shift));
                    }
                }
                let (s01, s23) = chunk_scales::<BK, S>(&scales, row * w.row_blocks, c, shift);
                let v = scale_chunk(decode64(codes, lut), s01, s23);
                for (q, v) in v.iter().enumerate() {
                    _mm512_store_ps(sc.0[q][j].as_mut_ptr(), *v);
                }
            } else {
                // The columns after the last whole chunk, in element order, zero-padded.
                let mut t = [0f32; CHUNK];
                let len = w.k - whole * CHUNK;
                w.decode_range(row, whole * CHUNK, &mut t[..len]);
                for (q, piece) in t.chunks_exact(LANES).enumerate() {
                    sc.0[q][j].copy_from_slice(piece);
                }
            }
        }
        let mut xr = xt.add((c - c0) * CHUNK * MV * LANES);
        for q in 0..4 {
            let mut wp = sc.0[q].as_ptr() as *const f32;
            for _ in 0..LANES {
                let xv: [__m512; MV] = std::array::from_fn(|v| _mm512_load_ps(xr.add(v * LANES)));
                for j in 0..NG {
                    let wv = _mm512_set1_ps(*wp.add(j * LANES));
                    for v in 0..MV {
                        acc[j][v] = _mm512_fmadd_ps(wv, xv[v], acc[j][v]);
                    }
                }
                // An opaque step keeps the broadcasts on base + displacement addresses: LLVM
                // otherwise indexes them off the loop counter, and an FMA with an indexed
                // memory operand costs two issue slots (measured 0.6-0.8x the FMA rate).
                wp = std::hint::black_box(wp).add(1);
                xr = xr.add(MV * LANES);
            }
        }
    }
    for j in 0..NG {
        for v in 0..MV {
            _mm512_storeu_ps(sums[j * MV + v].as_mut_ptr(), acc[j][v]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Format, QTensor, QuantSpec};
    use candle_core::{Device, Tensor};

    fn random(rows: usize, cols: usize) -> Vec<f32> {
        Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// `got` (`batch x n`) equals the scalar decode of `rows` times `x`, summed in f64, to f32
    /// rounding of the products' magnitudes.
    fn assert_matches_reference(rows: &Rows<'_>, x: &[f32], batch: usize, got: &[f32], what: &str) {
        let (n, k) = (rows.n, rows.k);
        for m in 0..batch {
            for r in 0..n {
                let (mut want, mut mag) = (0f64, 0f64);
                for c in 0..k {
                    let p = rows.weight(r, c) as f64 * x[m * k + c] as f64;
                    want += p;
                    mag += p.abs();
                }
                let g = got[m * n + r] as f64;
                assert!(
                    (g - want).abs() <= 1e-6 * mag + 1e-30,
                    "{what}: y[{m},{r}] = {g} vs {want}"
                );
            }
        }
    }

    /// Every format (16-, 32- and 64-wide blocks, table and f32 scales, both nibble orders),
    /// batches of one to four vectors of rows with padding lanes, row counts that leave a
    /// partial group, K tails and K cut into slices: equal to the scalar decode times the
    /// activations, summed in f64, to f32 rounding.
    #[test]
    fn kernel_matches_the_scalar_reference() {
        if !super::super::avx512::usable() {
            return;
        }
        let dev = Device::Cpu;
        let mut ran = 0;
        for format in [Format::Nvfp4, Format::Mxfp4, Format::Nf4, Format::Fp4] {
            for (n, k) in [(29usize, 576usize), (6, 160), (45, 1024), (13, 64)] {
                let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
                let Ok(q) = QTensor::quantize(&w, &QuantSpec::new(format)) else {
                    continue;
                };
                let view = q.host_view().unwrap();
                let rows = Rows::new(&view);
                if !fits(&rows) {
                    continue;
                }
                ran += 1;
                for batch in [1, 9, 16, 17, 33, 50, 64] {
                    let x = random(batch, k);
                    let mut xp = vec![0f32; x.len()];
                    super::super::avx512::permute_activations(&x, k, rows.high_first, &mut xp);
                    // Whole rows in one slice, and slices of one or two chunks.
                    for xt_max in [XT_MAX_BYTES, 1, CHUNK * 64 * 4 * 2] {
                        let mut got = vec![f32::NAN; batch * n];
                        matmul_sliced(&rows, &xp, batch, &mut got, xt_max);
                        let what = format!("{format} {n}x{k} b{batch} slices {xt_max}");
                        assert_matches_reference(&rows, &x, batch, &got, &what);
                    }
                }
            }
        }
        // NVFP4 and MXFP4 at every shape, NF4 and FP4 where K holds whole 64-blocks.
        assert!(ran >= 12, "only {ran} cases ran");
    }

    /// Through the CPU matmul's dispatch: rows wide enough for this kernel, batches it takes
    /// whole, padded, and split with a GEMV remainder; NVFP4 and NF4.
    #[test]
    fn dispatch_with_gemv_remainders_matches_the_reference() {
        if !super::super::avx512::usable() {
            return;
        }
        let dev = Device::Cpu;
        let (n, k) = (37usize, MIN_K);
        for format in [Format::Nvfp4, Format::Nf4] {
            let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, &QuantSpec::new(format)).unwrap();
            let view = q.host_view().unwrap();
            let rows = Rows::new(&view);
            for batch in [10, 17, 21, 22, 36, 64, 100, 130] {
                assert!(applies(&rows, batch), "{format} b{batch}");
                let x = random(batch, k);
                let mut got = vec![f32::NAN; batch * n];
                super::super::matmul(&view, &x, batch, &mut got);
                assert_matches_reference(&rows, &x, batch, &got, &format!("{format} b{batch}"));
            }
        }
        // Narrow rows: only batches the dot-product kernel leaves to the `gemm` crate.
        let w = Tensor::randn(0f32, 0.05, (8, 576), &dev).unwrap();
        let q = QTensor::quantize(&w, &QuantSpec::new(Format::Nvfp4)).unwrap();
        let view = q.host_view().unwrap();
        let rows = Rows::new(&view);
        assert!(!applies(&rows, 64));
        assert!(applies(&rows, 4096));
        assert_eq!(lanes_rows(17), 16);
        assert_eq!(lanes_rows(21), 16);
        assert_eq!(lanes_rows(22), 22);
        assert_eq!(lanes_rows(16), 16);
        assert_eq!(lanes_rows(12), 12);
        assert_eq!(lanes_rows(37), 32);
    }

    /// Calls made concurrently on a pool's workers (whose waits may run other calls on the same
    /// thread) give what one call alone gives.
    #[test]
    fn concurrent_calls_on_pool_workers_agree() {
        if !super::super::avx512::usable() {
            return;
        }
        use rayon::prelude::*;
        let dev = Device::Cpu;
        let (n, k, batch) = (300usize, 1024usize, 16usize);
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
        let q = QTensor::quantize(&w, &QuantSpec::new(Format::Nvfp4)).unwrap();
        let view = q.host_view().unwrap();
        let rows = Rows::new(&view);
        let x = random(batch, k);
        let mut xp = vec![0f32; x.len()];
        super::super::avx512::permute_activations(&x, k, rows.high_first, &mut xp);
        let mut want = vec![0f32; batch * n];
        matmul(&rows, &xp, batch, &mut want);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let outs: Vec<Vec<f32>> = pool.install(|| {
            (0..256)
                .into_par_iter()
                .map(|_| {
                    let mut y = vec![0f32; batch * n];
                    matmul(&rows, &xp, batch, &mut y);
                    y
                })
                .collect()
        });
        for y in outs {
            assert_eq!(y, want);
        }
    }

    #[test]
    fn transpose_pads_rows_and_columns_with_zeros() {
        let (k, batch, width) = (5, 3, 16);
        let xp: Vec<f32> = (0..batch * k).map(|i| i as f32 + 1.0).collect();
        let mut xt = vec![f32::NAN; 4 * width];
        transpose(&xp, k, batch, 2, 6, width, &mut xt);
        for p in 2..6 {
            for m in 0..width {
                let want = if m < batch && p < k {
                    xp[m * k + p]
                } else {
                    0.0
                };
                assert_eq!(xt[(p - 2) * width + m], want, "p{p} m{m}");
            }
        }
    }
}
