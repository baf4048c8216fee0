//! AVX-512 micro-kernel of the fused 4-bit GEMV (batches 1-8), used where the CPU has AVX-512F.
//!
//! A 16-entry f32 codebook fits one zmm register, and `vpermps` looks up sixteen lanes at once
//! using only the low four bits of each index lane. So 16 code bytes zero-extended to sixteen
//! 32-bit lanes are already the indices of their low nibbles, and the same lanes shifted right by
//! four those of their high nibbles: 32 weights cost one extension, one shift and two permutes,
//! where the AVX2 kernel needs byte-plane lookups and six unpacks per 32 weights (its port-5
//! shuffles made it compute-bound at batch 1).
//!
//! A 64-weight chunk (32 bytes) decodes into four vectors: the low nibbles of bytes 0-15, their
//! high nibbles, then the same for bytes 16-31. The activations are permuted once per call to
//! that order ([`chunk_element`]). With 16-wide blocks lanes 0-7 of each vector belong to one
//! block and lanes 8-15 to the next, so products are summed per vector pair and scaled by a
//! vector holding the two blocks' scales. At batch 1 each row leaves a vector of partial sums,
//! and sixteen rows' vectors are reduced together (`sum16`): on 576-wide rows a reduction per
//! row had cost about as much as the row's decode.
//!
//! The same decode serves the tiled GEMM's tiles ([`TileDecoder`]); the int8 W8A8 GEMV behind
//! the int8 embedding / LM-head tables runs on AVX-512 VNNI here too ([`rows_w8a8`]).

use std::arch::x86_64::*;
use std::sync::LazyLock;

use super::rows::{Rows, Scales, BLOCK16, BLOCK32};

/// Weights per decode step (the AVX2 kernel's chunk, so the tails are the same).
pub const CHUNK: usize = 64;

static AVAILABLE: LazyLock<bool> = LazyLock::new(|| std::is_x86_feature_detected!("avx512f"));

static SWITCH: super::switch::Switch = super::switch::Switch::new("Q4_AVX512");

/// Whether the GEMV runs on this kernel here: AVX-512F present, not turned off by
/// `Q4_AVX512=0` or [`set_enabled`].
pub fn usable() -> bool {
    *AVAILABLE && SWITCH.on()
}

/// Turns the AVX-512 GEMV on or off (default on where available; off, the AVX2 kernel runs),
/// for same-process A/B measurements (`examples/ab_gemv_avx512`).
#[doc(hidden)]
pub fn set_enabled(on: bool) {
    SWITCH.set(on);
}

/// Position in the chunk of the weight that permuted slot `p` (0..64) holds. Slots 0-15: low
/// nibbles of bytes 0-15, 16-31: their high nibbles, 32-63: the same for bytes 16-31. The low
/// nibble holds a pair's first element unless `high_first` (bitsandbytes).
#[inline]
pub fn chunk_element(p: usize, high_first: bool) -> usize {
    let quarter = p / 16;
    let byte = (quarter / 2) * 16 + p % 16;
    let high_nibble = quarter % 2 == 1;
    2 * byte + usize::from(high_nibble != high_first)
}

/// Reorders activation rows (`batch x k`) into the order the kernel consumes weights: each full
/// 64-chunk is permuted by [`chunk_element`], the tail (k % 64) stays in place.
///
/// # Panics
/// If AVX-512F is absent (callers check [`usable`]).
/// `out` holds as many values as `x`.
pub fn permute_activations(x: &[f32], k: usize, high_first: bool, out: &mut [f32]) {
    assert!(*AVAILABLE, "AVX-512F required");
    assert_eq!(out.len(), x.len());
    // SAFETY: AVX-512F is present (asserted); `out` holds as many values as `x`, a multiple of k.
    unsafe { permute_avx512(x, k, high_first, out) };
}

/// [`permute_activations`] in registers: the even and the odd elements of each 32 values are
/// two two-source permutes.
///
/// # Safety
/// AVX-512F present; `out.len() == x.len()`, a multiple of `k`.
#[target_feature(enable = "avx512f")]
unsafe fn permute_avx512(x: &[f32], k: usize, high_first: bool, out: &mut [f32]) {
    debug_assert!(out.len() == x.len() && x.len().is_multiple_of(k));
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    let (low, high) = if high_first { (odd, even) } else { (even, odd) };
    let full = k / CHUNK * CHUNK;
    for (src, dst) in x.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        for c in (0..full).step_by(32) {
            let (s, d) = (src.as_ptr().add(c), dst.as_mut_ptr().add(c));
            let a = _mm512_loadu_ps(s);
            let b = _mm512_loadu_ps(s.add(16));
            _mm512_storeu_ps(d, _mm512_permutex2var_ps(a, low, b));
            _mm512_storeu_ps(d.add(16), _mm512_permutex2var_ps(a, high, b));
        }
        dst[full..].copy_from_slice(&src[full..]);
    }
}

