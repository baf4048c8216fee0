//! CPU kernels: whole-tensor decode, fused dequantize-on-the-fly GEMV (batch 1-8) and a tiled
//! GEMM for larger batches, plus the exact NVFP4 W4A4 emulation.

#[cfg(target_arch = "aarch64")]
mod aarch64;
pub mod aligned;
#[cfg(target_arch = "x86_64")]
pub mod amx;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
#[cfg(target_arch = "x86_64")]
pub mod avx512_groups;
pub(crate) mod decode;
pub mod dense;
mod gemm;
mod gemv;
#[cfg(target_arch = "x86_64")]
pub mod lanes;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod no_simd;
pub mod parallel;
pub mod prefetch;
pub mod rows;
mod switch;
pub mod w4a4;
pub mod w4a8;
#[cfg(target_arch = "x86_64")]
pub mod w4a8_gemv;
#[cfg(target_arch = "x86_64")]
pub mod w4a8_vnni;
pub mod w8a8;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use decode::{dequantize_into, int8_codebook, pairs, Int8Codebook};
#[cfg(target_arch = "x86_64")]
pub use gemm::AMX_MIN_BATCH;
#[doc(hidden)]
pub use gemm::{
    set_dot_max_batch, set_unsliced_max_k, DOT_MAX_BATCH, DOT_WIDE_MAX_BATCH, DOT_WIDE_MAX_K,
    UNSLICED_MAX_K,
};
pub use rows::Rows;

use rayon::prelude::*;

use crate::qtensor::HostView;

/// Largest batch served by the GEMV kernel; above it the weight is decoded in tiles for a dense
/// GEMM micro-kernel.
pub const GEMV_MAX_BATCH: usize = 8;

/// Which kernel a CPU matmul of this shape uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuKernel {
    /// Fused decode + dot products in SIMD registers (AVX-512F where present, else AVX2+FMA, on
    /// x86-64; NEON on aarch64).
    GemvSimd,
    /// Fused decode + dot products, portable Rust.
    GemvPortable,
    /// Weight tiles decoded to f32, then a dense micro-kernel: on AVX-512 hosts without AMX,
    /// q4's kernel with the activation rows in the vector lanes (`lanes`; from 10 rows over
    /// rows from 2560 wide, otherwise where the dot-product kernel would not run; a GEMV for
    /// a remainder of up to five rows); else q4's dot-product kernel up to [`DOT_MAX_BATCH`]
    /// rows, the `gemm` crate's above (or AMX tiles where present).
    TiledGemm,
    /// Groups of up to [`GEMV_MAX_BATCH`] activation rows, a GEMV each (batches 9-16 over wide
    /// rows).
    GemvPasses,
}

/// Up to this batch, on hosts where the tiled GEMM cuts wide rows into K slices (no AVX2
/// dot-product micro-kernel), weights with rows wider than [`GEMV_PASSES_MIN_K`] take passes of
/// the GEMV instead: same-process interleaved A/B runs (cache-cold NVFP4, this 2-core host)
/// timed two GEMV passes at 0.57–0.81× the sliced tiles at batches 9–16 on 576x1536, 2048x1280,
/// 2560x2048, 4096x4096 and 9728x2560. Where the dot-product kernel decodes whole rows (AVX2),
/// the tiles win at every width (passes 1.07–1.40× the time of whole-row tiles on 576x1536,
/// 4096x4096 and 2560x9728 at batches 9 and 16), so no passes are taken there.
pub const GEMV_PASSES_MAX_BATCH: usize = 16;
/// See [`GEMV_PASSES_MAX_BATCH`].
pub const GEMV_PASSES_MIN_K: usize = 1025;

static PASSES_MIN_K: std::sync::LazyLock<std::sync::atomic::AtomicUsize> =
    std::sync::LazyLock::new(|| std::sync::atomic::AtomicUsize::new(default_gemv_passes_min_k()));

/// Whether the tiled GEMM uses q4's dot-product micro-kernel on this host (AVX2 or AVX-512) for
/// its smallest batches; its limit is [`DOT_MAX_BATCH`] activation rows, on AVX-512 hosts
/// [`DOT_WIDE_MAX_BATCH`] over rows up to [`DOT_WIDE_MAX_K`] wide.
pub fn tiles_use_dot_kernel() -> bool {
    // At 9 rows the row width does not change the answer: any `k` will do.
    gemm::dot_kernel(GEMV_MAX_BATCH + 1, 0)
}

/// The row width from which batches 9-16 take GEMV passes on this host: [`GEMV_PASSES_MIN_K`],
/// or never (`usize::MAX`) where the tiled GEMM decodes whole rows.
pub fn default_gemv_passes_min_k() -> usize {
    if gemm::dot_kernel(GEMV_PASSES_MAX_BATCH, 0) {
        usize::MAX
    } else {
        GEMV_PASSES_MIN_K
    }
}

