//! bitsandbytes NF4 and FP4 blockwise quantization with optional double quantization
//! (FORMATS.md §2), bit-exact with bitsandbytes 0.50 on CPU.
//!
//! Blocks run over the flattened tensor (they may straddle rows); codes are packed two per
//! byte with the *first* element in the *high* nibble.

use rayon::prelude::*;

use crate::codebook::{
    BNB_FP4, BNB_FP4_SORTED_CODES, BNB_FP4_THRESHOLDS, DYNAMIC_MAP, NF4, NF4_THRESHOLDS,
};
use crate::element::{abs_max_bits, first_non_finite, Element};
use crate::error::{expect_len, FormatError, Result};
use crate::simd;
use crate::NonFinite;

/// Block sizes bitsandbytes 0.50 accepts.
pub const BLOCK_SIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
/// Block size of the nested (8-bit) absmax quantization.
pub const NESTED_BLOCK: usize = 256;
/// bitsandbytes clamps a (tail) block's absmax to this before taking its reciprocal.
const ABSMAX_FLOOR: f32 = 1e-38;

/// Which 4-bit codebook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BnbKind {
    /// NormalFloat-4.
    Nf4,
    /// bitsandbytes' own "FP4" (not OCP E2M1).
    Fp4,
}

impl BnbKind {
    /// The 16-entry codebook (what checkpoints store as `quant_map`).
    pub fn codebook(self) -> &'static [f32; 16] {
        match self {
            BnbKind::Nf4 => &NF4,
            BnbKind::Fp4 => &BNB_FP4,
        }
    }

    /// The name bitsandbytes uses (`nf4` / `fp4`).
    pub fn name(self) -> &'static str {
        match self {
            BnbKind::Nf4 => "nf4",
            BnbKind::Fp4 => "fp4",
        }
    }

    /// Recognises a codebook stored in a checkpoint.
    pub fn from_codebook(map: &[f32]) -> Option<Self> {
        [BnbKind::Nf4, BnbKind::Fp4].into_iter().find(|k| {
            k.codebook()
                .iter()
                .zip(map)
                .filter(|(a, b)| a.to_bits() == b.to_bits())
                .count()
                == 16
        })
    }

    /// Encodes one scaled value `y` (nominally in [-1, 1]).
    #[inline(always)]
    pub fn encode(self, y: f32) -> u8 {
        match self {
            BnbKind::Nf4 => count_above(y, &NF4_THRESHOLDS),
            BnbKind::Fp4 => BNB_FP4_SORTED_CODES[count_above(y, &BNB_FP4_THRESHOLDS) as usize],
        }
    }
}

/// Number of thresholds strictly below `y`: the bucket index with ties to the lower bucket.
#[inline(always)]
fn count_above(y: f32, thresholds: &[f32; 15]) -> u8 {
    let mut c = 0u8;
    for &t in thresholds {
        c += (y > t) as u8;
    }
    c
}

/// How double quantization picks the 8-bit code of each centred absmax.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NestedRounding {
    /// Exact nearest entry of the dynamic map with CUDA's tie rule (`dQuantize`).
    #[default]
    Exact,
    /// The 65,536-bin lookup table of bitsandbytes 0.50's CPU kernel, which differs from the
    /// exact search in ~0.07% of codes. Use it to reproduce CPU-made checkpoints byte for byte.
    CpuLut,
}

/// Quantization options.
#[derive(Clone, Copy, Debug)]
pub struct BnbOptions {
    pub kind: BnbKind,
    pub block_size: usize,
    /// Compress the absmax vector with 8-bit blockwise quantization (`bnb_4bit_use_double_quant`).
    pub double_quant: bool,
    pub nested_rounding: NestedRounding,
    pub non_finite: NonFinite,
}

impl BnbOptions {
    /// NF4, block 64, no double quantization: the bitsandbytes defaults.
    pub fn nf4() -> Self {
        BnbOptions {
            kind: BnbKind::Nf4,
            block_size: 64,
            double_quant: false,
            nested_rounding: NestedRounding::Exact,
            non_finite: NonFinite::Reject,
        }
    }

    /// FP4, block 64, no double quantization.
    pub fn fp4() -> Self {
        BnbOptions {
            kind: BnbKind::Fp4,
            ..Self::nf4()
        }
    }
}

