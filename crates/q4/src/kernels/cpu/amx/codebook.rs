//! The AMX tile GEMM for codebook formats (NF4, bitsandbytes FP4): a 4-bit code indexes 16 f32
//! values, times an f32 scale per block (absmax).
//!
//! Accuracy: a code value times an absmax is not exact in bfloat16, so each decoded weight
//! `w = value * absmax` (the f32 product the reference dequantizes to) is split into two
//! bfloat16 pieces by rounding to nearest (`w ≈ wh + wm`, relative error at most 2^-16), each
//! activation likewise (`x ≈ xh + xm`), and the tile unit sums three products per weight in f32:
//! `wh·xh + wh·xm + wm·xh` (the dropped `wm·xm` is below 2^-16 of the product). This is not the
//! f32 dot product: on random data its norm-wise relative error against an f64 product is about
//! 4e-6 (f32 FMA kernels: 4e-7), inside the 1e-5 asked of f32 activations. Exact pieces would
//! need six products per weight (three of each), which had measured slower than the AVX2
//! kernels (module docs of [`super`]).
//!
//! Decoding: per block, the 16 products of the codebook and the block's absmax are computed and
//! split once (one f32 multiply, two bf16 conversions); then every 32 codes of the block become
//! two tile rows by one word permute each.
//!
//! Layout: as the NVFP4 kernel's (weights the A operand in `step_source` order,
//! activations the B operand), with 32-row units (two weight tiles by two pieces) and one
//! activation group (16 rows, both pieces) at a time: per K step six tile loads serve six
//! products, and with a single group the two accumulators stay in their registers over all of K.

use std::arch::x86_64::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::{
    activation_pieces, for_each_index, prefetch, tile, write_sums, AlignedBuf, TileConfig,
    DECODE_AHEAD, DECODE_PREFETCH, PERSIST, SCRATCH, SLICE_VALUES, STEP, TILE_STRIDE, TILE_WORDS,
};

/// Smallest batch the codebook tile GEMM takes over rows at least [`WIDE_K`] wide; narrower
/// rows from [`MIN_BATCH_NARROW`]. Same-process A/B against the AVX-512 / AVX2 kernels
/// (`ab_tile_decode ... nf4 amx`, 2-core Xeon, several runs): on 4096x4096 and 11008x4096
/// AMX / AVX time 0.76-0.80x at batch 10, 0.72-0.75x at 12, 0.64-0.83x at 16 (one slow-host
/// run 1.19x / 1.08x at 10 / 12); on 576x576, 576x1536 and 1536x576 1.00-1.30x at 10,
/// 0.92-1.22x at 12, 0.79-1.08x at 16 (the tile GEMM's time there hardly grows with the batch:
/// its decode dominates); from 32 on 0.49-0.83x everywhere. BENCHMARKS.md, fourteenth session.
pub const MIN_BATCH: usize = 10;
/// See [`MIN_BATCH`].
pub const MIN_BATCH_NARROW: usize = 16;
/// See [`MIN_BATCH`].
pub const WIDE_K: usize = 2048;

/// Whether `batch` activation rows over rows `k` wide take the codebook tile GEMM.
pub fn takes(batch: usize, k: usize) -> bool {
    let min = if k >= WIDE_K {
        MIN_BATCH
    } else {
        MIN_BATCH_NARROW
    };
    batch >= min
}

/// Weight rows per work unit (two A tiles of each piece).
const UNIT_ROWS: usize = 32;
/// Weight tiles per work unit.
const UNIT_TILES: usize = UNIT_ROWS / 16;

/// Pieces per weight and per activation.
const PIECES: usize = 2;
/// Smallest and largest nonzero absmax magnitude the path takes: the low piece of the smallest
/// codebook products stays a normal number (the tile unit flushes subnormal inputs), and sums
/// stay far from overflow. Other scales (and non-finite ones) send the call to the f32 kernels.
const MIN_SCALE: f32 = 1.0e-27; // about 2^-90
const MAX_SCALE: f32 = 1.0e27;