/// Sets the largest batch the W4A8 int8 kernel runs as passes over groups of four activation
/// rows instead of decoded tiles (default [`w4a8::I8_PASSES_MAX_BATCH`]; 0: never), for
/// same-process A/B measurements
/// (`examples/ab_gemv_passes`). No effect without the x86-64 int8 kernel.
#[doc(hidden)]
pub fn set_i8_passes_max_batch(batch: usize) {
    #[cfg(target_arch = "x86_64")]
    x86::set_i8_passes_max_batch(batch);
    let _ = batch;
}

/// Sets the row width from which batches 9-16 take the GEMV passes (default
/// [`default_gemv_passes_min_k`]; 0: always, `usize::MAX`: never), for same-process A/B measurements
/// (`examples/ab_gemv_passes`).
#[doc(hidden)]
pub fn set_gemv_passes_min_k(k: usize) {
    PASSES_MIN_K.store(k, std::sync::atomic::Ordering::Relaxed);
}

static CHUNK_ORDER_TILES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether the tiled GEMM decodes its tiles in the GEMV's chunk order where AVX2 can (default)
/// or in element order, for same-process A/B measurements (`examples/ab_tile_decode`).
#[doc(hidden)]
pub fn set_chunk_order_tiles(on: bool) {
    CHUNK_ORDER_TILES.store(on, std::sync::atomic::Ordering::Relaxed);
}

