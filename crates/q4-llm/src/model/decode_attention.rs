//! Attention of a single new position over the KV cache, on the CPU, without gemm.
//!
//! candle's CPU matmul always dispatches gemm onto the rayon pool; for the tiny products of a
//! decode step (a few query rows against a few hundred keys) the dispatch costs tens of
//! microseconds, twice per layer. A plain loop over the cached rows is several times cheaper
//! until the cache gets long, where the matmul path takes over. The query heads that share a
//! kv head go together, so each cached row is read once per step, and kv heads run in parallel
//! once the cache holds a few hundred positions (each split into position ranges merged
//! afterwards where the kv heads alone would leave a thread idle). For head sizes 64 and 128 the
//! scores and the weighted value sums run on AVX2+FMA where present (eight keys per pass with
//! their sums reduced together; each head's output kept in registers across the value rows);
//! the portable loops compile for the baseline target (SSE2) and cost 1.22x the time of a
//! 600-token generation.

use anyhow::Result;
use candle_core::{DType, Device, Storage, Tensor};

use super::cpu_ops::{exp_sub_in_place, softmax_in_place};

/// Above this many multiply-adds per product, the parallel matmul path is faster.
const MAX_WORK: usize = 1 << 20;

/// From this many multiply-adds per product on, the kv heads run in parallel (a few hundred
/// cached positions for a small model; below, waking a worker costs more than it saves).
const PARALLEL_WORK: usize = 1 << 16;

