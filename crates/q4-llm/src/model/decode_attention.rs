//! Attention of a single new position over the KV cache, on the CPU, without gemm.
//!
//! candle's CPU matmul always dispatches gemm onto the rayon pool; for the tiny products of a
//! decode step (a few query rows against a few hundred keys) the dispatch costs tens of
//! microseconds, twice per layer. A plain loop over the cached rows is several times cheaper
//! until the cache gets long, where the matmul path takes over.

use anyhow::Result;
use candle_core::{DType, Device, Storage, Tensor};

use super::cpu_ops::softmax_in_place;

/// Above this many multiply-adds per product, the parallel matmul path is faster.
const MAX_WORK: usize = 1 << 20;

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
    let mut scores = vec![0f32; s];
    for bi in 0..b {
        for h in 0..nh {
            let kvh = h / n_rep;
            let qrow = &qs[(bi * nh + h) * hd..][..hd];
            let k_base = k_off + bi * k_st[0] + kvh * k_st[1];
            for (si, score) in scores.iter_mut().enumerate() {
                *score = dot(qrow, &ks[k_base + si * hd..][..hd]) * scale;
            }
            softmax_in_place(&mut scores);
            let orow = &mut out[(bi * nh + h) * hd..][..hd];
            let v_base = v_off + bi * v_st[0] + kvh * v_st[1];
            for (si, &p) in scores.iter().enumerate() {
                for (o, &x) in orow.iter_mut().zip(&vs[v_base + si * hd..][..hd]) {
                    *o += p * x;
                }
            }
        }
    }
    Ok(Some(Tensor::from_vec(out, (b, nh, 1, hd), &Device::Cpu)?))
}

fn f32_slice(s: &Storage) -> Option<&[f32]> {
    match s {
        Storage::Cpu(c) => c.as_slice::<f32>().ok(),
        _ => None,
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

    /// Same result as the matmul path on a strided cache view with GQA.
    #[test]
    fn matches_matmul_attention() {
        let dev = Device::Cpu;
        let (b, nh, nkv, hd, cap, s) = (2, 6, 2, 20, 16, 11);
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
