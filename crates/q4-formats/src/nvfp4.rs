//! NVFP4: E2M1 elements in blocks of 16 along the last dimension, an E4M3 block scale and an
//! f32 tensor scale, exactly as ModelOpt's Hugging Face export computes them (FORMATS.md §3.2).

use rayon::prelude::*;

use crate::element::{abs_max_bits, first_non_finite, Element};
use crate::error::{expect_len, FormatError, Result};
use crate::scalar::{e4m3, SignRule};
use crate::simd;
use crate::NonFinite;

/// Elements per block.
pub const BLOCK: usize = 16;
/// `6 * 448`: the largest E2M1 value times the largest E4M3 value.
pub const TENSOR_SCALE_DIVISOR: f32 = 2688.0;
/// The E4M3 block scale of an all-zero block (1.0).
pub const ZERO_BLOCK_SCALE: u8 = 0x38;

/// An NVFP4 tensor viewed as `rows x cols` (all leading dimensions folded into rows).
#[derive(Clone, Debug, PartialEq)]
pub struct Nvfp4Tensor {
    pub rows: usize,
    /// Logical columns (input features).
    pub cols: usize,
    /// `rows x padded_cols / 2` bytes, element 2j in the low nibble.
    pub packed: Vec<u8>,
    /// `rows x padded_cols / 16` E4M3 bytes, row-major (the checkpoint's linear layout).
    pub scales: Vec<u8>,
    /// Tensor scale (`weight_scale_2`).
    pub scale2: f32,
}

/// Options of the NVFP4 quantizer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Nvfp4Options {
    /// Use this tensor scale instead of `amax / 2688` (for fused q/k/v or gate/up groups).
    pub scale2: Option<f32>,
    /// Pad rows with zeros to a multiple of 16 instead of refusing such a last dimension.
    pub pad: bool,
    pub non_finite: NonFinite,
}

/// Columns after padding to whole blocks.
pub fn padded_cols(cols: usize) -> usize {
    cols.div_ceil(BLOCK) * BLOCK
}

/// `max |x|` over a tensor; errors on the first NaN/Inf unless `non_finite` is `Zero`.
pub fn amax<T: Element>(data: &[T], non_finite: NonFinite) -> Result<f32> {
    Ok(scan(data, non_finite)?.0)
}

/// One pass over a tensor: its finite `max |x|` and whether every value is finite; errors on
/// the first NaN/Inf unless `non_finite` is `Zero`.
pub(crate) fn scan<T: Element>(data: &[T], non_finite: NonFinite) -> Result<(f32, bool)> {
    let m = data
        .par_chunks(1 << 16)
        .map(abs_max_bits)
        .max()
        .unwrap_or(0);
    if m < 0x7f80_0000 {
        return Ok((f32::from_bits(m), true));
    }
    match non_finite {
        NonFinite::Reject => {
            let index = first_non_finite(data).expect("non-finite present");
            Err(FormatError::NonFinite {
                index,
                value: data[index].to_f32(),
            })
        }
        NonFinite::Zero => {
            let finite_max = data
                .iter()
                .map(|x| x.to_f32())
                .filter(|x| x.is_finite())
                .fold(0f32, |m, x| m.max(x.abs()));
            Ok((finite_max, false))
        }
    }
}

/// ModelOpt's tensor scale: `fl(amax / 2688)`.
pub fn tensor_scale(amax: f32) -> f32 {
    amax / TENSOR_SCALE_DIVISOR
}

/// The E4M3 scale byte of a block with absolute maximum `bmax` under tensor scale `s2`.
#[inline(always)]
pub fn block_scale(bmax: f32, s2: f32) -> u8 {
    let mut ps = bmax / (6.0 * s2);
    if ps == 0.0 {
        ps = 1.0;
    }
    e4m3::encode(ps.clamp(e4m3::MIN_SUBNORMAL, e4m3::MAX))
}

/// Per-tensor table of the exact f32 block scales `fl(e4m3(b) * s2)` for every scale byte:
/// dequantized value = `E2M1[code] * table[scale_byte]`.
pub fn scale_table(s2: f32) -> [f32; 256] {
    let mut t = [0f32; 256];
    for (b, v) in t.iter_mut().enumerate() {
        *v = e4m3::decode(b as u8) * s2;
    }
    t
}

