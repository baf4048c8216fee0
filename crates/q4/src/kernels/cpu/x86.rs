//! AVX2 + FMA micro-kernels of the fused 4-bit GEMV.
//!
//! Decoding works on 64 weights (32 packed bytes) at a time without any cross-lane shuffle:
//! the low and high nibbles become two vectors of 32 one-byte codes; `vpshufb` looks each code
//! up in byte planes of the codebook (2 planes for E2M1, whose values are exact bfloat16, 4 planes
//! for NF4 / bitsandbytes FP4), and in-lane unpacks assemble the f32 values. The weights come
//! out in a fixed permuted order, so the activations are permuted once per call to match
//! ([`permute_activations`]) instead of shuffling every weight.
//!
//! Within a 64-weight chunk each decoded vector holds elements of at most two 16-element blocks
//! (lane 0 from the first 32 weights, lane 1 from the last 32); products are summed per block pair
//! and scaled by a vector of the matching block scales.

use std::arch::x86_64::*;

use super::rows::{
    block_class, F32Scales, Rows, ScaleSrc, Scales, TableScales, BLOCK16, BLOCK32, BLOCK64,
};

/// Weights per decode step.
pub const CHUNK: usize = 64;

/// Position in the chunk of the weight that decoded vector `t` (0..8), lane element `j` (0..8)
/// holds, for low-nibble-first storage. High-nibble-first storage swaps even and odd elements.
#[inline]
pub fn chunk_element(t: usize, j: usize, high_first: bool) -> usize {
    let parity = (t / 4) ^ usize::from(high_first);
    let half = j / 4; // lane 0: first 32 weights, lane 1: last 32
    let i = (t % 4) * 4 + j % 4; // index among the 16 same-parity elements of the half
    half * 32 + 2 * i + parity
}

/// Reorders activation rows (`batch x k`) into the order the kernels consume weights: each full
/// 64-chunk is permuted, the tail (k % 64) stays in place.
/// `out` holds as many values as `x`.
pub fn permute_activations(x: &[f32], k: usize, high_first: bool, out: &mut [f32]) {
    assert_eq!(out.len(), x.len());
    if available() {
        // SAFETY: AVX2 is present; `out` holds as many values as `x`.
        unsafe { permute_activations_avx(x, k, high_first, out) };
    } else {
        permute_activations_by_table(x, k, high_first, out);
    }
}

/// [`permute_activations`] through the [`chunk_element`] table, one value at a time.
fn permute_activations_by_table(x: &[f32], k: usize, high_first: bool, out: &mut [f32]) {
    let mut order = [0usize; CHUNK];
    for t in 0..8 {
        for j in 0..8 {
            order[t * 8 + j] = chunk_element(t, j, high_first);
        }
    }
    super::gemv::permute_chunks(x, k, &order, out);
}

/// [`permute_activations`] in registers: decoded vector `q` (and `q + 4`) holds the even (odd)
/// elements of the chunk's 8-value groups `q` and `q + 4`, so two lane permutes and two shuffles
/// produce both from two loads. At prefill batches the table walk cost as much as the decode it
/// serves (64 x 576 activations: ~70 µs).
///
/// # Safety
/// AVX2 present; `out.len() == x.len()`, a multiple of `k`.
#[target_feature(enable = "avx2,fma")]
unsafe fn permute_activations_avx(x: &[f32], k: usize, high_first: bool, out: &mut [f32]) {
    debug_assert!(out.len() == x.len() && x.len().is_multiple_of(k));
    let full = k / CHUNK * CHUNK;
    for (src, dst) in x.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        for c in (0..full).step_by(CHUNK) {
            let (s, d) = (src.as_ptr().add(c), dst.as_mut_ptr().add(c));
            for q in 0..4 {
                let a = _mm256_loadu_ps(s.add(8 * q));
                let b = _mm256_loadu_ps(s.add(32 + 8 * q));
                let lo = _mm256_permute2f128_ps::<0x20>(a, b); // a0..3 | b0..3
                let hi = _mm256_permute2f128_ps::<0x31>(a, b); // a4..7 | b4..7
                let even = _mm256_shuffle_ps::<0b10_00_10_00>(lo, hi);
                let odd = _mm256_shuffle_ps::<0b11_01_11_01>(lo, hi);
                let (first, second) = if high_first { (odd, even) } else { (even, odd) };
                _mm256_storeu_ps(d.add(8 * q), first);
                _mm256_storeu_ps(d.add(32 + 8 * q), second);
            }
        }
        dst[full..].copy_from_slice(&src[full..]);
    }
}

/// Byte planes of a 16-entry f32 codebook, each duplicated in both 128-bit lanes for `vpshufb`.
pub struct Planes {
    b: [__m256i; 4],
}

impl Planes {
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn new(lut: &[f32; 16]) -> Planes {
        let bytes = super::gemv::byte_planes(lut);
        let load = |p: &[u8; 16]| {
            _mm256_broadcastsi128_si256(_mm_loadu_si128(p.as_ptr() as *const __m128i))
        };
        Planes {
            b: [
                load(&bytes[0]),
                load(&bytes[1]),
                load(&bytes[2]),
                load(&bytes[3]),
            ],
        }
    }

    /// Whether the two low byte planes are zero (every value is exact in bfloat16).
    pub fn bf16_exact(lut: &[f32; 16]) -> bool {
        lut.iter().all(|v| v.to_bits() & 0xffff == 0)
    }
}

/// Decodes one vector of 32 byte codes into four vectors of eight f32 values.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn decode32<const BF16: bool>(codes: __m256i, p: &Planes) -> [__m256; 4] {
    let hi16 = {
        let b2 = _mm256_shuffle_epi8(p.b[2], codes);
        let b3 = _mm256_shuffle_epi8(p.b[3], codes);
        [_mm256_unpacklo_epi8(b2, b3), _mm256_unpackhi_epi8(b2, b3)]
    };
    let lo16 = if BF16 {
        [_mm256_setzero_si256(), _mm256_setzero_si256()]
    } else {
        let b0 = _mm256_shuffle_epi8(p.b[0], codes);
        let b1 = _mm256_shuffle_epi8(p.b[1], codes);
        [_mm256_unpacklo_epi8(b0, b1), _mm256_unpackhi_epi8(b0, b1)]
    };
    [
        _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo16[0], hi16[0])),
        _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo16[0], hi16[0])),
        _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo16[1], hi16[1])),
        _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo16[1], hi16[1])),
    ]
}

/// Decodes the 64 weights at `p` into eight vectors, in `chunk_element` order.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn decode64<const BF16: bool>(p: *const u8, planes: &Planes) -> [__m256; 8] {
    let v = _mm256_loadu_si256(p as *const __m256i);
    let mask = _mm256_set1_epi8(0x0f);
    let lo = _mm256_and_si256(v, mask);
    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    let a = decode32::<BF16>(lo, planes);
    let b = decode32::<BF16>(hi, planes);
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Scale vectors of the two block pairs of chunk `c` of a row whose scales start at `base`:
/// `[s(e0..15) x4 | s(e32..47) x4]` and `[s(e16..31) x4 | s(e48..63) x4]` (equal unless blocks
/// are 16 wide).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn chunk_scales<const BK: u8, S: Scales>(
    s: &S,
    base: usize,
    c: usize,
    shift: u32,
) -> (__m256, __m256) {
    let pair = |a: f32, b: f32| {
        _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(a)), _mm_set1_ps(b), 1)
    };
    match BK {
        BLOCK16 => {
            let i = base + 4 * c;
            (pair(s.at(i), s.at(i + 2)), pair(s.at(i + 1), s.at(i + 3)))
        }
        BLOCK32 => {
            let i = base + 2 * c;
            let v = pair(s.at(i), s.at(i + 1));
            (v, v)
        }
        _ => {
            let v = _mm256_set1_ps(s.at(base + ((c * CHUNK) >> shift)));
            (v, v)
        }
    }
}