/// `softmax(q kᵀ * scale) v` for `q` `[b, heads, 1, hd]` and `k`, `v` `[b, kv_heads, s, hd]`
/// (views of the cache, rows contiguous). `None` when this path does not apply.
pub fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let (b, nh, t, hd) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    if t != 1
        || !matches!(q.device(), Device::Cpu)
        || q.dtype() != DType::F32
        || k.dtype() != DType::F32
        || v.dtype() != DType::F32
        || nh * s * hd > MAX_WORK
    {
        return Ok(None);
    }
    let (q_storage, q_layout) = q.storage_and_layout();
    let (k_storage, k_layout) = k.storage_and_layout();
    let (v_storage, v_layout) = v.storage_and_layout();
    let (Some(qs), Some(ks), Some(vs)) = (
        f32_slice(&q_storage),
        f32_slice(&k_storage),
        f32_slice(&v_storage),
    ) else {
        return Ok(None);
    };
    let rows_ok = |st: &[usize]| st[3] == 1 && st[2] == hd;
    if !q.is_contiguous() || !rows_ok(k_layout.stride()) || !rows_ok(v_layout.stride()) {
        return Ok(None);
    }
    let qs = &qs[q_layout.start_offset()..];
    let (k_off, k_st) = (k_layout.start_offset(), k_layout.stride());
    let (v_off, v_st) = (v_layout.start_offset(), v_layout.stride());
    let n_rep = nh / nkv;
    let scale = scale as f32;
    let mut out = vec![0f32; b * nh * hd];
    // One unit per (batch row, kv head): its n_rep query heads read each cached key and value
    // row once, while it is in L1, instead of once per head. Per head the arithmetic (and so
    // the result) is what a head-by-head loop computes.
    // Scaled scores of unit (bi, kvh)'s query heads against cached positions s0..s1: head j's
    // row at j * (s1 - s0).
    let scores_of = |bi: usize, kvh: usize, s0: usize, s1: usize| {
        let k_base = k_off + bi * k_st[0] + kvh * k_st[1];
        let q0 = (bi * nh + kvh * n_rep) * hd;
        let len = s1 - s0;
        let mut scores = vec![0f32; n_rep * len];
        scores_block(
            &qs[q0..][..n_rep * hd],
            &ks[k_base + s0 * hd..][..len * hd],
            hd,
            scale,
            &mut scores,
        );
        scores
    };
    // Adds the cached values s0..s1 weighted by `weights` (laid out as `scores_of`'s) to head
    // j's output at o[j * stride..][..hd].
    let add_values = |bi: usize,
                      kvh: usize,
                      (s0, s1): (usize, usize),
                      weights: &[f32],
                      o: &mut [f32],
                      stride: usize| {
        let v_base = v_off + bi * v_st[0] + kvh * v_st[1];
        let len = s1 - s0;
        add_weighted(&vs[v_base + s0 * hd..][..len * hd], weights, hd, o, stride);
    };
    let unit = |(u, o): (usize, &mut [f32])| {
        let (bi, kvh) = (u / nkv, u % nkv);
        let mut scores = scores_of(bi, kvh, 0, s);
        for row in scores.chunks_exact_mut(s) {
            softmax_in_place(row);
        }
        add_values(bi, kvh, (0, s), &scores, o, hd);
    };
    if nh * s * hd >= PARALLEL_WORK {
        use rayon::prelude::*;
        let parts = position_parts(b * nkv, s, rayon::current_num_threads());
        if parts > 1 {
            // Fewer (batch row, kv head) units than the threads can share evenly (SmolLM2: 3 kv
            // heads on 2 threads): each unit also splits the cached positions into `parts`,
            // keeps its own softmax max, sum and unnormalized output, and the parts are merged.
            // Per part and head: max, sum, then hd output values.
            let width = n_rep * (hd + 2);
            let mut partial = vec![0f32; b * nkv * parts * width];
            partial
                .par_chunks_mut(width)
                .enumerate()
                .for_each(|(w, buf)| {
                    let (u, p) = (w / parts, w % parts);
                    let (bi, kvh) = (u / nkv, u % nkv);
                    let (s0, s1) = (p * s / parts, (p + 1) * s / parts);
                    let mut scores = scores_of(bi, kvh, s0, s1);
                    for (j, row) in scores.chunks_exact_mut(s1 - s0).enumerate() {
                        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let sum = exp_sub_in_place(row, max);
                        buf[j * (hd + 2)] = max;
                        buf[j * (hd + 2) + 1] = sum;
                    }
                    add_values(bi, kvh, (s0, s1), &scores, &mut buf[2..], hd + 2);
                });
            for (u, o) in out.chunks_mut(n_rep * hd).enumerate() {
                let parts_of = &partial[u * parts * width..][..parts * width];
                for (j, oj) in o.chunks_exact_mut(hd).enumerate() {
                    let at = |p: usize| &parts_of[p * width + j * (hd + 2)..][..hd + 2];
                    let max = (0..parts)
                        .map(|p| at(p)[0])
                        .fold(f32::NEG_INFINITY, f32::max);
                    let mut total = 0f32;
                    for p in 0..parts {
                        let (m, l, op) = (at(p)[0], at(p)[1], &at(p)[2..]);
                        let w = (m - max).exp();
                        total += l * w;
                        for (o, &x) in oj.iter_mut().zip(op) {
                            *o += w * x;
                        }
                    }
                    let inv = 1.0 / total;
                    oj.iter_mut().for_each(|v| *v *= inv);
                }
            }
        } else {
            out.par_chunks_mut(n_rep * hd).enumerate().for_each(unit);
        }
    } else {
        out.chunks_mut(n_rep * hd).enumerate().for_each(unit);
    }
    Ok(Some(Tensor::from_vec(out, (b, nh, 1, hd), &Device::Cpu)?))
}

/// Parts each of `units` (batch row, kv head) pairs splits its `s` cached positions into, so
/// that `threads` share the work evenly: 1 when the units already divide among the threads,
/// else enough parts for about four per thread, none shorter than 64 positions.
fn position_parts(units: usize, s: usize, threads: usize) -> usize {
    if threads <= 1 || units.is_multiple_of(threads) {
        return 1;
    }
    (4 * threads).div_ceil(units).min(s / 64).max(1)
}

fn f32_slice(s: &Storage) -> Option<&[f32]> {
    match s {
        Storage::Cpu(c) => c.as_slice::<f32>().ok(),
        _ => None,
    }
}

/// `out[j * len + i] = scale * (q_j · k_i)` for the query rows `q_j` (`q`, `hd` values each) and
/// the `len` key rows `k_i` (`keys`, contiguous).
fn scores_block(q: &[f32], keys: &[f32], hd: usize, scale: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if x86::applies(hd) {
        // SAFETY: AVX2 and FMA present and hd a supported multiple of 8 (`applies`).
        return unsafe { x86::scores_block(q, keys, hd, scale, out) };
    }
    let len = keys.len() / hd;
    for (i, krow) in keys.chunks_exact(hd).enumerate() {
        for (j, qrow) in q.chunks_exact(hd).enumerate() {
            out[j * len + i] = dot(qrow, krow) * scale;
        }
    }
}

