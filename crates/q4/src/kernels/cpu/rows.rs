//! Row-wise access to a QTensor's storage: which bytes and which scale each weight row uses.

use q4_formats::Format;

use crate::qtensor::{ExactScales, HostScales, HostView};

/// Per-block scales as kernels read them.
#[derive(Clone, Copy)]
pub enum ScaleSrc<'a> {
    /// A byte per block, looked up in a 256-entry table.
    Table {
        bytes: &'a [u8],
        table: &'a [f32; 256],
    },
    /// An f32 per block.
    F32(&'a [f32]),
}

impl ScaleSrc<'_> {
    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            ScaleSrc::Table { bytes, table } => table[bytes[i] as usize],
            ScaleSrc::F32(v) => v[i],
        }
    }
}

/// Block-scale lookup, monomorphised per storage kind so the hot loop has no branch on it.
pub trait Scales: Copy {
    /// # Safety
    /// `i` must be a valid block index.
    unsafe fn at(&self, i: usize) -> f32;

    /// Hints that block `i`'s scale (any index, even past the end) is read soon.
    fn prefetch(&self, i: usize);
}

/// A byte per block decoded through a 256-entry table (NVFP4, MXFP4).
#[derive(Clone, Copy)]
pub struct TableScales<'a> {
    pub bytes: &'a [u8],
    pub table: &'a [f32; 256],
}

impl Scales for TableScales<'_> {
    #[inline(always)]
    unsafe fn at(&self, i: usize) -> f32 {
        *self
            .table
            .get_unchecked(*self.bytes.get_unchecked(i) as usize)
    }

    #[inline(always)]
    fn prefetch(&self, i: usize) {
        super::prefetch::prefetch(self.bytes.as_ptr().wrapping_add(i));
    }
}

/// An f32 per block (bitsandbytes absmax).
#[derive(Clone, Copy)]
pub struct F32Scales<'a>(pub &'a [f32]);

impl Scales for F32Scales<'_> {
    #[inline(always)]
    unsafe fn at(&self, i: usize) -> f32 {
        *self.0.get_unchecked(i)
    }

    #[inline(always)]
    fn prefetch(&self, i: usize) {
        super::prefetch::prefetch(self.0.as_ptr().wrapping_add(i) as *const u8);
    }
}

impl Scales for ScaleSrc<'_> {
    #[inline(always)]
    unsafe fn at(&self, i: usize) -> f32 {
        match self {
            ScaleSrc::Table { bytes, table } => TableScales { bytes, table }.at(i),
            ScaleSrc::F32(v) => F32Scales(v).at(i),
        }
    }

    #[inline(always)]
    fn prefetch(&self, i: usize) {
        match self {
            ScaleSrc::Table { bytes, table } => TableScales { bytes, table }.prefetch(i),
            ScaleSrc::F32(v) => F32Scales(v).prefetch(i),
        }
    }
}

/// How a chunk's weights map to blocks: 16-, 32-wide blocks, or blocks of 64 or more (one scale
/// per chunk). A const parameter, so the index arithmetic compiles to shifts and adds.
pub const BLOCK16: u8 = 0;
pub const BLOCK32: u8 = 1;
pub const BLOCK64: u8 = 2;

/// Evaluates `$body` with the block class and scale storage of the rows `$w` as a const `$bk`
/// ([`BLOCK16`], [`BLOCK32`] or [`BLOCK64`]) and a [`Scales`] value `$s` ([`TableScales`] or
/// [`F32Scales`]): the one place that lists the six monomorphs the chunk kernels are built for.
/// `$body` is expanded once per pair, so calls in it inline as if written out.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_macros))]
macro_rules! with_scales {
    ($w:expr, |$bk:ident, $s:ident| $body:expr) => {{
        use $crate::kernels::cpu::rows::{
            block_class, F32Scales, ScaleSrc, TableScales, BLOCK16, BLOCK32, BLOCK64,
        };
        match (block_class($w.block), $w.scales) {
            (BLOCK16, ScaleSrc::Table { bytes, table }) => {
                const $bk: u8 = BLOCK16;
                let $s = TableScales { bytes, table };
                $body
            }
            (BLOCK32, ScaleSrc::Table { bytes, table }) => {
                const $bk: u8 = BLOCK32;
                let $s = TableScales { bytes, table };
                $body
            }
            (_, ScaleSrc::Table { bytes, table }) => {
                const $bk: u8 = BLOCK64;
                let $s = TableScales { bytes, table };
                $body
            }
            (BLOCK16, ScaleSrc::F32(v)) => {
                const $bk: u8 = BLOCK16;
                let $s = F32Scales(v);
                $body
            }
            (BLOCK32, ScaleSrc::F32(v)) => {
                const $bk: u8 = BLOCK32;
                let $s = F32Scales(v);
                $body
            }
            (_, ScaleSrc::F32(v)) => {
                const $bk: u8 = BLOCK64;
                let $s = F32Scales(v);
                $body
            }
        }
    }};
}
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_imports))]
pub(crate) use with_scales;

