//! The scalar types under the 4-bit formats: E2M1 elements, FP8 E4M3FN block scales and
//! E8M0 shared exponents (FORMATS.md §1.1, §4).
//!
//! Every encoder here is pure integer/IEEE arithmetic so that results are identical on every
//! platform and between the scalar and vectorised paths.

/// Magnitudes of the eight E2M1 codes (low three bits); bit 3 is the sign.
pub const E2M1_MAGNITUDES: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// All sixteen E2M1 codes decoded to f32 (code 8 is -0.0).
pub const E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Where the sign of an E2M1 code comes from. The references disagree only for values that
/// round to zero (FORMATS.md §1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignRule {
    /// IEEE sign bit: -0.0 and tiny negatives encode as 0x8 (torchao, ml_dtypes, OCP MX).
    SignBit,
    /// `x < 0`: -0.0 encodes as 0x0 (ModelOpt's NVFP4 `_cast_fp4`).
    Negative,
}

/// Magnitude code (0..=7) of `a = |x|` under round-to-nearest-even with saturation to 6.
///
/// The comparisons alternate `>` / `>=` so that every tie lands on the even code: 0.25 -> 0,
/// 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2.0, 3.5 -> 4.0, 5.0 -> 4.0. NaN gives 0.
#[inline(always)]
pub fn e2m1_magnitude_code(a: f32) -> u8 {
    (a > 0.25) as u8
        + (a >= 0.75) as u8
        + (a > 1.25) as u8
        + (a >= 1.75) as u8
        + (a > 2.5) as u8
        + (a >= 3.5) as u8
        + (a > 5.0) as u8
}

/// Encodes an f32 as an E2M1 code (0..=15), RNE and saturating (+-Inf -> +-6).
///
/// NaN is not representable; this encoder maps it to a signed zero (its magnitude code is 0).
/// The block quantizers reject NaN before they get here.
#[inline(always)]
pub fn e2m1_encode(x: f32, sign: SignRule) -> u8 {
    let negative = match sign {
        SignRule::SignBit => x.is_sign_negative(),
        SignRule::Negative => x < 0.0,
    };
    e2m1_magnitude_code(x.abs()) | ((negative as u8) << 3)
}

/// Decodes an E2M1 code (only the low four bits are used).
#[inline(always)]
pub fn e2m1_decode(code: u8) -> f32 {
    E2M1_VALUES[(code & 0xF) as usize]
}

/// FP8 E4M3FN: bias 7, no infinities, 0x7F/0xFF are NaN, max finite 448.
pub mod e4m3 {
    /// Largest finite value.
    pub const MAX: f32 = 448.0;
    /// Smallest positive (subnormal) value, 2^-9.
    pub const MIN_SUBNORMAL: f32 = 1.0 / 512.0;

    const fn decode_const(b: u8) -> f32 {
        let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0f32 };
        let e = ((b >> 3) & 0xF) as i32;
        let m = (b & 7) as u32;
        if e == 15 && m == 7 {
            return f32::NAN;
        }
        if e == 0 {
            // m/8 * 2^-6 = m * 2^-9, exact.
            return sign * (m as f32) * (1.0 / 512.0);
        }
        // (8 + m) * 2^(e - 10): assemble the f32 bits directly (always a normal f32).
        let bits = (((e - 7 + 127) as u32) << 23) | (m << 20);
        sign * f32::from_bits(bits)
    }

    const fn build_table() -> [f32; 256] {
        let mut t = [0.0f32; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = decode_const(i as u8);
            i += 1;
        }
        t
    }

    /// Every E4M3FN byte decoded to f32 (exact).
    pub static TABLE: [f32; 256] = build_table();

    /// Decodes one E4M3FN byte.
    #[inline(always)]
    pub fn decode(b: u8) -> f32 {
        TABLE[b as usize]
    }

    #[inline(always)]
    fn encode_impl(x: f32, saturate: bool) -> u8 {
        let bits = x.to_bits();
        let sign = ((bits >> 24) & 0x80) as u8;
        let a = bits & 0x7fff_ffff;
        let overflow = if saturate { 0x7e } else { 0x7f };
        if a > 0x7f80_0000 {
            return 0x7f | sign;
        }
        if a >= 0x43f0_0000 {
            // |x| >= 480 (incl. Inf): beyond max + ulp/2.
            return overflow | sign;
        }
        if a < (121 << 23) {
            // Below 2^-6: round to the 2^-9 grid through the FPU (RNE).
            let r = (f32::from_bits(a) + 16384.0).to_bits() - 16384.0f32.to_bits();
            return r as u8 | sign;
        }
        // Re-bias the exponent and round the 20 dropped mantissa bits to nearest even.
        let r = (a - (120 << 23) + 0x7ffff + ((a >> 20) & 1)) >> 20;
        if r >= 0x7f {
            overflow | sign
        } else {
            r as u8 | sign
        }
    }

    /// f32 -> E4M3FN, round-to-nearest-even, saturating to +-448 (torch >= 2.13, CUDA satfinite).
    /// NaN -> 0x7F | sign.
    #[inline(always)]
    pub fn encode(x: f32) -> u8 {
        encode_impl(x, true)
    }

    /// f32 -> E4M3FN as ml_dtypes and older torch do it: overflow becomes NaN.
    #[inline(always)]
    pub fn encode_nonsaturating(x: f32) -> u8 {
        encode_impl(x, false)
    }
}