/// `o_j += sum_i w[j * len + i] * v_i` for the `len` value rows `v_i` (`values`, contiguous),
/// head `j`'s output at `o[j * stride..][..hd]`.
fn add_weighted(values: &[f32], weights: &[f32], hd: usize, o: &mut [f32], stride: usize) {
    #[cfg(target_arch = "x86_64")]
    if x86::applies(hd) {
        // SAFETY: AVX2 and FMA present and hd a supported multiple of 8 (`applies`).
        return unsafe { x86::add_weighted(values, weights, hd, o, stride) };
    }
    let len = values.len() / hd;
    for (i, vrow) in values.chunks_exact(hd).enumerate() {
        for (j, w) in weights.chunks_exact(len).enumerate() {
            let p = w[i];
            for (o, &x) in o[j * stride..][..hd].iter_mut().zip(vrow) {
                *o += p * x;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::sync::LazyLock;

    static AVX2_FMA: LazyLock<bool> =
        LazyLock::new(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"));

    /// Whether these kernels serve head size `hd` here (64 and 128: the runner's models).
    pub fn applies(hd: usize) -> bool {
        *AVX2_FMA && (hd == 64 || hd == 128)
    }

    /// See [`super::scores_block`]: eight key rows at a time against one query row, their
    /// eight sums reduced together.
    ///
    /// # Safety
    /// AVX2 and FMA present; `hd` 64 or 128; `q` a multiple of `hd` values, `keys` too, and
    /// `out` `q.len() / hd * keys.len() / hd` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores_block(q: &[f32], keys: &[f32], hd: usize, scale: f32, out: &mut [f32]) {
        match hd {
            64 => scores::<8>(q, keys, scale, out),
            _ => scores::<16>(q, keys, scale, out),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn scores<const NCH: usize>(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
        let hd = 8 * NCH;
        let len = keys.len() / hd;
        debug_assert!(out.len() >= q.len() / hd * len);
        let sc = _mm256_set1_ps(scale);
        let kp = keys.as_ptr();
        for (j, qrow) in q.chunks_exact(hd).enumerate() {
            let qv: [__m256; NCH] =
                std::array::from_fn(|c| _mm256_loadu_ps(qrow.as_ptr().add(8 * c)));
            let o = out.as_mut_ptr().add(j * len);
            let mut i = 0;
            while len - i >= 8 {
                let acc: [__m256; 8] = std::array::from_fn(|r| products(&qv, kp.add((i + r) * hd)));
                _mm256_storeu_ps(o.add(i), _mm256_mul_ps(sum8(&acc), sc));
                i += 8;
            }
            for i in i..len {
                *o.add(i) = hsum(products(&qv, kp.add(i * hd))) * scale;
            }
        }
    }

    /// The products of `q` with the `8 * NCH` values at `k`, summed per lane.
    ///
    /// # Safety
    /// AVX2 and FMA present; `k` readable for `8 * NCH` values.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn products<const NCH: usize>(q: &[__m256; NCH], k: *const f32) -> __m256 {
        let mut a = _mm256_mul_ps(q[0], _mm256_loadu_ps(k));
        for (c, qc) in q.iter().enumerate().skip(1) {
            a = _mm256_fmadd_ps(*qc, _mm256_loadu_ps(k.add(8 * c)), a);
        }
        a
    }

    /// See [`super::add_weighted`]: per head, its output held in registers across a block of
    /// value rows.
    ///
    /// # Safety
    /// AVX2 and FMA present; `hd` 64 or 128; `values` a multiple of `hd` values; `weights`
    /// heads x `values.len() / hd`; `o` holding each head's `hd` values at `j * stride`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn add_weighted(
        values: &[f32],
        weights: &[f32],
        hd: usize,
        o: &mut [f32],
        stride: usize,
    ) {
        match hd {
            64 => add::<8>(values, weights, o, stride),
            _ => add::<16>(values, weights, o, stride),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn add<const NCH: usize>(values: &[f32], weights: &[f32], o: &mut [f32], stride: usize) {
        let hd = 8 * NCH;
        let len = values.len() / hd;
        let vp = values.as_ptr();
        for (j, w) in weights.chunks_exact(len).enumerate() {
            debug_assert!(o.len() >= j * stride + hd);
            let op = o.as_mut_ptr().add(j * stride);
            let mut acc: [__m256; NCH] = std::array::from_fn(|c| _mm256_loadu_ps(op.add(8 * c)));
            for (i, &p) in w.iter().enumerate() {
                let pv = _mm256_set1_ps(p);
                let v = vp.add(i * hd);
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v.add(8 * c)), *a);
                }
            }
            for (c, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(op.add(8 * c), *a);
            }
        }
    }

    /// The lane sums of eight vectors, in order, in one vector.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn sum8(v: &[__m256; 8]) -> __m256 {
        let u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
        let u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
        // u0: rows 0-3 over elements 0-3, then over elements 4-7; u1 the same for rows 4-7.
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(u0, u1),
            _mm256_permute2f128_ps::<0x31>(u0, u1),
        )
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }
}

