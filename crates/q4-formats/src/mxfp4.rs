//! MXFP4 (OCP Microscaling): E2M1 elements in blocks of 32 along the last dimension, one E8M0
//! shared exponent per block (FORMATS.md §5). Low nibble first.

use rayon::prelude::*;

use crate::element::{abs_max_bits, Element};
use crate::error::{expect_len, FormatError, Result};
use crate::nvfp4::dequantize_rows;
use crate::scalar::e8m0;
use crate::simd;
use crate::NonFinite;

/// Elements per block.
pub const BLOCK: usize = 32;

/// How the shared exponent of a block is chosen from its absolute maximum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ScaleRule {
    /// `ceil(log2(amax / 6))`: never clips. NVIDIA's recipe, gpt-oss tooling, torchao `RCEIL`.
    #[default]
    Rceil,
    /// `floor(log2(amax)) - 2`: the OCP rule; values above `6 * 2^e` saturate.
    Floor,
    /// torchao's `EVEN`: round amax to a power of two (up from a mantissa of 0.75), then floor.
    Even,
}

impl ScaleRule {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ScaleRule::Rceil => "rceil",
            ScaleRule::Floor => "floor",
            ScaleRule::Even => "even",
        }
    }
}

/// An MXFP4 tensor viewed as `rows x cols`.
#[derive(Clone, Debug, PartialEq)]
pub struct Mxfp4Tensor {
    pub rows: usize,
    pub cols: usize,
    /// `rows x padded_cols / 2` bytes, element 2j in the low nibble (gpt-oss `*_blocks`).
    pub packed: Vec<u8>,
    /// `rows x padded_cols / 32` E8M0 bytes (gpt-oss `*_scales`, bias 127).
    pub scales: Vec<u8>,
}

/// Options of the MXFP4 quantizer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Mxfp4Options {
    pub rule: ScaleRule,
    /// Pad rows with zeros to a multiple of 32 instead of refusing such a last dimension.
    pub pad: bool,
    pub non_finite: NonFinite,
}

/// Whether the input's precision is bfloat16: torchao computes RCEIL's `amax / 6` and its
/// logarithm in the input dtype.
fn is_bf16<T: Element>() -> bool {
    T::NAME == "BF16"
}

/// Rounds an f32 to the nearest bfloat16 (RNE) and back.
#[inline]
fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// E8M0 byte of the shared exponent for a block with absolute maximum `amax` (finite).
pub fn scale_byte(amax: f32, rule: ScaleRule, bf16_input: bool) -> u8 {
    match rule {
        ScaleRule::Floor | ScaleRule::Even => {
            let mut bits = amax.to_bits();
            if rule == ScaleRule::Even {
                // Round the mantissa at the E2M1 precision (1 bit): add half of the next bit.
                bits = if bf16_input {
                    (((bits >> 16) + (1 << 5)) & 0x7f80) << 16
                } else {
                    (bits + (1 << 21)) & 0xff80_0000
                };
            }
            if amax == 0.0 {
                // torchao adds the smallest normal before taking the exponent.
                bits = f32::MIN_POSITIVE.to_bits();
            }
            let e = ((bits >> 23) & 0xff) as i32 - 127 - 2;
            (e.clamp(-127, 128) + 127) as u8
        }
        ScaleRule::Rceil => {
            // torchao 0.18: ceil(log2(amax / 6)) with the division and the logarithm rounded in the
            // input dtype; an exact power of two has an exact logarithm.
            let mut descale = amax / 6.0;
            if bf16_input {
                descale = round_bf16(descale);
            }
            if descale == 0.0 {
                return 0;
            }
            let bits = descale.to_bits();
            let (exp, mant) = ((bits >> 23) as i32, bits & 0x7f_ffff);
            if exp > 0 && exp < 255 && (mant == 0 || mant > 1024) {
                // A normal number: log2 is exactly the exponent for a power of two, and rounds
                // to at least exponent + 1 ulp-steps above it otherwise (the mantissa is far from
                // 1.0), so the ceiling is exponent + 1 - the f32 logarithm is only needed within a
                // few ulps of a power of two.
                let e = exp - 127 + i32::from(mant != 0);
                return (e.clamp(-127, 127) + 127) as u8;
            }
            let l = (descale as f64).log2() as f32;
            (l.ceil().clamp(-127.0, 127.0) as i32 + 127) as u8
        }
    }
}