/// Double-quantized absmax statistics (`absmax` U8 codes + `nested_absmax` + offset).
#[derive(Clone, Debug, PartialEq)]
pub struct NestedAbsmax {
    /// One 8-bit dynamic-map code per 4-bit block.
    pub codes: Vec<u8>,
    /// One f32 scale per 256 codes.
    pub nested_absmax: Vec<f32>,
    /// The mean that was subtracted before quantizing.
    pub offset: f32,
    /// The 256-entry code map (normally the dynamic map).
    pub code_map: Vec<f32>,
    /// Codes per nested block (256 in every bitsandbytes release).
    pub block_size: usize,
}

impl NestedAbsmax {
    /// Reconstructs the f32 absmax exactly as bitsandbytes does:
    /// `fl(fl(map[code] * nested_absmax[i / 256]) + offset)`.
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        let nb = self.block_size;
        if nb == 0 {
            return Err(FormatError::Invalid("nested block size is 0".into()));
        }
        expect_len(
            "nested_absmax",
            self.codes.len().div_ceil(nb),
            self.nested_absmax.len(),
        )?;
        expect_len("nested_quant_map", 256, self.code_map.len())?;
        Ok(self
            .codes
            .iter()
            .enumerate()
            .map(|(i, &c)| self.code_map[c as usize] * self.nested_absmax[i / nb] + self.offset)
            .collect())
    }
}

/// Per-block scales of a bitsandbytes tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    /// Plain f32 absmax per block.
    Plain(Vec<f32>),
    /// Double-quantized absmax.
    Nested(NestedAbsmax),
}

impl Absmax {
    /// Number of 4-bit blocks covered.
    pub fn len(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Nested(n) => n.codes.len(),
        }
    }

    /// Whether no blocks are covered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The f32 absmax per block (reconstructed when nested).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        match self {
            Absmax::Plain(v) => Ok(v.clone()),
            Absmax::Nested(n) => n.dequantize(),
        }
    }
}

/// A bitsandbytes-quantized tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct BnbTensor {
    pub kind: BnbKind,
    pub block_size: usize,
    /// Number of logical elements.
    pub numel: usize,
    /// `ceil(numel / 2)` bytes, first element of each pair in the high nibble.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

impl BnbTensor {
    /// Number of 4-bit blocks.
    pub fn n_blocks(&self) -> usize {
        self.numel.div_ceil(self.block_size)
    }

    /// Checks that every buffer has the length the element count implies.
    pub fn validate(&self) -> Result<()> {
        check_block_size(self.block_size)?;
        expect_len(
            "packed 4-bit codes (bytes)",
            self.numel.div_ceil(2),
            self.packed.len(),
        )?;
        expect_len("absmax", self.n_blocks(), self.absmax.len())?;
        Ok(())
    }

    /// Dequantizes into `out` (length `numel`).
    pub fn dequantize_into<O: Element>(&self, out: &mut [O]) -> Result<()> {
        self.validate()?;
        expect_len("output", self.numel, out.len())?;
        let absmax = self.absmax.to_f32()?;
        dequantize_into(self.kind, self.block_size, &self.packed, &absmax, out);
        Ok(())
    }

    /// Dequantizes to a new vector.
    pub fn dequantize<O: Element>(&self) -> Result<Vec<O>> {
        let mut out = vec![O::from_f32(0.0); self.numel];
        self.dequantize_into(&mut out)?;
        Ok(out)
    }
}

/// Rejects block sizes bitsandbytes does not allow.
pub fn check_block_size(bs: usize) -> Result<()> {
    if BLOCK_SIZES.contains(&bs) {
        Ok(())
    } else {
        Err(FormatError::BlockSize(bs))
    }
}

/// Blocks per parallel task: about 32 Ki elements, so that rayon overhead stays small.
fn blocks_per_task(bs: usize) -> usize {
    (32 * 1024 / bs).max(1)
}

