//! Fused GEMV for batches of 1-8 activation rows: each task walks a chunk of weight rows,
//! decoding 4-bit codes through the codebook in registers; the dense weight never exists.

use rayon::prelude::*;

use super::rows::Rows;
use super::transpose_into;

/// Weight rows per rayon task: large enough to amortise scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 32;

pub fn avx2_available() -> bool {
    q4_formats::simd::has_avx2()
}

/// `y[m, n] = sum_k x[m, k] W[n, k]`.
pub fn matmul(w: &Rows<'_>, x: &[f32], batch: usize, y: &mut [f32]) {
    // Results are produced row-major by weight row ([n][m]) and transposed at the end.
    let mut yt = vec![0f32; w.n * batch];
    yt.par_chunks_mut(ROWS_PER_TASK * batch)
        .enumerate()
        .for_each(|(t, out)| {
            let r0 = t * ROWS_PER_TASK;
            let r1 = (r0 + ROWS_PER_TASK).min(w.n);
            rows(w, x, batch, r0, r1, out);
        });
    if batch == 1 {
        y.copy_from_slice(&yt);
    } else {
        transpose_into(&yt, w.n, batch, y);
    }
}

/// Computes rows `r0..r1` into `out` (`[row - r0][m]`).
pub fn rows(w: &Rows<'_>, x: &[f32], batch: usize, r0: usize, r1: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if w.aligned && w.block.is_multiple_of(16) && avx2_available() {
        // SAFETY: AVX2+FMA are present (checked above) and the geometry requirements of
        // `rows_kernel` (aligned rows, blocks of a multiple of 16, rows in range, `x` holding
        // `batch` rows of k) are established by the caller and the checks here.
        unsafe { rows_avx2(w, x, batch, r0, r1, out) };
        add_tails(w, x, batch, r0, r1, out);
        return;
    }
    rows_portable(w, x, batch, r0, r1, out);
}

/// Adds the columns after the last whole block (NVFP4/MXFP4 rows padded to whole blocks).
fn add_tails(w: &Rows<'_>, x: &[f32], batch: usize, r0: usize, r1: usize, out: &mut [f32]) {
    let start = w.full_blocks() * w.block;
    if start == w.k {
        return;
    }
    for r in r0..r1 {
        for col in start..w.k {
            let wv = w.weight(r, col);
            for m in 0..batch {
                out[(r - r0) * batch + m] += wv * x[m * w.k + col];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(w: &Rows<'_>, x: &[f32], batch: usize, r0: usize, r1: usize, out: &mut [f32]) {
    use super::x86::rows_kernel;
    macro_rules! run {
        ($r:literal, $b:literal) => {{
            let mut r = r0;
            while r1 - r >= $r {
                rows_kernel::<$r, $b>(w, x, r, &mut out[(r - r0) * $b..]);
                r += $r;
            }
            while r < r1 {
                rows_kernel::<1, $b>(w, x, r, &mut out[(r - r0) * $b..]);
                r += 1;
            }
        }};
    }
    match batch {
        1 => run!(4, 1),
        2 => run!(3, 2),
        3 => run!(2, 3),
        4 => run!(2, 4),
        5 => run!(1, 5),
        6 => run!(1, 6),
        7 => run!(1, 7),
        8 => run!(1, 8),
        _ => unreachable!("GEMV serves batches of 1-8"),
    }
}

/// Portable path (and the only path for bitsandbytes blocks that straddle rows): decode one row
/// at a time into a row buffer, then dot it with each activation row.
pub fn rows_portable(w: &Rows<'_>, x: &[f32], batch: usize, r0: usize, r1: usize, out: &mut [f32]) {
    let mut buf = vec![0f32; w.k];
    for r in r0..r1 {
        w.decode_row(r, &mut buf);
        for m in 0..batch {
            out[(r - r0) * batch + m] = dot(&buf, &x[m * w.k..(m + 1) * w.k]);
        }
    }
}

/// Dot product with eight independent partial sums (vectorises on any target).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}
