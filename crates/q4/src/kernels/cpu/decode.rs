//! Whole-tensor decode (bit-exact with q4-formats).

use std::sync::LazyLock;

use q4_formats::{simd, Element, Format};
use rayon::prelude::*;

use crate::qtensor::{HostScales, HostView};

/// Pair table (two decoded values per byte, in element order) of a format.
pub fn pairs(format: Format) -> &'static simd::PairTable {
    match format {
        Format::Nvfp4 => &simd::E2M1_POSITIVE_ZERO_PAIRS,
        Format::Mxfp4 => &simd::E2M1_PAIRS,
        Format::Nf4 => &simd::NF4_PAIRS,
        Format::Fp4 => &simd::FP4_PAIRS,
    }
}

/// Value of each 4-bit code exactly as the format's pair table decodes it (sign of zero
/// included): bitsandbytes stores a pair's first value in the high nibble.
pub fn code_values(format: Format) -> &'static [f32; 16] {
    static VALUES: LazyLock<[[f32; 16]; 4]> = LazyLock::new(|| {
        [Format::Nvfp4, Format::Mxfp4, Format::Nf4, Format::Fp4].map(|f| {
            let pairs = pairs(f);
            let high_first = matches!(f, Format::Nf4 | Format::Fp4);
            std::array::from_fn(|c| pairs[if high_first { c << 4 } else { c }][0])
        })
    });
    &VALUES[match format {
        Format::Nvfp4 => 0,
        Format::Mxfp4 => 1,
        Format::Nf4 => 2,
        Format::Fp4 => 3,
    }]
}

/// A bitsandbytes codebook (NF4, FP4) rounded to int8, as W4A8 multiplies it: integer block
/// sums need integer weights, and these codebooks are not integers times a common factor
/// (E2M1's are: twice each value). Each value `c` becomes `round(f c) / f`, with the factor `f`
/// (at most 127, so that the codebook's ±1 fit) chosen once per codebook to minimise the mean
/// squared rounding error over its 16 values: a fixed `f = 127` rounded NF4 so that the error
/// leaned one way on several codes, and cost SmolLM2 1.2% perplexity over 4096 tokens of
/// Moby-Dick, the chosen `f` (NF4 112.03, FP4 120) 0.3% (BENCHMARKS.md).
pub struct Int8Codebook {
    /// The factor `f`: `ints = round(f c)`.
    pub factor: f32,
    /// `round(f c)` for each code's value `c` (all within -127..=127).
    pub ints: [i8; 16],
    /// `ints[code] / f` in f32: the values every kernel multiplies in this mode.
    pub values: [f32; 16],
    /// The pair table of `values` (high nibble first, as bitsandbytes stores codes).
    pub pairs: Box<simd::PairTable>,
}

impl Int8Codebook {
    fn of(codebook: &[f32; 16]) -> Int8Codebook {
        let factor = Self::factor_for(codebook);
        let ints = codebook.map(|c| (c * factor).round() as i8);
        let values = ints.map(|i| f32::from(i) / factor);
        Int8Codebook {
            factor,
            ints,
            values,
            pairs: simd::pair_table(&values, true),
        }
    }

    /// The factor in 64..=127, on a grid of 1/1024, whose rounding of `codebook` has the least
    /// squared error (the largest factor among equals).
    fn factor_for(codebook: &[f32; 16]) -> f32 {
        let mut best = (f64::INFINITY, 127.0);
        for step in (64 * 1024..=127 * 1024).rev() {
            let f = f64::from(step) / 1024.0;
            let e = Self::rounding_error(codebook, f);
            if e < best.0 {
                best = (e, f);
            }
        }
        best.1 as f32
    }

    /// The squared error of rounding `codebook` to multiples of `1 / f`, summed over its values.
    fn rounding_error(codebook: &[f32; 16], f: f64) -> f64 {
        codebook
            .iter()
            .map(|&c| {
                let c = f64::from(c);
                ((c * f).round() / f - c).powi(2)
            })
            .sum()
    }
}

/// The int8 form of a bitsandbytes codebook (`None` for the E2M1 formats, exact in int8 as
/// they are).
pub fn int8_codebook(format: Format) -> Option<&'static Int8Codebook> {
    static NF4: LazyLock<Int8Codebook> =
        LazyLock::new(|| Int8Codebook::of(&q4_formats::codebook::NF4));
    static FP4: LazyLock<Int8Codebook> =
        LazyLock::new(|| Int8Codebook::of(&q4_formats::codebook::BNB_FP4));
    match format {
        Format::Nf4 => Some(&NF4),
        Format::Fp4 => Some(&FP4),
        Format::Nvfp4 | Format::Mxfp4 => None,
    }
}