/// Computes `out[r * B + m] = sum_k W[row0 + r, k] * x[m, k]` over the whole 64-chunks of each
/// row (the caller adds the `k % 64` tail). `xp` holds the activations permuted by
/// [`permute_activations`].
///
/// # Safety
/// The CPU must support AVX2 and FMA; `w.aligned` must hold with `w.block` a multiple of 16
/// (and of 64 or less than 64 dividing it), rows `row0..row0 + R` must exist, and `xp` must hold
/// `B` rows of `w.k` values.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // register blocking reads clearer with indices
pub unsafe fn rows_kernel<
    const R: usize,
    const B: usize,
    const BF16: bool,
    const BK: u8,
    S: Scales,
>(
    w: &Rows<'_>,
    scales: S,
    planes: &Planes,
    xp: &[f32],
    row0: usize,
    out: &mut [f32],
) {
    debug_assert!(
        w.aligned
            && w.block.is_multiple_of(16)
            && row0 + R <= w.n
            && xp.len() >= B * w.k
            && out.len() >= R * B
    );
    let chunks = w.k / CHUNK;
    let xptr = xp.as_ptr();
    let cp = w.codes.as_ptr();
    let shift = w.block.trailing_zeros();
    // No weight prefetch here: this f32 kernel is bound by its decode, not by memory, and the
    // prefetch instructions cost it 0-4% (examples/ab_prefetch).
    let mut acc = [[_mm256_setzero_ps(); B]; R];
    for c in 0..chunks {
        let col = c * CHUNK;
        for r in 0..R {
            let (s1, s2) = chunk_scales::<BK, S>(&scales, (row0 + r) * w.row_blocks, c, shift);
            let wv = decode64::<BF16>(cp.add((row0 + r) * w.row_bytes + col / 2), planes);
            if B == 1 {
                // One activation row: sum each block pair unscaled, scale once per chunk.
                let x = xptr.add(col);
                let mut p1 = _mm256_mul_ps(wv[0], _mm256_loadu_ps(x));
                p1 = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(x.add(8)), p1);
                p1 = _mm256_fmadd_ps(wv[4], _mm256_loadu_ps(x.add(32)), p1);
                p1 = _mm256_fmadd_ps(wv[5], _mm256_loadu_ps(x.add(40)), p1);
                let mut p2 = _mm256_mul_ps(wv[2], _mm256_loadu_ps(x.add(16)));
                p2 = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(x.add(24)), p2);
                p2 = _mm256_fmadd_ps(wv[6], _mm256_loadu_ps(x.add(48)), p2);
                p2 = _mm256_fmadd_ps(wv[7], _mm256_loadu_ps(x.add(56)), p2);
                acc[r][0] = _mm256_fmadd_ps(p1, s1, acc[r][0]);
                acc[r][0] = _mm256_fmadd_ps(p2, s2, acc[r][0]);
            } else {
                // Several activation rows: scale the decoded weights once, reuse them B times.
                let mut ws = wv;
                for t in 0..8 {
                    ws[t] = _mm256_mul_ps(wv[t], if t % 4 < 2 { s1 } else { s2 });
                }
                for m in 0..B {
                    let x = xptr.add(m * w.k + col);
                    for t in 0..8 {
                        acc[r][m] =
                            _mm256_fmadd_ps(ws[t], _mm256_loadu_ps(x.add(8 * t)), acc[r][m]);
                    }
                }
            }
        }
    }
    for r in 0..R {
        for m in 0..B {
            *out.get_unchecked_mut(r * B + m) = hsum(acc[r][m]);
        }
    }
}

/// Decodes weight rows for the tiled GEMM in the GEMV's chunk order: each whole 64-chunk comes
/// out as [`decode64`] produces it ([`chunk_element`] order, to be multiplied with activations
/// permuted by [`permute_activations`]), scaled by its blocks' scales. Per 8 weights that is
/// about half the instructions of [`decode_blocks`]' element-order decode (byte-plane lookups
/// instead of two cross-lane permutes and a blend).
pub struct ChunkDecoder<'a> {
    w: Rows<'a>,
    planes: Planes,
    bf16: bool,
    bk: u8,
}

impl<'a> ChunkDecoder<'a> {
    /// `None` unless AVX2+FMA are present and the rows fit the chunk kernel (the GEMV's
    /// `simd_fits`: aligned rows, blocks of 16 or 32, or multiples of 64).
    pub fn new(w: &Rows<'a>) -> Option<ChunkDecoder<'a>> {
        if !super::gemv::simd_fits(w) {
            return None;
        }
        Some(ChunkDecoder {
            w: *w,
            // SAFETY: AVX2 is present (`simd_fits` checked it).
            planes: unsafe { Planes::new(w.lut) },
            bf16: Planes::bf16_exact(w.lut),
            bk: block_class(w.block),
        })
    }

    /// Decodes columns `k0 .. k0 + out.len()` of weight `row` (`k0` a multiple of 64): whole
    /// chunks in chunk order, then the columns after the row's last whole chunk in element
    /// order (where [`permute_activations`] leaves them).
    pub fn decode(&self, row: usize, k0: usize, out: &mut [f32]) {
        debug_assert!(k0.is_multiple_of(CHUNK) && k0 + out.len() <= self.w.k && row < self.w.n);
        // SAFETY: the constructor checked AVX2 and the chunk geometry; `row` exists and the
        // column range lies inside it (asserted above, the caller's contract).
        let done = unsafe {
            match (self.bf16, self.bk) {
                (true, BLOCK16) => self.chunks::<true, BLOCK16>(row, k0, out),
                (true, BLOCK32) => self.chunks::<true, BLOCK32>(row, k0, out),
                (true, _) => self.chunks::<true, BLOCK64>(row, k0, out),
                (false, BLOCK16) => self.chunks::<false, BLOCK16>(row, k0, out),
                (false, BLOCK32) => self.chunks::<false, BLOCK32>(row, k0, out),
                (false, _) => self.chunks::<false, BLOCK64>(row, k0, out),
            }
        };
        if done < out.len() {
            self.w.decode_range(row, k0 + done, &mut out[done..]);
        }
    }

    /// The whole chunks of [`Self::decode`]; returns how many values it wrote.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn chunks<const BF16: bool, const BK: u8>(
        &self,
        row: usize,
        k0: usize,
        out: &mut [f32],
    ) -> usize {
        let w = &self.w;
        let (c0, c1) = (k0 / CHUNK, (k0 + out.len()) / CHUNK);
        let shift = w.block.trailing_zeros();
        let base = row * w.row_blocks;
        let codes = w.codes.as_ptr().add(row * w.row_bytes);
        let dst = out.as_mut_ptr();
        for c in c0..c1 {
            let (s1, s2) = chunk_scales::<BK, _>(&w.scales, base, c, shift);
            let wv = decode64::<BF16>(codes.add(c * CHUNK / 2), &self.planes);
            let o = dst.add((c - c0) * CHUNK);
            for (t, v) in wv.iter().enumerate() {
                let s = if t % 4 < 2 { s1 } else { s2 };
                _mm256_storeu_ps(o.add(8 * t), _mm256_mul_ps(*v, s));
            }
        }
        (c1 - c0) * CHUNK
    }
}