/// Decodes the 64 weights at `p` into four vectors in [`chunk_element`] order (unscaled).
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn decode64(p: *const u8, lut: __m512) -> [__m512; 4] {
    let b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
    let b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(16) as *const __m128i));
    [
        _mm512_permutexvar_ps(b0, lut),
        _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(b0), lut),
        _mm512_permutexvar_ps(b1, lut),
        _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(b1), lut),
    ]
}

/// The four decoded vectors of a chunk times their scales ([`chunk_scales`]: `s01` for vectors
/// 0-1, `s23` for 2-3).
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn scale_chunk(v: [__m512; 4], s01: __m512, s23: __m512) -> [__m512; 4] {
    [
        _mm512_mul_ps(v[0], s01),
        _mm512_mul_ps(v[1], s01),
        _mm512_mul_ps(v[2], s23),
        _mm512_mul_ps(v[3], s23),
    ]
}

/// A decoded chunk's products with its 64 permuted activations at `x`, each block pair (vectors
/// 0-1, 2-3) summed unscaled, to be scaled once by [`chunk_scales`]' two vectors.
///
/// # Safety
/// AVX-512F present; `x` valid for 64 values.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn pair_products(v: [__m512; 4], x: *const f32) -> (__m512, __m512) {
    let p01 = _mm512_fmadd_ps(
        v[1],
        _mm512_loadu_ps(x.add(16)),
        _mm512_mul_ps(v[0], _mm512_loadu_ps(x)),
    );
    let p23 = _mm512_fmadd_ps(
        v[3],
        _mm512_loadu_ps(x.add(48)),
        _mm512_mul_ps(v[2], _mm512_loadu_ps(x.add(32))),
    );
    (p01, p23)
}

/// Scales of chunk `c` of a row whose scales start at `base`: one vector for decoded vectors
/// 0-1 (weights 0-31) and one for 2-3 (weights 32-63). With 16-wide blocks each is
/// `[s(first block) x8 | s(second block) x8]`.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn chunk_scales<const BK: u8, S: Scales>(
    s: &S,
    base: usize,
    c: usize,
    shift: u32,
) -> (__m512, __m512) {
    // Broadcasts from memory and a blend: no port-5 shuffle (the decode's permutes use it).
    let halves =
        |a: f32, b: f32| _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(a), _mm512_set1_ps(b));
    match BK {
        BLOCK16 => {
            let i = base + 4 * c;
            (
                halves(s.at(i), s.at(i + 1)),
                halves(s.at(i + 2), s.at(i + 3)),
            )
        }
        BLOCK32 => {
            let i = base + 2 * c;
            (_mm512_set1_ps(s.at(i)), _mm512_set1_ps(s.at(i + 1)))
        }
        _ => {
            let v = _mm512_set1_ps(s.at(base + ((c * CHUNK) >> shift)));
            (v, v)
        }
    }
}

/// How many times its L1 distance ahead a pass of the GEMV (this kernel at batches 2-8, and
/// [`super::avx512_groups`] at batch 1) also prefetches its weight stream into L2: `prefetcht1`
/// can keep more lines in flight than L1's miss buffers, so each thread's stream runs nearer the
/// memory's rate. Same-process A/B, cache-cold, two threads, on a Zen 5 host, NVFP4 / NF4 /
/// MXFP4 (`scripts/cpu/results/ab-gemv-l2-prefetch*-2026-11-28-s31.txt`): batch 1 4096x4096
/// 0.78-0.88x the time, 11008x4096 0.77-0.86x, 576x1536 0.89-0.96x, 49152x576 0.94-0.97x,
/// 2048x8192 0.98-0.99x, 1536x576 0.99-1.02x; batches 2-8 on 4096-wide rows 0.58-0.99x (one
/// disturbed round 1.07-1.20x), on 576-wide rows 0.95-1.04x. The L2 prefetch in place of the
/// L1 one (not beside it) was 1.06-1.2x slower on the 576-wide rows.
const L2_AHEAD_FACTOR: usize = 3;

/// Bytes ahead of a code being read to the line prefetched into L2 only, for an L1 prefetch
/// `ahead` bytes ahead: [`L2_AHEAD_FACTOR`] times that.
pub(super) fn l2_distance(ahead: usize) -> usize {
    L2_AHEAD_FACTOR * ahead
}

/// Where a pass of the kernel reads next, for the software prefetch.
#[derive(Clone, Copy)]
pub(super) struct Pass {
    /// Chunks `c0..c1` of each row.
    pub c0: usize,
    pub c1: usize,
    /// Bytes from a code being read to the one to prefetch: [`PREFETCH_AHEAD`] along the row
    /// when a pass reads whole rows, the next pass's rows when it reads a K slice.
    ///
    /// [`PREFETCH_AHEAD`]: super::prefetch::PREFETCH_AHEAD
    pub ahead: usize,
    /// Whether the weight stream is also prefetched into L2 only, [`Pass::l2_ahead`] bytes
    /// ahead ([`super::prefetch::prefetch_l2`]).
    pub l2: bool,
}