static WIDE_TILE_BLOCKS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether the dot-product micro-kernel multiplies 3 activation rows by 4 weight rows per block
/// (default) or by 3, for same-process A/B measurements (`examples/ab_tile_decode nr4`).
#[doc(hidden)]
pub fn set_wide_tile_blocks(on: bool) {
    WIDE_TILE_BLOCKS.store(on, std::sync::atomic::Ordering::Relaxed);
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn wide_tile_blocks() -> bool {
    WIDE_TILE_BLOCKS.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn chunk_order_tiles() -> bool {
    CHUNK_ORDER_TILES.load(std::sync::atomic::Ordering::Relaxed)
}

/// The kernel `matmul` picks for `batch` rows of activations and rows of `k` weights.
pub fn kernel_for(batch: usize, k: usize) -> CpuKernel {
    if batch > GEMV_MAX_BATCH
        && batch <= GEMV_PASSES_MAX_BATCH
        && k >= PASSES_MIN_K.load(std::sync::atomic::Ordering::Relaxed)
    {
        CpuKernel::GemvPasses
    } else if batch > GEMV_MAX_BATCH {
        CpuKernel::TiledGemm
    } else if gemv::simd_available() {
        CpuKernel::GemvSimd
    } else {
        CpuKernel::GemvPortable
    }
}

/// `y[m, n] = sum_k x[m, k] * W[n, k]` for f32 activations `x` (`batch x k`, row-major) into
/// `y` (`batch x n`). The 4-bit weight is never materialised as a whole.
pub fn matmul(w: &HostView<'_>, x: &[f32], batch: usize, y: &mut [f32]) {
    let rows = Rows::new(w);
    debug_assert_eq!(x.len(), batch * rows.k);
    debug_assert_eq!(y.len(), batch * rows.n);
    if batch == 0 || rows.n == 0 {
        return;
    }
    match kernel_for(batch, rows.k) {
        #[cfg(target_arch = "x86_64")]
        CpuKernel::TiledGemm if e2m1_amx(&rows, w.format, batch, x, y, w.scale2) => {}
        #[cfg(target_arch = "x86_64")]
        CpuKernel::TiledGemm if codebook_amx(&rows, batch, x, y) => {}
        CpuKernel::TiledGemm => gemm::matmul(&rows, x, batch, y),
        CpuKernel::GemvPasses => {
            // Groups of up to GEMV_MAX_BATCH activation rows, each a GEMV over the weight.
            let (k, n) = (rows.k, rows.n);
            let mut m0 = 0;
            while m0 < batch {
                let b = (batch - m0).min(GEMV_MAX_BATCH);
                gemv::matmul(
                    &rows,
                    &x[m0 * k..(m0 + b) * k],
                    b,
                    &mut y[m0 * n..(m0 + b) * n],
                );
                m0 += b;
            }
        }
        _ => gemv::matmul(&rows, x, batch, y),
    }
}

/// The E2M1 (NVFP4, MXFP4) tiled GEMM on AMX, from [`AMX_MIN_BATCH`] rows where AMX is usable:
/// E2M1 codes times unscaled E4M3 block scales are exact in bfloat16 (checked unless the code
/// values are NVFP4's own), so NVFP4's tensor scale `scale2` is applied to the sums; times E8M0
/// scales they are exact and normal for scale bytes within 2^±90, which the decoder checks
/// (others send the call to the f32 kernels). Returns false (`y` then unspecified) elsewhere.
#[cfg(target_arch = "x86_64")]
fn e2m1_amx(
    rows: &Rows<'_>,
    format: crate::Format,
    batch: usize,
    x: &[f32],
    y: &mut [f32],
    scale2: f32,
) -> bool {
    let rows::ScaleSrc::Table { bytes, table } = rows.scales else {
        return false;
    };
    if batch < AMX_MIN_BATCH || !amx::usable() {
        return false;
    }
    let own;
    // The tile tables, and the factor left for the sums: NVFP4's tensor scale, which its
    // kernels' table holds but the tile table must not (MXFP4's table is the plain E8M0 one).
    let (products, table, byte_range, factor): (&[u16], &[f32; 256], _, f32) = match format {
        // The product table depends only on the code values: NVFP4's are fixed, so it is
        // built once.
        crate::Format::Nvfp4 if rows.block == 16 => {
            if rows.values == decode::code_values(crate::Format::Nvfp4) {
                (&NVFP4_PRODUCTS, &NVFP4_UNSCALED, None, scale2)
            } else if amx::products_exact(rows.values, &*NVFP4_UNSCALED) {
                own = amx::products(rows.values, &NVFP4_UNSCALED);
                (&own, &NVFP4_UNSCALED, None, scale2)
            } else {
                return false;
            }
        }
        crate::Format::Mxfp4
            if rows.block == 32
                && rows.values == decode::code_values(crate::Format::Mxfp4)
                && same_bits(table, &MXFP4_SCALES) =>
        {
            (&MXFP4_PRODUCTS, table, Some(amx::E8M0_BYTES), 1.0)
        }
        _ => return false,
    };
    let tiles = amx::E2m1Tiles {
        codes: rows.codes,
        scale_bytes: bytes,
        table,
        values: rows.values,
        block: rows.block,
        byte_range,
        n: rows.n,
        k: rows.k,
        row_bytes: rows.row_bytes,
        row_blocks: rows.row_blocks,
    };
    if !amx::matmul_e2m1(&tiles, products, x, batch, y) {
        return false;
    }
    if factor != 1.0 {
        y.iter_mut().for_each(|v| *v *= factor);
    }
    true
}

/// MXFP4's E8M0 scale table.
#[cfg(target_arch = "x86_64")]
static MXFP4_SCALES: std::sync::LazyLock<[f32; 256]> =
    std::sync::LazyLock::new(q4_formats::mxfp4::scale_table);

/// [`amx::products`] of E2M1 code values and MXFP4's E8M0 scales (exact for
/// [`amx::E8M0_BYTES`]).
#[cfg(target_arch = "x86_64")]
static MXFP4_PRODUCTS: std::sync::LazyLock<Vec<u16>> = std::sync::LazyLock::new(|| {
    amx::products(decode::code_values(crate::Format::Mxfp4), &MXFP4_SCALES)
});

/// Whether two scale tables hold the same bits (E8M0's NaN entry included).
#[cfg(target_arch = "x86_64")]
fn same_bits(a: &[f32; 256], b: &[f32; 256]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// The codebook (NF4, bitsandbytes FP4) tiled GEMM on AMX, from [`amx::codebook::MIN_BATCH`] rows
/// ([`amx::codebook::MIN_BATCH_NARROW`] over rows narrower than [`amx::codebook::WIDE_K`]) where
/// AMX is usable and the rows are whole blocks of whole K steps (three bf16 products per
/// weight: see [`amx::codebook`]). Returns false (`y` then unspecified) elsewhere, and where a
/// block scale lies outside the range that path takes.
#[cfg(target_arch = "x86_64")]
fn codebook_amx(rows: &Rows<'_>, batch: usize, x: &[f32], y: &mut [f32]) -> bool {
    let rows::ScaleSrc::F32(scales) = rows.scales else {
        return false;
    };
    if !amx::codebook::takes(batch, rows.k) || !rows.aligned || !amx::usable() {
        return false;
    }
    let tiles = amx::codebook::CodebookTiles {
        codes: rows.codes,
        scales,
        values: rows.values,
        high_first: rows.high_first,
        block: rows.block,
        n: rows.n,
        k: rows.k,
        row_bytes: rows.row_bytes,
        row_blocks: rows.row_blocks,
    };
    tiles.supported() && amx::codebook::matmul(&tiles, x, batch, y)
}

/// [`amx::products`] of NVFP4's code values and unscaled block scales.
#[cfg(target_arch = "x86_64")]
static NVFP4_PRODUCTS: std::sync::LazyLock<Vec<u16>> = std::sync::LazyLock::new(|| {
    amx::products(decode::code_values(crate::Format::Nvfp4), &NVFP4_UNSCALED)
});

/// NVFP4's E4M3 block scales without a tensor scale.
#[cfg(target_arch = "x86_64")]
static NVFP4_UNSCALED: std::sync::LazyLock<[f32; 256]> =
    std::sync::LazyLock::new(|| q4_formats::nvfp4::scale_table(1.0));

/// Where a kernel writes results that come row-major by weight row (`[n][batch]`): at batch 1
/// that is `y`'s own layout (`batch x n`), so `y` itself, zeroed; else `scratch`, resized and
/// zeroed, for [`finish_row_major`] to transpose into `y`. Writing `y` in place spares the call
/// a fresh buffer, which from 128 KiB is mapped anew each time (49152x576 at batch 1 took 1.04x
/// the time with it; `scripts/cpu/results/ab-batch1-output-2026-11-29-s39.txt`).
pub(crate) fn row_major_out<'a>(
    y: &'a mut [f32],
    scratch: &'a mut Vec<f32>,
    n: usize,
    batch: usize,
) -> &'a mut [f32] {
    if batch == 1 {
        y.fill(0.0);
        y
    } else {
        scratch.clear();
        scratch.resize(n * batch, 0f32);
        scratch
    }
}

/// Moves the results [`row_major_out`] handed out into `y` (nothing to do at batch 1).
pub(crate) fn finish_row_major(scratch: &[f32], n: usize, batch: usize, y: &mut [f32]) {
    if batch > 1 {
        transpose_into(scratch, n, batch, y);
    }
}

/// Transposes `src` (`rows x cols`) into `dst` (`cols x rows`); one column is a plain copy (the
/// kernels' per-weight-row results at batch 1).
pub(crate) fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    if cols == 1 {
        dst.copy_from_slice(src);
        return;
    }
    // Eight destination rows per task: each source row then gives eight neighbouring values
    // (one cache line) instead of one, which at prefill sizes is ~8x fewer line reads.
    const GROUP: usize = 8;
    let work = |(g, out): (usize, &mut [f32])| {
        let c0 = g * GROUP;
        let width = out.len() / rows;
        for r in 0..rows {
            let s = &src[r * cols + c0..][..width];
            for (j, &v) in s.iter().enumerate() {
                out[j * rows + r] = v;
            }
        }
    };
    if rows * cols >= 1 << 15 {
        dst.par_chunks_mut(rows * GROUP).enumerate().for_each(work);
    } else {
        dst.chunks_mut(rows * GROUP).enumerate().for_each(work);
    }
}