/// Decodes `nblocks` whole blocks of `block` weights (a multiple of 8) in element order into
/// `out`, each value `value[code] * scale` exactly as the scalar decode computes it. The codes
/// of 8 weights are one 32-bit load; a variable shift spreads their nibbles over the lanes and two
/// in-register table permutes (codes 0-7 and 8-15) look them up.
///
/// # Safety
/// AVX2 present; `codes` holds `nblocks * block / 2` bytes, `out` `nblocks * block` values and
/// `scales` blocks `first_block .. first_block + nblocks`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn decode_blocks<S: Scales>(
    values: &[f32; 16],
    high_first: bool,
    codes: &[u8],
    scales: S,
    first_block: usize,
    block: usize,
    out: &mut [f32],
) {
    let nblocks = out.len() / block;
    debug_assert!(block.is_multiple_of(8) && out.len() == nblocks * block);
    debug_assert!(codes.len() * 2 >= out.len());
    let lo = _mm256_loadu_ps(values.as_ptr());
    let hi = _mm256_loadu_ps(values.as_ptr().add(8));
    let shifts = if high_first {
        _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24)
    } else {
        _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)
    };
    let nibble = _mm256_set1_epi32(15);
    let src = codes.as_ptr();
    let dst = out.as_mut_ptr();
    for b in 0..nblocks {
        let s = _mm256_set1_ps(scales.at(first_block + b));
        let mut e = b * block;
        let end = e + block;
        while e < end {
            let word = (src.add(e / 2) as *const u32).read_unaligned();
            let idx = _mm256_and_si256(
                _mm256_srlv_epi32(_mm256_set1_epi32(word as i32), shifts),
                nibble,
            );
            // Bit 3 of the code picks the upper table: move it to the sign bit for blendv.
            let v = _mm256_blendv_ps(
                _mm256_permutevar8x32_ps(lo, idx),
                _mm256_permutevar8x32_ps(hi, idx),
                _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)),
            );
            _mm256_storeu_ps(dst.add(e), _mm256_mul_ps(v, s));
            e += 8;
        }
    }
}

/// Whether AVX2 and FMA are available.
pub fn available() -> bool {
    q4_formats::simd::has_avx2()
}

/// Computes weight rows `r0..r1` into `out` (`[row - r0][m]`) over their whole chunks.
///
/// # Safety
/// As for [`rows_kernel`]: AVX2+FMA present, aligned rows with a chunk-compatible block size,
/// rows in range, `xp` holding `batch` permuted activation rows.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn rows(w: &Rows<'_>, xp: &[f32], batch: usize, r0: usize, r1: usize, out: &mut [f32]) {
    let planes = Planes::new(w.lut);
    let bf16 = Planes::bf16_exact(w.lut);
    let bk = block_class(w.block);
    // Monomorphised for the combinations the formats produce (codebook planes, block class,
    // scale storage); anything else takes the general instance.
    macro_rules! call {
        ($r:literal, $b:literal, $row:expr) => {{
            let o = &mut out[($row - r0) * $b..];
            match (bf16, bk, w.scales) {
                (true, BLOCK16, ScaleSrc::Table { bytes, table }) => {
                    rows_kernel::<$r, $b, true, BLOCK16, _>(
                        w,
                        TableScales { bytes, table },
                        &planes,
                        xp,
                        $row,
                        o,
                    )
                }
                (true, BLOCK32, ScaleSrc::Table { bytes, table }) => {
                    rows_kernel::<$r, $b, true, BLOCK32, _>(
                        w,
                        TableScales { bytes, table },
                        &planes,
                        xp,
                        $row,
                        o,
                    )
                }
                (false, BLOCK64, ScaleSrc::F32(v)) => {
                    rows_kernel::<$r, $b, false, BLOCK64, _>(w, F32Scales(v), &planes, xp, $row, o)
                }
                (false, BLOCK32, ScaleSrc::F32(v)) => {
                    rows_kernel::<$r, $b, false, BLOCK32, _>(w, F32Scales(v), &planes, xp, $row, o)
                }
                (bf, _, s) => match (bf, bk) {
                    (true, BLOCK16) => {
                        rows_kernel::<$r, $b, true, BLOCK16, _>(w, s, &planes, xp, $row, o)
                    }
                    (true, BLOCK32) => {
                        rows_kernel::<$r, $b, true, BLOCK32, _>(w, s, &planes, xp, $row, o)
                    }
                    (true, _) => {
                        rows_kernel::<$r, $b, true, BLOCK64, _>(w, s, &planes, xp, $row, o)
                    }
                    (false, BLOCK16) => {
                        rows_kernel::<$r, $b, false, BLOCK16, _>(w, s, &planes, xp, $row, o)
                    }
                    (false, BLOCK32) => {
                        rows_kernel::<$r, $b, false, BLOCK32, _>(w, s, &planes, xp, $row, o)
                    }
                    (false, _) => {
                        rows_kernel::<$r, $b, false, BLOCK64, _>(w, s, &planes, xp, $row, o)
                    }
                },
            }
        }};
    }
    macro_rules! run {
        ($r:literal, $b:literal) => {{
            let mut r = r0;
            while r1 - r >= $r {
                call!($r, $b, r);
                r += $r;
            }
            while r < r1 {
                call!(1, $b, r);
                r += 1;
            }
        }};
    }
    match batch {
        1 => run!(1, 1),
        2 => run!(1, 2),
        3 => run!(1, 3),
        4 => run!(1, 4),
        5 => run!(1, 5),
        6 => run!(1, 6),
        7 => run!(1, 7),
        8 => run!(1, 8),
        _ => unreachable!("GEMV serves batches of 1-8"),
    }
}

/// Dense micro-kernel of the tiled GEMM (batches above the GEMV's): for `m < batch`,
/// `j < rows`, `y[m * ys + j] = (accumulate ? y[..] : 0) + sum_kk x[m * xs + kk] * t[j * w + kk]`
/// over `kk < w`. Dot-product form: the decoded tile rows and the activation rows are both read
/// in their natural order, so nothing is packed or transposed; 3 x 4 blocks of (activation row,
/// weight row) keep twelve accumulators in registers, 16-wide where AVX-512F is present, else
/// 8-wide (7 loads per 12 FMAs; 3 x 3 with
/// `set_wide_tile_blocks(false)`), and each tile row is loaded once per
/// batch (the activation slice stays in L1).
///
/// # Safety
/// AVX2+FMA present; `x` points at `batch` rows of stride `xs` with `w` readable values each,
/// `y` at `batch` rows of stride `ys` with `rows` writable values each (not overlapping `x`),
/// and `t.len() >= rows * w`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn tile_gemm(
    x: *const f32,
    xs: usize,
    t: &[f32],
    w: usize,
    rows: usize,
    batch: usize,
    y: *mut f32,
    ys: usize,
    accumulate: bool,
) {
    let zmm = super::avx512::usable();
    tile_gemm_with(zmm, x, xs, t, w, rows, batch, y, ys, accumulate)
}

