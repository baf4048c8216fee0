//! NEON micro-kernels of the fused 4-bit GEMV (aarch64).
//!
//! Same design as the AVX2 kernel: 32 weights (16 packed bytes) per step; low and high nibbles
//! become two vectors of 16 byte codes, `tbl` looks them up in byte planes of the codebook
//! (2 planes when every value is exact in bfloat16, else 4), and zips assemble the f32 values.
//! The weights come out in a fixed order (even elements, then odd ones), so activations are
//! permuted once per call to match.

use std::arch::aarch64::*;

use super::rows::{block_class, F32Scales, Rows, ScaleSrc, Scales, TableScales, BLOCK16, BLOCK64};

/// Weights per decode step.
pub const CHUNK: usize = 32;

/// NEON is part of the aarch64 baseline; checked anyway for clarity.
pub fn available() -> bool {
    std::arch::is_aarch64_feature_detected!("neon")
}

/// Position in the chunk of the weight that decoded vector `t` (0..8), lane `j` (0..4) holds
/// (low-nibble-first storage; high-nibble-first swaps even and odd).
#[inline]
pub fn chunk_element(t: usize, j: usize, high_first: bool) -> usize {
    let parity = (t / 4) ^ usize::from(high_first);
    2 * ((t % 4) * 4 + j) + parity
}

/// Reorders activation rows (`batch x k`) to the kernel's weight order (full chunks only).
/// `out` holds as many values as `x`.
pub fn permute_activations(x: &[f32], k: usize, high_first: bool, out: &mut [f32]) {
    let mut order = [0usize; CHUNK];
    for t in 0..8 {
        for j in 0..4 {
            order[t * 4 + j] = chunk_element(t, j, high_first);
        }
    }
    super::gemv::permute_chunks(x, k, &order, out);
}

/// Byte planes of a 16-entry codebook for `tbl`.
pub struct Planes {
    b: [uint8x16_t; 4],
}

impl Planes {
    /// # Safety
    /// NEON must be available (always on aarch64).
    #[target_feature(enable = "neon")]
    pub unsafe fn new(lut: &[f32; 16]) -> Planes {
        let bytes = super::gemv::byte_planes(lut);
        Planes {
            b: [
                vld1q_u8(bytes[0].as_ptr()),
                vld1q_u8(bytes[1].as_ptr()),
                vld1q_u8(bytes[2].as_ptr()),
                vld1q_u8(bytes[3].as_ptr()),
            ],
        }
    }

    pub fn bf16_exact(lut: &[f32; 16]) -> bool {
        lut.iter().all(|v| v.to_bits() & 0xffff == 0)
    }
}

/// 16 byte codes -> four vectors of four f32 (codes 0-3, 4-7, 8-11, 12-15).
#[target_feature(enable = "neon")]
#[inline]
unsafe fn decode16<const BF16: bool>(codes: uint8x16_t, p: &Planes) -> [float32x4_t; 4] {
    let b2 = vqtbl1q_u8(p.b[2], codes);
    let b3 = vqtbl1q_u8(p.b[3], codes);
    let hi = [
        vreinterpretq_u16_u8(vzip1q_u8(b2, b3)),
        vreinterpretq_u16_u8(vzip2q_u8(b2, b3)),
    ];
    let lo = if BF16 {
        [vdupq_n_u16(0), vdupq_n_u16(0)]
    } else {
        let b0 = vqtbl1q_u8(p.b[0], codes);
        let b1 = vqtbl1q_u8(p.b[1], codes);
        [
            vreinterpretq_u16_u8(vzip1q_u8(b0, b1)),
            vreinterpretq_u16_u8(vzip2q_u8(b0, b1)),
        ]
    };
    let f = |l: uint16x8_t, h: uint16x8_t, second: bool| {
        let v = if second {
            vzip2q_u16(l, h)
        } else {
            vzip1q_u16(l, h)
        };
        vreinterpretq_f32_u16(v)
    };
    [
        f(lo[0], hi[0], false),
        f(lo[0], hi[0], true),
        f(lo[1], hi[1], false),
        f(lo[1], hi[1], true),
    ]
}

/// The 32 weights at `ptr` as eight vectors, in [`chunk_element`] order.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn decode32<const BF16: bool>(ptr: *const u8, p: &Planes) -> [float32x4_t; 8] {
    let v = vld1q_u8(ptr);
    let lo = vandq_u8(v, vdupq_n_u8(0x0f));
    let hi = vshrq_n_u8(v, 4);
    let a = decode16::<BF16>(lo, p);
    let b = decode16::<BF16>(hi, p);
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
}