impl Pass {
    /// Bytes ahead of a code being read to the line prefetched into L2 only: [`L2_AHEAD_FACTOR`]
    /// times `ahead`, or 0 for none.
    #[inline(always)]
    pub fn l2_ahead(&self) -> usize {
        if self.l2 {
            l2_distance(self.ahead)
        } else {
            0
        }
    }
}

/// The lanes of `sum_k W[row0 + r, k] * x[m, k]` over chunks `pass.c0..pass.c1` of each of `R`
/// rows, as `[r][m]` vectors whose lanes sum to it. `xp` holds the activations permuted by
/// [`permute_activations`]. `PF`: whether the weight stream is prefetched (the caller reads
/// [`super::prefetch::enabled`] once, so that the chunk loop tests nothing for it: same-process
/// A/B, `scripts/cpu/results/ab-prefetch-flag-hoisted-2026-11-28-s27.txt`, 0.97-1.0x the time
/// warm on one thread, 0.98-1.0x cache-cold on two except one 1.02x point).
///
/// # Safety
/// AVX-512F present; `w.aligned` with `w.block` a multiple of 16 (and of 64, or dividing 64);
/// rows `row0..row0 + R` exist; the chunks lie inside the rows; `xp` holds `B` rows of `w.k`
/// values.
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::needless_range_loop)] // register blocking reads clearer with indices
unsafe fn rows_acc<const R: usize, const B: usize, const BK: u8, const PF: bool, S: Scales>(
    w: &Rows<'_>,
    scales: &S,
    lut: __m512,
    xp: &[f32],
    row0: usize,
    pass: Pass,
) -> [[__m512; B]; R] {
    debug_assert!(
        w.aligned
            && w.block.is_multiple_of(16)
            && row0 + R <= w.n
            && pass.c1 * CHUNK <= w.k
            && xp.len() >= B * w.k
    );
    let xptr = xp.as_ptr();
    let cp = w.codes.as_ptr();
    let shift = w.block.trailing_zeros();
    // Weights per block: 16, 32 or (BLOCK64 and up) at least 64.
    let per_block = match BK {
        BLOCK16 => 16,
        BLOCK32 => 32,
        _ => 64,
    };
    // Two accumulators per output at batch 1 (the two halves of a chunk) keep the FMA chains short.
    let mut acc = [[_mm512_setzero_ps(); B]; R];
    let mut acc2 = [_mm512_setzero_ps(); R];
    for c in pass.c0..pass.c1 {
        let col = c * CHUNK;
        for r in 0..R {
            let row = row0 + r;
            let codes = cp.add(row * w.row_bytes + col / 2);
            if PF {
                // One code line per chunk, one scale line every eight chunks. Any address is
                // allowed: a prefetch never faults.
                if pass.l2 {
                    super::prefetch::prefetch_l2(codes.wrapping_add(pass.l2_ahead()));
                }
                super::prefetch::prefetch(codes.wrapping_add(pass.ahead));
                if c.is_multiple_of(8) {
                    scales.prefetch(row * w.row_blocks + (col + 2 * pass.ahead) / per_block);
                }
            }
            let (s01, s23) = chunk_scales::<BK, S>(scales, row * w.row_blocks, c, shift);
            let v = decode64(codes, lut);
            if B == 1 {
                let (p01, p23) = pair_products(v, xptr.add(col));
                acc[r][0] = _mm512_fmadd_ps(p01, s01, acc[r][0]);
                acc2[r] = _mm512_fmadd_ps(p23, s23, acc2[r]);
            } else {
                // Several activation rows: scale the weights once, reuse them B times.
                let ws = scale_chunk(v, s01, s23);
                for m in 0..B {
                    let x = xptr.add(m * w.k + col);
                    for (t, wt) in ws.iter().enumerate() {
                        acc[r][m] = _mm512_fmadd_ps(*wt, _mm512_loadu_ps(x.add(16 * t)), acc[r][m]);
                    }
                }
            }
        }
    }
    if B == 1 {
        for r in 0..R {
            acc[r][0] = _mm512_add_ps(acc[r][0], acc2[r]);
        }
    }
    acc
}

/// [`rows_acc`] with the prefetch switch `prefetch` (read once by the caller) as its `PF`.
///
/// # Safety
/// As for [`rows_acc`].
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn rows_acc_pf<const R: usize, const B: usize, const BK: u8, S: Scales>(
    prefetch: bool,
    w: &Rows<'_>,
    scales: &S,
    lut: __m512,
    xp: &[f32],
    row0: usize,
    pass: Pass,
) -> [[__m512; B]; R] {
    if prefetch {
        rows_acc::<R, B, BK, true, S>(w, scales, lut, xp, row0, pass)
    } else {
        rows_acc::<R, B, BK, false, S>(w, scales, lut, xp, row0, pass)
    }
}