/// [`tile_gemm`] with the blocks on 16-wide AVX-512 registers (`zmm`) or 8-wide AVX2 ones.
///
/// # Safety
/// As [`tile_gemm`], and AVX-512F present if `zmm`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile_gemm_with(
    zmm: bool,
    x: *const f32,
    xs: usize,
    t: &[f32],
    w: usize,
    rows: usize,
    batch: usize,
    y: *mut f32,
    ys: usize,
    accumulate: bool,
) {
    debug_assert!(t.len() >= rows * w);
    let tp = t.as_ptr();
    let nr_max = if super::wide_tile_blocks() { 4 } else { 3 };
    let mut j = 0;
    while j < rows {
        let nr = (rows - j).min(nr_max);
        let mut m = 0;
        while m < batch {
            let mr = (batch - m).min(3);
            let (xb, tb, yb) = (x.add(m * xs), tp.add(j * w), y.add(m * ys + j));
            macro_rules! block {
                ($($a:literal, $b:literal);*) => {
                    match (mr, nr) {
                        $(($a, $b) if zmm => tile_block_512::<$a, $b>(xb, xs, tb, w, yb, ys, accumulate),)*
                        $(($a, $b) => tile_block::<$a, $b>(xb, xs, tb, w, yb, ys, accumulate),)*
                        _ => unreachable!("blocks are 1-3 by 1-4"),
                    }
                };
            }
            block!(3, 4; 3, 3; 3, 2; 3, 1; 2, 4; 2, 3; 2, 2; 2, 1; 1, 4; 1, 3; 1, 2; 1, 1);
            m += mr;
        }
        j += nr;
    }
}

/// Defines one `MR x NR` block of [`tile_gemm`] for a register width: the 8-wide AVX2 block and
/// the 16-wide AVX-512 one are the same loop over different intrinsics.
macro_rules! tile_block_fn {
    ($(#[$doc:meta])* $name:ident, $feature:literal, $lanes:literal, $zero:ident, $load:ident,
     $fma:ident, $sum:ident) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// The target feature present; `x` points at `MR` rows of stride `xs` with `w` readable
        /// values each, `t` at `NR` rows of `w` values, `y` at `MR` rows of stride `ys` with
        /// `NR` writable values each.
        #[target_feature(enable = $feature)]
        pub(super) unsafe fn $name<const MR: usize, const NR: usize>(
            x: *const f32,
            xs: usize,
            t: *const f32,
            w: usize,
            y: *mut f32,
            ys: usize,
            accumulate: bool,
        ) {
            let mut acc = [[$zero(); NR]; MR];
            let steps = w / $lanes;
            for s in 0..steps {
                let kk = s * $lanes;
                let mut xv = [$zero(); MR];
                for (i, v) in xv.iter_mut().enumerate() {
                    *v = $load(x.add(i * xs + kk));
                }
                for jj in 0..NR {
                    let wv = $load(t.add(jj * w + kk));
                    for (a, xi) in acc.iter_mut().zip(&xv) {
                        a[jj] = $fma(*xi, wv, a[jj]);
                    }
                }
            }
            for (i, row) in acc.iter().enumerate() {
                for (jj, &a) in row.iter().enumerate() {
                    let mut sum = $sum(a);
                    for kk in steps * $lanes..w {
                        sum += *x.add(i * xs + kk) * *t.add(jj * w + kk);
                    }
                    let dst = y.add(i * ys + jj);
                    *dst = if accumulate { *dst + sum } else { sum };
                }
            }
        }
    };
}

tile_block_fn!(
    /// One `MR x NR` block of [`tile_gemm`] on 8-wide AVX2 registers.
    tile_block, "avx2,fma", 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_fmadd_ps, hsum
);
tile_block_fn!(
    /// One `MR x NR` block of [`tile_gemm`] on 16-wide AVX-512 registers: on the Xeon host a
    /// probe issued 512-bit FMAs at the rate of 256-bit ones, twice the arithmetic per instruction.
    tile_block_512, "avx512f", 16, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_fmadd_ps,
    _mm512_reduce_add_ps
);

/// Int8 activations laid out for [`rows_i8`]: per row and 64-value chunk, the 32 even-indexed
/// values then the 32 odd-indexed ones (the order the low and high nibbles of the chunk's 32
/// code bytes take), and the chunk's two block scales spread as `[d0 x4 | d1 x4]`.
pub struct Int8Layout {
    eo: Vec<i8>,
    sv: Vec<f32>,
    /// Per row and chunk, `W8_OFFSET` times the sum of each 8 consecutive values: what the
    /// offset (unsigned) weights add to each 32-bit lane of the kernel's sums.
    corr: Vec<i32>,
    chunks: usize,
}

/// Prefetches the 4-bit weight stream [`PREFETCH_AHEAD`](super::prefetch::PREFETCH_AHEAD) bytes
/// past chunk `c` of the row whose codes start at `codes` (and whose scales start at block
/// `sb`): one code line per chunk, one scale line every eight chunks. Rows are contiguous, so
/// the lines ahead belong to the rows that follow.
#[inline(always)]
fn prefetch_chunk<const BK: u8, S: Scales>(codes: *const u8, scales: &S, sb: usize, c: usize) {
    use super::prefetch::{prefetch, PREFETCH_AHEAD};
    prefetch(codes.wrapping_add(c * 32 + PREFETCH_AHEAD));
    if c.is_multiple_of(8) {
        // Weights per block: 16, 32 or (BLOCK64 and up) at least 64.
        let per_block = match BK {
            BLOCK16 => 16,
            BLOCK32 => 32,
            _ => 64,
        };
        scales.prefetch(sb + (c * CHUNK + 2 * PREFETCH_AHEAD) / per_block);
    }
}

/// Added to twice the E2M1 value so every weight byte is unsigned (0..=24), as `vpmaddubsw`
/// wants; the kernel subtracts `W8_OFFSET * sum(x)` per lane instead of sign-flipping `x`.
const W8_OFFSET: i32 = 12;

/// `2w + W8_OFFSET` for each E2M1 code, in both 128-bit lanes (a `vpshufb` table).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn offset_table() -> __m256i {
    let mut unsigned = [0u8; 16];
    for (u, &v) in unsigned.iter_mut().zip(&super::w4a8::E2M1_X2) {
        *u = (i32::from(v) + W8_OFFSET) as u8;
    }
    _mm256_broadcastsi128_si256(_mm_loadu_si128(unsigned.as_ptr() as *const __m128i))
}

