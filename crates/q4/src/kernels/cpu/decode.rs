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

/// Decodes a whole tensor into `out` (`rows * cols` values), bit-exact with q4-formats.
pub fn dequantize_into<O: Element>(v: &HostView<'_>, out: &mut [O]) {
    let pairs = pairs(v.format);
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