/// [`rows_acc`] added to `out[r * B + m]`, each output reduced on its own.
///
/// # Safety
/// As for [`rows_acc`], and `out` holds `R * B` values.
#[target_feature(enable = "avx512f")]
unsafe fn rows_kernel<const R: usize, const B: usize, const BK: u8, S: Scales>(
    w: &Rows<'_>,
    scales: S,
    lut: __m512,
    xp: &[f32],
    row0: usize,
    pass: Pass,
    out: &mut [f32],
) {
    debug_assert!(out.len() >= R * B);
    let acc =
        rows_acc_pf::<R, B, BK, S>(super::prefetch::enabled(), w, &scales, lut, xp, row0, pass);
    for (r, row) in acc.iter().enumerate() {
        for (m, v) in row.iter().enumerate() {
            *out.get_unchecked_mut(r * B + m) += _mm512_reduce_add_ps(*v);
        }
    }
}

/// Where [`sum16`] leaves the sum of its input `i`: lane `SUM16_LANE[i]` (an involution).
const SUM16_LANE: [usize; 16] = [0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15];

/// The lane sums of sixteen vectors in one vector, the sum of `v[i]` in lane [`SUM16_LANE`]`[i]`:
/// 15 adds and 30 shuffles for all sixteen, where one reduction alone is a chain of eight
/// dependent operations (with rows of 576 values, that chain cost as much as the row's decode).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn sum16(v: &[__m512; 16]) -> __m512 {
    let halves = |a: __m512, b: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0xEE>(a, b),
        )
    };
    let w: [__m512; 8] = std::array::from_fn(|i| halves(v[i], v[i + 8]));
    let quarters = |a: __m512, b: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
        )
    };
    let u: [__m512; 4] = std::array::from_fn(|i| quarters(w[i], w[i + 4]));
    let pairs = |a: __m512, b: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(a, b),
            _mm512_shuffle_ps::<0xEE>(a, b),
        )
    };
    let t = [pairs(u[0], u[2]), pairs(u[1], u[3])];
    _mm512_add_ps(
        _mm512_shuffle_ps::<0x88>(t[0], t[1]),
        _mm512_shuffle_ps::<0xDD>(t[0], t[1]),
    )
}

/// The lane sums of `row(0)`, ..., `row(15)` in order in one vector ([`sum16`] with each row's
/// vector placed where its sum lands in lane `r`: [`SUM16_LANE`] is an involution).
///
/// # Safety
/// AVX-512F present.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn sum16_rows(mut row: impl FnMut(usize) -> __m512) -> __m512 {
    let mut v = [_mm512_setzero_ps(); 16];
    for (r, &lane) in SUM16_LANE.iter().enumerate() {
        v[lane] = row(r);
    }
    sum16(&v)
}

/// The lane sums of sixteen rows' vectors in order in one vector, the rows produced two at a
/// time by `pair(p)` (rows `2p`, `2p + 1`).
///
/// # Safety
/// AVX-512F present.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn sum16_rows_pairs(mut pair: impl FnMut(usize) -> [__m512; 2]) -> __m512 {
    let mut v = [_mm512_setzero_ps(); 16];
    for p in 0..8 {
        let [a, b] = pair(p);
        // Each row's vector where `sum16` leaves its sum in lane `r`.
        v[SUM16_LANE[2 * p]] = a;
        v[SUM16_LANE[2 * p + 1]] = b;
    }
    sum16(&v)
}

/// Batch 1, sixteen rows from `row0`: their vectors from [`rows_acc`], two rows at a time, then
/// all sixteen reduced together by [`sum16`] and added to `out[0..16]`.
///
/// Two rows per chunk loop give the core two independent decode streams and half the loop exits
/// per row; their prefetch then reaches two rows ahead (one row ahead lands in the pair's own
/// second row: 4096-wide rows ran 1.5x slower). Same-process A/B against one row at a time,
/// cache-cold, 2 threads (`scripts/cpu/results/ab-gemv-row-pairs-2026-11-28-s26.txt`): 0.88-0.99x
/// the time on 576- to 8192-wide rows (NF4 0.88-0.96x, NVFP4 0.95-0.99x), 576x1536 NVFP4
/// 1.01-1.03x.
///
/// # Safety
/// As for [`rows_acc`] with `R = 2`, `B = 1` over rows `row0..row0 + 16`; `out` holds 16 values.
#[target_feature(enable = "avx512f")]
unsafe fn rows16_batch1<const BK: u8, S: Scales>(
    w: &Rows<'_>,
    scales: S,
    lut: __m512,
    xp: &[f32],
    row0: usize,
    pass: Pass,
    out: &mut [f32],
) {
    debug_assert!(out.len() >= 16);
    let pass = Pass {
        ahead: pass.ahead.max(2 * w.row_bytes),
        ..pass
    };
    let prefetch = super::prefetch::enabled();
    let sums = sum16_rows_pairs(|p| {
        let pair = rows_acc_pf::<2, 1, BK, S>(prefetch, w, &scales, lut, xp, row0 + 2 * p, pass);
        [pair[0][0], pair[1][0]]
    });
    let o = out.as_mut_ptr();
    _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), sums));
}

