//! The native Blackwell W4A4 kernel (`cu/blackwell_sm120.cu`) emulated on the CPU, as its test
//! oracle: every warp, lane and register is gathered exactly as the kernel gathers it (same
//! addresses into the codes and the swizzled scales), then the warp's
//! `mma.m16n8k64.kind::mxf4nvf4.block_scale.scale_vec::4X` is evaluated from the PTX ISA's
//! fragment layout, with the exact integer arithmetic of `kernels::cpu::w4a4`. If the kernel's
//! addressing and the instruction's layout disagree anywhere, the result differs from
//! `matmul_exact`. Compiled in every build; the test runs in CI.

use q4_formats::nvfp4::swizzled_offset;

/// 2 * E2M1 value of a code (code 8, -0, is 0).
fn e2m1_x2(c: u32) -> i64 {
    const MAG: [i64; 8] = [0, 1, 2, 3, 4, 6, 8, 12];
    let m = MAG[(c & 7) as usize];
    if c & 8 != 0 {
        -m
    } else {
        m
    }
}

/// E4M3 value x 2^9 as an integer; `None` for NaN.
fn e4m3_x512(b: u8) -> Option<i64> {
    let v = q4_formats::scalar::e4m3::decode(b);
    v.is_finite().then_some((v * 512.0) as i64)
}

fn word(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// One lane's operands of one mma, as the kernel loads them.
#[derive(Clone, Copy, Default)]
struct Lane {
    a: [u32; 4],
    b: [u32; 2],
    sa: u32,
    sb: u32,
}

/// Operands of an NVFP4 W4A4 product in the native kernel's layout.
pub struct NativeOperands<'a> {
    /// Weight codes `[n][k/2]`, low nibble first.
    pub w: &'a [u8],
    /// Weight scales, swizzled with `w_kp` padded columns.
    pub ws_swz: &'a [u8],
    pub w_kp: usize,
    /// Activation codes `[m][k/2]`.
    pub x: &'a [u8],
    /// Activation scales, swizzled with `x_kp` padded columns.
    pub xs_swz: &'a [u8],
    pub x_kp: usize,
    pub s2x: f32,
    pub s2w: f32,
    pub n: usize,
    pub m: usize,
    pub k: usize,
}

/// `y[m][n]` as `w4a4_sm120` computes it, with exact accumulation (k must be a multiple of 64).
pub fn emulate_sm120(op: &NativeOperands<'_>) -> Vec<f32> {
    let (n, m, k) = (op.n, op.m, op.k);
    assert!(k.is_multiple_of(64), "the native kernel needs k % 64 == 0");
    let row_bytes = k / 2;
    let tiles_n = n.div_ceil(16);
    let mut y = vec![0f32; m * n];
    for warp in 0..tiles_n * m.div_ceil(8) {
        let (n0, m0) = ((warp % tiles_n) * 16, (warp / tiles_n) * 8);
        let mut acc = [[0i64; 8]; 16];
        let mut nan = [[false; 8]; 16];
        for kc in 0..k / 64 {
            // Gather: mirrors the loads of the CUDA kernel line by line.
            let mut lanes = [Lane::default(); 32];
            for (lane, l) in lanes.iter_mut().enumerate() {
                let (g, t) = (lane / 4, lane % 4);
                let kb = kc * 32 + 4 * t;
                let (ra, rb, rs, mx) = (n0 + g, n0 + g + 8, n0 + g + 8 * (lane & 1), m0 + g);
                let wrow = |r: usize, off: usize| {
                    if r < n {
                        word(op.w, r * row_bytes + off)
                    } else {
                        0
                    }
                };
                l.a = [
                    wrow(ra, kb),
                    wrow(rb, kb),
                    wrow(ra, kb + 16),
                    wrow(rb, kb + 16),
                ];
                let xrow = |off: usize| {
                    if mx < m {
                        word(op.x, mx * row_bytes + off)
                    } else {
                        0
                    }
                };
                l.b = [xrow(kb), xrow(kb + 16)];
                l.sa = if rs < n {
                    word(op.ws_swz, swizzled_offset(rs, 4 * kc, op.w_kp))
                } else {
                    0
                };
                l.sb = if mx < m {
                    word(op.xs_swz, swizzled_offset(mx, 4 * kc, op.x_kp))
                } else {
                    0
                };
            }
            mma_m16n8k64(&lanes, &mut acc, &mut nan);
        }
        let alpha = op.s2x * op.s2w;
        for (r, (acc_row, nan_row)) in acc.iter().zip(&nan).enumerate() {
            for (c, (&a, &bad)) in acc_row.iter().zip(nan_row).enumerate() {
                let (nn, mm) = (n0 + r, m0 + c);
                if nn < n && mm < m {
                    y[mm * n + nn] = if bad {
                        f32::NAN
                    } else {
                        (a as f32) * (1.0 / (1u64 << 20) as f32) * alpha
                    };
                }
            }
        }
    }
    y
}