/// Quantizes a flattened tensor.
pub fn quantize<T: Element>(data: &[T], opts: &BnbOptions) -> Result<BnbTensor> {
    let bs = opts.block_size;
    check_block_size(bs)?;
    let n = data.len();
    let n_blocks = n.div_ceil(bs);
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; n_blocks];
    let per_task = blocks_per_task(bs);
    let kind = opts.kind;
    let policy = opts.non_finite;

    let first_bad = data
        .par_chunks(per_task * bs)
        .zip(packed.par_chunks_mut(per_task * bs / 2))
        .zip(absmax.par_chunks_mut(per_task))
        .enumerate()
        .map(|(task, ((xs, bytes), am))| {
            let base = task * per_task * bs;
            let mut bad: Option<usize> = None;
            for (b, (block, out)) in xs.chunks(bs).zip(bytes.chunks_mut(bs / 2)).enumerate() {
                let tail = block.len() < bs;
                let m = abs_max_bits(block);
                if m >= 0x7f80_0000 {
                    let i = first_non_finite(block).expect("a non-finite bit pattern exists");
                    match policy {
                        NonFinite::Reject => {
                            bad.get_or_insert(base + b * bs + i);
                            continue;
                        }
                        NonFinite::Zero => {
                            let clean: Vec<f32> =
                                block.iter().map(|x| zero_non_finite(x.to_f32())).collect();
                            am[b] = encode_block(kind, &clean, abs_max_bits(&clean), tail, out);
                            continue;
                        }
                    }
                }
                am[b] = encode_block(kind, block, m, tail, out);
            }
            bad
        })
        .reduce(
            || None,
            |a, b| match (a, b) {
                (Some(x), Some(y)) => Some(x.min(y)),
                (x, y) => x.or(y),
            },
        );
    if let Some(index) = first_bad {
        return Err(FormatError::NonFinite {
            index,
            value: data[index].to_f32(),
        });
    }

    let absmax = if opts.double_quant {
        Absmax::Nested(quantize_absmax(&absmax, opts.nested_rounding))
    } else {
        Absmax::Plain(absmax)
    };
    Ok(BnbTensor {
        kind,
        block_size: bs,
        numel: n,
        packed,
        absmax,
    })
}

#[inline(always)]
fn zero_non_finite(x: f32) -> f32 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

/// Encodes one block (full or tail) and returns the absmax to store.
///
/// Full blocks scale by `x * fl(1 / max(absmax, 1e-38))` and store the unclamped absmax; the tail
/// block divides by the clamped absmax and stores it, as bitsandbytes 0.50's CPU backend does.
fn encode_block<T: Element>(
    kind: BnbKind,
    block: &[T],
    max_bits: u32,
    tail: bool,
    out: &mut [u8],
) -> f32 {
    let absmax = f32::from_bits(max_bits);
    let clamped = absmax.max(ABSMAX_FLOOR);
    if tail {
        let mut codes = [0u8; 4096];
        for (c, x) in codes.iter_mut().zip(block) {
            *c = kind.encode(x.to_f32() / clamped);
        }
        pack_high_first(&codes[..block.len()], kind.encode(0.0), out);
        clamped
    } else {
        let inv = 1.0 / clamped;
        simd::encode_bnb_block(kind, block, inv, out);
        absmax
    }
}

/// Packs codes two per byte, first element in the high nibble; an odd count pads with `pad`.
pub fn pack_high_first(codes: &[u8], pad: u8, out: &mut [u8]) {
    for (byte, pair) in out.iter_mut().zip(codes.chunks(2)) {
        let lo = if pair.len() == 2 { pair[1] } else { pad };
        *byte = (pair[0] << 4) | lo;
    }
}

/// Dequantizes packed codes with f32 per-block absmax into `out`.
pub fn dequantize_into<O: Element>(
    kind: BnbKind,
    bs: usize,
    packed: &[u8],
    absmax: &[f32],
    out: &mut [O],
) {
    let table = kind.codebook();
    let per_task = blocks_per_task(bs);
    out.par_chunks_mut(per_task * bs)
        .zip(packed.par_chunks(per_task * bs / 2))
        .zip(absmax.par_chunks(per_task))
        .for_each(|((out, bytes), am)| {
            for ((o, b), &s) in out.chunks_mut(bs).zip(bytes.chunks(bs / 2)).zip(am) {
                simd::decode_high_first(table, s, b, o);
            }
        });
}

/// float32 mean as torch computes it on CPU for a contiguous vector.
///
/// torch sums float32 in a multi-level cascade; summing exactly in f64 and rounding agrees with
/// it on the statistics bitsandbytes averages (a few thousand positive values).
pub fn mean_f32(xs: &[f32]) -> f32 {
    if xs.is_empty() {
        return f32::NAN;
    }
    let sum: f64 = xs.iter().map(|&x| x as f64).sum();
    (sum as f32) / xs.len() as f32
}

