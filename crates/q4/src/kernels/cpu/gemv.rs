//! Fused GEMV for batches of 1-8 activation rows: each task walks a chunk of weight rows,
//! decoding 4-bit codes through the codebook in registers; the dense weight never exists.

use super::aligned::AlignedBuf;
use super::parallel::for_each_chunk_mut;
use super::rows::Rows;

#[cfg(target_arch = "aarch64")]
use super::aarch64 as arch;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
use super::no_simd as arch;
#[cfg(target_arch = "x86_64")]
use super::x86 as arch;

/// Weight rows per rayon task: large enough to amortise scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 32;

/// Whether a SIMD micro-kernel (AVX2+FMA on x86-64, NEON on aarch64) is available here.
pub fn simd_available() -> bool {
    arch::available()
}

/// Whether the SIMD chunk kernel can walk this weight's rows: rows aligned to blocks, and blocks
/// that tile a chunk (16, 32) or are tiled by it (multiples of 64).
pub(super) fn simd_fits(w: &Rows<'_>) -> bool {
    let b = w.block;
    simd_available() && w.aligned && b.is_multiple_of(16) && (64 % b == 0 || b.is_multiple_of(64))
}

/// `y[m, n] = sum_k x[m, k] W[n, k]`.
pub fn matmul(w: &Rows<'_>, x: &[f32], batch: usize, y: &mut [f32]) {
    let simd = simd_fits(w);
    // Where AVX-512F is present its kernel replaces the AVX2 one (same chunks, other order).
    #[cfg(target_arch = "x86_64")]
    let wide = simd && super::avx512::usable();
    #[cfg(not(target_arch = "x86_64"))]
    let wide = false;
    // Batch 1 on AVX-512BW: 128-weight groups (`avx512_groups`), activations in their order.
    #[cfg(target_arch = "x86_64")]
    let groups = wide && batch == 1 && super::avx512_groups::usable();
    #[cfg(not(target_arch = "x86_64"))]
    let groups = false;
    // The permuted activations start on a cache line, so the kernels' vector loads never
    // straddle two (see `aligned`).
    let mut xp_buf = AlignedBuf::new();
    let xp = xp_buf.slice(if simd { x.len() } else { 0 });
    if groups {
        #[cfg(target_arch = "x86_64")]
        super::avx512_groups::permute_activations(x, w.k, w.high_first, xp);
    } else if wide {
        #[cfg(target_arch = "x86_64")]
        super::avx512::permute_activations(x, w.k, w.high_first, xp);
    } else if simd {
        arch::permute_activations(x, w.k, w.high_first, xp);
    }
    let xp = &*xp;
    // Results come row-major by weight row ([n][m]): at batch 1 straight into `y`.
    let mut yt = Vec::new();
    let out = super::row_major_out(y, &mut yt, w.n, batch);
    for_each_chunk_mut(
        out,
        ROWS_PER_TASK * batch,
        w.n * w.k * batch.div_ceil(2),
        |t, out| {
            let r0 = t * ROWS_PER_TASK;
            let r1 = (r0 + ROWS_PER_TASK).min(w.n);
            if groups {
                #[cfg(target_arch = "x86_64")]
                {
                    // SAFETY: AVX-512F and BW are present (`avx512_groups::usable`) and the
                    // geometry fits the chunk kernel (`simd_fits`); rows r0..r1 exist, `out`
                    // holds their values (batch 1) and `xp` the row permuted for this kernel.
                    unsafe { super::avx512_groups::rows(w, xp, r0, r1, out) };
                    add_tails(w, x, batch, r0, r1, super::avx512::CHUNK, out);
                }
            } else if wide {
                #[cfg(target_arch = "x86_64")]
                {
                    // SAFETY: AVX-512F is present (`usable`) and the geometry fits the chunk
                    // kernel (`simd_fits`); rows r0..r1 exist and `xp` holds `batch` rows of k
                    // values permuted for this kernel.
                    unsafe { super::avx512::rows(w, xp, batch, r0, r1, out) };
                    add_tails(w, x, batch, r0, r1, super::avx512::CHUNK, out);
                }
            } else if simd {
                // SAFETY: the SIMD extension is present and the geometry fits the chunk kernel
                // (`simd_fits`); rows r0..r1 exist and `xp` holds `batch` permuted rows of k
                // values.
                unsafe { arch::rows(w, xp, batch, r0, r1, out) };
                add_tails(w, x, batch, r0, r1, arch::CHUNK, out);
            } else {
                rows_portable(w, x, batch, r0, r1, out);
            }
        },
    );
    super::finish_row_major(&yt, w.n, batch, y)
}

/// Reorders each activation row (`k` values) chunk by chunk: `out[c + p] = x[c + order[p]]` for
/// every whole chunk of `order.len()` values; the tail stays in place. The SIMD kernels decode
/// weights in a fixed permuted order and permute the activations once per call to match.
pub(super) fn permute_chunks(x: &[f32], k: usize, order: &[usize], out: &mut [f32]) {
    let chunk = order.len();
    assert_eq!(out.len(), x.len());
    let full = k / chunk * chunk;
    for (src, dst) in x.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        for (s, d) in src[..full]
            .chunks_exact(chunk)
            .zip(dst[..full].chunks_exact_mut(chunk))
        {
            for (p, &o) in order.iter().enumerate() {
                d[p] = s[o];
            }
        }
        dst[full..].copy_from_slice(&src[full..]);
    }
}

/// The bytes of a 16-entry f32 codebook split into four planes (plane `p` holds byte `p`, little
/// endian, of every value) for byte-table lookups (`vpshufb`, `tbl`).
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
pub(super) fn byte_planes(lut: &[f32; 16]) -> [[u8; 16]; 4] {
    let mut bytes = [[0u8; 16]; 4];
    for (c, v) in lut.iter().enumerate() {
        for (p, plane) in bytes.iter_mut().enumerate() {
            plane[c] = v.to_bits().to_le_bytes()[p];
        }
    }
    bytes
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
