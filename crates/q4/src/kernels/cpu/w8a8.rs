//! W8A8 products of an int8 table (`Int8Table`) with int8 activations, both in blocks of 32
//! with an f32 scale: each block's dot product is an exact integer sum (`vpmaddubsw` on AVX2),
//! scaled by the two block scales. Batches above the GEMV's run the tiled f32 GEMM over the
//! decoded table and the dequantized activations: the same product up to f32 rounding.

use super::gemm::matmul_decoded;
use super::parallel::for_each_chunk_mut;
use super::w4a8::{Int8Acts, ACT_BLOCK};
use super::{transpose_into, GEMV_MAX_BATCH};

const ROWS_PER_TASK: usize = 64;

/// Portable row kernel: integer block sums, one f32 multiply-add per block.
fn rows_portable(
    q: &[i8],
    d: &[f32],
    k: usize,
    x: &Int8Acts,
    batch: usize,
    r0: usize,
    out: &mut [f32],
) {
    let nb = k / ACT_BLOCK;
    for (i, o) in out.chunks_exact_mut(batch).enumerate() {
        let r = r0 + i;
        for (m, y) in o.iter_mut().enumerate() {
            let mut acc = 0f32;
            for b in 0..nb {
                let w = &q[r * k + b * ACT_BLOCK..][..ACT_BLOCK];
                let a = &x.q[m * k + b * ACT_BLOCK..][..ACT_BLOCK];
                let s: i32 = w.iter().zip(a).map(|(&u, &v)| u as i32 * v as i32).sum();
                acc += s as f32 * (d[r * nb + b] * x.d[m * nb + b]);
            }
            *y = acc;
        }
    }
}

/// `y[m, n] = sum_k xq[m, k] T[n, k]` for an int8 table `q`/`d` (`n x k`, `k` a multiple of 32).
pub fn matmul(q: &[i8], d: &[f32], n: usize, k: usize, x: &Int8Acts, batch: usize, y: &mut [f32]) {
    debug_assert!(k.is_multiple_of(ACT_BLOCK) && q.len() == n * k && y.len() == batch * n);
    if batch == 0 || n == 0 {
        return;
    }
    if batch > GEMV_MAX_BATCH {
        let nb = k / ACT_BLOCK;
        let decode = |r: usize, k0: usize, out: &mut [f32]| {
            for (j, o) in out.iter_mut().enumerate() {
                let c = k0 + j;
                *o = q[r * k + c] as f32 * d[r * nb + c / ACT_BLOCK];
            }
        };
        return matmul_decoded(n, k, decode, &x.dequantize(), batch, y);
    }
    let mut yt = vec![0f32; n * batch];
    #[cfg(target_arch = "x86_64")]
    let simd = super::x86::available();
    #[cfg(target_arch = "x86_64")]
    let vnni = super::avx512::vnni_usable().then(|| super::avx512::w8a8_corrections(x));
    for_each_chunk_mut(&mut yt, ROWS_PER_TASK * batch, n * k * batch, |t, out| {
        let r0 = t * ROWS_PER_TASK;
        #[cfg(target_arch = "x86_64")]
        if let Some(corr) = &vnni {
            // SAFETY: AVX-512 BW + VNNI present (`vnni_usable`); k is a multiple of 32; this
            // task's rows exist in q and d; x holds `batch` rows and `corr` their corrections.
            unsafe { super::avx512::rows_w8a8(q, d, k, x, corr, batch, r0, out) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX2 and FMA are present (checked above); rows r0.. of `q`/`d` exist for
            // every output slot of `out`, and `x` holds `batch` rows of `k` values.
            unsafe { super::x86::rows_w8a8(q, d, k, x, batch, r0, out) };
            return;
        }
        rows_portable(q, d, k, x, batch, r0, out);
    });
    transpose_into(&yt, n, batch, y);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SIMD GEMV, the portable rows and the tiled GEMM all compute the integer product.
    #[test]
    fn every_path_computes_the_block_product() {
        let (n, k) = (70usize, 96usize);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 201) as f32 / 50.0 - 2.0)
            .collect();
        let t = Int8Acts::quantize(&w, k);
        for batch in [1usize, 3, 8, 12] {
            let xs: Vec<f32> = (0..batch * k)
                .map(|i| ((i * 104729) % 97) as f32 / 13.0 - 3.5)
                .collect();
            let xq = Int8Acts::quantize(&xs, k);
            // f64 reference of the dequantized operands.
            let (wd, xd) = (t.dequantize(), xq.dequantize());
            let mut want = vec![0f64; batch * n];
            for m in 0..batch {
                for r in 0..n {
                    want[m * n + r] = (0..k)
                        .map(|c| wd[r * k + c] as f64 * xd[m * k + c] as f64)
                        .sum();
                }
            }
            let mut got = vec![0f32; batch * n];
            matmul(&t.q, &t.d, n, k, &xq, batch, &mut got);
            let mut port = vec![0f32; n * batch];
            rows_portable(&t.q, &t.d, k, &xq, batch, 0, &mut port);
            // Both SIMD kernels directly, whichever `matmul` picked on this host.
            #[allow(unused_mut)]
            let mut simd: Vec<(&str, Vec<f32>)> = Vec::new();
            #[cfg(target_arch = "x86_64")]
            if batch <= GEMV_MAX_BATCH {
                if super::super::x86::available() {
                    let mut o = vec![0f32; n * batch];
                    // SAFETY: AVX2 present (checked); k is a multiple of 32; rows 0..n exist.
                    unsafe { super::super::x86::rows_w8a8(&t.q, &t.d, k, &xq, batch, 0, &mut o) };
                    simd.push(("avx2", o));
                }
                if super::super::avx512::vnni_usable() {
                    let corr = super::super::avx512::w8a8_corrections(&xq);
                    let mut o = vec![0f32; n * batch];
                    // SAFETY: AVX-512 VNNI present (checked); as above, with `corr` for `xq`.
                    unsafe {
                        super::super::avx512::rows_w8a8(&t.q, &t.d, k, &xq, &corr, batch, 0, &mut o)
                    };
                    // From an offset row (the parallel GEMV's ranges): the same values.
                    let mut part = vec![0f32; (n - 5) * batch];
                    // SAFETY: as above, rows 5..n.
                    unsafe {
                        super::super::avx512::rows_w8a8(
                            &t.q, &t.d, k, &xq, &corr, batch, 5, &mut part,
                        )
                    };
                    assert_eq!(
                        part[..],
                        o[5 * batch..],
                        "avx512-vnni from row 5, batch {batch}"
                    );
                    simd.push(("avx512-vnni", o));
                }
            }
            for m in 0..batch {
                for r in 0..n {
                    let w = want[m * n + r];
                    let tol = 1e-4 * w.abs().max(1.0);
                    assert!(
                        (got[m * n + r] as f64 - w).abs() < tol,
                        "batch {batch} ({m}, {r})"
                    );
                    assert!(
                        (port[r * batch + m] as f64 - w).abs() < tol,
                        "portable ({m}, {r})"
                    );
                    for (name, o) in &simd {
                        let v = o[r * batch + m] as f64;
                        assert!((v - w).abs() < tol, "{name} batch {batch} ({m}, {r})");
                    }
                }
            }
        }
    }
}