/// Columns after padding to whole blocks.
pub fn padded_cols(cols: usize) -> usize {
    cols.div_ceil(BLOCK) * BLOCK
}

/// Quantizes a `rows x cols` tensor.
pub fn quantize<T: Element>(data: &[T], cols: usize, opts: &Mxfp4Options) -> Result<Mxfp4Tensor> {
    if cols == 0 || !data.len().is_multiple_of(cols) {
        return Err(FormatError::Invalid(format!(
            "{} elements do not form rows of {cols}",
            data.len()
        )));
    }
    if !cols.is_multiple_of(BLOCK) && !opts.pad {
        return Err(FormatError::NotBlockMultiple { cols, block: BLOCK });
    }
    let (_, finite) = crate::nvfp4::scan(data, opts.non_finite)?;
    let rows = data.len() / cols;
    let pc = padded_cols(cols);
    let mut packed = vec![0u8; rows * pc / 2];
    let mut scales = vec![0u8; rows * pc / BLOCK];
    let rows_per_task = (16384 / pc).max(1);
    let bf16 = is_bf16::<T>();
    let rule = opts.rule;
    if finite && pc == cols {
        // Whole rows of whole blocks: one vectorised pass per task.
        data.par_chunks(rows_per_task * cols)
            .zip(packed.par_chunks_mut(rows_per_task * pc / 2))
            .zip(scales.par_chunks_mut(rows_per_task * pc / BLOCK))
            .for_each(|((xs, bytes), sc)| simd::encode_mxfp4_blocks(xs, rule, bf16, bytes, sc));
        return Ok(Mxfp4Tensor {
            rows,
            cols,
            packed,
            scales,
        });
    }

    data.par_chunks(rows_per_task * cols)
        .zip(packed.par_chunks_mut(rows_per_task * pc / 2))
        .zip(scales.par_chunks_mut(rows_per_task * pc / BLOCK))
        .for_each(|((xs, bytes), sc)| {
            for ((row, rb), rs) in xs
                .chunks(cols)
                .zip(bytes.chunks_mut(pc / 2))
                .zip(sc.chunks_mut(pc / BLOCK))
            {
                for ((block, out), s) in row
                    .chunks(BLOCK)
                    .zip(rb.chunks_mut(BLOCK / 2))
                    .zip(rs.iter_mut())
                {
                    let m = abs_max_bits(block);
                    if block.len() < BLOCK || m >= 0x7f80_0000 {
                        let mut padded = [0f32; BLOCK];
                        for (p, x) in padded.iter_mut().zip(block) {
                            let v = x.to_f32();
                            *p = if v.is_finite() { v } else { 0.0 };
                        }
                        *s = encode_block(
                            &padded,
                            f32::from_bits(abs_max_bits(&padded)),
                            rule,
                            bf16,
                            out,
                        );
                    } else {
                        *s = encode_block(block, f32::from_bits(m), rule, bf16, out);
                    }
                }
            }
        });
    Ok(Mxfp4Tensor {
        rows,
        cols,
        packed,
        scales,
    })
}

#[inline(always)]
fn encode_block<T: Element>(
    block: &[T],
    amax: f32,
    rule: ScaleRule,
    bf16: bool,
    out: &mut [u8],
) -> u8 {
    let s = scale_byte(amax, rule, bf16);
    match rule {
        ScaleRule::Rceil => {
            let mul = rceil_multiplier(s);
            simd::encode_e2m1_block(block, 0.0, mul, false, true, out);
        }
        ScaleRule::Floor | ScaleRule::Even => {
            let div = floor_divisor(s);
            simd::encode_e2m1_block(block, div, 0.0, true, true, out);
        }
    }
    s
}

/// RCEIL scales elements by multiplying with the exact reciprocal power of two of the scale, as
/// torchao does (1.0 for byte 0).
#[inline]
pub fn rceil_multiplier(s: u8) -> f32 {
    if s == 0 {
        1.0
    } else {
        // 2^(127 - s) for s in 1..=254 is a normal f32 (2^-127 is subnormal, still exact).
        (2.0f64).powi(127 - s as i32) as f32
    }
}

/// FLOOR and EVEN divide elements by the scale clamped to the smallest normal f32 (torchao).
#[inline]
pub fn floor_divisor(s: u8) -> f32 {
    e8m0::decode(s).max(f32::MIN_POSITIVE)
}

