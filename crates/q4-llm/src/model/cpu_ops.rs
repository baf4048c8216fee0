//! The runner's fused CPU element-wise ops, with an AVX2 `exp`: the attention softmax (scale,
//! causal mask and softmax in one pass over each row of the scores) and the MLP gate
//! `silu(gate) * up`.
//!
//! The generic paths run several tensor ops and call libm's `expf` once per value: at a few
//! hundred prompt tokens that `exp` alone was 5–7% of prefill.

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

/// `silu(gate) * up` for two equally shaped CPU f32 views whose rows are contiguous (e.g. the
/// two halves of a fused gate/up output); `None` for the caller's generic path otherwise.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    let (Some((g_rows, g_stride)), Some((u_rows, u_stride))) = (row_view(gate), row_view(up))
    else {
        return Ok(None);
    };
    if gate.dims() != up.dims() || g_rows != u_rows {
        return Ok(None);
    }
    let width = *gate.dims().last().unwrap_or(&0);
    let (gs, gl) = gate.storage_and_layout();
    let (us, ul) = up.storage_and_layout();
    let (
        candle_core::Storage::Cpu(CpuStorage::F32(g)),
        candle_core::Storage::Cpu(CpuStorage::F32(u)),
    ) = (&*gs, &*us)
    else {
        return Ok(None);
    };
    let (g, u) = (&g[gl.start_offset()..], &u[ul.start_offset()..]);
    let mut out = vec![0f32; g_rows * width];
    out.par_chunks_mut(width.max(1))
        .with_min_len(4)
        .enumerate()
        .for_each(|(r, o)| {
            silu_mul_row(&g[r * g_stride..][..width], &u[r * u_stride..][..width], o)
        });
    Ok(Some(Tensor::from_vec(out, gate.dims(), gate.device())?))
}

/// `(rows, row stride)` of an f32 CPU tensor whose last axis is contiguous and whose other axes
/// collapse into evenly spaced rows.
fn row_view(t: &Tensor) -> Option<(usize, usize)> {
    if !matches!(t.device(), candle_core::Device::Cpu) || t.dtype() != DType::F32 {
        return None;
    }
    let layout = t.layout();
    let (dims, stride) = (layout.dims(), layout.stride());
    let n = dims.len();
    if n == 0 || stride[n - 1] != 1 {
        return None;
    }
    if n == 1 {
        return Some((1, dims[0]));
    }
    // Outer axes must nest: stride[i] == stride[i + 1] * dims[i + 1] above the row axis.
    for i in 0..n - 2 {
        if stride[i] != stride[i + 1] * dims[i + 1] {
            return None;
        }
    }
    Some((dims[..n - 1].iter().product(), stride[n - 2]))
}

fn silu_mul_row(g: &[f32], u: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA are present (checked just above).
        return unsafe { x86::silu_mul_row(g, u, out) };
    }
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + (-g).exp()) * u;
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
pub(crate) fn exp_sub_in_place(x: &mut [f32], max: f32) -> f32 {
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

    /// See [`super::silu_mul_row`]: `g / (1 + exp(-g)) * u`, as candle's `silu` then a product.
    ///
    /// # Safety
    /// AVX2 and FMA present; `u` and `out` at least as long as `g`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul_row(g: &[f32], u: &[f32], out: &mut [f32]) {
        let one = _mm256_set1_ps(1.0);
        let n = g.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            let gv = _mm256_loadu_ps(g.as_ptr().add(i));
            let uv = _mm256_loadu_ps(u.as_ptr().add(i));
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            let s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(s, uv));
        }
        for i in n..g.len() {
            out[i] = g[i] / (1.0 + (-g[i]).exp()) * u[i];
        }
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
        // The last < 8 values as one vector, padded with -inf (exp 0), summed in order.
        let rest = chunks.into_remainder();
        let mut tail = [f32::NEG_INFINITY; 8];
        for (t, v) in tail.iter_mut().zip(rest.iter()) {
            *t = *v - max;
        }
        _mm256_storeu_ps(tail.as_mut_ptr(), exp8(_mm256_loadu_ps(tail.as_ptr())));
        for (v, e) in rest.iter_mut().zip(tail) {
            *v = e;
            sum += e;
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
        let mask = crate::model::causal_mask(t, offset, &dev).unwrap();
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
        let diff = crate::model::max_abs_diff(&got, &want);
        assert!(diff < 1e-6, "max abs difference {diff}");
    }

    /// The halves of a fused gate/up output (strided views) give candle's `silu(gate) * up`.
    #[test]
    fn silu_mul_matches_candle() {
        let dev = Device::Cpu;
        let y = (Tensor::randn(0f32, 4.0, (2, 3, 2 * 37), &dev).unwrap() * 3.0).unwrap();
        let (g, u) = (y.narrow(2, 0, 37).unwrap(), y.narrow(2, 37, 37).unwrap());
        let want = (g.silu().unwrap() * &u).unwrap();
        let got = silu_mul(&g, &u).unwrap().expect("row views");
        let rel: f32 = ((&got - &want).unwrap().abs().unwrap()
            / (want.abs().unwrap() + 1e-30).unwrap())
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
        assert!(rel < 1e-6, "max relative difference {rel}");
        assert_eq!(got.dims(), &[2, 3, 37]);
        // A transposed view is not a row view: generic path.
        assert!(silu_mul(&g.t().unwrap(), &u.t().unwrap())
            .unwrap()
            .is_none());
    }

    #[test]
    fn other_tensors_take_the_generic_path() {
        let dev = Device::Cpu;
        let s = Tensor::zeros((2, 3), DType::F64, &dev).unwrap();
        assert!(causal_softmax(s, 1.0, 2, 0).unwrap().is_none());
    }
}