/// Chunk `c` of the weight row whose codes start at `codes` and scales at index `sb`: the offset
/// bytes of the 32 low and the 32 high nibbles, and the weight scale of each 32-bit lane of the
/// kernels' sums (`[s0 s0 s1 s1 s2 s2 s3 s3]` for 16-blocks, `[s0 x4 | s1 x4]` for 32-blocks).
///
/// # Safety
/// AVX2 present; the chunk's 32 code bytes and its scales exist.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn decode_chunk_i8<const BK: u8, S: Scales>(
    codes: *const u8,
    scales: &S,
    sb: usize,
    c: usize,
    table: __m256i,
) -> (__m256i, __m256i, __m256) {
    let mask = _mm256_set1_epi8(0x0f);
    let v = _mm256_loadu_si256(codes.add(c * 32) as *const __m256i);
    let wl = _mm256_shuffle_epi8(table, _mm256_and_si256(v, mask));
    let wh = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));
    let ws = if BK == BLOCK16 {
        let i = sb + 4 * c;
        let s4 = _mm_setr_ps(
            scales.at(i),
            scales.at(i + 1),
            scales.at(i + 2),
            scales.at(i + 3),
        );
        let dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
        _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s4), dup)
    } else {
        let i = sb + 2 * c;
        _mm256_set_m128(_mm_set1_ps(scales.at(i + 1)), _mm_set1_ps(scales.at(i)))
    };
    (wl, wh, ws)
}

/// `acc` plus the product of a decoded weight chunk (`wl`, `wh`, lane scales `ws`) with record
/// `at` (activation row × chunk) of `xs`. The products `(2w + 12) * x` are summed in pairs:
/// <= 2 * 24 * 127 per pair and twice that after the add, so the 16-bit sums cannot saturate;
/// the `12 * x` part is subtracted after widening.
///
/// # Safety
/// AVX2 and FMA present; record `at` exists in `xs`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn chunk_product_i8(
    wl: __m256i,
    wh: __m256i,
    ws: __m256,
    xs: &Int8Layout,
    at: usize,
    acc: __m256,
) -> __m256 {
    let xp = xs.eo.as_ptr().add(at * CHUNK);
    let pl = _mm256_maddubs_epi16(wl, _mm256_loadu_si256(xp as *const __m256i));
    let ph = _mm256_maddubs_epi16(wh, _mm256_loadu_si256(xp.add(32) as *const __m256i));
    let sum = _mm256_sub_epi32(
        _mm256_madd_epi16(_mm256_add_epi16(pl, ph), _mm256_set1_epi16(1)),
        _mm256_loadu_si256(xs.corr.as_ptr().add(at * 8) as *const __m256i),
    );
    let sc = _mm256_mul_ps(ws, _mm256_loadu_ps(xs.sv.as_ptr().add(at * 8)));
    _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), sc, acc)
}

impl Int8Layout {
    pub fn new(a: &super::w4a8::Int8Acts, batch: usize) -> Int8Layout {
        use rayon::prelude::*;
        let k = a.k;
        let chunks = k / CHUNK;
        let mut eo = vec![0i8; batch * chunks * CHUNK];
        let mut sv = vec![0f32; batch * chunks * 8];
        let mut corr = vec![0i32; batch * chunks * 8];
        // One activation row's slices of the three arrays.
        type RowOut<'a> = ((&'a mut [i8], &'a mut [f32]), &'a mut [i32]);
        let row = |(m, ((eo, sv), corr)): (usize, RowOut<'_>)| {
            for c in 0..chunks {
                let src = &a.q[m * k + c * CHUNK..][..CHUNK];
                let dst = &mut eo[c * CHUNK..][..CHUNK];
                for i in 0..32 {
                    dst[i] = src[2 * i];
                    dst[32 + i] = src[2 * i + 1];
                }
                let d = &a.d[(m * k + c * CHUNK) / super::w4a8::ACT_BLOCK..];
                let v = &mut sv[c * 8..][..8];
                v[..4].fill(d[0]);
                v[4..].fill(d[1]);
                for (o, e) in corr[c * 8..][..8].iter_mut().zip(src.chunks_exact(8)) {
                    *o = W8_OFFSET * e.iter().map(|&q| i32::from(q)).sum::<i32>();
                }
            }
        };
        let (er, sr) = (chunks * CHUNK, chunks * 8);
        // Prefill-sized inputs in parallel (a row is a few hundred ns of work).
        if batch * k >= 1 << 15 {
            eo.par_chunks_mut(er)
                .zip(sv.par_chunks_mut(sr))
                .zip(corr.par_chunks_mut(sr))
                .enumerate()
                .for_each(row);
        } else {
            eo.chunks_mut(er)
                .zip(sv.chunks_mut(sr))
                .zip(corr.chunks_mut(sr))
                .enumerate()
                .for_each(row);
        }
        Int8Layout {
            eo,
            sv,
            corr,
            chunks,
        }
    }
}

/// Weight rows `rows` times activation rows `m0 .. m0 + B` into `out[i * batch + m0 + m]` (row
/// `rows.start + i`); see `w4a8`. The setup and the dispatch are paid once per call, not per
/// row (SmolLM2's rows are only nine 64-weight chunks long). The weight bytes are
/// `2w + 12` (unsigned, as `vpmaddubsw` wants) and the layout's `corr` removes the `12 * x`
/// part after widening, which costs one subtract instead of two sign flips per product. After
/// the byte multiply-adds, 32-bit lane `d` of a chunk's sum holds weights `8d .. 8d + 8`: a
/// 16-block covers lanes `2b, 2b + 1`, a 32-block lanes `4b .. 4b + 4`, and the activation
/// blocks lanes 0-3 and 4-7.
///
/// # Safety
/// AVX2 and FMA present; the weight passes `w4a8::supported`; `rows.end <= w.n`; `xs` holds at
/// least `m0 + B <= batch` rows of `w.k` values; `out` has `rows.len() * batch` slots.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // register blocking reads clearer with indices
unsafe fn rows_i8_kernel<const B: usize, const BK: u8, S: Scales>(
    w: &Rows<'_>,
    scales: S,
    xs: &Int8Layout,
    rows: std::ops::Range<usize>,
    m0: usize,
    batch: usize,
    out: &mut [f32],
) {
    let chunks = xs.chunks;
    debug_assert!(xs.chunks == w.k / CHUNK && xs.eo.len() >= (m0 + B) * chunks * CHUNK);
    debug_assert!(rows.end <= w.n && out.len() >= rows.len() * batch && m0 + B <= batch);
    let table = offset_table();
    let pf = super::prefetch::enabled();
    for (i, row) in rows.enumerate() {
        // From 4 activation rows on, their independent FMA chains hide the latency; below,
        // even and odd chunks accumulate apart (the compiler drops the unused half).
        let mut acc = [[_mm256_setzero_ps(); B]; 2];
        let codes = w.codes.as_ptr().add(row * w.row_bytes);
        let sb = row * w.row_blocks;
        for c in 0..chunks {
            if pf {
                prefetch_chunk::<BK, S>(codes, &scales, sb, c);
            }
            let (wl, wh, ws) = decode_chunk_i8::<BK, S>(codes, &scales, sb, c, table);
            let slot = if B >= 4 { 0 } else { c & 1 };
            for m in 0..B {
                let at = (m0 + m) * chunks + c;
                acc[slot][m] = chunk_product_i8(wl, wh, ws, xs, at, acc[slot][m]);
            }
        }
        for m in 0..B {
            // The integer sums are twice the E2M1 products.
            *out.get_unchecked_mut(i * batch + m0 + m) =
                0.5 * hsum(_mm256_add_ps(acc[0][m], acc[1][m]));
        }
    }
}

