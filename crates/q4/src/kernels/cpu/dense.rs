//! bfloat16 weights (kept dense, e.g. embeddings and the output layer next to 4-bit decoder
//! layers): a GEMV that widens each weight to f32 in registers, and the tiled GEMM for larger
//! batches. candle's own CPU bf16 matmul runs at about 1 GFLOP/s; f32 activations are kept.

use half::bf16;

use super::gemm::matmul_decoded;
use super::parallel::for_each_chunk_mut;
use super::{transpose_into, GEMV_MAX_BATCH};

const ROWS_PER_TASK: usize = 64;

#[inline(always)]
fn widen(b: bf16) -> f32 {
    f32::from_bits((b.to_bits() as u32) << 16)
}

/// `dot(w, x)` with eight partial sums (vectorises: a widening shift, a multiply and an add
/// per lane; the same arithmetic in the portable and the AVX2 copy).
#[inline(always)]
fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (cw, cx) = (w.chunks_exact(8), x.chunks_exact(8));
    let (rw, rx) = (cw.remainder(), cx.remainder());
    for (a, b) in cw.zip(cx) {
        for i in 0..8 {
            acc[i] += widen(a[i]) * b[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in rw.iter().zip(rx) {
        s += widen(*a) * b;
    }
    s
}

fn rows(w: &[bf16], k: usize, x: &[f32], batch: usize, r0: usize, out: &mut [f32]) {
    use super::prefetch::{enabled, prefetch, PREFETCH_AHEAD};
    let pf = enabled() && k <= 1024;
    for (i, o) in out.chunks_exact_mut(batch).enumerate() {
        let row = &w[(r0 + i) * k..(r0 + i + 1) * k];
        if pf {
            // The row 4096 weights ahead (4x the 4-bit distance in bf16 bytes). Short rows only:
            // the 576-wide rows of a small model's LM head gain 8-13% (examples/ab_prefetch);
            // 1536-wide rows were 10-40% slower at every distance tried (1-16 KiB), whole row
            // or first KiB.
            let ahead = (row.as_ptr() as *const u8).wrapping_add(4 * PREFETCH_AHEAD);
            for off in (0..2 * k).step_by(64) {
                prefetch(ahead.wrapping_add(off));
            }
        }
        for (m, y) in o.iter_mut().enumerate() {
            *y = dot_bf16(row, &x[m * k..(m + 1) * k]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(w: &[bf16], k: usize, x: &[f32], batch: usize, r0: usize, out: &mut [f32]) {
    rows(w, k, x, batch, r0, out)
}

/// `y[m, n] = sum_k x[m, k] W[n, k]` for a row-major bf16 `W` (`n x k`).
pub fn matmul_bf16(w: &[bf16], n: usize, k: usize, x: &[f32], batch: usize, y: &mut [f32]) {
    if batch > GEMV_MAX_BATCH {
        let decode = |r: usize, k0: usize, out: &mut [f32]| {
            for (o, &b) in out.iter_mut().zip(&w[r * k + k0..]) {
                *o = widen(b);
            }
        };
        return matmul_decoded(n, k, decode, x, batch, y);
    }
    let mut yt = vec![0f32; n * batch];
    let simd = q4_formats::simd::has_avx2();
    for_each_chunk_mut(
        &mut yt,
        ROWS_PER_TASK * batch,
        n * k * batch.div_ceil(2),
        |t, out| {
            let r0 = t * ROWS_PER_TASK;
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: AVX2 and FMA are present (checked above); the body is safe Rust.
                unsafe { rows_avx2(w, k, x, batch, r0, out) };
                return;
            }
            let _ = simd;
            rows(w, k, x, batch, r0, out);
        },
    );
    transpose_into(&yt, n, batch, y);
}