/// Double quantization of an absmax vector (FORMATS.md §2.5).
pub fn quantize_absmax(absmax: &[f32], rounding: NestedRounding) -> NestedAbsmax {
    let offset = mean_f32(absmax);
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let lut = match rounding {
        NestedRounding::CpuLut => Some(cpu_lut(&DYNAMIC_MAP)),
        NestedRounding::Exact => None,
    };
    let mut codes = vec![0u8; centred.len()];
    let mut nested = vec![0f32; centred.len().div_ceil(NESTED_BLOCK)];
    // Blocks are independent: 64 of them per task.
    const BLOCKS_PER_TASK: usize = 64;
    codes
        .par_chunks_mut(NESTED_BLOCK * BLOCKS_PER_TASK)
        .zip(centred.par_chunks(NESTED_BLOCK * BLOCKS_PER_TASK))
        .zip(nested.par_chunks_mut(BLOCKS_PER_TASK))
        .for_each(|((codes, centred), nested)| {
            for ((out, block), nm) in codes
                .chunks_mut(NESTED_BLOCK)
                .zip(centred.chunks(NESTED_BLOCK))
                .zip(nested.iter_mut())
            {
                let m = block.iter().fold(0f32, |m, &c| m.max(c.abs()));
                *nm = m;
                if m == 0.0 {
                    out.fill(0);
                    continue;
                }
                let inv = 1.0 / m;
                for (o, &c) in out.iter_mut().zip(block) {
                    let y = c * inv;
                    *o = match &lut {
                        Some(lut) => lut[cpu_lut_index(y) as usize],
                        None => nearest_dynamic(&DYNAMIC_MAP, y),
                    };
                }
            }
        });
    NestedAbsmax {
        codes,
        nested_absmax: nested,
        offset,
        code_map: DYNAMIC_MAP.to_vec(),
        block_size: NESTED_BLOCK,
    }
}

/// Nearest entry of a sorted 256-entry map, with the binary search and tie rule of
/// bitsandbytes' CUDA `dQuantize<0>`: an exact midpoint stays on the pivot the search visited.
pub fn nearest_dynamic(map: &[f32; 256], x: f32) -> u8 {
    let mut pivot = 127usize;
    let mut upper_pivot = 255usize;
    let mut lower_pivot = 0usize;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = map[pivot];
    let mut step = 64;
    // Written as selects, not branches: the comparisons are data-dependent and mispredict.
    while step > 0 {
        let gt = x > val;
        lower_pivot = if gt { pivot } else { lower_pivot };
        lower = if gt { val } else { lower };
        upper_pivot = if gt { upper_pivot } else { pivot };
        upper = if gt { upper } else { val };
        pivot = if gt { pivot + step } else { pivot - step };
        val = map[pivot];
        step >>= 1;
    }
    if upper_pivot == 255 {
        upper = map[255];
    }
    if lower_pivot == 0 {
        lower = map[0];
    }
    if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot as u8
        } else {
            pivot as u8
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot as u8
    } else {
        pivot as u8
    }
}

const LUT_SIZE: usize = 65536;

/// bitsandbytes 0.50's CPU quantization table: 65,536 bins over [-1, 1], each mapped to the
/// first code whose upper midpoint is not below the bin's value.
fn cpu_lut(map: &[f32; 256]) -> Vec<u8> {
    let mid: Vec<f32> = (0..255).map(|i| 0.5 * (map[i] + map[i + 1])).collect();
    let mut lut = vec![0u8; LUT_SIZE];
    let mut code = 0usize;
    for (i, slot) in lut.iter_mut().enumerate() {
        let val = -1.0f32 + (2.0f32 * i as f32) / (LUT_SIZE - 1) as f32;
        while code < 255 && mid[code] < val {
            code += 1;
        }
        *slot = code as u8;
    }
    lut
}

#[inline]
fn cpu_lut_index(y: f32) -> u16 {
    let v = y.clamp(-1.0, 1.0);
    ((v + 1.0) * 0.5 * (LUT_SIZE - 1) as f32 + 0.5) as u16
}