#[cfg(test)]
mod tests {
    use crate::{Format, QTensor, QuantSpec};
    use candle_core::{Device, Tensor};

    /// The output buffer's old contents never leak into a result: at batch 1 the GEMV kernels
    /// write `y` in place (no buffer of their own), so a `y` full of NaN must come back equal to
    /// one full of zeros, for the f32 and the W4A8 kernels, and for larger batches too.
    #[test]
    fn matmul_overwrites_the_output_buffer() {
        let dev = Device::Cpu;
        // Small (inline) and large (parallel) weights, odd row counts, a K tail.
        for (n, k) in [(37usize, 576usize), (1001, 320), (2048, 1024)] {
            let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
            for format in [Format::Nvfp4, Format::Nf4, Format::Mxfp4] {
                let q = QTensor::quantize(&w, &QuantSpec::new(format)).unwrap();
                let view = q.host_view().unwrap();
                let rows = super::Rows::new(&view);
                for batch in [1usize, 3, 16] {
                    let x: Vec<f32> = (0..batch * k)
                        .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
                        .collect();
                    let mut zeros = vec![0f32; batch * n];
                    super::matmul(&view, &x, batch, &mut zeros);
                    let mut nans = vec![f32::NAN; batch * n];
                    super::matmul(&view, &x, batch, &mut nans);
                    assert_eq!(zeros, nans, "{format} {n}x{k} batch {batch}, f32 kernels");
                    let mut zeros = vec![0f32; batch * n];
                    let mut nans = vec![f32::NAN; batch * n];
                    if super::w4a8::matmul(&rows, &x, batch, &mut zeros) {
                        assert!(super::w4a8::matmul(&rows, &x, batch, &mut nans));
                        assert_eq!(zeros, nans, "{format} {n}x{k} batch {batch}, W4A8 kernels");
                    }
                }
            }
        }
    }

    #[test]
    fn transpose_matches_the_definition() {
        // Column counts around the eight-row grouping, one column, and a parallel-sized case.
        for (rows, cols) in [(5, 1), (3, 7), (9, 8), (17, 13), (4096, 64), (33, 1000)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let mut dst = vec![f32::NAN; rows * cols];
            super::transpose_into(&src, rows, cols, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * cols + c],
                        "{rows}x{cols} at {r},{c}"
                    );
                }
            }
        }
    }
}