/// E8M0 (`float8_e8m0fnu`): an unsigned power of two 2^(b-127); 0xFF is NaN.
pub mod e8m0 {
    /// NaN byte.
    pub const NAN: u8 = 0xFF;

    const fn decode_const(b: u8) -> f32 {
        if b == 0xFF {
            return f32::NAN;
        }
        if b == 0 {
            return f32::from_bits(0x0040_0000); // 2^-127, an f32 subnormal
        }
        f32::from_bits((b as u32) << 23)
    }

    const fn build_table() -> [f32; 256] {
        let mut t = [0.0f32; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = decode_const(i as u8);
            i += 1;
        }
        t
    }

    /// Every E8M0 byte decoded to f32 (exact).
    pub static TABLE: [f32; 256] = build_table();

    /// Decodes one E8M0 byte.
    #[inline(always)]
    pub fn decode(b: u8) -> f32 {
        TABLE[b as usize]
    }

    /// Generic value cast as torch's `.to(float8_e8m0fnu)` does it: round to nearest power of
    /// two (ties up for normal inputs), sign ignored, 0 -> 0x00, NaN/Inf -> 0xFF.
    /// This is *not* how MX quantizers choose a block scale (see `mxfp4::ScaleRule`).
    pub fn from_f32_torch(x: f32) -> u8 {
        let bits = x.to_bits();
        let exponent = (bits >> 23) & 0xFF;
        if exponent == 0xFF {
            return 0xFF;
        }
        let g = bits & 0x40_0000 != 0;
        let r = bits & 0x20_0000 != 0;
        let s = bits & 0x1F_FFFF != 0;
        let lsb = exponent > 0;
        if g && (r || s || lsb) {
            (exponent + 1) as u8
        } else {
            exponent as u8
        }
    }

    /// Generic value cast as ml_dtypes does it: like torch for positive normal values, but zero,
    /// negative values, NaN and Inf all become NaN (0xFF).
    pub fn from_f32_ml_dtypes(x: f32) -> u8 {
        if x.is_nan() || x.is_infinite() || x <= 0.0 || x.is_sign_negative() {
            return 0xFF;
        }
        from_f32_torch(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e2m1_ties_go_to_even() {
        let cases = [
            (0.25, 0),
            (0.75, 2),
            (1.25, 2),
            (1.75, 4),
            (2.5, 4),
            (3.5, 6),
            (5.0, 6),
            (7.0, 7),
            (f32::INFINITY, 7),
        ];
        for (x, code) in cases {
            assert_eq!(e2m1_encode(x, SignRule::SignBit), code, "{x}");
            assert_eq!(e2m1_encode(-x, SignRule::SignBit), code | 8, "-{x}");
        }
        assert_eq!(e2m1_encode(-0.0, SignRule::SignBit), 0x8);
        assert_eq!(e2m1_encode(-0.0, SignRule::Negative), 0x0);
        assert_eq!(e2m1_encode(-0.1, SignRule::Negative), 0x8);
    }

    #[test]
    fn e4m3_examples_from_the_spec() {
        let cases: [(f32, u8); 12] = [
            (0.0, 0x00),
            (-0.0, 0x80),
            (1.0, 0x38),
            (448.0, 0x7e),
            (464.0, 0x7e),
            (500.0, 0x7e),
            (f32::INFINITY, 0x7e),
            (f32::NEG_INFINITY, 0xfe),
            (1.0 / 512.0, 0x01),
            (1.0 / 1024.0, 0x00),
            (17.0, 0x58),
            (19.0, 0x5a),
        ];
        for (x, b) in cases {
            assert_eq!(e4m3::encode(x), b, "{x}");
        }
        assert_eq!(e4m3::encode_nonsaturating(464.0001), 0x7f);
        assert_eq!(e4m3::encode(f32::NAN), 0x7f);
        assert_eq!(e4m3::decode(0x7e), 448.0);
        assert!(e4m3::decode(0xff).is_nan());
        assert_eq!(e4m3::decode(0x01), 1.0 / 512.0);
    }

    #[test]
    fn e8m0_examples_from_the_spec() {
        let cases: [(f32, u8); 6] = [
            (1.0, 0x7f),
            (1.25, 0x7f),
            (1.5, 0x80),
            (3.0, 0x81),
            (0.75, 0x7f),
            (6.0, 0x82),
        ];
        for (x, b) in cases {
            assert_eq!(e8m0::from_f32_torch(x), b, "{x}");
        }
        assert_eq!(e8m0::from_f32_torch(0.0), 0x00);
        assert_eq!(e8m0::from_f32_ml_dtypes(0.0), 0xff);
        assert_eq!(e8m0::decode(0), f32::from_bits(0x0040_0000));
        assert_eq!(e8m0::decode(127), 1.0);
    }
}