/// The JSON object bitsandbytes packs into `quant_state.bitsandbytes__{nf4,fp4}`, byte for byte
/// (Python `json.dumps` with default separators, insertion order).
pub fn quant_state_json(t: &BnbTensor, dtype: &str, shape: &[usize]) -> String {
    let shape = shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
        t.kind.name(),
        t.block_size,
        dtype,
        shape
    );
    if let Absmax::Nested(n) = &t.absmax {
        s.push_str(&format!(
            ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            n.block_size,
            python_float_repr(n.offset)
        ));
    }
    s.push('}');
    s
}

/// Python's `repr(float(x))` for an f32 widened to f64: the shortest string that round-trips the
/// f64, always with a decimal point or exponent.
pub fn python_float_repr(x: f32) -> String {
    let v = x as f64;
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    // Rust's `{:?}` for f64 is shortest-round-trip; Python switches to exponent notation
    // outside 1e-4 <= |x| < 1e16.
    let a = v.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        let s = format!("{v:e}");
        // Rust: 1.5e-5, Python: 1.5e-05
        let (mant, exp) = s.split_once('e').expect("exponent form");
        let (sign, digits) = exp
            .strip_prefix('-')
            .map(|d| ("-", d))
            .unwrap_or(("+", exp));
        return format!("{mant}e{sign}{digits:0>2}");
    }
    let s = format!("{v:?}");
    if s.contains('.') || s.contains('e') {
        s
    } else {
        format!("{s}.0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worked_example_nf4_1() {
        let mut x = vec![0f32; 64];
        x[..8].copy_from_slice(&[
            0.5,
            -2.0,
            1.0,
            0.100_097_656,
            -0.30078125,
            0.0,
            1.5,
            -0.08984375,
        ]);
        let t = quantize(&x, &BnbOptions::nf4()).unwrap();
        assert_eq!(&t.packed[..4], &[0xa0, 0xc8, 0x57, 0xe7]);
        assert!(t.packed[4..].iter().all(|&b| b == 0x77));
        let d: Vec<f32> = t.dequantize().unwrap();
        assert_eq!(d[0], 0.4922246);
        assert_eq!(d[1], -2.0);
    }

    #[test]
    fn worked_example_fp4_1() {
        let mut x = vec![0f32; 64];
        x[..8].copy_from_slice(&[1.0, -1.0, 0.5, -0.5, 0.25, 0.1, -0.2, 0.04]);
        let t = quantize(&x, &BnbOptions::fp4()).unwrap();
        assert_eq!(&t.packed[..4], &[0x3b, 0x5d, 0x76, 0xe1]);
    }

    #[test]
    fn nf4_ties_go_low() {
        let mut x = vec![0f32; 64];
        x[..3].copy_from_slice(&[1.0, f32::from_bits(0x3d22faff), f32::from_bits(0xbd3a7871)]);
        let t = quantize(&x, &BnbOptions::nf4()).unwrap();
        assert_eq!(&t.packed[..2], &[0xf7, 0x67]);
    }

    #[test]
    fn rejects_nan_with_index() {
        let mut x = vec![0.5f32; 200];
        x[131] = f32::NAN;
        let err = quantize(&x, &BnbOptions::nf4()).unwrap_err();
        assert!(matches!(err, FormatError::NonFinite { index: 131, .. }));
        let zeroed = quantize(
            &x,
            &BnbOptions {
                non_finite: NonFinite::Zero,
                ..BnbOptions::nf4()
            },
        )
        .unwrap();
        let d: Vec<f32> = zeroed.dequantize().unwrap();
        assert_eq!(d[131], 0.0);
    }

    #[test]
    fn python_repr_matches() {
        assert_eq!(python_float_repr(2.755_859_4), "2.755859375");
        assert_eq!(python_float_repr(1.0), "1.0");
        assert_eq!(python_float_repr(0.1), "0.10000000149011612");
        assert_eq!(python_float_repr(1.5e-5), "1.4999999621068127e-05");
    }

    #[test]
    fn dynamic_search_matches_brute_force_nearest() {
        for i in 0..20000 {
            let y = -1.0 + 2.0 * (i as f32) / 19999.0;
            let c = nearest_dynamic(&DYNAMIC_MAP, y) as usize;
            let d = (DYNAMIC_MAP[c] - y).abs();
            let best = DYNAMIC_MAP
                .iter()
                .map(|&m| (m - y).abs())
                .fold(f32::INFINITY, f32::min);
            assert_eq!(d, best, "y={y}");
        }
    }
}