/// Quantizes a `rows x cols` tensor (row-major, `data.len() == rows * cols`).
pub fn quantize<T: Element>(data: &[T], cols: usize, opts: &Nvfp4Options) -> Result<Nvfp4Tensor> {
    if cols == 0 || !data.len().is_multiple_of(cols) {
        return Err(FormatError::Invalid(format!(
            "{} elements do not form rows of {cols}",
            data.len()
        )));
    }
    if !cols.is_multiple_of(BLOCK) && !opts.pad {
        return Err(FormatError::NotBlockMultiple { cols, block: BLOCK });
    }
    let rows = data.len() / cols;
    // (A shared scale still needs the scan: this tensor's own NaN/Inf must be reported.)
    let (own_amax, finite) = scan(data, opts.non_finite)?;
    let s2 = opts.scale2.unwrap_or_else(|| tensor_scale(own_amax));
    if !(s2.is_finite() && s2 >= 0.0) {
        return Err(FormatError::Invalid(format!(
            "tensor scale {s2} is not a finite non-negative number"
        )));
    }
    let pc = padded_cols(cols);
    let mut packed = vec![0u8; rows * pc / 2];
    let mut scales = vec![0u8; rows * pc / BLOCK];
    let rows_per_task = (16384 / pc).max(1);
    if finite && pc == cols && s2 > 0.0 {
        // Whole rows of whole blocks: one vectorised pass per task.
        data.par_chunks(rows_per_task * cols)
            .zip(packed.par_chunks_mut(rows_per_task * pc / 2))
            .zip(scales.par_chunks_mut(rows_per_task * pc / BLOCK))
            .for_each(|((xs, bytes), sc)| simd::encode_nvfp4_blocks(xs, s2, bytes, sc));
        return Ok(Nvfp4Tensor {
            rows,
            cols,
            packed,
            scales,
            scale2: s2,
        });
    }

    data.par_chunks(rows_per_task * cols)
        .zip(packed.par_chunks_mut(rows_per_task * pc / 2))
        .zip(scales.par_chunks_mut(rows_per_task * pc / BLOCK))
        .for_each(|((xs, bytes), sc)| {
            let mut padded;
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
                    let mut m = abs_max_bits(block);
                    if block.len() < BLOCK || m >= 0x7f80_0000 {
                        // Tail of a padded row, or NaN/Inf replaced by zero (rejected earlier).
                        padded = [0f32; BLOCK];
                        for (p, x) in padded.iter_mut().zip(block) {
                            let v = x.to_f32();
                            *p = if v.is_finite() { v } else { 0.0 };
                        }
                        m = abs_max_bits(&padded);
                        *s = encode_block(&padded, f32::from_bits(m), s2, out);
                    } else {
                        *s = encode_block(block, f32::from_bits(m), s2, out);
                    }
                }
            }
        });
    Ok(Nvfp4Tensor {
        rows,
        cols,
        packed,
        scales,
        scale2: s2,
    })
}

#[inline(always)]
fn encode_block<T: Element>(block: &[T], bmax: f32, s2: f32, out: &mut [u8]) -> u8 {
    if s2 == 0.0 {
        // All-zero tensor (or a scale that underflowed): every value encodes as +0.
        out.fill(0);
        return ZERO_BLOCK_SCALE;
    }
    let s = block_scale(bmax, s2);
    let t = e4m3::decode(s) * s2;
    simd::encode_e2m1_block(block, t, 0.0, true, false, out);
    s
}

impl Nvfp4Tensor {
    /// Columns after padding.
    pub fn padded_cols(&self) -> usize {
        padded_cols(self.cols)
    }

    /// Checks buffer lengths against the shape.
    pub fn validate(&self) -> Result<()> {
        let pc = self.padded_cols();
        expect_len(
            "packed NVFP4 codes (bytes)",
            self.rows * pc / 2,
            self.packed.len(),
        )?;
        expect_len(
            "NVFP4 block scales",
            self.rows * pc / BLOCK,
            self.scales.len(),
        )?;
        Ok(())
    }