/// The `BK` class of a block size.
pub fn block_class(block: usize) -> u8 {
    match block {
        16 => BLOCK16,
        32 => BLOCK32,
        _ => BLOCK64,
    }
}

/// `2^120`: an E4M3 value over its bits moved into an f32 (see [`Rows::e4m3_factor`]).
pub const E4M3_BITS_SCALE: f32 = f32::from_bits((127 + 120) << 23);

/// The geometry of a quantized `[n, k]` weight.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub codes: &'a [u8],
    pub scales: ScaleSrc<'a>,
    /// Codebook (16 f32 values indexed by nibble).
    pub lut: &'a [f32; 16],
    /// The codebook as value pairs per byte, in element order (for block decodes).
    pub pairs: &'a q4_formats::simd::PairTable,
    /// bitsandbytes stores the first element of a pair in the high nibble.
    pub high_first: bool,
    pub block: usize,
    /// Output features (rows).
    pub n: usize,
    /// Input features (columns).
    pub k: usize,
    /// Bytes from one row's codes to the next (rows are padded to whole blocks).
    pub row_bytes: usize,
    /// Scales per row.
    pub row_blocks: usize,
    /// Every row starts on a byte and a block boundary, so rows can be walked block by block.
    /// False only for bitsandbytes tensors whose blocks straddle rows.
    pub aligned: bool,
    /// Value of each code exactly as the pair table decodes it (sign of zero included).
    pub values: &'a [f32; 16],
    /// Scales that are `e4m3(b) * s2` ([`ExactScales::E4m3`]) with `2^120 * s2` finite: that
    /// product. An E4M3 byte `b` moved to bits 20-27 of an f32 (sign to bit 31)
    /// reads as `e4m3(b) * 2^-120` (subnormals as f32 subnormals), so times this factor it is
    /// exactly the table's `e4m3(b) * s2`: scales decode by arithmetic instead of lookups.
    pub e4m3_factor: Option<f32>,
    /// Scales that are E8M0 without the bytes 0x00 and 0xff ([`ExactScales::E8m0`]): every
    /// scale byte `b` is then the f32 whose exponent field is `b`.
    pub e8m0_exact: bool,
    /// The bitsandbytes codebook rounded to int8 that `values`, `lut` and `pairs` hold (W4A8,
    /// [`HostView::int8_codebook`]).
    pub int8_codebook: Option<&'static super::decode::Int8Codebook>,
}

impl<'a> Rows<'a> {
    pub fn new(v: &HostView<'a>) -> Self {
        let scales = match v.scales {
            HostScales::Table { bytes, table } => ScaleSrc::Table { bytes, table },
            HostScales::F32(f) => ScaleSrc::F32(f),
        };
        let bs = v.block_size;
        let (row_bytes, row_blocks, aligned) = match v.format {
            Format::Nvfp4 | Format::Mxfp4 => {
                let pc = v.cols.div_ceil(bs) * bs;
                (pc / 2, pc / bs, true)
            }
            Format::Nf4 | Format::Fp4 => (v.cols / 2, v.cols / bs, v.cols.is_multiple_of(bs)),
        };
        let int8 = super::decode::int8_codebook_of(v);
        Rows {
            values: int8.map_or(super::decode::code_values(v.format), |c| &c.values),
            codes: v.codes,
            scales,
            lut: int8.map_or(codebook(v.format), |c| &c.values),
            pairs: int8.map_or(super::decode::pairs(v.format), |c| &*c.pairs),
            int8_codebook: int8,
            high_first: matches!(v.format, Format::Nf4 | Format::Fp4),
            block: bs,
            n: v.rows,
            k: v.cols,
            row_bytes,
            row_blocks,
            aligned,
            e4m3_factor: match v.exact_scales {
                Some(ExactScales::E4m3 { s2 }) => {
                    Some(E4M3_BITS_SCALE * s2).filter(|f| f.is_finite())
                }
                _ => None,
            },
            e8m0_exact: v.exact_scales == Some(ExactScales::E8m0),
        }
    }

