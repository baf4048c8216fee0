//! Hot loops of the CPU quantizers and dequantizers.
//!
//! Each loop is written once as plain scalar Rust that LLVM vectorises; `dispatch!` compiles it
//! a second time with AVX2+FMA enabled and picks that copy at run time when the CPU has it. The
//! arithmetic is identical in both copies (no FMA contraction happens in Rust), so results are
//! bit-identical whichever copy runs.

use std::sync::LazyLock;

use crate::bnb::BnbKind;
use crate::codebook::{BNB_FP4, BNB_FP4_SORTED_CODES, BNB_FP4_THRESHOLDS, NF4, NF4_THRESHOLDS};
use crate::element::Element;
use crate::scalar::{e2m1_magnitude_code, E2M1_VALUES};

/// Whether the AVX2+FMA copies can run here.
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX-512 copies can run here (F, BW, VL and DQ, besides AVX2 and FMA).
#[inline]
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: LazyLock<bool> = LazyLock::new(|| {
            has_avx2()
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512dq")
        });
        *HAS
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `pub fn $name` that runs `$body` compiled for AVX2+FMA when available, else portable;
/// with a leading `wide;`, compiled for AVX-512 first where the CPU has it. The quantizers take
/// it (Zen 5 host, `cargo bench -p q4-formats --bench formats`: NVFP4 2.07x the throughput of
/// the AVX2 copy, NF4 1.71x, NF4 with double quantization and bnb-FP4 1.36x, MXFP4 1.21x); the
/// dequantizers do not (0.73-0.85x the AVX2 copy's throughput there).
macro_rules! dispatch {
    ($(#[$m:meta])* fn $name:ident / $portable:ident <$($g:ident: $b:path),*>($($a:ident: $t:ty),* $(,)?) $body:block) => {
        dispatch!(@ false; $(#[$m])* fn $name / $portable <$($g: $b),*>($($a: $t),*) $body);
    };
    (wide; $(#[$m:meta])* fn $name:ident / $portable:ident <$($g:ident: $b:path),*>($($a:ident: $t:ty),* $(,)?) $body:block) => {
        dispatch!(@ true; $(#[$m])* fn $name / $portable <$($g: $b),*>($($a: $t),*) $body);
    };
    (@ $wide:literal; $(#[$m:meta])* fn $name:ident / $portable:ident <$($g:ident: $b:path),*>($($a:ident: $t:ty),* $(,)?) $body:block) => {
        /// The portable copy of the function of the same stem (always available; used in tests to
        /// check that the vectorised copy computes the same bytes).
        #[inline(always)]
        pub fn $portable<$($g: $b),*>($($a: $t),*) $body

        $(#[$m])*
        #[inline]
        pub fn $name<$($g: $b),*>($($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<$($g: $b),*>($($a: $t),*) {
                $portable($($a),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
            unsafe fn avx512<$($g: $b),*>($($a: $t),*) {
                $portable($($a),*)
            }

            #[cfg(target_arch = "x86_64")]
            if $wide && has_avx512() {
                // SAFETY: the CPU supports AVX-512 F/BW/VL/DQ, AVX2 and FMA (checked just
                // above), which is all that `avx512` requires; its body is safe Rust.
                return unsafe { avx512($($a),*) };
            }
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: the CPU supports AVX2 and FMA (checked just above), which is all that
                // `avx2` requires; its body is safe Rust.
                return unsafe { avx2($($a),*) };
            }
            $portable($($a),*)
        }
    };
}

/// Number of thresholds strictly below `y`.
#[inline(always)]
fn bucket(y: f32, t: &[f32; 15]) -> u8 {
    let mut c = 0u8;
    for &th in t {
        c += (y > th) as u8;
    }
    c
}

dispatch! { wide;
    /// Encodes a full bitsandbytes block: codes of `x * inv`, packed high nibble first.
    fn encode_bnb_block / encode_bnb_block_portable <T: Element>(kind: BnbKind, block: &[T], inv: f32, out: &mut [u8]) {
        let mut codes = [0u8; 64];
        for (xs, bytes) in block.chunks(64).zip(out.chunks_mut(32)) {
            match kind {
                BnbKind::Nf4 => {
                    for (c, x) in codes.iter_mut().zip(xs) {
                        *c = bucket(x.to_f32() * inv, &NF4_THRESHOLDS);
                    }
                }
                BnbKind::Fp4 => {
                    for (c, x) in codes.iter_mut().zip(xs) {
                        *c = bucket(x.to_f32() * inv, &BNB_FP4_THRESHOLDS);
                    }
                    for c in codes.iter_mut() {
                        *c = BNB_FP4_SORTED_CODES[(*c & 15) as usize];
                    }
                }
            }
            for (b, pair) in bytes.iter_mut().zip(codes.chunks_exact(2)) {
                *b = (pair[0] << 4) | pair[1];
            }
        }
    }
}

dispatch! { wide;
    /// Encodes NVFP4/MXFP4 elements `x / divisor` (or `x * multiplier` when `divisor` is None)
    /// as E2M1 with RNE, packed low nibble first. `sign_bit` picks the sign rule (IEEE sign bit,
    /// or `q < 0` as ModelOpt does).
    fn encode_e2m1_block / encode_e2m1_block_portable <T: Element>(block: &[T], divisor: f32, multiplier: f32, divide: bool, sign_bit: bool, out: &mut [u8]) {
        let mut codes = [0u8; 32];
        for (xs, bytes) in block.chunks(32).zip(out.chunks_mut(16)) {
            for (c, x) in codes.iter_mut().zip(xs) {
                let q = if divide { x.to_f32() / divisor } else { x.to_f32() * multiplier };
                let neg = if sign_bit { q.to_bits() >> 31 != 0 } else { q < 0.0 };
                *c = e2m1_magnitude_code(q.abs()) | ((neg as u8) << 3);
            }
            for (b, pair) in bytes.iter_mut().zip(codes.chunks_exact(2)) {
                *b = pair[0] | (pair[1] << 4);
            }
        }
    }
}

dispatch! { wide;
    /// NVFP4 blocks of finite values (`xs.len()` a multiple of 16, tensor scale `s2 > 0`): block
    /// scales and packed codes with ModelOpt's arithmetic. Fixed-size arrays let the compiler keep
    /// a whole block in two vector registers.
    fn encode_nvfp4_blocks / encode_nvfp4_blocks_portable <T: Element>(xs: &[T], s2: f32, bytes: &mut [u8], scales: &mut [u8]) {
        for ((x16, out8), s) in xs.chunks_exact(16).zip(bytes.chunks_exact_mut(8)).zip(scales.iter_mut()) {
            let mut v = [0f32; 16];
            for (d, x) in v.iter_mut().zip(x16) {
                *d = x.to_f32();
            }
            let m = v.iter().fold(0u32, |m, x| m.max(x.to_bits() & 0x7fff_ffff));
            let sb = crate::nvfp4::block_scale(f32::from_bits(m), s2);
            let t = crate::scalar::e4m3::decode(sb) * s2;
            let mut c = [0u8; 16];
            for (c, x) in c.iter_mut().zip(&v) {
                let q = x / t;
                *c = e2m1_magnitude_code(q.abs()) | (((q < 0.0) as u8) << 3);
            }
            for (b, pair) in out8.iter_mut().zip(c.chunks_exact(2)) {
                *b = pair[0] | (pair[1] << 4);
            }
            *s = sb;
        }
    }
}

dispatch! { wide;
    /// MXFP4 blocks of finite values (`xs.len()` a multiple of 32): E8M0 scales from `scale_of`
    /// (the rule) and packed codes, scaled by multiplication (`multiply`, RCEIL) or division.
    fn encode_mxfp4_blocks / encode_mxfp4_blocks_portable <T: Element>(xs: &[T], rule: crate::mxfp4::ScaleRule, bf16: bool, bytes: &mut [u8], scales: &mut [u8]) {
        for ((x32, out16), s) in xs.chunks_exact(32).zip(bytes.chunks_exact_mut(16)).zip(scales.iter_mut()) {
            let mut v = [0f32; 32];
            for (d, x) in v.iter_mut().zip(x32) {
                *d = x.to_f32();
            }
            let m = v.iter().fold(0u32, |m, x| m.max(x.to_bits() & 0x7fff_ffff));
            let sb = crate::mxfp4::scale_byte(f32::from_bits(m), rule, bf16);
            let mut c = [0u8; 32];
            if rule == crate::mxfp4::ScaleRule::Rceil {
                let mul = crate::mxfp4::rceil_multiplier(sb);
                for (c, x) in c.iter_mut().zip(&v) {
                    let q = x * mul;
                    *c = e2m1_magnitude_code(q.abs()) | (((q.to_bits() >> 31) as u8) << 3);
                }
            } else {
                let div = crate::mxfp4::floor_divisor(sb);
                for (c, x) in c.iter_mut().zip(&v) {
                    let q = x / div;
                    *c = e2m1_magnitude_code(q.abs()) | (((q.to_bits() >> 31) as u8) << 3);
                }
            }
            for (b, pair) in out16.iter_mut().zip(c.chunks_exact(2)) {
                *b = pair[0] | (pair[1] << 4);
            }
            *s = sb;
        }
    }
}

/// For every byte, the two decoded (unscaled) values in element order.
pub type PairTable = [[f32; 2]; 256];

/// The pair table of a 16-entry codebook; `high_first`: a byte's first element is its high
/// nibble (bitsandbytes), else its low nibble.
pub fn pair_table(values: &[f32; 16], high_first: bool) -> Box<PairTable> {
    let mut t = Box::new([[0f32; 2]; 256]);
    for (b, slot) in t.iter_mut().enumerate() {
        let (hi, lo) = (values[b >> 4], values[b & 15]);
        *slot = if high_first { [hi, lo] } else { [lo, hi] };
    }
    t
}

/// NF4 pairs, high nibble first.
pub static NF4_PAIRS: LazyLock<Box<PairTable>> = LazyLock::new(|| pair_table(&NF4, true));
/// bitsandbytes FP4 pairs, high nibble first.
pub static FP4_PAIRS: LazyLock<Box<PairTable>> = LazyLock::new(|| pair_table(&BNB_FP4, true));
/// E2M1 pairs, low nibble first, code 8 = -0.0 (MXFP4 as torchao and transformers decode it).
pub static E2M1_PAIRS: LazyLock<Box<PairTable>> = LazyLock::new(|| pair_table(&E2M1_VALUES, false));
/// E2M1 pairs, low nibble first, code 8 = +0.0 (NVFP4 as ModelOpt decodes it).
pub static E2M1_POSITIVE_ZERO_PAIRS: LazyLock<Box<PairTable>> = LazyLock::new(|| {
    let mut values = E2M1_VALUES;
    values[8] = 0.0;
    pair_table(&values, false)
});

dispatch! {
    /// `out[2i], out[2i+1] = pairs[bytes[i]] * scale`; an odd-length `out` drops the last value.
    fn decode_pairs / decode_pairs_portable <O: Element>(pairs: &PairTable, scale: f32, bytes: &[u8], out: &mut [O]) {
        let (even, rest) = out.split_at_mut(out.len() & !1);
        for (o, &b) in even.chunks_exact_mut(2).zip(bytes) {
            let p = pairs[b as usize];
            o[0] = O::from_f32(p[0] * scale);
            o[1] = O::from_f32(p[1] * scale);
        }
        if let Some(last) = rest.first_mut() {
            *last = O::from_f32(pairs[bytes[even.len() / 2] as usize][0] * scale);
        }
    }
}

/// bitsandbytes decode of one block, high nibble first.
#[inline]
pub fn decode_high_first<O: Element>(
    codebook: &[f32; 16],
    scale: f32,
    bytes: &[u8],
    out: &mut [O],
) {
    let pairs: &PairTable = if codebook[1] == NF4[1] {
        &NF4_PAIRS
    } else {
        &FP4_PAIRS
    };
    decode_pairs(pairs, scale, bytes, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn vectorised_copies_agree_with_portable(xs in prop::collection::vec(-8.0f32..8.0, 64), inv in 0.01f32..4.0) {
            let (mut a, mut b) = (vec![0u8; 32], vec![0u8; 32]);
            for kind in [BnbKind::Nf4, BnbKind::Fp4] {
                encode_bnb_block(kind, &xs, inv, &mut a);
                encode_bnb_block_portable(kind, &xs, inv, &mut b);
                prop_assert_eq!(&a, &b);
            }
            for (divide, sign_bit) in [(true, false), (false, true)] {
                encode_e2m1_block(&xs, inv, inv, divide, sign_bit, &mut a);
                encode_e2m1_block_portable(&xs, inv, inv, divide, sign_bit, &mut b);
                prop_assert_eq!(&a, &b);
            }
            let (mut sa, mut sb) = (vec![0u8; 4], vec![0u8; 4]);
            encode_nvfp4_blocks(&xs, inv * 0.01, &mut a, &mut sa);
            encode_nvfp4_blocks_portable(&xs, inv * 0.01, &mut b, &mut sb);
            prop_assert_eq!((&a, &sa), (&b, &sb));
            for rule in [crate::mxfp4::ScaleRule::Rceil, crate::mxfp4::ScaleRule::Floor] {
                encode_mxfp4_blocks(&xs, rule, false, &mut a, &mut sa[..2]);
                encode_mxfp4_blocks_portable(&xs, rule, false, &mut b, &mut sb[..2]);
                prop_assert_eq!((&a, &sa), (&b, &sb));
            }
            let (mut da, mut db) = (vec![0f32; 63], vec![0f32; 63]);
            decode_pairs(&NF4_PAIRS, inv, &a, &mut da);
            decode_pairs_portable(&NF4_PAIRS, inv, &a, &mut db);
            prop_assert_eq!(da, db);
        }
    }

    #[test]
    fn bnb_block_matches_scalar_encoder() {
        let xs: Vec<f32> = (0..4096)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 97.0)
            .collect();
        let inv = 1.0f32 / 5.2;
        let mut packed = vec![0u8; 2048];
        encode_bnb_block(BnbKind::Fp4, &xs, inv, &mut packed);
        for (pair, byte) in xs.chunks(2).zip(&packed) {
            let expect =
                (BnbKind::Fp4.encode(pair[0] * inv) << 4) | BnbKind::Fp4.encode(pair[1] * inv);
            assert_eq!(*byte, expect);
        }
        assert_eq!(BNB_FP4[8].to_bits(), 0);
    }
}
