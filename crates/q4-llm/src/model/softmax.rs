//! Attention softmax on the CPU: scale, causal mask and softmax in one pass over each row of
//! the scores, with an AVX2 `exp`.
//!
//! The generic path runs four tensor ops (scale, mask add, candle's softmax) and calls libm's
//! `expf` once per score: at a few hundred prompt tokens that `exp` alone was 5–7% of prefill.

use anyhow::Result;
use candle_core::{CpuStorage, DType, Layout, Tensor};
use rayon::prelude::*;

/// `softmax(scores * scale)` over the last axis of `[.., rows, s]`, where row `r` belongs to the
/// query at position `offset + r % t` and sees keys `0..=offset + r % t` (later keys get
/// probability 0). `scores` is changed in place and returned; `None` (and `scores` untouched)
/// when it is not a contiguous f32 CPU tensor, for the caller's generic path.
pub fn causal_softmax(
    scores: Tensor,
    scale: f32,
    t: usize,
    offset: usize,
) -> Result<Option<Tensor>> {
    if !matches!(scores.device(), candle_core::Device::Cpu)
        || scores.dtype() != DType::F32
        || !scores.is_contiguous()
        || t == 0
    {
        return Ok(None);
    }
    scores.inplace_op1(&CausalSoftmax { scale, t, offset })?;
    Ok(Some(scores))
}

struct CausalSoftmax {
    scale: f32,
    t: usize,
    offset: usize,
}

impl candle_core::InplaceOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "q4-causal-softmax"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("q4-causal-softmax: expected f32 scores");
        };
        let s = *layout.dims().last().unwrap_or(&0);
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("q4-causal-softmax: not contiguous".into()))?;
        if s == 0 {
            return Ok(());
        }
        let (t, offset, scale) = (self.t, self.offset, self.scale);
        // Rows are independent; a row is a few hundred values, so hand out several at a time.
        data[start..end]
            .par_chunks_mut(s)
            .with_min_len(16)
            .enumerate()
            .for_each(|(r, row)| {
                let visible = (offset + r % t + 1).min(s);
                let (live, masked) = row.split_at_mut(visible);
                live.iter_mut().for_each(|v| *v *= scale);
                softmax_in_place(live);
                masked.fill(0.0);
            });
        Ok(())
    }
}

/// `x` replaced by `softmax(x)`.
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = exp_sub_in_place(x, max);
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// `x[i] = exp(x[i] - max)`, returning the sum.
fn exp_sub_in_place(x: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA are present (checked just above).
        return unsafe { x86::exp_sub_in_place(x, max) };
    }
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `exp` of 8 values: `2^n · p(r)` with `n = round(x / ln 2)`, `r = x - n ln 2` (ln 2 split
    /// in two for an exact first step) and the degree-6 polynomial of the Cephes `expf`, within
    /// 2 ulp of libm on the range softmax uses; 0 below -87.3 (where `expf` underflows to 0 or a
    /// subnormal).
    ///
    /// # Safety
    /// AVX2 and FMA present.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(x, _mm256_set1_ps(88.376_26));
        let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-87.336_54));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        // 2^n through the exponent field; n is in [-126, 128) here.
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let e = _mm256_mul_ps(p, _mm256_castsi256_ps(pow2));
        _mm256_andnot_ps(underflow, e)
    }

    /// See [`super::exp_sub_in_place`].
    ///
    /// # Safety
    /// AVX2 and FMA present.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sub_in_place(x: &mut [f32], max: f32) -> f32 {
        let m = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            let p = c.as_mut_ptr();
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), m));
            _mm256_storeu_ps(p, e);
            acc = _mm256_add_ps(acc, e);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let mut sum: f32 = lanes.iter().sum();
        for v in chunks.into_remainder() {
            let mut tail = [0f32; 8];
            tail[0] = *v - max;
            let mut out = [0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), exp8(_mm256_loadu_ps(tail.as_ptr())));
            *v = out[0];
            sum += out[0];
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The AVX2 `exp` stays within a few ulp of libm's over the whole range softmax feeds it
    /// (x <= 0), underflows to 0 where `expf` does (or to its subnormals), and is exact at 0.
    #[test]
    fn vector_exp_matches_libm() {
        #[cfg(target_arch = "x86_64")]
        {
            if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
                return;
            }
            let mut worst = 0f64;
            let mut x = -90.0f32;
            while x <= 0.0 {
                let mut v = [x; 8];
                let got = unsafe { x86::exp_sub_in_place(&mut v, 0.0) } / 8.0;
                let want = x.exp();
                if want >= f32::MIN_POSITIVE {
                    let rel = ((got - want) / want).abs() as f64;
                    worst = worst.max(rel);
                } else {
                    assert!(
                        got <= f32::MIN_POSITIVE * 2.0,
                        "exp({x}) = {got}, libm {want}"
                    );
                }
                x += 0.003_7;
            }
            assert!(
                worst < 3.0 * f32::EPSILON as f64,
                "worst relative error {worst:e}"
            );
            let mut z = [0.0f32; 3];
            exp_sub_in_place(&mut z, 0.0);
            assert_eq!(z, [1.0; 3]);
        }
    }

    /// Same probabilities as scale + additive causal mask + candle's softmax, with the stacked
    /// query-head rows of grouped-query attention and a cache offset.
    #[test]
    fn causal_softmax_matches_the_tensor_ops() {
        let dev = Device::Cpu;
        let (b, nkv, n_rep, t, offset) = (2, 3, 2, 5, 4);
        let s = offset + t;
        let scores = Tensor::randn(0f32, 3.0, (b, nkv, n_rep * t, s), &dev).unwrap();
        let scale = 0.125f32;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..s).map(move |j| {
                    if j > offset + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, s), &dev).unwrap();
        let want = (scores.clone() * scale as f64)
            .unwrap()
            .reshape((b, nkv, n_rep, t, s))
            .unwrap()
            .broadcast_add(&mask)
            .unwrap()
            .reshape((b, nkv, n_rep * t, s))
            .unwrap();
        let want = candle_nn::ops::softmax_last_dim(&want).unwrap();
        let got = causal_softmax(scores.copy().unwrap(), scale, t, offset)
            .unwrap()
            .expect("CPU f32 scores");
        let diff: f32 = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-6, "max abs difference {diff}");
    }

    #[test]
    fn other_tensors_take_the_generic_path() {
        let dev = Device::Cpu;
        let s = Tensor::zeros((2, 3), DType::F64, &dev).unwrap();
        assert!(causal_softmax(s, 1.0, 2, 0).unwrap().is_none());
    }
}