    /// Whole blocks per row that lie inside the first `k` columns.
    pub fn full_blocks(&self) -> usize {
        self.k / self.block
    }

    /// Decodes weight `(row, col)` for any geometry (slow, scalar).
    #[inline]
    pub fn weight(&self, row: usize, col: usize) -> f32 {
        let (byte, nib_hi, scale_idx) = if self.aligned {
            (
                row * self.row_bytes + col / 2,
                (col % 2 == 1) != self.high_first,
                row * self.row_blocks + col / self.block,
            )
        } else {
            let flat = row * self.k + col;
            (
                flat / 2,
                (flat % 2 == 1) != self.high_first,
                flat / self.block,
            )
        };
        let b = self.codes[byte];
        let code = if nib_hi { b >> 4 } else { b & 15 };
        self.lut[code as usize] * self.scales.get(scale_idx)
    }

    /// Decodes columns `k0 .. k0 + out.len()` of a row into `out`.
    pub fn decode_range(&self, row: usize, k0: usize, out: &mut [f32]) {
        let k1 = k0 + out.len();
        debug_assert!(k1 <= self.k);
        if !self.aligned || k0 % 2 == 1 {
            for (i, o) in out.iter_mut().enumerate() {
                *o = self.weight(row, k0 + i);
            }
            return;
        }
        let codes = &self.codes[row * self.row_bytes..];
        let mut c = k0;
        // Whole blocks in one vectorised run.
        #[cfg(target_arch = "x86_64")]
        if self.block.is_multiple_of(8) && k0.is_multiple_of(self.block) && super::x86::available()
        {
            let whole = (k1 - k0) / self.block * self.block;
            if whole > 0 {
                let first = row * self.row_blocks + k0 / self.block;
                let o = &mut out[..whole];
                let cs = &codes[k0 / 2..(k0 + whole) / 2];
                // SAFETY: AVX2 is present (checked above); `cs` holds the codes of exactly the
                // `whole / block` blocks written to `o`, whose scales exist in this row.
                unsafe {
                    match self.scales {
                        ScaleSrc::Table { bytes, table } => super::x86::decode_blocks(
                            self.values,
                            self.high_first,
                            cs,
                            TableScales { bytes, table },
                            first,
                            self.block,
                            o,
                        ),
                        ScaleSrc::F32(v) => super::x86::decode_blocks(
                            self.values,
                            self.high_first,
                            cs,
                            F32Scales(v),
                            first,
                            self.block,
                            o,
                        ),
                    }
                }
                c += whole;
            }
        }
        // Walk block by block (a block may start before k0 or end after k1).
        while c < k1 {
            let j = c / self.block;
            let end = ((j + 1) * self.block).min(k1);
            let s = self.scales.get(row * self.row_blocks + j);
            let o = &mut out[c - k0..end - k0];
            q4_formats::simd::decode_pairs(self.pairs, s, &codes[c / 2..end.div_ceil(2)], o);
            c = end;
        }
    }

    /// Decodes a whole row into `out` (`k` values).
    pub fn decode_row(&self, row: usize, out: &mut [f32]) {
        if self.aligned {
            let fb = self.full_blocks();
            let codes = &self.codes[row * self.row_bytes..];
            for j in 0..fb {
                let s = self.scales.get(row * self.row_blocks + j);
                let o = &mut out[j * self.block..(j + 1) * self.block];
                let c = &codes[j * self.block / 2..(j + 1) * self.block / 2];
                q4_formats::simd::decode_pairs(self.pairs, s, c, o);
            }
            for (col, o) in out
                .iter_mut()
                .enumerate()
                .take(self.k)
                .skip(fb * self.block)
            {
                *o = self.weight(row, col);
            }
        } else {
            for (col, o) in out.iter_mut().enumerate().take(self.k) {
                *o = self.weight(row, col);
            }
        }
    }
}

/// The 16-entry codebook of a format, as multiplied by block scales in the kernels.
pub fn codebook(format: Format) -> &'static [f32; 16] {
    match format {
        Format::Nvfp4 | Format::Mxfp4 => &q4_formats::scalar::E2M1_VALUES,
        Format::Nf4 => &q4_formats::codebook::NF4,
        Format::Fp4 => &q4_formats::codebook::BNB_FP4,
    }
}