/// Decodes weight rows `r0..r1` once for the prefill kernel [`tile_i8_kernel`]: per row and
/// chunk, the 64 offset bytes `2w + 12` (low nibbles then high, as `rows_i8_kernel` builds
/// them) into `codes`, and the chunk's eight lane scales into `scales`.
///
/// # Safety
/// AVX2 present; the weight passes `w4a8::supported`; `r1 <= w.n`; `codes` holds
/// `(r1 - r0) * chunks * 64` bytes and `scales` `(r1 - r0) * chunks * 8` values.
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_tile_i8<const BK: u8, S: Scales>(
    w: &Rows<'_>,
    sc: S,
    r0: usize,
    r1: usize,
    codes: &mut [u8],
    scales: &mut [f32],
) {
    let chunks = w.k / CHUNK;
    debug_assert!(codes.len() >= (r1 - r0) * chunks * CHUNK);
    debug_assert!(scales.len() >= (r1 - r0) * chunks * 8);
    let table = offset_table();
    for (i, r) in (r0..r1).enumerate() {
        let src = w.codes.as_ptr().add(r * w.row_bytes);
        for c in 0..chunks {
            let at = i * chunks + c;
            let (wl, wh, ws) = decode_chunk_i8::<BK, S>(src, &sc, r * w.row_blocks, c, table);
            let dst = codes.as_mut_ptr().add(at * CHUNK) as *mut __m256i;
            _mm256_storeu_si256(dst, wl);
            _mm256_storeu_si256(dst.add(1), wh);
            _mm256_storeu_ps(scales.as_mut_ptr().add(at * 8), ws);
        }
    }
}

/// [`rows_i8_kernel`] for prefill batches, on a row decoded by [`decode_tile_i8`]: the decode
/// is paid once per weight row instead of once per group of activation rows (at batch 256,
/// 64 times), leaving two loads per chunk besides the products.
///
/// # Safety
/// AVX2 and FMA present; `codes` / `scales` hold the decoded row (`chunks * 64` bytes,
/// `chunks * 8` values); `xs` holds at least `m0 + B` rows of `chunks * 64` values; `out` has
/// `B` slots.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // register blocking reads clearer with indices
unsafe fn tile_i8_kernel<const B: usize>(
    codes: &[u8],
    scales: &[f32],
    xs: &Int8Layout,
    m0: usize,
    out: &mut [f32],
) {
    let chunks = xs.chunks;
    debug_assert!(codes.len() >= chunks * CHUNK && scales.len() >= chunks * 8);
    debug_assert!(xs.eo.len() >= (m0 + B) * chunks * CHUNK && out.len() >= B);
    let mut acc = [_mm256_setzero_ps(); B];
    for c in 0..chunks {
        let wl = _mm256_loadu_si256(codes.as_ptr().add(c * CHUNK) as *const __m256i);
        let wh = _mm256_loadu_si256(codes.as_ptr().add(c * CHUNK + 32) as *const __m256i);
        let ws = _mm256_loadu_ps(scales.as_ptr().add(c * 8));
        for m in 0..B {
            acc[m] = chunk_product_i8(wl, wh, ws, xs, (m0 + m) * chunks + c, acc[m]);
        }
    }
    for m in 0..B {
        *out.get_unchecked_mut(m) = 0.5 * hsum(acc[m]);
    }
}

/// Runs `$body` with `$bk` bound (as a constant) to the weight's block class, 16 or 32 — the two
/// the int8 kernels take — and `$s` to its scales as a concrete `Scales` type, so that each of
/// the four combinations compiles to its own kernel.
macro_rules! with_i8_scales {
    ($w:expr, |$bk:ident, $s:ident| $body:expr) => {
        match ($w.block, $w.scales) {
            (16, ScaleSrc::Table { bytes, table }) => {
                const $bk: u8 = BLOCK16;
                let $s = TableScales { bytes, table };
                $body
            }
            (16, $s) => {
                const $bk: u8 = BLOCK16;
                $body
            }
            (_, ScaleSrc::Table { bytes, table }) => {
                const $bk: u8 = BLOCK32;
                let $s = TableScales { bytes, table };
                $body
            }
            (_, $s) => {
                const $bk: u8 = BLOCK32;
                $body
            }
        }
    };
}

/// Activation rows per pass over a weight row. Larger batches run in groups of this many over
/// decoded tiles ([`rows_i8_tiled`]). Groups of 6 or 8, and two weight rows per pass over a
/// group of 4 (which spills accumulators to the stack), were not faster at batches 16 and 64 in
/// single-thread runs of `q4 bench linear` on 4096x4096 and 1536x576.
pub const I8_GROUP: usize = 4;

/// `out[(r - r0) * batch + m]` for rows `r0..r1` of the int8 product (see `w4a8`): up to
/// [`I8_GROUP`] activation rows in one pass per weight row, decoding in registers; larger
/// batches through [`rows_i8_tiled`]. 2 or 4 weight rows per pass won on a lone 1536x576 layer
/// but lost 8% of SmolLM2's decode rate (4 alternating runs each) and lost on 4096x4096 at
/// batch 1.
///
/// # Safety
/// As [`rows_i8_kernel`] for every row in `r0..r1` and every activation row below `batch`, with
/// `out` holding `(r1 - r0) * batch` values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn rows_i8(
    w: &Rows<'_>,
    xs: &Int8Layout,
    batch: usize,
    r0: usize,
    r1: usize,
    out: &mut [f32],
) {
    macro_rules! run {
        ($b:literal, $m0:expr) => {
            with_i8_scales!(w, |BK, s| rows_i8_kernel::<$b, BK, _>(
                w,
                s,
                xs,
                r0..r1,
                $m0,
                batch,
                out
            ))
        };
    }
    if batch > I8_GROUP && batch <= I8_PASSES_MAX.load(std::sync::atomic::Ordering::Relaxed) {
        // Up to three groups: a pass of the register kernel per group of four activation rows
        // (each decoding the weight again) beats decoding tiles once (`rows_i8_tiled`).
        let mut m0 = 0;
        while m0 < batch {
            match (batch - m0).min(I8_GROUP) {
                1 => run!(1, m0),
                2 => run!(2, m0),
                3 => run!(3, m0),
                _ => run!(4, m0),
            }
            m0 += I8_GROUP;
        }
        return;
    }
    match batch {
        1 => run!(1, 0),
        2 => run!(2, 0),
        3 => run!(3, 0),
        4 => run!(4, 0),
        _ => rows_i8_tiled(w, xs, batch, r0, r1, out),
    }
}

static I8_PASSES_MAX: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(super::w4a8::I8_PASSES_MAX_BATCH);

/// Sets [`super::w4a8::I8_PASSES_MAX_BATCH`] for the process (for same-process A/B measurements).
pub fn set_i8_passes_max_batch(batch: usize) {
    I8_PASSES_MAX.store(batch, std::sync::atomic::Ordering::Relaxed);
}