/// Per-byte f32 block scales: `2^(b - 127)`, NaN for 0xFF.
pub fn scale_table() -> [f32; 256] {
    e8m0::TABLE
}

impl Mxfp4Tensor {
    /// Columns after padding.
    pub fn padded_cols(&self) -> usize {
        padded_cols(self.cols)
    }

    /// Checks buffer lengths against the shape.
    pub fn validate(&self) -> Result<()> {
        let pc = self.padded_cols();
        expect_len(
            "packed MXFP4 codes (bytes)",
            self.rows * pc / 2,
            self.packed.len(),
        )?;
        expect_len(
            "MXFP4 block scales",
            self.rows * pc / BLOCK,
            self.scales.len(),
        )?;
        Ok(())
    }

    /// Dequantizes into `out` (`rows * cols` elements); a 0xFF scale decodes to NaN.
    pub fn dequantize_into<O: Element>(&self, out: &mut [O]) -> Result<()> {
        self.validate()?;
        expect_len("output", self.rows * self.cols, out.len())?;
        dequantize_rows(
            &simd::E2M1_PAIRS,
            &self.packed,
            &self.scales,
            BLOCK,
            self.cols,
            &e8m0::TABLE,
            out,
        );
        Ok(())
    }

    /// Dequantizes to a new vector.
    pub fn dequantize<O: Element>(&self) -> Result<Vec<O>> {
        let mut out = vec![O::from_f32(0.0); self.rows * self.cols];
        self.dequantize_into(&mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(first: &[f32]) -> Vec<f32> {
        let mut b = vec![0f32; 32];
        b[..first.len()].copy_from_slice(first);
        b
    }

    #[test]
    fn worked_examples() {
        let b = block(&[6.0, -3.0, 0.75, 1.25, 5.0, -0.0, 0.25, 2.5]);
        for rule in [ScaleRule::Floor, ScaleRule::Rceil] {
            let t = quantize(
                &b,
                32,
                &Mxfp4Options {
                    rule,
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(t.scales, vec![0x7f]);
            assert_eq!(&t.packed[..4], &[0xd7, 0x22, 0x86, 0x40]);
        }
        let b = block(&[7.0, 3.5, -1.75, 0.4, 2.9]);
        let f = quantize(
            &b,
            32,
            &Mxfp4Options {
                rule: ScaleRule::Floor,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            (f.scales[0], &f.packed[..4]),
            (0x7f, &[0x67, 0x1c, 0x05, 0x00][..])
        );
        let r = quantize(&b, 32, &Mxfp4Options::default()).unwrap();
        assert_eq!(
            (r.scales[0], &r.packed[..4]),
            (0x80, &[0x46, 0x0a, 0x03, 0x00][..])
        );
        let z = quantize(&[0f32; 32], 32, &Mxfp4Options::default()).unwrap();
        assert_eq!(z.scales, vec![0]);
        assert!(z.packed.iter().all(|&b| b == 0));
    }

    /// torchao 0.18's RCEIL taken literally: `ceil(log2(amax / 6))` with an f32 logarithm.
    fn rceil_reference(amax: f32, bf16: bool) -> u8 {
        let mut d = amax / 6.0;
        if bf16 {
            d = round_bf16(d);
        }
        if d == 0.0 {
            return 0;
        }
        let l = (d as f64).log2() as f32;
        (l.ceil().clamp(-127.0, 127.0) as i32 + 127) as u8
    }

    #[test]
    fn rceil_shortcut_equals_the_logarithm_everywhere() {
        // Every exponent, mantissas near 1.0 (where the f32 logarithm can round onto the integer)
        // and a spread of others.
        for exp in 1u32..254 {
            for mant in (0u32..2048).chain((0..64).map(|i| i * 131_071 + 2048)) {
                let amax = f32::from_bits((exp << 23) | mant);
                for bf16 in [false, true] {
                    assert_eq!(
                        scale_byte(amax, ScaleRule::Rceil, bf16),
                        rceil_reference(amax, bf16),
                        "{amax:e} bf16={bf16}"
                    );
                }
            }
        }
    }

    #[test]
    fn gpt_oss_decode_example() {
        let mut packed = vec![0u8; 16];
        packed[0] = 0xd7;
        let t = Mxfp4Tensor {
            rows: 1,
            cols: 32,
            packed,
            scales: vec![0x80],
        };
        let d: Vec<f32> = t.dequantize().unwrap();
        assert_eq!(&d[..2], &[12.0, -6.0]);
    }
}