/// K values decoded per slice when a single activation group runs (its accumulators stay in
/// their registers, so a slice costs no store): narrow enough that a unit's decoded tiles
/// (32 rows by two pieces, 32 KiB) stay in L1. Several groups take the NVFP4 kernel's slice.
const ONE_GROUP_SLICE: usize = 256;

static ONE_GROUP_SLICE_VALUES: AtomicUsize = AtomicUsize::new(ONE_GROUP_SLICE);

/// K values per decoded slice for one activation group (a multiple of [`STEP`]; default
/// [`ONE_GROUP_SLICE`]), for same-process A/B measurements (`ab_tile_decode ... cbsliceA-B`).
#[doc(hidden)]
pub fn set_one_group_slice(values: usize) {
    assert!(values > 0 && values.is_multiple_of(STEP));
    ONE_GROUP_SLICE_VALUES.store(values, Ordering::Relaxed);
}

/// Codebook weights as the tile GEMM reads them: packed codes, one f32 scale per block, rows
/// starting on a block boundary.
pub struct CodebookTiles<'a> {
    pub codes: &'a [u8],
    pub scales: &'a [f32],
    /// The code values (16 f32, indexed by nibble).
    pub values: &'a [f32; 16],
    /// bitsandbytes stores the first of two values in the high nibble.
    pub high_first: bool,
    pub block: usize,
    pub n: usize,
    pub k: usize,
    pub row_bytes: usize,
    pub row_blocks: usize,
}