    /// Dequantizes into `out` (`rows * cols` elements).
    pub fn dequantize_into<O: Element>(&self, out: &mut [O]) -> Result<()> {
        self.validate()?;
        expect_len("output", self.rows * self.cols, out.len())?;
        let table = scale_table(self.scale2);
        dequantize_rows(
            &simd::E2M1_POSITIVE_ZERO_PAIRS,
            &self.packed,
            &self.scales,
            BLOCK,
            self.cols,
            &table,
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

/// Shared row decoder of the E2M1 formats: each block is `pairs[byte] * table[scale byte]`.
pub(crate) fn dequantize_rows<O: Element>(
    pairs: &simd::PairTable,
    packed: &[u8],
    scales: &[u8],
    block: usize,
    cols: usize,
    table: &[f32; 256],
    out: &mut [O],
) {
    let pc = cols.div_ceil(block) * block;
    let rows_per_task = (16384 / pc).max(1);
    out.par_chunks_mut(rows_per_task * cols)
        .zip(packed.par_chunks(rows_per_task * pc / 2))
        .zip(scales.par_chunks(rows_per_task * pc / block))
        .for_each(|((out, bytes), sc)| {
            for ((orow, brow), srow) in out
                .chunks_mut(cols)
                .zip(bytes.chunks(pc / 2))
                .zip(sc.chunks(pc / block))
            {
                for ((o, b), &s) in orow.chunks_mut(block).zip(brow.chunks(block / 2)).zip(srow) {
                    simd::decode_pairs(pairs, table[s as usize], b, o);
                }
            }
        });
}

/// The sign rule ModelOpt's NVFP4 export uses (`x < 0`: -0.0 encodes as +0).
pub const SIGN_RULE: SignRule = SignRule::Negative;

/// Byte offset of scale `(r, c)` in the 128x4-tiled ("swizzled") layout of Blackwell
/// block-scaled GEMMs, for a scale matrix with `kp` (padded to a multiple of 4) columns.
#[inline]
pub fn swizzled_offset(r: usize, c: usize, kp: usize) -> usize {
    ((r / 128) * (kp / 4) + c / 4) * 512 + (r % 32) * 16 + ((r % 128) / 32) * 4 + (c % 4)
}

/// Rearranges a row-major `rows x cols` scale matrix into the swizzled layout, padding with 0
/// to `ceil(rows/128)*128 x ceil(cols/4)*4`.
pub fn swizzle_scales(scales: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let mp = rows.div_ceil(128) * 128;
    let kp = cols.div_ceil(4) * 4;
    let mut out = vec![0u8; mp * kp];
    for r in 0..rows {
        for c in 0..cols {
            out[swizzled_offset(r, c, kp)] = scales[r * cols + c];
        }
    }
    out
}

/// Inverse of [`swizzle_scales`].
pub fn unswizzle_scales(swizzled: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let kp = cols.div_ceil(4) * 4;
    let mut out = vec![0u8; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            out[r * cols + c] = swizzled[swizzled_offset(r, c, kp)];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worked_example_rows() {
        let row0 = [
            6.0, -3.0, 1.5, 0.75, 0.25, -0.0, 2.5, 5.0, -0.1, 1.25, 1.75, 3.5, -4.0, 0.5, -6.0, 0.0,
        ];
        let row1 = [
            0.3, -0.15, 0.075, 0.0375, 0.0125, 0.0, 0.125, 0.25, -0.005, 0.0625, 0.0875, 0.175,
            -0.2, 0.025, -0.3, 0.01,
        ];
        let data: Vec<f32> = row0.iter().chain(row1.iter()).copied().collect();
        let t = quantize(&data, 16, &Nvfp4Options::default()).unwrap();
        assert_eq!(t.scale2.to_bits(), 0x3b124925);
        assert_eq!(t.scales, vec![0x7e, 0x5b]);
        assert_eq!(
            &t.packed[..8],
            &[0xd7, 0x23, 0x00, 0x64, 0x28, 0x64, 0x1e, 0x0f]
        );
        assert_eq!(
            &t.packed[8..],
            &[0xd7, 0x23, 0x01, 0x75, 0x38, 0x64, 0x1e, 0x0f]
        );
        let d: Vec<f32> = t.dequantize().unwrap();
        assert_eq!(d[16], 0.29464287);
    }

    #[test]
    fn refuses_ragged_rows_unless_padding() {
        let data = vec![1.0f32; 40];
        assert!(matches!(
            quantize(&data, 20, &Nvfp4Options::default()),
            Err(FormatError::NotBlockMultiple {
                cols: 20,
                block: 16
            })
        ));
        let t = quantize(
            &data,
            20,
            &Nvfp4Options {
                pad: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(t.packed.len(), 2 * 16);
        let d: Vec<f32> = t.dequantize().unwrap();
        assert_eq!(d, data);
    }

    #[test]
    fn swizzle_round_trips() {
        let (rows, cols) = (130, 5);
        let s: Vec<u8> = (0..rows * cols).map(|i| (i % 251) as u8).collect();
        let z = swizzle_scales(&s, rows, cols);
        assert_eq!(z.len(), 256 * 8);
        assert_eq!(unswizzle_scales(&z, rows, cols), s);
    }
}