/// [`rows_i8`] above one group of activation rows: a few weight rows at a time decoded once
/// into an L1-sized tile, then every group of activation rows over that tile.
///
/// # Safety
/// As [`rows_i8`].
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_i8_tiled(
    w: &Rows<'_>,
    xs: &Int8Layout,
    batch: usize,
    r0: usize,
    r1: usize,
    out: &mut [f32],
) {
    let chunks = xs.chunks;
    // Rows per decoded sub-tile: about 16 KiB of decoded codes and scales (96 bytes per chunk),
    // so the tile stays in L1 while every group of activation rows passes over it.
    let step = (16384 / (chunks * 96)).clamp(1, r1 - r0);
    let mut codes = vec![0u8; step * chunks * CHUNK];
    let mut scales = vec![0f32; step * chunks * 8];
    let mut t0 = r0;
    while t0 < r1 {
        let t1 = (t0 + step).min(r1);
        with_i8_scales!(w, |BK, s| decode_tile_i8::<BK, _>(
            w,
            s,
            t0,
            t1,
            &mut codes,
            &mut scales
        ));
        let tile_out = &mut out[(t0 - r0) * batch..(t1 - r0) * batch];
        let mut m0 = 0;
        while m0 < batch {
            let b = (batch - m0).min(I8_GROUP);
            for (i, o) in tile_out.chunks_exact_mut(batch).enumerate() {
                let c = &codes[i * chunks * CHUNK..][..chunks * CHUNK];
                let s = &scales[i * chunks * 8..][..chunks * 8];
                let o = &mut o[m0..m0 + b];
                match b {
                    1 => tile_i8_kernel::<1>(c, s, xs, m0, o),
                    2 => tile_i8_kernel::<2>(c, s, xs, m0, o),
                    3 => tile_i8_kernel::<3>(c, s, xs, m0, o),
                    4 => tile_i8_kernel::<4>(c, s, xs, m0, o),
                    _ => unreachable!("groups hold 1-4 activation rows"),
                }
            }
            m0 += b;
        }
        t0 = t1;
    }
}

/// W8A8 rows (see `w8a8`): `out[i * B + m]` for table rows `r0 + i`, `B` activation rows.
///
/// # Safety
/// AVX2 and FMA present; `k` a multiple of 32; rows `r0 .. r0 + out.len() / B` of `q`
/// (`k` values each) and `d` (`k / 32` each) exist; `x` holds `B` rows of `k` values.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // register blocking reads clearer with indices
unsafe fn rows_w8a8_kernel<const B: usize>(
    q: &[i8],
    d: &[f32],
    k: usize,
    x: &super::w4a8::Int8Acts,
    r0: usize,
    out: &mut [f32],
) {
    let nb = k / 32;
    let ones = _mm256_set1_epi16(1);
    let pf = super::prefetch::enabled();
    // The same number of weights ahead as the 4-bit kernels: twice the bytes.
    let ahead = 2 * super::prefetch::PREFETCH_AHEAD;
    for (i, o) in out.chunks_exact_mut(B).enumerate() {
        let r = r0 + i;
        debug_assert!((r + 1) * k <= q.len() && x.q.len() >= B * k);
        let wrow = q.as_ptr().add(r * k);
        let drow = d.as_ptr().add(r * nb);
        // Even and odd blocks accumulate apart so one FMA chain does not bound the loop.
        let mut acc = [[_mm256_setzero_ps(); B]; 2];
        for b in 0..nb {
            if pf {
                use super::prefetch::prefetch;
                prefetch((wrow as *const u8).wrapping_add(32 * b + ahead));
                if b.is_multiple_of(16) {
                    prefetch((drow as *const u8).wrapping_add(4 * b + ahead / 8));
                }
            }
            let w = _mm256_loadu_si256(wrow.add(32 * b) as *const __m256i);
            let aw = _mm256_abs_epi8(w);
            let dw = *drow.add(b);
            for m in 0..B {
                let xv = _mm256_loadu_si256(x.q.as_ptr().add(m * k + 32 * b) as *const __m256i);
                // |w| * (x with w's sign); |pair sums| <= 2 * 127 * 127 < 2^15: no saturation.
                let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w));
                let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
                let sc = _mm256_set1_ps(dw * *x.d.get_unchecked(m * nb + b));
                acc[b & 1][m] = _mm256_fmadd_ps(s, sc, acc[b & 1][m]);
            }
        }
        for m in 0..B {
            o[m] = hsum(_mm256_add_ps(acc[0][m], acc[1][m]));
        }
    }
}

/// Dispatches [`rows_w8a8_kernel`] on `batch` (1-8).
///
/// # Safety
/// As [`rows_w8a8_kernel`].
#[target_feature(enable = "avx2,fma")]
pub unsafe fn rows_w8a8(
    q: &[i8],
    d: &[f32],
    k: usize,
    x: &super::w4a8::Int8Acts,
    batch: usize,
    r0: usize,
    out: &mut [f32],
) {
    match batch {
        1 => rows_w8a8_kernel::<1>(q, d, k, x, r0, out),
        2 => rows_w8a8_kernel::<2>(q, d, k, x, r0, out),
        3 => rows_w8a8_kernel::<3>(q, d, k, x, r0, out),
        4 => rows_w8a8_kernel::<4>(q, d, k, x, r0, out),
        5 => rows_w8a8_kernel::<5>(q, d, k, x, r0, out),
        6 => rows_w8a8_kernel::<6>(q, d, k, x, r0, out),
        7 => rows_w8a8_kernel::<7>(q, d, k, x, r0, out),
        8 => rows_w8a8_kernel::<8>(q, d, k, x, r0, out),
        _ => unreachable!("the W8A8 GEMV serves batches of 1-8"),
    }
}

/// `w4a8::quantize_block` for one block of 32 in AVX2 registers: writes the codes to `q` and
/// returns the scale, bit for bit as the scalar form (same products, truncation, exact fraction
/// and half-away rounding; NaN and zero codes for a block holding a non-finite value, scale 0 for
/// an all-zero block).
///
/// # Safety
/// AVX2 present.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_block(x: &[f32; 32], q: &mut [i8; 32]) -> f32 {
    let p = x.as_ptr();
    let v = [
        _mm256_loadu_ps(p),
        _mm256_loadu_ps(p.add(8)),
        _mm256_loadu_ps(p.add(16)),
        _mm256_loadu_ps(p.add(24)),
    ];
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let inf = _mm256_set1_ps(f32::INFINITY);
    let mut amax = _mm256_setzero_ps();
    let mut finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    for &vi in &v {
        let a = _mm256_and_ps(vi, abs_mask);
        finite = _mm256_and_ps(finite, _mm256_cmp_ps::<_CMP_LT_OQ>(a, inf));
        amax = _mm256_max_ps(amax, a);
    }
    if _mm256_movemask_ps(finite) != 0xff {
        q.fill(0);
        return f32::NAN;
    }
    let m4 = _mm_max_ps(
        _mm256_castps256_ps128(amax),
        _mm256_extractf128_ps::<1>(amax),
    );
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let m = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<0b01>(m2, m2)));
    if m == 0.0 {
        q.fill(0);
        return 0.0;
    }
    let pre = if m < super::w4a8::TINY_BLOCK {
        super::w4a8::TINY_PRESCALE
    } else {
        1.0
    };
    let (pre_v, inv) = (_mm256_set1_ps(pre), _mm256_set1_ps(127.0 / (m * pre)));
    let (half, neg_half) = (_mm256_set1_ps(0.5), _mm256_set1_ps(-0.5));
    let (lo, hi) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
    let r: [__m256i; 4] = std::array::from_fn(|k| {
        let t = _mm256_mul_ps(_mm256_mul_ps(v[k], pre_v), inv);
        let i = _mm256_cvttps_epi32(t);
        let f = _mm256_sub_ps(t, _mm256_cvtepi32_ps(i));
        let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(f, half));
        let down = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(f, neg_half));
        let r = _mm256_add_epi32(_mm256_sub_epi32(i, up), down);
        _mm256_min_epi32(_mm256_max_epi32(r, lo), hi)
    });
    // The packs interleave 128-bit lanes: dwords come out as r0a r1a r2a r3a r0b r1b r2b r3b.
    let bytes = _mm256_packs_epi16(
        _mm256_packs_epi32(r[0], r[1]),
        _mm256_packs_epi32(r[2], r[3]),
    );
    let ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, ordered);
    m / 127.0
}