/// The codebook a view is decoded with: its [`HostView::int8_codebook`] form where asked for and
/// one exists.
pub fn int8_codebook_of(v: &HostView<'_>) -> Option<&'static Int8Codebook> {
    if v.int8_codebook {
        int8_codebook(v.format)
    } else {
        None
    }
}

/// Decodes a whole tensor into `out` (`rows * cols` values), bit-exact with q4-formats (with
/// [`HostView::int8_codebook`], with that codebook).
pub fn dequantize_into<O: Element>(v: &HostView<'_>, out: &mut [O]) {
    let pairs: &simd::PairTable = match int8_codebook_of(v) {
        Some(c) => &c.pairs,
        None => pairs(v.format),
    };
    let bs = v.block_size;
    match (v.format, &v.scales) {
        (Format::Nvfp4 | Format::Mxfp4, HostScales::Table { bytes, table }) => {
            let pc = v.cols.div_ceil(bs) * bs;
            let rows_per_task = (16384 / pc).max(1);
            out.par_chunks_mut(rows_per_task * v.cols)
                .zip(v.codes.par_chunks(rows_per_task * pc / 2))
                .zip(bytes.par_chunks(rows_per_task * pc / bs))
                .for_each(|((out, codes), sc)| {
                    for ((orow, crow), srow) in out
                        .chunks_mut(v.cols)
                        .zip(codes.chunks(pc / 2))
                        .zip(sc.chunks(pc / bs))
                    {
                        for ((o, c), &s) in orow.chunks_mut(bs).zip(crow.chunks(bs / 2)).zip(srow) {
                            simd::decode_pairs(pairs, table[s as usize], c, o);
                        }
                    }
                });
        }
        (Format::Nf4 | Format::Fp4, HostScales::F32(absmax)) => {
            let per_task = (32768 / bs).max(1);
            out.par_chunks_mut(per_task * bs)
                .zip(v.codes.par_chunks(per_task * bs / 2))
                .zip(absmax.par_chunks(per_task))
                .for_each(|((out, codes), am)| {
                    for ((o, c), &s) in out.chunks_mut(bs).zip(codes.chunks(bs / 2)).zip(am) {
                        simd::decode_pairs(pairs, s, c, o);
                    }
                });
        }
        _ => unreachable!("scale kind matches the format"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{QTensor, QuantSpec};
    use candle_core::{Device, Tensor};

    /// Each int8 value is its codebook value rounded once (within half a step), distinct codes
    /// stay distinct, the factor is the best on its grid (no factor in 64-127 rounds with
    /// less squared error), and the E2M1 formats have none.
    #[test]
    fn int8_codebooks_round_each_value_once() {
        for (format, exact) in [
            (Format::Nf4, &q4_formats::codebook::NF4),
            (Format::Fp4, &q4_formats::codebook::BNB_FP4),
        ] {
            let c = int8_codebook(format).unwrap();
            for (code, (&v, &i)) in c.values.iter().zip(&c.ints).enumerate() {
                assert_eq!(v, f32::from(i) / c.factor, "{format} code {code}");
                assert!(
                    (v - exact[code]).abs() <= 0.5 / c.factor + 1e-7,
                    "{format} code {code}: {v} for {}",
                    exact[code]
                );
                assert_eq!(c.pairs[code << 4][0], v, "{format} code {code} high first");
                for (other, &e) in exact.iter().enumerate() {
                    assert!(
                        e == exact[code] || c.ints[other] != i,
                        "{format}: codes {code} and {other} merge"
                    );
                }
            }
        }
        // No factor on a finer grid rounds with clearly less squared error.
        for (format, exact, near) in [
            (Format::Nf4, &q4_formats::codebook::NF4, 112.03),
            (Format::Fp4, &q4_formats::codebook::BNB_FP4, 120.0),
        ] {
            let sq = |f: f64| Int8Codebook::rounding_error(exact, f);
            let c = int8_codebook(format).unwrap();
            let best = sq(f64::from(c.factor));
            assert!((c.factor - near).abs() < 0.01, "{format}: {}", c.factor);
            for i in 0..=63_000 {
                let f = 64.0 + f64::from(i) / 1000.0;
                assert!(sq(f) >= 0.99 * best, "{format}: {f} beats {}", c.factor);
            }
        }
        assert!(int8_codebook(Format::Nvfp4).is_none() && int8_codebook(Format::Mxfp4).is_none());
    }

    /// A view with `int8_codebook` decodes to the int8 values times the absmax; without it, to
    /// the exact codebook; E2M1 views ignore it.
    #[test]
    fn views_decode_with_the_codebook_they_ask_for() {
        let w = Tensor::randn(0f32, 1.0, (8, 128), &Device::Cpu).unwrap();
        for format in Format::ALL {
            let q = QTensor::quantize(&w, &QuantSpec::new(format)).unwrap();
            let view = q.host_view().unwrap();
            let mut exact = vec![0f32; 8 * 128];
            dequantize_into(&view, &mut exact);
            let view = view.with_int8_codebook();
            let mut rounded = vec![0f32; 8 * 128];
            dequantize_into(&view, &mut rounded);
            let rows = crate::kernels::cpu::Rows::new(&view);
            for (i, (&r, &e)) in rounded.iter().zip(&exact).enumerate() {
                assert_eq!(r, rows.weight(i / 128, i % 128), "{format} {i}");
                match int8_codebook(format) {
                    None => assert_eq!(r.to_bits(), e.to_bits(), "{format} {i}"),
                    Some(c) => {
                        let absmax = rows.scales.get(i / q.block_size());
                        let bound = 0.5 / c.factor * absmax * 1.0001;
                        assert!((r - e).abs() <= bound, "{format} {i}");
                    }
                }
            }
            assert_ne!(
                rounded == exact,
                int8_codebook(format).is_some(),
                "{format}"
            );
        }
    }
}