/// The K slices of `slice` chunks (of `chunks` per row) that the kernels walk the rows in: a
/// pass over whole rows prefetches [`PREFETCH_AHEAD`] along them, one over a slice the rows
/// `pass_bytes` further on (those of its next call).
///
/// [`PREFETCH_AHEAD`]: super::prefetch::PREFETCH_AHEAD
pub(super) fn passes(chunks: usize, slice: usize, pass_bytes: usize) -> impl Iterator<Item = Pass> {
    (0..chunks).step_by(slice.max(1)).map(move |c0| {
        let c1 = (c0 + slice).min(chunks);
        Pass {
            c0,
            c1,
            ahead: if c1 - c0 == chunks {
                super::prefetch::PREFETCH_AHEAD
            } else {
                pass_bytes
            },
            l2: super::prefetch::l2_enabled(),
        }
    })
}

/// Activation bytes a K slice may span (all `B` rows together), so that they stay in L1 while
/// the slice's rows stream past: at batch 4 the whole rows of 4096 values (64 KiB) did not, and
/// the activation loads from L2 bounded the kernel.
pub(super) const SLICE_BYTES: usize = 16 << 10;

/// Computes weight rows `r0..r1` into `out` (`[row - r0][m]`) over their whole chunks: in K
/// slices whose activations fit L1, two rows at a time at batches 2-4 (they share each
/// activation load; at 5-8 two rows' accumulators spill registers).
///
/// # Safety
/// As for `rows_kernel`: AVX-512F present ([`usable`]), the GEMV's `simd_fits` geometry, rows
/// in range, `xp` holding `batch` (1-8) rows permuted by [`permute_activations`].
#[target_feature(enable = "avx512f")]
pub unsafe fn rows(w: &Rows<'_>, xp: &[f32], batch: usize, r0: usize, r1: usize, out: &mut [f32]) {
    let lut = _mm512_loadu_ps(w.lut.as_ptr());
    out[..(r1 - r0) * batch].fill(0.0);
    let chunks = w.k / CHUNK;
    let slice = (SLICE_BYTES / (4 * CHUNK * batch)).max(1);
    // Monomorphised for the scale storage and block class each format produces: `$f` is
    // called as `$f::<$($g)* BK, S>(w, scales, lut, xp, row, pass, out)`.
    macro_rules! call {
        ($f:ident, [$($g:tt)*], $row:expr, $pass:expr, $o:expr) => {{
            let (o, p, row) = ($o, $pass, $row);
            super::rows::with_scales!(w, |BK, scales| $f::<$($g)* BK, _>(w, scales, lut, xp, row, p, o))
        }};
    }
    macro_rules! run {
        ($r:literal, $b:literal) => {{
            for pass in passes(chunks, slice, $r * w.row_bytes) {
                let mut r = r0;
                if $b == 1 {
                    while r1 - r >= 16 {
                        call!(rows16_batch1, [], r, pass, &mut out[r - r0..]);
                        r += 16;
                    }
                }
                while r1 - r >= $r {
                    call!(rows_kernel, [$r, $b,], r, pass, &mut out[(r - r0) * $b..]);
                    r += $r;
                }
                while r < r1 {
                    call!(rows_kernel, [1, $b,], r, pass, &mut out[(r - r0) * $b..]);
                    r += 1;
                }
            }
        }};
    }
    match batch {
        1 => run!(1, 1),
        2 => run!(2, 2),
        3 => run!(2, 3),
        4 => run!(2, 4),
        5 => run!(1, 5),
        6 => run!(1, 6),
        7 => run!(1, 7),
        8 => run!(1, 8),
        _ => unreachable!("GEMV serves batches of 1-8"),
    }
}

/// Decodes weight rows for the tiled GEMM in this kernel's chunk order (activations permuted by
/// [`permute_activations`]), scaled by their blocks' scales: the AVX2 `ChunkDecoder`'s job
/// with a quarter of its shuffles per 64 weights.
pub struct TileDecoder<'a> {
    w: Rows<'a>,
}

