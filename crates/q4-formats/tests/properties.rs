//! Laws of the formats, checked on random inputs:
//! * every byte pattern decodes (decoders are total);
//! * quantizing a dequantized tensor gives it back (the quantizer is a projection);
//! * the error of dequantize(quantize(x)) stays within each format's bound, at many scales.

use proptest::prelude::*;
use q4_formats::bnb::{self, BnbKind, BnbOptions, BnbTensor};
use q4_formats::codebook::{BNB_FP4, NF4};
use q4_formats::mxfp4::{self, Mxfp4Options, Mxfp4Tensor, ScaleRule};
use q4_formats::nvfp4::{self, Nvfp4Options, Nvfp4Tensor};
use q4_formats::scalar::{e4m3, e8m0};

/// Random weight-like rows: mixed magnitudes inside a row, an optional all-zero block, scaled by
/// 10^exp so every test runs over many orders of magnitude.
fn matrix(cols: usize) -> impl Strategy<Value = (Vec<f32>, usize)> {
    (1usize..6, -30i32..30, any::<bool>()).prop_flat_map(move |(rows, exp, zero_block)| {
        prop::collection::vec(-1.0f32..1.0, rows * cols).prop_map(move |mut v| {
            let scale = 10f32.powi(exp);
            for (i, x) in v.iter_mut().enumerate() {
                // Heavier tails on some elements, like real weights.
                let w = if i % 7 == 0 { *x * 8.0 } else { *x };
                *x = w * scale;
            }
            if zero_block {
                v[..cols.min(32)].fill(0.0);
            }
            (v, cols)
        })
    })
}

/// Packed E2M1 bytes with the -0 code (0x8) replaced by +0 in both nibbles.
fn positive_zero_codes(packed: &[u8]) -> Vec<u8> {
    let fix = |n: u8| if n == 8 { 0 } else { n };
    packed
        .iter()
        .map(|&b| fix(b & 15) | (fix(b >> 4) << 4))
        .collect()
}