/// `out[r * B + m] = sum_k W[row, k] x[m, k]` over the whole chunks of one row.
///
/// # Safety
/// NEON present; aligned rows with blocks of 16, 32 or multiples of 32; `row` in range; `xp`
/// holds `B` permuted activation rows of `w.k` values.
#[target_feature(enable = "neon")]
#[allow(clippy::needless_range_loop)]
unsafe fn row_kernel<const B: usize, const BF16: bool, const BK: u8, S: Scales>(
    w: &Rows<'_>,
    scales: S,
    planes: &Planes,
    xp: &[f32],
    row: usize,
    out: &mut [f32],
) {
    let chunks = w.k / CHUNK;
    let shift = w.block.trailing_zeros();
    let base = row * w.row_blocks;
    let mut acc = [vdupq_n_f32(0.0); B];
    for c in 0..chunks {
        let col = c * CHUNK;
        // Vectors t%4 in {0,1} hold the first 16 weights of the chunk, {2,3} the last 16.
        let (s1, s2) = match BK {
            BLOCK16 => (scales.at(base + 2 * c), scales.at(base + 2 * c + 1)),
            _ => {
                let s = scales.at(base + ((c * CHUNK) >> shift));
                (s, s)
            }
        };
        let wv = decode32::<BF16>(w.codes.as_ptr().add(row * w.row_bytes + col / 2), planes);
        for m in 0..B {
            let x = xp.as_ptr().add(m * w.k + col);
            let mut p1 = vmulq_f32(wv[0], vld1q_f32(x));
            p1 = vfmaq_f32(p1, wv[1], vld1q_f32(x.add(4)));
            p1 = vfmaq_f32(p1, wv[4], vld1q_f32(x.add(16)));
            p1 = vfmaq_f32(p1, wv[5], vld1q_f32(x.add(20)));
            let mut p2 = vmulq_f32(wv[2], vld1q_f32(x.add(8)));
            p2 = vfmaq_f32(p2, wv[3], vld1q_f32(x.add(12)));
            p2 = vfmaq_f32(p2, wv[6], vld1q_f32(x.add(24)));
            p2 = vfmaq_f32(p2, wv[7], vld1q_f32(x.add(28)));
            acc[m] = vfmaq_n_f32(acc[m], p1, s1);
            acc[m] = vfmaq_n_f32(acc[m], p2, s2);
        }
    }
    for m in 0..B {
        *out.get_unchecked_mut(m) = vaddvq_f32(acc[m]);
    }
}

/// Computes weight rows `r0..r1` into `out` (`[row - r0][m]`) over their whole chunks.
///
/// # Safety
/// As for [`row_kernel`].
#[target_feature(enable = "neon")]
pub unsafe fn rows(w: &Rows<'_>, xp: &[f32], batch: usize, r0: usize, r1: usize, out: &mut [f32]) {
    let planes = Planes::new(w.lut);
    let bf16 = Planes::bf16_exact(w.lut);
    let bk = block_class(w.block);
    macro_rules! call {
        ($b:literal, $row:expr) => {{
            let o = &mut out[($row - r0) * $b..];
            match (bf16, bk == BLOCK16, w.scales) {
                (true, true, ScaleSrc::Table { bytes, table }) => {
                    row_kernel::<$b, true, BLOCK16, _>(
                        w,
                        TableScales { bytes, table },
                        &planes,
                        xp,
                        $row,
                        o,
                    )
                }
                (true, false, ScaleSrc::Table { bytes, table }) => {
                    row_kernel::<$b, true, BLOCK64, _>(
                        w,
                        TableScales { bytes, table },
                        &planes,
                        xp,
                        $row,
                        o,
                    )
                }
                (false, false, ScaleSrc::F32(v)) => {
                    row_kernel::<$b, false, BLOCK64, _>(w, F32Scales(v), &planes, xp, $row, o)
                }
                (bf, b16, s) => match (bf, b16) {
                    (true, true) => row_kernel::<$b, true, BLOCK16, _>(w, s, &planes, xp, $row, o),
                    (true, false) => row_kernel::<$b, true, BLOCK64, _>(w, s, &planes, xp, $row, o),
                    (false, true) => {
                        row_kernel::<$b, false, BLOCK16, _>(w, s, &planes, xp, $row, o)
                    }
                    (false, false) => {
                        row_kernel::<$b, false, BLOCK64, _>(w, s, &planes, xp, $row, o)
                    }
                },
            }
        }};
    }
    for r in r0..r1 {
        match batch {
            1 => call!(1, r),
            2 => call!(2, r),
            3 => call!(3, r),
            4 => call!(4, r),
            5 => call!(5, r),
            6 => call!(6, r),
            7 => call!(7, r),
            8 => call!(8, r),
            _ => unreachable!("GEMV serves batches of 1-8"),
        }
    }
}