/// The block-scaled MMA, from the PTX ISA fragment layout of m16n8k64 (e2m1, scale_vec::4X,
/// thread-id selectors 0): A(row, k) lives in lane 4*(row%8) + (k%32)/8, register
/// row/8 + 2*(k/32), nibble k%8; B(k, col) in lane 4*col + (k%32)/8, register k/32, nibble k%8;
/// scale A of row r in lane 4*(r%8) + r/8, scale B of col c in lane 4c; byte j scales
/// k 16j..16j+15. Accumulates exactly (units of 2^-20).
fn mma_m16n8k64(lanes: &[Lane; 32], acc: &mut [[i64; 8]; 16], nan: &mut [[bool; 8]; 16]) {
    let nib = |v: u32, i: usize| (v >> (4 * i)) & 15;
    for (r, (acc_row, nan_row)) in acc.iter_mut().zip(nan.iter_mut()).enumerate() {
        for (c, (acc_rc, nan_rc)) in acc_row.iter_mut().zip(nan_row.iter_mut()).enumerate() {
            for j in 0..4 {
                let sa = (lanes[4 * (r % 8) + r / 8].sa >> (8 * j)) as u8;
                let sb = (lanes[4 * c].sb >> (8 * j)) as u8;
                let (Some(sa), Some(sb)) = (e4m3_x512(sa), e4m3_x512(sb)) else {
                    *nan_rc = true;
                    continue;
                };
                let mut dot = 0i64;
                for kk in 16 * j..16 * j + 16 {
                    let la = &lanes[4 * (r % 8) + (kk % 32) / 8];
                    let a = nib(la.a[r / 8 + 2 * (kk / 32)], kk % 8);
                    let lb = &lanes[4 * c + (kk % 32) / 8];
                    let b = nib(lb.b[kk / 32], kk % 8);
                    dot += e2m1_x2(a) * e2m1_x2(b);
                }
                *acc_rc += dot * sa * sb;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::w4a4::{matmul_exact, quantize_activations};
    use crate::qlinear::ActQuant;
    use crate::qtensor::{QTensor, QuantSpec};
    use crate::Format;
    use candle_core::{Device, Tensor};
    use q4_formats::nvfp4::swizzle_scales;

    /// Uniform in [-2, 2).
    fn random(len: usize, seed: u64) -> Vec<f32> {
        crate::test_util::uniform(seed, len, 2.0)
    }

    fn check(n: usize, m: usize, k: usize, seed: u64, swizzled: bool) -> bool {
        let w = Tensor::from_vec(random(n * k, seed), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, &QuantSpec::new(Format::Nvfp4)).unwrap();
        let view = q.host_view().unwrap();
        let xq = quantize_activations(&random(m * k, seed + 7), k, ActQuant::Nvfp4Dynamic).unwrap();
        let mut expect = vec![0f32; m * n];
        matmul_exact(&view, &xq, &mut expect).unwrap();
        let crate::qtensor::HostScales::Table { bytes: ws, .. } = view.scales else {
            unreachable!()
        };
        let blocks = k / 16;
        let kp = blocks.div_ceil(4) * 4;
        let (ws_l, xs_l) = if swizzled {
            (
                swizzle_scales(ws, n, blocks),
                swizzle_scales(&xq.scales, m, blocks),
            )
        } else {
            // Row-major scales fed through the swizzled addressing: must not match.
            let pad = |s: &[u8], rows: usize| {
                let mut v = s.to_vec();
                v.resize(rows.div_ceil(128) * 128 * kp, 0);
                v
            };
            (pad(ws, n), pad(&xq.scales, m))
        };
        let got = emulate_sm120(&NativeOperands {
            w: view.codes,
            ws_swz: &ws_l,
            w_kp: kp,
            x: &xq.packed,
            xs_swz: &xs_l,
            x_kp: kp,
            s2x: xq.scale2,
            s2w: q.scale2(),
            n,
            m,
            k,
        });
        got.iter()
            .zip(&expect)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    }

    #[test]
    fn swizzled_native_addressing_equals_exact_w4a4() {
        // Ragged tiles on purpose: n not a multiple of 16 or 128, m not a multiple of 8.
        for (n, m, k, seed) in [
            (16, 8, 64, 1),
            (40, 3, 128, 2),
            (130, 11, 192, 3),
            (257, 9, 256, 4),
        ] {
            assert!(check(n, m, k, seed, true), "n={n} m={m} k={k}");
        }
    }

    #[test]
    fn unswizzled_scales_are_caught() {
        assert!(!check(130, 11, 192, 5, false));
    }
}