/// [`super::w4a8::round_trip_in_place`] for one 32-value activation block: `x` replaced by
/// `round(x * 127 / amax) * (amax / 127)`, the codes of [`quantize_block`] times its scale —
/// NaN for a block holding a non-finite value and zeros for an all-zero block.
///
/// # Safety
/// AVX2 present.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn round_trip_block(x: &mut [f32; 32]) {
    let mut q = [0i8; 32];
    let d = _mm256_set1_ps(quantize_block(x, &mut q));
    let p = x.as_mut_ptr();
    for k in 0..4 {
        let codes = _mm_loadl_epi64(q.as_ptr().add(8 * k) as *const __m128i);
        let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
        // 0 * NaN keeps a non-finite block NaN; 0 * 0 an all-zero block zero.
        _mm256_storeu_ps(p.add(8 * k), _mm256_mul_ps(v, d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_gemm_matches_the_scalar_product() {
        if !available() {
            return;
        }
        // Block remainders in both directions, tails of K that are not a multiple of 8, and
        // accumulation into existing outputs; 3 x 4 blocks (default) and 3 x 3 (the A/B knob:
        // each output is the same dot product either way, so concurrent tests are unaffected).
        for (wide, (batch, rows, w)) in [true, false].into_iter().flat_map(|wide| {
            [
                (16, 128, 256),
                (7, 5, 13),
                (1, 1, 8),
                (4, 10, 1),
                (9, 3, 70),
                (40, 7, 300),
            ]
            .map(|c| (wide, c))
        }) {
            super::super::set_wide_tile_blocks(wide);
            let (xs, ys) = (w + 3, rows + 2);
            let x: Vec<f32> = (0..batch * xs)
                .map(|i| ((i * 7919) % 97) as f32 / 13.0 - 3.5)
                .collect();
            let t: Vec<f32> = (0..rows * w)
                .map(|i| ((i * 104729) % 89) as f32 / 7.0 - 6.0)
                .collect();
            // Both register widths: 16-wide where AVX-512F is present, always 8-wide.
            let zmm_options: &[bool] = if super::super::avx512::usable() {
                &[true, false]
            } else {
                &[false]
            };
            for (&zmm, accumulate) in zmm_options
                .iter()
                .flat_map(|z| [false, true].map(move |a| (z, a)))
            {
                let mut y: Vec<f32> = (0..batch * ys).map(|i| i as f32 * 0.25).collect();
                let before = y.clone();
                // SAFETY: AVX2 is present (checked above), AVX-512F where `zmm`; x has batch
                // rows of stride xs >= w, y batch rows of stride ys >= rows, t rows * w values.
                unsafe {
                    tile_gemm_with(
                        zmm,
                        x.as_ptr(),
                        xs,
                        &t,
                        w,
                        rows,
                        batch,
                        y.as_mut_ptr(),
                        ys,
                        accumulate,
                    )
                };
                for m in 0..batch {
                    for j in 0..ys {
                        let got = y[m * ys + j];
                        if j >= rows {
                            assert_eq!(got, before[m * ys + j], "padding written at {m},{j}");
                            continue;
                        }
                        let dot: f64 = (0..w)
                            .map(|kk| x[m * xs + kk] as f64 * t[j * w + kk] as f64)
                            .sum();
                        let want = dot
                            + if accumulate {
                                before[m * ys + j] as f64
                            } else {
                                0.0
                            };
                        let tol = 1e-5 * (1.0 + want.abs()) * (w as f64).sqrt();
                        assert!(
                            (got as f64 - want).abs() <= tol,
                            "{batch}x{rows}x{w} (4-wide blocks: {wide}) m={m} j={j}: {got} vs {want}"
                        );
                    }
                }
            }
        }
        super::super::set_wide_tile_blocks(true);
    }

    #[test]
    fn block_decode_is_bit_exact_with_the_pair_table() {
        if !available() {
            return;
        }
        use q4_formats::Format;
        let codes: Vec<u8> = (0..512u32).map(|i| (i * 37 + i / 3) as u8).collect();
        let scales: Vec<f32> = (0..200)
            .map(|i| [0.0, -1.5, 3.25e-3, 448.0][i % 4])
            .collect();
        for format in [Format::Nvfp4, Format::Mxfp4, Format::Nf4, Format::Fp4] {
            let pairs = super::super::decode::pairs(format);
            let high_first = matches!(format, Format::Nf4 | Format::Fp4);
            let values = super::super::decode::code_values(format);
            for block in [8usize, 16, 32, 64] {
                let n = 1024 / block / 2 * block; // fits `codes`
                let first = 3;
                let mut got = vec![f32::NAN; n];
                // SAFETY: AVX2 is present (checked above); buffers sized per the contract.
                unsafe {
                    decode_blocks(
                        values,
                        high_first,
                        &codes,
                        F32Scales(&scales),
                        first,
                        block,
                        &mut got,
                    )
                };
                let mut want = vec![0f32; n];
                for (b, o) in want.chunks_mut(block).enumerate() {
                    let c = &codes[b * block / 2..(b + 1) * block / 2];
                    q4_formats::simd::decode_pairs_portable(pairs, scales[first + b], c, o);
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{format:?} block {block}");
            }
        }
    }

    #[test]
    fn register_permute_matches_the_table() {
        if !available() {
            return;
        }
        for (k, batch) in [(64, 1), (576, 3), (100, 2), (32, 4), (1088, 2)] {
            let x: Vec<f32> = (0..k * batch).map(|i| i as f32).collect();
            for hf in [false, true] {
                let (mut fast, mut table) = (vec![0f32; x.len()], vec![0f32; x.len()]);
                permute_activations(&x, k, hf, &mut fast);
                permute_activations_by_table(&x, k, hf, &mut table);
                assert_eq!(fast, table, "k={k} batch={batch} high_first={hf}");
            }
        }
    }

    #[test]
    fn chunk_order_is_a_permutation() {
        for hf in [false, true] {
            let mut seen = [false; CHUNK];
            for t in 0..8 {
                for j in 0..8 {
                    let e = chunk_element(t, j, hf);
                    assert!(!seen[e]);
                    seen[e] = true;
                    // Each vector stays within one 16-block per lane: t%4 in {0,1} -> first block
                    // of the lane's half, {2,3} -> second.
                    assert_eq!((e % 32) / 16, (t % 4) / 2, "t={t} j={j} e={e}");
                }
            }
        }
    }
}