/// Half of the largest gap between neighbouring codebook values.
fn half_max_gap(book: &[f32; 16]) -> f32 {
    let mut v = book.to_vec();
    v.sort_by(f32::total_cmp);
    v.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max) / 2.0
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn every_byte_pattern_decodes(packed in prop::collection::vec(any::<u8>(), 64), scales in prop::collection::vec(any::<u8>(), 8), s2 in 0.0f32..1e3) {
        let nv = Nvfp4Tensor { rows: 2, cols: 64, packed: packed.clone(), scales: scales.clone(), scale2: s2 };
        let d: Vec<f32> = nv.dequantize().unwrap();
        for (i, x) in d.iter().enumerate() {
            let s = e4m3::decode(scales[i / 16]);
            prop_assert!(x.is_finite() || s.is_nan(), "finite scale gave {x}");
        }
        let mx = Mxfp4Tensor { rows: 2, cols: 64, packed: packed.clone(), scales: scales[..4].to_vec() };
        let d: Vec<f32> = mx.dequantize().unwrap();
        for (i, x) in d.iter().enumerate() {
            let s = e8m0::decode(scales[i / 32]);
            prop_assert!(!x.is_nan() || s.is_nan());
        }
        for kind in [BnbKind::Nf4, BnbKind::Fp4] {
            let t = BnbTensor { kind, block_size: 32, numel: 127, packed: packed.clone(), absmax: bnb::Absmax::Plain(vec![1.5; 4]) };
            let d: Vec<f32> = t.dequantize().unwrap();
            prop_assert!(d.iter().all(|x| x.abs() <= 1.5));
        }
    }

    #[test]
    fn nvfp4_error_within_bound_and_idempotent((x, cols) in matrix(64)) {
        let q = nvfp4::quantize(&x, cols, &Nvfp4Options::default()).unwrap();
        let d: Vec<f32> = q.dequantize().unwrap();
        for (i, (&a, &b)) in x.iter().zip(&d).enumerate() {
            let t = e4m3::decode(q.scales[i / 16]) * q.scale2;
            // Round-to-nearest on the E2M1 grid (largest gap 2 => half-gap 1), or saturation at 6.
            let bound = if a.abs() <= 6.0 * t { t * 1.000_001 } else { a.abs() - 6.0 * t * 0.999_999 };
            prop_assert!((a - b).abs() <= bound, "i={i} x={a} x^={b} t={t}");
        }
        // Re-quantizing with the same tensor scale reproduces every byte, except that a negative
        // zero code (0x8, a tiny negative value) decodes to +0 and comes back as 0x0.
        let again = nvfp4::quantize(&d, cols, &Nvfp4Options { scale2: Some(q.scale2), ..Default::default() }).unwrap();
        prop_assert_eq!(positive_zero_codes(&again.packed), positive_zero_codes(&q.packed));
        prop_assert_eq!(&again.scales, &q.scales);
        // With its own tensor scale (which may move by an ulp), the projection is idempotent on
        // values to within 2 ulps while every block
        // scale is a normal E4M3 number (subnormal scales round by up to 50%, so a block's
        // largest code can drop below 6 and move the scale on the next pass).
        if q.scales.iter().any(|&s| s < 0x08) {
            return Ok(());
        }
        let again = nvfp4::quantize(&d, cols, &Nvfp4Options::default()).unwrap();
        let d2: Vec<f32> = again.dequantize().unwrap();
        for (i, (a, b)) in d.iter().zip(&d2).enumerate() {
            prop_assert!((a - b).abs() <= a.abs() * 4.8e-7, "i={} {} vs {} scale {:#x} -> {:#x}, s2 {:e} -> {:e}", i, a, b, q.scales[i / 16], again.scales[i / 16], q.scale2, again.scale2);
        }
    }

    #[test]
    fn bnb_error_within_bound_and_idempotent((x, _cols) in matrix(48), bs_i in 0usize..3, double in any::<bool>(), nf4 in any::<bool>()) {
        let block_size = [32, 64, 128][bs_i];
        let kind = if nf4 { BnbKind::Nf4 } else { BnbKind::Fp4 };
        let opts = BnbOptions { kind, block_size, double_quant: double, ..BnbOptions::nf4() };
        let q = bnb::quantize(&x, &opts).unwrap();
        let absmax = q.absmax.to_f32().unwrap();
        let d: Vec<f32> = q.dequantize().unwrap();
        let gap = half_max_gap(if nf4 { &NF4 } else { &BNB_FP4 });
        for (i, (&a, &b)) in x.iter().zip(&d).enumerate() {
            let true_max = x[i / block_size * block_size..((i / block_size + 1) * block_size).min(x.len())]
                .iter().fold(0f32, |m, v| m.max(v.abs()));
            // Nested statistics are 8-bit: allow their own quantization error on top.
            let slack = (absmax[i / block_size] - true_max).abs() + 1e-6 * true_max;
            prop_assert!((a - b).abs() <= gap * true_max + slack + f32::MIN_POSITIVE, "i={i} x={a} x^={b}");
        }
        if !double {
            let again = bnb::quantize(&d, &BnbOptions { double_quant: false, ..opts }).unwrap();
            let d2: Vec<f32> = again.dequantize().unwrap();
            prop_assert_eq!(d, d2);
            if nf4 {
                // NF4 codes are unique per value, so the bytes come back too.
                prop_assert_eq!(again.packed, q.packed);
            }
        }
    }

    #[test]
    fn mxfp4_error_within_bound_and_idempotent((x, cols) in matrix(64), floor in any::<bool>()) {
        let rule = if floor { ScaleRule::Floor } else { ScaleRule::Rceil };
        let opts = Mxfp4Options { rule, ..Default::default() };
        let q = mxfp4::quantize(&x, cols, &opts).unwrap();
        let d: Vec<f32> = q.dequantize().unwrap();
        for (i, (&a, &b)) in x.iter().zip(&d).enumerate() {
            let t = e8m0::decode(q.scales[i / 32]);
            let bound = if a.abs() <= 6.0 * t { t } else { a.abs() - 6.0 * t };
            prop_assert!(!floor || (a - b).abs() <= bound, "i={i} x={a} x^={b}");
            if !floor {
                // RCEIL never clips: within half a grid step (<= t) everywhere.
                prop_assert!((a - b).abs() <= t * 1.000_001, "i={i} x={a} x^={b} t={t}");
            }
        }
        let again = mxfp4::quantize(&d, cols, &opts).unwrap();
        if floor {
            prop_assert_eq!(&again.packed, &q.packed);
            prop_assert_eq!(&again.scales, &q.scales);
        }
        let d2: Vec<f32> = again.dequantize().unwrap();
        prop_assert_eq!(d, d2);
    }

    #[test]
    fn quantize_dequantize_codes_round_trip(packed in prop::collection::vec(any::<u8>(), 8)) {
        // quantize(dequantize(q)) == q for codes of a block whose scale is exactly representable
        // and whose maximum code is +-6 (so the block scale is recovered).
        let mut packed = packed;
        packed[0] = 0x77; // +6, +6
        let nv = Nvfp4Tensor { rows: 1, cols: 16, packed: packed.clone(), scales: vec![0x7e], scale2: 1.0 / 448.0 * 0.5 };
        let d: Vec<f32> = nv.dequantize().unwrap();
        let q = nvfp4::quantize(&d, 16, &Nvfp4Options { scale2: Some(nv.scale2), ..Default::default() }).unwrap();
        // -0 decodes to +0 and re-encodes as code 0: compare on values.
        let d2: Vec<f32> = q.dequantize().unwrap();
        prop_assert_eq!(d, d2);
        prop_assert_eq!(q.scales, vec![0x7e]);
    }
}

#[test]
fn double_quant_reconstruction_is_close() {
    let x: Vec<f32> = (0..64 * 600)
        .map(|i| ((i * 2654435761u32 as usize) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let q = bnb::quantize(
        &x,
        &BnbOptions {
            double_quant: true,
            ..BnbOptions::nf4()
        },
    )
    .unwrap();
    let plain = bnb::quantize(&x, &BnbOptions::nf4()).unwrap();
    let (a, b) = (q.absmax.to_f32().unwrap(), plain.absmax.to_f32().unwrap());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 0.01 * y.abs() + 1e-3, "{x} vs {y}");
    }
}