/// Dot product with 8 independent accumulators so it vectorizes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((a, x), y) in acc.iter_mut().zip(x).zip(y) {
            *a += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Same result as the matmul path on a strided cache view with GQA: a short cache (one
    /// thread) and one long enough for the kv heads to run in parallel.
    #[test]
    fn matches_matmul_attention() {
        check_against_matmul(2, 6, 2, 20, 16, 11);
        let (nh, hd, s) = (6, 32, 400);
        assert!(nh * s * hd >= PARALLEL_WORK && nh * s * hd <= MAX_WORK);
        check_against_matmul(2, nh, 3, hd, 512, s);
    }

    /// Three kv heads (SmolLM2's) over a cache long enough to run in parallel: with two or more
    /// threads each head splits its positions into parts that are merged afterwards.
    #[test]
    fn split_positions_match_matmul_attention() {
        let (nh, hd, s) = (9, 64, 700);
        assert!(nh * s * hd >= PARALLEL_WORK && nh * s * hd <= MAX_WORK);
        check_against_matmul(1, nh, 3, hd, 1024, s);
        check_against_matmul(1, nh, 3, hd, 1024, 130);
    }

    /// The head sizes with SIMD kernels (64, 128), short caches and lengths that are not a
    /// multiple of the eight keys scored together.
    #[test]
    fn simd_head_sizes_match_matmul_attention() {
        check_against_matmul(1, 9, 3, 64, 16, 5);
        check_against_matmul(2, 9, 3, 64, 64, 37);
        check_against_matmul(1, 8, 2, 128, 256, 45);
        check_against_matmul(1, 16, 8, 128, 64, 8);
    }

    #[test]
    fn positions_split_only_where_heads_do_not_divide_among_threads() {
        assert_eq!(position_parts(3, 400, 2), 3);
        assert_eq!(position_parts(3, 700, 16), 10);
        assert_eq!(position_parts(6, 400, 2), 1);
        assert_eq!(position_parts(3, 100, 2), 1);
        assert_eq!(position_parts(3, 400, 1), 1);
    }

    fn check_against_matmul(b: usize, nh: usize, nkv: usize, hd: usize, cap: usize, s: usize) {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (b, nh, 1, hd), &dev).unwrap();
        let kc = Tensor::randn(0f32, 1., (b, nkv, cap, hd), &dev).unwrap();
        let vc = Tensor::randn(0f32, 1., (b, nkv, cap, hd), &dev).unwrap();
        let (k, v) = (kc.narrow(2, 0, s).unwrap(), vc.narrow(2, 0, s).unwrap());
        let scale = 0.3;
        let got = decode_attention(&q, &k, &v, scale)
            .unwrap()
            .expect("applies");
        let n_rep = nh / nkv;
        let qg = q.reshape((b, nkv, n_rep, hd)).unwrap();
        let scores = (qg.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let p = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let want = p.matmul(&v).unwrap().reshape((b, nh, 1, hd)).unwrap();
        let err = crate::model::max_abs_diff(&got, &want);
        assert!(err < 1e-5, "{err}");
    }
}