impl CodebookTiles<'_> {
    /// Whether this geometry suits the tile decoder: blocks of a power of two of whole K steps
    /// (bitsandbytes' 32-4096), rows of whole blocks (so every step lies in one block and no
    /// row ends inside a step).
    pub fn supported(&self) -> bool {
        self.block.is_multiple_of(STEP)
            && self.block.is_power_of_two()
            && self.k.is_multiple_of(self.block)
            && self.row_bytes * 2 == self.k
            && self.row_blocks * self.block == self.k
    }

    /// Panics unless the geometry is [`supported`](Self::supported) and the buffers cover `n`
    /// rows: the decoder reads whole steps unchecked within these bounds.
    fn check(&self) {
        assert!(
            self.supported()
                && self.codes.len() >= self.n * self.row_bytes
                && self.scales.len() >= self.n * self.row_blocks,
            "codebook tiles: buffers do not cover {} x {} in blocks of {}",
            self.n,
            self.k,
            self.block
        );
    }

    /// Decodes weight rows `r0..r0 + UNIT_ROWS` (rows from `n` on as zeros), columns
    /// `k0..k0 + steps * STEP`, into A tiles `[step][tile][piece]` [`TILE_STRIDE`] bytes apart,
    /// each 16 rows by 32 values (bf16, in [`step_source`] order). Returns false if a block's
    /// scale lies outside [`MIN_SCALE`]..[`MAX_SCALE`] (nor zero): the tiles are then not to
    /// be used.
    ///
    /// # Safety
    /// AVX-512F/BW and AVX512-BF16 present; [`check`](Self::check) passed; `k0` a multiple of
    /// [`STEP`] and `k0 + steps * STEP <= k`;
    /// `out.len() >= steps * UNIT_TILES * PIECES * TILE_STRIDE / 2`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn decode(&self, r0: usize, k0: usize, steps: usize, out: &mut [u16]) -> bool {
        if self.high_first {
            self.decode_with::<true>(r0, k0, steps, out)
        } else {
            self.decode_with::<false>(r0, k0, steps, out)
        }
    }

    /// [`decode`](Self::decode) for codes whose first value is in the high nibble or not.
    ///
    /// # Safety
    /// As for [`decode`](Self::decode).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn decode_with<const HIGH_FIRST: bool>(
        &self,
        r0: usize,
        k0: usize,
        steps: usize,
        out: &mut [u16],
    ) -> bool {
        debug_assert!(k0.is_multiple_of(STEP) && k0 + steps * STEP <= self.k);
        debug_assert!(out.len() >= steps * UNIT_TILES * PIECES * TILE_STRIDE / 2);
        let rows = UNIT_ROWS.min(self.n - r0);
        let values = _mm512_loadu_ps(self.values.as_ptr());
        let base = out.as_mut_ptr().cast::<__m512i>();
        let prefetch_on =
            super::super::prefetch::enabled() && DECODE_PREFETCH.load(Ordering::Relaxed);
        // bf16 words to the f32 values they stand for.
        let widen = |b: __m256bh| {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                std::mem::transmute::<__m256bh, __m256i>(b),
            )))
        };
        let second_half = _mm512_set1_epi16(16);
        let steps_per_block = self.block / STEP;
        let mut in_range = true;
        for r in 0..UNIT_ROWS {
            let at = |s: usize, q: usize| {
                base.add((tile_index(s, r / 16, q) * TILE_STRIDE + (r % 16) * 64) / 64)
            };
            if r >= rows {
                for s in 0..steps {
                    for q in 0..PIECES {
                        _mm512_storeu_si512(at(s, q), _mm512_setzero_si512());
                    }
                }
                continue;
            }
            let codes = self.codes.as_ptr().add((r0 + r) * self.row_bytes + k0 / 2);
            let scales = self.scales.as_ptr().add((r0 + r) * self.row_blocks);
            if prefetch_on && r + DECODE_AHEAD < rows {
                let ahead = DECODE_AHEAD * self.row_bytes;
                for b in (0..steps * 16).step_by(64) {
                    prefetch(codes.wrapping_add(ahead + b));
                }
                prefetch(
                    scales
                        .wrapping_add(DECODE_AHEAD * self.row_blocks + k0 / self.block)
                        .cast(),
                );
            }
            // Block by block: the 16 products of its scale, split into a table of the high
            // pieces (words 0-15) and the low ones (16-31), then its steps.
            let mut s = 0;
            let mut b = k0 / self.block;
            let mut in_block = k0 % self.block / STEP;
            while s < steps {
                let a = *scales.add(b);
                // Zero, or a magnitude in range (NaN's bits compare above the range).
                let bits = a.to_bits() & 0x7fff_ffff;
                in_range &=
                    bits == 0 || (MIN_SCALE.to_bits()..=MAX_SCALE.to_bits()).contains(&bits);
                let w = _mm512_mul_ps(values, _mm512_set1_ps(a));
                let m = _mm512_sub_ps(w, widen(_mm512_cvtneps_pbh(w)));
                let table = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(m, w));
                let end = (s + steps_per_block - in_block).min(steps);
                while s < end {
                    let idx = indices::<HIGH_FIRST>(_mm_loadu_si128(codes.add(s * 16).cast()));
                    _mm512_storeu_si512(at(s, 0), _mm512_permutexvar_epi16(idx, table));
                    let idx_low = _mm512_or_si512(idx, second_half);
                    _mm512_storeu_si512(at(s, 1), _mm512_permutexvar_epi16(idx_low, table));
                    s += 1;
                }
                b += 1;
                in_block = 0;
            }
        }
        in_range
    }
}

/// A step's 16 code bytes as 32 word indices in [`step_source`] order: the first value of each
/// byte (even columns) to words 0-15, the second to 16-31.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn indices<const HIGH_FIRST: bool>(codes: __m128i) -> __m512i {
    let w16 = _mm256_cvtepu8_epi16(codes);
    let low = _mm256_and_si256(w16, _mm256_set1_epi16(0x0f));
    let high = _mm256_srli_epi16::<4>(w16);
    let (first, second) = if HIGH_FIRST { (high, low) } else { (low, high) };
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(first), second)
}

/// Index (in tiles of [`TILE_STRIDE`] bytes) of piece `q` of weight tile `t` at step `s` in a
/// unit's decoded slice.
#[inline(always)]
fn tile_index(s: usize, t: usize, q: usize) -> usize {
    (s * UNIT_TILES + t) * PIECES + q
}