impl<'a> TileDecoder<'a> {
    /// `None` unless [`usable`] and the rows fit the chunk kernel (the GEMV's `simd_fits`).
    pub fn new(w: &Rows<'a>) -> Option<TileDecoder<'a>> {
        (usable() && super::gemv::simd_fits(w)).then_some(TileDecoder { w: *w })
    }

    /// Decodes columns `k0 .. k0 + out.len()` of weight `row` (`k0` a multiple of 64): whole
    /// chunks in chunk order, then the columns after the row's last whole chunk in element
    /// order (where [`permute_activations`] leaves them).
    pub fn decode(&self, row: usize, k0: usize, out: &mut [f32]) {
        debug_assert!(k0.is_multiple_of(CHUNK) && k0 + out.len() <= self.w.k && row < self.w.n);
        // SAFETY: the constructor checked AVX-512F and the chunk geometry; `row` exists and the
        // column range lies inside it (asserted above, the caller's contract).
        let w = &self.w;
        let done = unsafe {
            super::rows::with_scales!(w, |BK, scales| self.chunks::<BK, _>(scales, row, k0, out))
        };
        if done < out.len() {
            self.w.decode_range(row, k0 + done, &mut out[done..]);
        }
    }

    /// The whole chunks of [`Self::decode`]; returns how many values it wrote.
    #[target_feature(enable = "avx512f")]
    unsafe fn chunks<const BK: u8, S: Scales>(
        &self,
        scales: S,
        row: usize,
        k0: usize,
        out: &mut [f32],
    ) -> usize {
        let w = &self.w;
        let lut = _mm512_loadu_ps(w.lut.as_ptr());
        let (c0, c1) = (k0 / CHUNK, (k0 + out.len()) / CHUNK);
        let shift = w.block.trailing_zeros();
        let base = row * w.row_blocks;
        let codes = w.codes.as_ptr().add(row * w.row_bytes);
        let dst = out.as_mut_ptr();
        for c in c0..c1 {
            let (s01, s23) = chunk_scales::<BK, S>(&scales, base, c, shift);
            let v = scale_chunk(decode64(codes.add(c * CHUNK / 2), lut), s01, s23);
            let o = dst.add((c - c0) * CHUNK);
            for (t, v) in v.iter().enumerate() {
                _mm512_storeu_ps(o.add(16 * t), *v);
            }
        }
        (c1 - c0) * CHUNK
    }
}

static VNNI: LazyLock<bool> = LazyLock::new(|| {
    std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("avx512vnni")
});

/// Whether the W8A8 GEMV runs on [`rows_w8a8`] here: [`usable`] and AVX-512 BW + VNNI.
pub fn vnni_usable() -> bool {
    usable() && *VNNI
}

/// Per-lane corrections for [`rows_w8a8`]: `-128 * (sum of each 4 consecutive activation
/// codes)`, `batch x k / 4` values. `vpdpbusd` multiplies unsigned by signed bytes, so the
/// kernel feeds it the weights plus 128 and starts each lane's sum from this.
pub fn w8a8_corrections(x: &super::w4a8::Int8Acts) -> Vec<i32> {
    x.q.chunks_exact(4)
        .map(|c| -128 * c.iter().map(|&v| v as i32).sum::<i32>())
        .collect()
}

/// W8A8 rows (see `w8a8`): `out[i * B + m]` for table rows `r0 + i` and `B` activation rows,
/// each the sum over 32-wide blocks of the exact integer block product times both block
/// scales — what the AVX2 kernel computes, with one `vpdpbusd` per 64 weights and activation
/// row instead of sign, multiply-add and widening steps per 32.
///
/// # Safety
/// [`vnni_usable`]; `k` a multiple of 32; rows `r0 .. r0 + out.len() / B` of `q` (`k` values
/// each) and `d` (`k / 32` each) exist; `x` holds `B` rows of `k` values and `corr` their
/// [`w8a8_corrections`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn rows_w8a8_kernel<const B: usize>(
    q: &[i8],
    d: &[f32],
    k: usize,
    x: &super::w4a8::Int8Acts,
    corr: &[i32],
    r0: usize,
    out: &mut [f32],
) {
    debug_assert!(corr.len() >= B * k / 4 && x.q.len() >= B * k && x.d.len() >= B * (k / 32));
    let rows = out.len() / B;
    let mut i = 0;
    if B == 1 {
        // Sixteen rows' vectors reduced together (see `rows16_batch1`).
        while rows - i >= 16 {
            let sums = sum16_rows(|j| w8a8_row::<1>(q, d, k, x, corr, r0 + i + j)[0]);
            _mm512_storeu_ps(out.as_mut_ptr().add(i), sums);
            i += 16;
        }
    }
    for (o, r) in out[i * B..].chunks_exact_mut(B).zip(r0 + i..) {
        let acc = w8a8_row::<B>(q, d, k, x, corr, r);
        for m in 0..B {
            o[m] = _mm512_reduce_add_ps(acc[m]);
        }
    }
}

/// One table row `r` of [`rows_w8a8_kernel`]: per activation row, a vector whose lanes sum to
/// the output.
///
/// # Safety
/// As for [`rows_w8a8_kernel`], row `r` existing.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
#[allow(clippy::needless_range_loop)] // register blocking reads clearer with indices
unsafe fn w8a8_row<const B: usize>(
    q: &[i8],
    d: &[f32],
    k: usize,
    x: &super::w4a8::Int8Acts,
    corr: &[i32],
    r: usize,
) -> [__m512; B] {
    let nb = k / 32;
    // Weight + 128 as unsigned bytes.
    let flip = _mm512_set1_epi8(-128);
    let pf = super::prefetch::enabled();
    // The same number of weights ahead as the 4-bit kernels: twice the bytes.
    let ahead = 2 * super::prefetch::PREFETCH_AHEAD;
    let (xq, xd, cp) = (x.q.as_ptr(), x.d.as_ptr(), corr.as_ptr());
    debug_assert!((r + 1) * k <= q.len() && (r + 1) * nb <= d.len());
    let wrow = q.as_ptr().add(r * k);
    let drow = d.as_ptr().add(r * nb);
    let mut acc = [_mm512_setzero_ps(); B];
    // Block pairs (64 weights); an odd last block reads as a half pair (masked loads).
    let mut b = 0;
    while b < nb {
        let full = b + 1 < nb;
        let (mb, mi): (__mmask64, __mmask16) = if full {
            (!0, !0)
        } else {
            (0xffff_ffff, 0x00ff)
        };
        if pf {
            use super::prefetch::prefetch;
            prefetch((wrow as *const u8).wrapping_add(32 * b + ahead));
            if b.is_multiple_of(16) {
                prefetch((drow as *const u8).wrapping_add(4 * b + ahead / 8));
            }
        }
        let wu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mb, wrow.add(32 * b)), flip);
        let (da, db) = (*drow.add(b), if full { *drow.add(b + 1) } else { 0.0 });
        for m in 0..B {
            let xv = _mm512_maskz_loadu_epi8(mb, xq.add(m * k + 32 * b));
            let c = _mm512_maskz_loadu_epi32(mi, cp.add(m * k / 4 + 8 * b));
            let sums = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c, wu, xv));
            let xa = *xd.add(m * nb + b);
            let xb = if full { *xd.add(m * nb + b + 1) } else { 0.0 };
            let sc = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(da * xa), _mm512_set1_ps(db * xb));
            acc[m] = _mm512_fmadd_ps(sums, sc, acc[m]);
        }
        b += 2;
    }
    acc
}

