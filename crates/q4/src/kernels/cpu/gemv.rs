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

/// Whether the AVX2 chunk kernel can walk this weight's rows.
fn avx2_fits(w: &Rows<'_>) -> bool {
    let b = w.block;
    avx2_available() && w.aligned && b.is_multiple_of(16) && (64 % b == 0 || b.is_multiple_of(64))
}

/// `y[m, n] = sum_k x[m, k] W[n, k]`.
pub fn matmul(w: &Rows<'_>, x: &[f32], batch: usize, y: &mut [f32]) {
    // Results are produced row-major by weight row ([n][m]) and transposed at the end.
    let mut yt = vec![0f32; w.n * batch];
    #[cfg(target_arch = "x86_64")]
    if avx2_fits(w) {
        let mut xp = Vec::new();
        super::x86::permute_activations(x, w.k, w.high_first, &mut xp);
        yt.par_chunks_mut(ROWS_PER_TASK * batch)
            .enumerate()
            .for_each(|(t, out)| {
                let r0 = t * ROWS_PER_TASK;
                let r1 = (r0 + ROWS_PER_TASK).min(w.n);
                // SAFETY: AVX2+FMA are present and the geometry fits the chunk kernel (`avx2_fits`);
                // rows r0..r1 exist and `xp` holds `batch` permuted rows of k values.
                unsafe { rows_avx2(w, &xp, batch, r0, r1, out) };
                add_tails(w, x, batch, r0, r1, super::x86::CHUNK, out);
            });
        return finish(yt, w.n, batch, y);
    }
    yt.par_chunks_mut(ROWS_PER_TASK * batch)
        .enumerate()
        .for_each(|(t, out)| {
            let r0 = t * ROWS_PER_TASK;
            let r1 = (r0 + ROWS_PER_TASK).min(w.n);
            rows_portable(w, x, batch, r0, r1, out);
        });
    finish(yt, w.n, batch, y)
}

fn finish(yt: Vec<f32>, n: usize, batch: usize, y: &mut [f32]) {
    if batch == 1 {
        y.copy_from_slice(&yt);
    } else {
        transpose_into(&yt, n, batch, y);
    }
}

/// Adds the columns after the last whole `chunk` of each row (and any zero-padded block).
fn add_tails(
    w: &Rows<'_>,
    x: &[f32],
    batch: usize,
    r0: usize,
    r1: usize,
    chunk: usize,
    out: &mut [f32],
) {
    let start = w.k / chunk * chunk;
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
unsafe fn rows_avx2(w: &Rows<'_>, xp: &[f32], batch: usize, r0: usize, r1: usize, out: &mut [f32]) {
    use super::rows::ScaleSrc;
    use super::x86::{
        block_class, rows_kernel, F32Scales, Planes, TableScales, BLOCK16, BLOCK32, BLOCK64,
    };
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