/// One K step of a 32-row unit and one activation group: weight pieces `a(tile, piece)`,
/// activation pieces `b(piece)`; accumulator t gathers weight tile t. The products alternate
/// between the two accumulators, so that consecutive ones rarely wait for each other.
///
/// # Safety
/// Tiles configured; every pointer reaches a readable 1 KiB tile.
#[inline(always)]
unsafe fn step(a: impl Fn(usize, usize) -> *const u8, b: impl Fn(usize) -> *const u8) {
    tile::load_b0(b(0)); // tmm6: x high
    tile::load_t2(a(0, 0)); // w0 high
    tile::load_a0(a(1, 0)); // tmm4: w1 high
    tile::load_b1(b(1)); // tmm7: x low
    tile::load_t3(a(0, 1)); // w0 low
    tile::load_a1(a(1, 1)); // tmm5: w1 low
    tile::c0_t2_t6();
    tile::c1_t4_t6();
    tile::c0_t2_t7();
    tile::c1_t4_t7();
    tile::c0_t3_t6();
    tile::c1_t5_t6();
}

/// `y[m, n] = sum_k x[m, k] W'[n, k]` on AMX for codebook weights `w`, with the three-product
/// accuracy of the module docs. Returns false, with `y` unspecified, where a block scale lies
/// outside the range the path takes: the caller then runs the f32 kernels. Callers check
/// [`super::usable`] and [`CodebookTiles::supported`].
pub fn matmul(w: &CodebookTiles<'_>, x: &[f32], batch: usize, y: &mut [f32]) -> bool {
    assert!(
        super::usable(),
        "AMX tile GEMM called where AMX is not usable"
    );
    w.check();
    let (n, k) = (w.n, w.k);
    debug_assert_eq!(x.len(), batch * k);
    debug_assert_eq!(y.len(), batch * n);
    let steps = k / STEP;
    let groups = batch.div_ceil(16);
    let mut xb_buf = AlignedBuf::<u32>::new();
    let xb = xb_buf.slice(groups * steps * PIECES * TILE_WORDS);
    // SAFETY: AMX implies AVX-512F/BW and AVX512-BF16 (checked in `cpu_has_amx`).
    unsafe { activation_pieces::<PIECES>(x, batch, k, steps, xb) };
    let xb = &*xb;
    let units = n.div_ceil(UNIT_ROWS);
    let y_addr = y.as_mut_ptr() as usize;
    let cfg = TileConfig::full();
    // One group: the accumulators stay in their tile registers over all of K.
    let persist = groups == 1 && PERSIST.load(Ordering::Relaxed);
    let slice = if persist {
        ONE_GROUP_SLICE_VALUES.load(Ordering::Relaxed)
    } else {
        SLICE_VALUES.load(Ordering::Relaxed)
    };
    let in_range = AtomicBool::new(true);
    for_each_index(units, n * k * batch / 8, |u| {
        if !in_range.load(Ordering::Relaxed) {
            return;
        }
        SCRATCH.with_borrow_mut(|sc| {
            let r0 = u * UNIT_ROWS;
            let rows = UNIT_ROWS.min(n - r0);
            let slice_max = slice.min(k);
            let sa =
                sc.a.slice(slice_max / STEP * UNIT_TILES * PIECES * TILE_STRIDE / 2);
            let scc = sc.c.slice(4 * TILE_WORDS);
            // SAFETY: AMX is usable (asserted above) and the configuration is valid.
            let tiles = unsafe { tile::Configured::new(&cfg) };
            let mut k0 = 0;
            while k0 < k {
                let w_cols = slice.min(k - k0);
                // SAFETY: AMX implies AVX-512F/BW and AVX512-BF16; `check` passed above; k0
                // is a multiple of the slice width (itself of STEP, as is k), so the slice's
                // steps end at or before k; `sa` holds the widest slice's tiles.
                if !unsafe { w.decode(r0, k0, w_cols / STEP, sa) } {
                    in_range.store(false, Ordering::Relaxed);
                    break;
                }
                let step0 = k0 / STEP;
                let last = k0 + w_cols >= k;
                for g in 0..groups {
                    // SAFETY: tiles configured above. Every tile load reads 1 KiB inside `sa`
                    // (step < w_cols / STEP, tile < 2, piece < 2) or inside `xb` (group <
                    // groups, step < steps, piece < 2); the store writes 4 KiB of `scc`.
                    unsafe {
                        if !persist || k0 == 0 {
                            tile::zero_accumulators();
                        }
                        for s in 0..w_cols / STEP {
                            let a = |t: usize, q: usize| {
                                sa.as_ptr()
                                    .add(tile_index(s, t, q) * TILE_STRIDE / 2)
                                    .cast::<u8>()
                            };
                            let b = |q: usize| {
                                xb.as_ptr()
                                    .add(((g * steps + step0 + s) * PIECES + q) * TILE_WORDS)
                                    .cast::<u8>()
                            };
                            step(a, b);
                        }
                        if !persist || last {
                            tile::store_accumulators(scc.as_mut_ptr());
                        }
                    }
                    if persist && !last {
                        continue;
                    }
                    // Accumulator t holds weight rows r0 + 16t + i by activation rows
                    // 16g + j at [i][j].
                    let (m0, add) = (g * 16, k0 > 0 && !persist);
                    // SAFETY: `y_addr` is `y` (batch x n); m0 < batch, r0 + rows <= n, and
                    // only this unit writes columns r0..r0 + rows.
                    unsafe { write_sums(y_addr, n, batch, r0, rows, m0, scc, add, |r| r / 16) };
                }
                k0 += w_cols;
            }
            drop(tiles);
        })
    });
    in_range.into_inner()
}