/// Dispatches `rows_w8a8_kernel` on `batch` (1-8).
///
/// # Safety
/// As `rows_w8a8_kernel`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn rows_w8a8(
    q: &[i8],
    d: &[f32],
    k: usize,
    x: &super::w4a8::Int8Acts,
    corr: &[i32],
    batch: usize,
    r0: usize,
    out: &mut [f32],
) {
    match batch {
        1 => rows_w8a8_kernel::<1>(q, d, k, x, corr, r0, out),
        2 => rows_w8a8_kernel::<2>(q, d, k, x, corr, r0, out),
        3 => rows_w8a8_kernel::<3>(q, d, k, x, corr, r0, out),
        4 => rows_w8a8_kernel::<4>(q, d, k, x, corr, r0, out),
        5 => rows_w8a8_kernel::<5>(q, d, k, x, corr, r0, out),
        6 => rows_w8a8_kernel::<6>(q, d, k, x, corr, r0, out),
        7 => rows_w8a8_kernel::<7>(q, d, k, x, corr, r0, out),
        8 => rows_w8a8_kernel::<8>(q, d, k, x, corr, r0, out),
        _ => unreachable!("the W8A8 GEMV serves batches of 1-8"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::gemv::rows_portable;
    use crate::{Format, QTensor, QuantSpec};
    use candle_core::{Device, Tensor};

    #[test]
    fn chunk_order_is_a_permutation_matching_the_nibbles() {
        for high_first in [false, true] {
            let mut seen = [false; CHUNK];
            for p in 0..CHUNK {
                let e = chunk_element(p, high_first);
                assert!(!seen[e]);
                seen[e] = true;
                // Slot p reads byte e / 2: low nibble for slots 0-15 and 32-47.
                let byte = (p / 32) * 16 + p % 16;
                assert_eq!(e / 2, byte);
            }
        }
    }

    #[test]
    fn register_permute_matches_the_order_table() {
        if !*AVAILABLE {
            return;
        }
        for high_first in [false, true] {
            for k in [64usize, 128, 130, 576, 7] {
                let x: Vec<f32> = (0..3 * k).map(|i| i as f32).collect();
                let mut got = vec![0f32; x.len()];
                permute_activations(&x, k, high_first, &mut got);
                let order: Vec<usize> = (0..CHUNK).map(|p| chunk_element(p, high_first)).collect();
                let mut want = vec![0f32; x.len()];
                super::super::gemv::permute_chunks(&x, k, &order, &mut want);
                assert_eq!(got, want, "k {k} high_first {high_first}");
            }
        }
    }

    /// Tile rows come out in chunk order, scaled, equal to the scalar decode of each weight; the columns after the last whole chunk in element order.
    #[test]
    fn tile_decoder_matches_the_scalar_decode() {
        if !usable() {
            return;
        }
        let dev = Device::Cpu;
        for format in [Format::Nvfp4, Format::Mxfp4, Format::Nf4, Format::Fp4] {
            // K tails (160: NVFP4 and MXFP4 only; formats that cannot take a width skip it).
            for (n, k) in [(3usize, 576usize), (2, 1024), (2, 160)] {
                let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
                let Ok(q) = QTensor::quantize(&w, &QuantSpec::new(format)) else {
                    continue;
                };
                let view = q.host_view().unwrap();
                let rows_ = Rows::new(&view);
                let Some(dec) = TileDecoder::new(&rows_) else {
                    continue;
                };
                for row in 0..n {
                    for k0 in (0..k).step_by(CHUNK) {
                        let len = (k - k0).min(3 * CHUNK);
                        let mut out = vec![0f32; len];
                        dec.decode(row, k0, &mut out);
                        let whole = len / CHUNK * CHUNK;
                        for (p, &v) in out.iter().enumerate() {
                            let col = if p < whole {
                                k0 + p / CHUNK * CHUNK + chunk_element(p % CHUNK, rows_.high_first)
                            } else {
                                k0 + p
                            };
                            let want = rows_.weight(row, col);
                            // `==`: the tail's element-order decode keeps the sign of a zero
                            // code, the codebook lookup need not.
                            assert_eq!(v, want, "{format} {n}x{k} r{row} c{col}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn sum16_puts_each_vectors_sum_in_its_lane() {
        if !*AVAILABLE {
            return;
        }
        // Vector i holds 16 distinct powers of two scaled by i + 1: every sum is exact, and a
        // lane that mixed two vectors or dropped a lane would differ.
        let vals: Vec<[f32; 16]> = (0..16)
            .map(|i| std::array::from_fn(|l| (i + 1) as f32 * (1u32 << l) as f32 / 65536.0))
            .collect();
        let mut got = [0f32; 16];
        // SAFETY: AVX-512F present (checked); loads and the store cover 16 floats each.
        unsafe {
            let v: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(vals[i].as_ptr()));
            _mm512_storeu_ps(got.as_mut_ptr(), sum16(&v));
        }
        for (i, row) in vals.iter().enumerate() {
            assert_eq!(got[SUM16_LANE[i]], row.iter().sum::<f32>(), "vector {i}");
            assert_eq!(SUM16_LANE[SUM16_LANE[i]], i, "not an involution at {i}");
        }
    }

    /// The kernel equals the portable decode-and-dot path (to f32 summation order) for every
    /// format (16-, 32- and 64-wide blocks, table and f32 scales, both nibble orders), every
    /// GEMV batch and rows with K tails, which the caller adds.
    #[test]
    fn kernel_matches_the_portable_gemv() {
        if !*AVAILABLE {
            return;
        }
        let dev = Device::Cpu;
        for format in [Format::Nvfp4, Format::Mxfp4, Format::Nf4, Format::Fp4] {
            // 33 and 18 rows: sixteen-row groups at batch 1 and a remainder; K = 4160: two K
            // passes at batch 1.
            for (n, k) in [
                (7usize, 64usize),
                (33, 576),
                (5, 1024),
                (3, 192),
                (18, 4160),
            ] {
                let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
                let q = QTensor::quantize(&w, &QuantSpec::new(format)).unwrap();
                let view = q.host_view().unwrap();
                let rows_ = Rows::new(&view);
                if !super::super::gemv::simd_fits(&rows_) {
                    continue;
                }
                for batch in 1..=8 {
                    let x: Vec<f32> = Tensor::randn(0f32, 1.0, (batch, k), &dev)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let mut xp = vec![0f32; x.len()];
                    permute_activations(&x, k, rows_.high_first, &mut xp);
                    let mut got = vec![0f32; n * batch];
                    // SAFETY: AVX-512F present (checked); simd_fits holds; rows 0..n exist; xp
                    // holds batch permuted rows.
                    unsafe { rows(&rows_, &xp, batch, 0, n, &mut got) };
                    let mut want = vec![0f32; n * batch];
                    rows_portable(&rows_, &x, batch, 0, n, &mut want);
                    // The AVX2 kernel this one replaces (its fallback via `set_enabled(false)` or
                    // `Q4_AVX512=0`), which the QLinear tests no longer reach on this host.
                    let mut xp2 = vec![0f32; x.len()];
                    super::super::x86::permute_activations(&x, k, rows_.high_first, &mut xp2);
                    let mut avx2 = vec![0f32; n * batch];
                    // SAFETY: AVX2 is present wherever AVX-512F is; same geometry as above.
                    unsafe { super::super::x86::rows(&rows_, &xp2, batch, 0, n, &mut avx2) };
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        // Whole chunks only: k is a multiple of 64 in every case here.
                        let tol = 1e-5 * (1.0 + e.abs());
                        assert!(
                            (g - e).abs() <= tol,
                            "{format} {n}x{k} b{batch} [{i}]: {g} vs {e}"
                        );
                        let a = avx2[i];
                        assert!((a - e).abs() <= tol, "AVX2 {format} {n}x{k} b{batch} [{i}]");
                    }
                    // Rows from an offset (the parallel GEMV's row ranges), both kernels.
                    let mut part = vec![0f32; (n - 1) * batch];
                    let mut part2 = vec![0f32; (n - 1) * batch];
                    // SAFETY: as above, rows 1..n.
                    unsafe {
                        rows(&rows_, &xp, batch, 1, n, &mut part);
                        super::super::x86::rows(&rows_, &xp2, batch, 1, n, &mut part2);
                    }
                    for (i, e) in want[batch..].iter().enumerate() {
                        let tol = 1e-5 * (1.0 + e.abs());
                        assert!(
                            (part[i] - e).abs() <= tol,
                            "{format} rows 1.. b{batch} [{i}]"
                        );
                        assert!((part2[i] - e).abs() <= tol, "AVX2 rows 1.. b{batch} [{i}]");
                    }
                }
            }
        }
    }
}
