//! AVX2 + FMA micro-kernel of the fused 4-bit GEMV.
//!
//! Sixteen nibbles (8 bytes) are split, interleaved in element order and widened to eight
//! 32-bit lane indices at a time; two `vpermps` look them up in the 16-entry codebook and a blend
//! on bit 3 picks the half. The decoded weights are scaled by the block scale and fed to FMAs
//! against `B` activation rows for `R` weight rows at once (R*B accumulators in registers).

use std::arch::x86_64::*;

use super::rows::{Rows, ScaleSrc};

/// Looks up eight lane indices (0..16) in the codebook held as two halves.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn lookup8(i: __m256i, lut_lo: __m256, lut_hi: __m256) -> __m256 {
    let a = _mm256_permutevar8x32_ps(lut_lo, i);
    let b = _mm256_permutevar8x32_ps(lut_hi, i);
    // Bit 3 of the code moved to the sign bit selects the upper half of the table.
    _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)))
}

/// Decodes 16 codes starting at `p` into two vectors of f32 codebook values.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn decode16(
    p: *const u8,
    high_first: bool,
    lut_lo: __m256,
    lut_hi: __m256,
) -> (__m256, __m256) {
    let v = _mm_loadl_epi64(p as *const __m128i);
    let mask = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(v, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    let idx = if high_first {
        _mm_unpacklo_epi8(hi, lo)
    } else {
        _mm_unpacklo_epi8(lo, hi)
    };
    let i0 = _mm256_cvtepu8_epi32(idx);
    let i1 = _mm256_cvtepu8_epi32(_mm_srli_si128(idx, 8));
    (lookup8(i0, lut_lo, lut_hi), lookup8(i1, lut_lo, lut_hi))
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Computes `out[r * B + m] = sum_k W[row0 + r, k] * x[m, k]` for `R` rows over the whole
/// blocks of each row; the caller adds the (padded) tail columns.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `w.aligned` must hold, `w.block % 16 == 0`, rows
/// `row0..row0 + R` must exist, and `x` must hold `B` rows of `w.k` values.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // register blocking reads clearer with indices
pub unsafe fn rows_kernel<const R: usize, const B: usize>(
    w: &Rows<'_>,
    x: &[f32],
    row0: usize,
    out: &mut [f32],
) {
    debug_assert!(
        w.aligned
            && w.block.is_multiple_of(16)
            && row0 + R <= w.n
            && x.len() >= B * w.k
            && out.len() >= R * B
    );
    let lut_lo = _mm256_loadu_ps(w.lut.as_ptr());
    let lut_hi = _mm256_loadu_ps(w.lut.as_ptr().add(8));
    let mut acc = [[_mm256_setzero_ps(); B]; R];
    let fb = w.full_blocks();
    let groups = w.block / 16;
    let xp = x.as_ptr();
    let cp = w.codes.as_ptr();
    for j in 0..fb {
        let mut scale = [_mm256_setzero_ps(); R];
        for (r, s) in scale.iter_mut().enumerate() {
            let idx = (row0 + r) * w.row_blocks + j;
            *s = _mm256_set1_ps(match w.scales {
                ScaleSrc::Table { bytes, table } => {
                    *table.get_unchecked(*bytes.get_unchecked(idx) as usize)
                }
                ScaleSrc::F32(v) => *v.get_unchecked(idx),
            });
        }
        for g in 0..groups {
            let kk = j * w.block + g * 16;
            for r in 0..R {
                let p = cp.add((row0 + r) * w.row_bytes + kk / 2);
                let (w0, w1) = decode16(p, w.high_first, lut_lo, lut_hi);
                let w0 = _mm256_mul_ps(w0, scale[r]);
                let w1 = _mm256_mul_ps(w1, scale[r]);
                for m in 0..B {
                    let xm = xp.add(m * w.k + kk);
                    acc[r][m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), acc[r][m]);
                    acc[r][m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm.add(8)), acc[r][m]);
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