#[cfg(test)]
mod tests {
    use super::super::step_source;
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        }
    }

    /// Random codes and scales for an `n x k` weight in blocks of `block`.
    fn weight(n: usize, k: usize, block: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut r = rng(seed);
        let codes = (0..n * k / 2)
            .map(|_| ((r() + 0.5) * 256.0) as u8)
            .collect();
        let scales = (0..n * k / block).map(|_| r() + 0.75).collect();
        (codes, scales)
    }

    fn tiles<'a>(
        codes: &'a [u8],
        scales: &'a [f32],
        values: &'a [f32; 16],
        n: usize,
        k: usize,
        block: usize,
    ) -> CodebookTiles<'a> {
        CodebookTiles {
            codes,
            scales,
            values,
            high_first: true,
            block,
            n,
            k,
            row_bytes: k / 2,
            row_blocks: k / block,
        }
    }

    /// The weight as the reference dequantizes it: code value times absmax in f32.
    fn dense(w: &CodebookTiles<'_>) -> Vec<f32> {
        let mut d = Vec::with_capacity(w.n * w.k);
        for r in 0..w.n {
            for c in 0..w.k {
                let byte = w.codes[r * w.row_bytes + c / 2];
                let first = if w.high_first { byte >> 4 } else { byte & 15 };
                let second = if w.high_first { byte & 15 } else { byte >> 4 };
                let code = if c % 2 == 0 { first } else { second };
                d.push(w.values[code as usize] * w.scales[r * w.row_blocks + c / w.block]);
            }
        }
        d
    }

    /// The two tiles hold, for every weight, the nearest bfloat16 `h` to it and the nearest to
    /// its remainder, in step order, zeros past the rows.
    #[test]
    fn tiles_hold_rounded_pieces() {
        if !super::super::cpu_has_amx() {
            return;
        }
        let nf4 = &q4_formats::codebook::NF4;
        for (n, k, block) in [
            (40, 128, 64),
            (32, 2048, 64),
            (17, 96, 32),
            (33, 4096, 4096),
        ] {
            let (codes, scales) = weight(n, k, block, (n * k) as u64);
            let mut w = tiles(&codes, &scales, nf4, n, k, block);
            for high_first in [true, false] {
                w.high_first = high_first;
                let d = dense(&w);
                for k0 in (0..k).step_by(1024) {
                    let steps = (k - k0).min(1024) / STEP;
                    for r0 in (0..n).step_by(UNIT_ROWS) {
                        let mut out =
                            vec![0xffffu16; steps * UNIT_TILES * PIECES * TILE_STRIDE / 2];
                        // SAFETY: AVX-512 and BF16 present (cpu_has_amx); geometry checked;
                        // k0 a multiple of STEP with its steps inside k; `out` sized as asked.
                        w.check();
                        assert!(unsafe { w.decode(r0, k0, steps, &mut out) });
                        for r in 0..UNIT_ROWS {
                            for s in 0..steps {
                                for i in 0..STEP {
                                    let (row, col) = (r0 + r, k0 + s * STEP + step_source(i));
                                    let v = if row < n { d[row * k + col] } else { 0.0 };
                                    let h = half::bf16::from_f32(v);
                                    let m = half::bf16::from_f32(v - h.to_f32());
                                    for (q, want) in [h, m].into_iter().enumerate() {
                                        let t = tile_index(s, r / 16, q);
                                        let got = out[(t * TILE_STRIDE + (r % 16) * 64) / 2 + i];
                                        assert_eq!(
                                            got,
                                            want.to_bits(),
                                            "{n}x{k} row {row} col {col} piece {q}"
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The GEMM against an f64 product of the dequantized weight: within the three-product
    /// error bound (norm-wise 1e-5), over shapes with row and batch remainders, one and several
    /// activation groups, K slices, and both codebooks.
    #[test]
    fn matches_f64_reference() {
        if !super::super::usable() {
            eprintln!("AMX not usable here: skipped");
            return;
        }
        let mut r = rng(0x5eed);
        for (values, name) in [
            (&q4_formats::codebook::NF4, "nf4"),
            (&q4_formats::codebook::BNB_FP4, "fp4"),
        ] {
            for (n, k, block, batch) in [
                (32, 64, 64, 16),
                (45, 128, 64, 9),
                (70, 1152, 64, 37),
                (33, 2048, 128, 64),
                (97, 2112, 64, 12),
                (48, 576, 64, 3),
                (16, 4096, 4096, 17),
            ] {
                let (codes, scales) = weight(n, k, block, (n + k + batch) as u64);
                let w = tiles(&codes, &scales, values, n, k, block);
                let d = dense(&w);
                let x: Vec<f32> = (0..batch * k).map(|_| r()).collect();
                let mut y = vec![f32::NAN; batch * n];
                assert!(matmul(&w, &x, batch, &mut y));
                let e = super::super::f64_rel_err(&y, &d, &x, n, k);
                assert!(e < 1e-5, "{name} {n}x{k} batch {batch}: relative error {e}");
            }
        }
    }

    /// A scale outside the range (tiny, huge, non-finite) is reported, not used.
    #[test]
    fn out_of_range_scales_are_refused() {
        if !super::super::usable() {
            return;
        }
        let nf4 = &q4_formats::codebook::NF4;
        let (n, k, block) = (40, 256, 64);
        for bad in [1e-35f32, 1e35, f32::INFINITY, f32::NAN] {
            let (codes, mut scales) = weight(n, k, block, 3);
            scales[37] = bad;
            let w = tiles(&codes, &scales, nf4, n, k, block);
            let mut y = vec![0.0; 16 * n];
            assert!(!matmul(&w, &vec![1.0; 16 * k], 16, &mut y), "{bad}");
        }
        let (codes, mut scales) = weight(n, k, block, 3);
        scales[5] = 0.0;
        let w = tiles(&codes, &scales, nf4, n, k, block);
        let mut y = vec![0.0; 16 * n];
        assert!(matmul(&w, &vec![1.0; 16 * k], 16, &mut y));
    }
}
