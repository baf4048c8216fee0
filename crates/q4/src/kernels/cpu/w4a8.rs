//! W4A8: activations quantized to int8 in blocks of 32 with an f32 scale each (`d = amax / 127`,
//! `q = round(x / d)`), the scheme llama.cpp uses for the activations of its quantized matmuls.
//! The AVX2 kernel here takes E2M1 weights (NVFP4, MXFP4); `w4a8_vnni`'s tiles also take the
//! bitsandbytes codebooks rounded to int8 (`decode::Int8Codebook`).
//!
//! Twice every E2M1 value is a small integer (0, ±1, ±2, ±3, ±4, ±6, ±8, ±12), so each block's
//! dot product is an exact integer sum, done with byte multiply-adds (`vpmaddubsw`) instead of
//! widening every weight to f32 — about half the vector instructions of the f32 GEMV, whose
//! decode, not memory, bounds batch 1 on two AVX2 cores. On AVX-512 VNNI hosts, batches 1-4 take
//! `w4a8_gemv` (`vpdpbusd` over 128 weights per code load) and batches from
//! `w4a8_vnni::MIN_BATCH` take `w4a8_vnni`'s tiles (`vpdpbusd`, one output row per lane).
//! The result equals the f32 product of the weight with the *dequantized* activations `q * d` up
//! to f32 rounding; that is the reference this mode is tested against.

use super::aligned::AlignedVec;
use super::rows::Rows;

/// Activations per int8 scale.
pub const ACT_BLOCK: usize = 32;

/// Twice the E2M1 value of each code (code 8, "-0", is 0).
pub const E2M1_X2: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Activation rows quantized to int8, one f32 scale per 32 values.
pub struct Int8Acts {
    /// `batch x k` values (`k` a multiple of 32), row-major, natural order; 64-byte aligned,
    /// so that rows of a multiple of 64 values start on cache lines.
    pub q: AlignedVec<i8>,
    /// `batch x k / 32` scales.
    pub d: Vec<f32>,
    pub k: usize,
}

impl Int8Acts {
    /// Quantizes `x` (`batch x k`, `k` a multiple of 32). Non-finite values make the whole
    /// block's scale non-finite, so they propagate to the output as they would in f32.
    pub fn quantize(x: &[f32], k: usize) -> Int8Acts {
        debug_assert!(k.is_multiple_of(ACT_BLOCK) && x.len().is_multiple_of(k.max(1)));
        let mut q = AlignedVec::<i8>::zeroed(x.len());
        let mut d = vec![0f32; x.len() / ACT_BLOCK];
        // Prefill-sized inputs in parallel, in pieces of whole blocks; below 128 K values (about
        // 0.1 ms in one thread) waking the pool costs more than it saves.
        const PIECE: usize = 64 * ACT_BLOCK;
        #[cfg(target_arch = "x86_64")]
        let simd = super::x86::available();
        let work = |(xs, (qs, ds)): (&[f32], (&mut [i8], &mut [f32]))| {
            for ((xb, qb), db) in xs
                .chunks_exact(ACT_BLOCK)
                .zip(qs.chunks_exact_mut(ACT_BLOCK))
                .zip(ds.iter_mut())
            {
                #[cfg(target_arch = "x86_64")]
                if simd {
                    let xb: &[f32; ACT_BLOCK] = xb.try_into().expect("whole blocks");
                    let qb: &mut [i8; ACT_BLOCK] = qb.try_into().expect("whole blocks");
                    // SAFETY: AVX2 is present (`simd`).
                    *db = unsafe { super::x86::quantize_block(xb, qb) };
                    continue;
                }
                *db = quantize_block(xb, qb);
            }
        };
        if x.len() >= 64 * PIECE {
            use rayon::prelude::*;
            x.par_chunks(PIECE)
                .zip(
                    q.par_chunks_mut(PIECE)
                        .zip(d.par_chunks_mut(PIECE / ACT_BLOCK)),
                )
                .for_each(work);
        } else {
            x.chunks(PIECE)
                .zip(q.chunks_mut(PIECE).zip(d.chunks_mut(PIECE / ACT_BLOCK)))
                .for_each(work);
        }
        Int8Acts { q, d, k }
    }

    /// The activations the int8 product is equivalent to: `q * d`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.q.len()];
        for ((o, qb), &d) in out
            .chunks_exact_mut(ACT_BLOCK)
            .zip(self.q.chunks_exact(ACT_BLOCK))
            .zip(&self.d)
        {
            for (o, &v) in o.iter_mut().zip(qb) {
                *o = v as f32 * d;
            }
        }
        out
    }
}

/// `x` replaced by its int8 round trip (`Int8Acts::quantize` then `dequantize`) in place, in
/// parallel for prefill-sized inputs: what the f32 kernels multiply when the int8 kernel does
/// not apply.
pub fn round_trip_in_place(x: &mut [f32]) {
    debug_assert!(x.len().is_multiple_of(ACT_BLOCK));
    let work = |xs: &mut [f32]| {
        #[cfg(target_arch = "x86_64")]
        if super::x86::available() {
            for xb in xs.chunks_exact_mut(ACT_BLOCK) {
                let xb: &mut [f32; ACT_BLOCK] = xb.try_into().expect("whole blocks");
                // SAFETY: AVX2 is present (checked above).
                unsafe { super::x86::round_trip_block(xb) };
            }
            return;
        }
        round_trip_scalar(xs);
    };
    const PIECE: usize = 64 * ACT_BLOCK;
    if x.len() >= 16 * PIECE {
        use rayon::prelude::*;
        x.par_chunks_mut(PIECE).for_each(work);
    } else {
        x.chunks_mut(PIECE).for_each(work);
    }
}

/// Block maxima below this (2^-100) are pre-scaled by [`TINY_PRESCALE`] before quantizing.
pub(crate) const TINY_BLOCK: f32 = f32::from_bits(27 << 23);
/// 2^64.
pub(crate) const TINY_PRESCALE: f32 = f32::from_bits(191 << 23);

/// [`round_trip_in_place`] without SIMD (and the reference its SIMD form is tested against).
fn round_trip_scalar(xs: &mut [f32]) {
    let mut q = [0i8; ACT_BLOCK];
    for xb in xs.chunks_exact_mut(ACT_BLOCK) {
        let d = quantize_block(xb, &mut q);
        for (o, &v) in xb.iter_mut().zip(&q) {
            *o = v as f32 * d;
        }
    }
}

/// One block: returns its scale and writes `round(x * 127 / amax)`, rounding half away from
/// zero exactly as `f32::round` (and candle's `round`) do, without a libm call per value.
fn quantize_block(xb: &[f32], qb: &mut [i8]) -> f32 {
    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
    if xb.iter().any(|v| !v.is_finite()) {
        // Non-finite values make the block's scale NaN, so they reach the output as in f32.
        qb.fill(0);
        return f32::NAN;
    }
    if amax == 0.0 {
        qb.fill(0);
        return 0.0;
    }
    // 127 / amax overflows for amax below ~3.7e-37: such a block is scaled by 2^64 first
    // (exact), so it gets the codes it would get at a normal magnitude.
    let pre = if amax < TINY_BLOCK {
        TINY_PRESCALE
    } else {
        1.0
    };
    let inv = 127.0 / (amax * pre);
    for (o, v) in qb.iter_mut().zip(xb) {
        let t = v * pre * inv;
        // |t| <= 127: the truncation is exact, and so is the fraction t - trunc(t).
        let i = t as i32;
        let f = t - i as f32;
        let r = i + i32::from(f >= 0.5) - i32::from(f <= -0.5);
        *o = r.clamp(-127, 127) as i8;
    }
    amax / 127.0
}

/// Whether the int8 kernel can run this weight: an E2M1 codebook stored low nibble first, rows
/// on block boundaries, blocks of 16 or 32, and `k` a multiple of the 64-weight chunk.
pub fn supported(w: &Rows<'_>) -> bool {
    let e2m1 = w
        .values
        .iter()
        .zip(E2M1_X2)
        .all(|(v, i)| *v * 2.0 == i as f32);
    e2m1 && !w.high_first && w.aligned && matches!(w.block, 16 | 32) && w.k.is_multiple_of(64)
}

/// Largest batch the int8 kernel takes. Above it the f32 tiled GEMM on the round-tripped
/// activations is faster: its 3 x 4 micro-kernel keeps 12 FMAs per 7 loads, while the int8 one
/// pays a convert, a scale product and an FMA per 64 products. Same-process A/B
/// (`examples/ab_tile_decode int8`, NVFP4, int8 / f32 time): batches 9-16 0.73-1.07x on
/// 1536x576, 576x1536, 4096x4096 and 49152x576; 24-64 0.93-1.32x, the f32 kernels ahead on
/// three of the four shapes.
pub const INT8_MAX_BATCH: usize = 16;

/// [`INT8_MAX_BATCH`] for E2M1 weights (NVFP4, MXFP4) on AMX hosts, where the round trip's f32
/// product runs on the tile unit. Same-process A/B (`examples/ab_tile_decode int8`, 2-core Xeon
/// with AMX, int8 / AMX time): NVFP4 batch 9 0.78x / 0.88x on 4096x4096 / 11008x4096 but 1.16x
/// on 1536x576 and 1.00x on 576x1536; batch 12 0.93-0.96x / 1.23-1.30x; batch 16 1.23-1.67x on
/// all four. MXFP4 (its tile path since the fourteenth session): 1.17-1.36x at batch 9,
/// 1.38-1.64x at 12, 1.69-2.21x at 16 on the same four shapes (two runs).
pub const INT8_MAX_BATCH_AMX: usize = 8;

static INT8_MAX: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static INT8_MAX_SET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets the largest batch of the int8 kernel for the process, for every weight (default:
/// [`INT8_MAX_BATCH`], [`INT8_MAX_BATCH_AMX`] for E2M1 weights on AMX hosts), for same-process A/B
/// measurements.
#[doc(hidden)]
pub fn set_int8_max_batch(batch: usize) {
    INT8_MAX.store(batch, std::sync::atomic::Ordering::Relaxed);
    INT8_MAX_SET.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The int8 kernel's largest batch for `w` (only x86-64 has the int8 kernel).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn int8_max_batch(w: &Rows<'_>) -> usize {
    use std::sync::atomic::Ordering::Relaxed;
    if INT8_MAX_SET.load(Relaxed) {
        return INT8_MAX.load(Relaxed);
    }
    // E2M1 weights (NVFP4: blocks of 16, MXFP4: of 32) go to the tile unit where AMX is usable.
    #[cfg(target_arch = "x86_64")]
    if (w.block == 16 || w.block == 32) && super::amx::usable() {
        return INT8_MAX_BATCH_AMX;
    }
    let _ = w;
    INT8_MAX_BATCH
}

/// Largest batch the int8 kernel runs as passes of its register kernel over groups of four
/// activation rows rather than over decoded tiles. Same-process interleaved A/B
/// (`examples/ab_gemv_passes`, mode `w4a8`; cache-cold NVFP4): batches 5-8 0.84-0.92x the time
/// of the tiles on 3072x576, 960x576 and 4096x4096, batch 10 0.87-0.97x, 12 0.93-0.98x, 16
/// 0.96-1.02x.
pub const I8_PASSES_MAX_BATCH: usize = 12;

/// `y[m, n] = sum_k q(x)[m, k] W[n, k]` for f32 activations `x` (`batch x k`), with an int8
/// kernel when this target has one and the weight and batch fit it (the VNNI GEMV up to
/// `w4a8_gemv::MAX_BATCH`, the VNNI tiles from `w4a8_vnni::min_batch`, else the AVX2 GEMV;
/// `true`, the activations quantized here); `false` leaves `y` untouched and the caller runs
/// the f32 kernels on the activations' round trip (`round_trip_in_place`).
pub fn matmul(w: &Rows<'_>, x: &[f32], batch: usize, y: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if batch >= super::w4a8_vnni::min_batch() && super::w4a8_vnni::usable(w) {
        super::w4a8_vnni::matmul(w, &Int8Acts::quantize(x, w.k), batch, y);
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(iw) = (batch <= super::w4a8_gemv::MAX_BATCH)
        .then(|| super::w4a8_gemv::taken(w))
        .flatten()
    {
        use super::w4a8_gemv::{rows, Acts};
        let acts = Acts::new(&Int8Acts::quantize(x, w.k), batch);
        by_row_pieces(w, batch, y, |r0, r1, out| {
            // SAFETY: `taken` checked AVX-512 BW + VNNI and the weight (`iw` its integer
            // weights); rows r0..r1 exist, `acts` holds `batch` rows of w.k activations and
            // `out` their (r1 - r0) * batch outputs.
            unsafe { rows(w, &iw, &acts, r0, r1, out) };
        });
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    if batch <= int8_max_batch(w) && supported(w) && super::x86::available() {
        let xs = super::x86::Int8Layout::new(&Int8Acts::quantize(x, w.k), batch);
        by_row_pieces(w, batch, y, |r0, r1, out| {
            // SAFETY: AVX2 is present and the weight fits the kernel (`supported`); rows
            // r0..r1 exist and `xs` holds `batch` rows of `w.k` activations.
            unsafe { super::x86::rows_i8(w, &xs, batch, r0, r1, out) };
        });
        return true;
    }
    let _ = (w, x, batch, y);
    false
}

/// `rows(r0, r1, out)` over pieces of 32 weight rows, in parallel where the work is large, each
/// adding its rows' `batch` outputs, row-major (`[n][m]`), to zeros; then transposed into `y`
/// (`batch x n`). At batch 1 that is `y`'s own layout: the pieces write `y` itself (no buffer
/// to allocate, no transposition).
#[cfg(target_arch = "x86_64")]
fn by_row_pieces(
    w: &Rows<'_>,
    batch: usize,
    y: &mut [f32],
    rows: impl Fn(usize, usize, &mut [f32]) + Sync + Send,
) {
    let mut yt = Vec::new();
    let out = super::row_major_out(y, &mut yt, w.n, batch);
    let work = w.n * w.k * batch.div_ceil(2);
    super::parallel::for_each_chunk_mut(out, 32 * batch, work, |t, out| {
        let r0 = t * 32;
        rows(r0, (r0 + 32).min(w.n), out);
    });
    super::finish_row_major(&yt, w.n, batch, y);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::relative_error;
    use crate::{Format, QTensor, QuantSpec};
    use candle_core::{Device, Tensor};

    /// The int8 kernel equals the f32 GEMV over the dequantized activations, for both E2M1
    /// formats, every GEMV batch and odd row counts.
    #[test]
    fn int8_kernel_matches_dequantized_activations() {
        let dev = Device::Cpu;
        for format in [Format::Nvfp4, Format::Mxfp4] {
            // Short rows (several per pass, with a tail) and long ones (one per pass).
            for (n, k) in [(37usize, 128usize), (5, 576), (64, 1024), (9, 2304)] {
                let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
                let q = QTensor::quantize(&w, &QuantSpec::new(format)).unwrap();
                let view = q.host_view().unwrap();
                let rows = Rows::new(&view);
                assert!(supported(&rows));
                for batch in (1..=9).chain([13, 16, INT8_MAX_BATCH]) {
                    let x: Vec<f32> = Tensor::randn(0f32, 1.0, (batch, k), &dev)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let xq = Int8Acts::quantize(&x, k);
                    let mut got = vec![0f32; batch * n];
                    if !matmul(&rows, &x, batch, &mut got) {
                        return; // no int8 kernel on this target
                    }
                    let mut want = vec![0f32; batch * n];
                    super::super::matmul(&view, &xq.dequantize(), batch, &mut want);
                    let e = relative_error(&got, &want);
                    assert!(e < 1e-6, "{format} {n}x{k} batch {batch}: {e}");
                }
            }
        }
    }

    #[test]
    fn quantization_rounds_each_block_to_its_own_scale() {
        let mut x: Vec<f32> = (0..64).map(|i| i as f32 - 20.0).collect();
        x[40] = 0.0;
        let a = Int8Acts::quantize(&x, 64);
        assert_eq!(a.d[0], 20.0 / 127.0);
        assert_eq!(a.d[1], 43.0 / 127.0);
        assert_eq!(a.q[0], -127);
        assert_eq!(a.q[63], 127);
        let back = a.dequantize();
        let mut rt = x.clone();
        round_trip_in_place(&mut rt);
        assert_eq!(rt, back);
        for (b, v) in back.iter().zip(&x) {
            assert!((b - v).abs() <= 43.0 / 127.0 / 2.0 + 1e-6);
        }
        // An all-zero block has scale 0 and codes 0; a NaN poisons only its own block.
        let mut y = vec![0f32; 64];
        y[33] = f32::NAN;
        let b = Int8Acts::quantize(&y, 64);
        assert_eq!((b.d[0], b.q[0]), (0.0, 0));
        assert!(b.d[1].is_nan());
    }
}

#[cfg(test)]
mod rounding {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The branch-free rounding is `f32::round` for every value a block can produce,
        /// including halves and the values just below them.
        #[test]
        fn matches_f32_round(v in prop::collection::vec(-1e4f32..1e4, ACT_BLOCK)) {
            let mut q = [0i8; ACT_BLOCK];
            let d = quantize_block(&v, &mut q);
            let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            if amax > 0.0 {
                prop_assert_eq!(d, amax / 127.0);
                let inv = 127.0 / amax;
                for (x, &got) in v.iter().zip(&q) {
                    prop_assert_eq!(got as f32, (x * inv).round().clamp(-127.0, 127.0));
                }
            }
        }
    }

    /// `len` activations of the kinds the quantizers must agree on: mixed magnitudes, halves,
    /// signed zeros and non-finite values.
    fn block_values(len: usize) -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec(
            prop_oneof![
                4 => -1e4f32..1e4,
                2 => (-300i32..300).prop_map(|i| i as f32 * 0.5),
                1 => Just(-0.0f32),
                1 => Just(0.0f32),
                1 => prop::sample::select(vec![f32::NAN, f32::INFINITY, -f32::INFINITY, 1e-40, -3e38]),
            ],
            len,
        )
    }

    proptest! {
        /// The AVX2 round trip equals the scalar one bit for bit: random blocks of mixed
        /// magnitudes, halves, signed zeros, all-zero blocks and non-finite values.
        #[test]
        fn simd_round_trip_matches_the_scalar_one(
            v in block_values(ACT_BLOCK * 4),
            zero_block in 0usize..5,
        ) {
            let mut v = v;
            if zero_block < 4 {
                v[zero_block * ACT_BLOCK..][..ACT_BLOCK].fill(0.0);
            }
            let mut want = v.clone();
            round_trip_scalar(&mut want);
            let mut got = v;
            round_trip_in_place(&mut got);
            let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            // NaN blocks: any NaN payload.
            let canon = |x: &[f32]| bits(&x.iter().map(|f| if f.is_nan() { f32::NAN } else { *f }).collect::<Vec<_>>());
            prop_assert_eq!(canon(&got), canon(&want));
        }

        /// The AVX2 block quantizer (what `Int8Acts::quantize` runs on x86-64) gives the scalar
        /// one's codes and scales bit for bit, on the same kinds of blocks.
        #[test]
        fn simd_quantize_matches_the_scalar_one(
            v in block_values(ACT_BLOCK),
            zero in any::<bool>(),
        ) {
            #[cfg(target_arch = "x86_64")]
            if super::super::x86::available() {
                let mut v = v;
                if zero {
                    v.fill(0.0);
                }
                let mut want = [0i8; ACT_BLOCK];
                let dw = quantize_block(&v, &mut want);
                let mut got = [0i8; ACT_BLOCK];
                let xb: &[f32; ACT_BLOCK] = v.as_slice().try_into().unwrap();
                // SAFETY: AVX2 is present (checked above).
                let dg = unsafe { super::super::x86::quantize_block(xb, &mut got) };
                prop_assert_eq!(got, want);
                prop_assert!(dg.to_bits() == dw.to_bits() || (dg.is_nan() && dw.is_nan()));
            }
        }
    }

    /// Blocks of tiny values (127 / amax overflows f32) get the codes of the same block at a
    /// normal magnitude; before the pre-scaling the largest value's code wrapped to -127.
    #[test]
    fn tiny_blocks_keep_their_codes() {
        let normal: Vec<f32> = (0..ACT_BLOCK).map(|i| i as f32 - 13.0).collect();
        let tiny: Vec<f32> = normal.iter().map(|v| v * 1e-40).collect();
        let (mut qn, mut qt) = ([0i8; ACT_BLOCK], [0i8; ACT_BLOCK]);
        quantize_block(&normal, &mut qn);
        let d = quantize_block(&tiny, &mut qt);
        assert_eq!(qt, qn);
        assert_eq!(qt[ACT_BLOCK - 1], 127);
        assert!(d > 0.0);
        let mut rt = tiny.clone();
        round_trip_in_place(&mut rt);
        let mut want = tiny.clone();
        round_trip_scalar(&mut want);
        assert_eq!(rt, want);
    }

    /// The device-agnostic round trip (candle ops, what the CUDA path uses) agrees with the CPU
    /// kernels' bit for bit, tiny and all-zero blocks included.
    #[test]
    fn tensor_round_trip_matches_the_kernels() {
        let mut x: Vec<f32> = (0..4 * ACT_BLOCK)
            .map(|i| (i as f32 * 0.37).sin() * 3.0)
            .collect();
        for v in &mut x[ACT_BLOCK..2 * ACT_BLOCK] {
            *v *= 1e-39;
        }
        x[2 * ACT_BLOCK..3 * ACT_BLOCK].fill(0.0);
        x[3 * ACT_BLOCK + 5] = 0.5;
        let t =
            candle_core::Tensor::from_vec(x.clone(), (2, 2 * ACT_BLOCK), &candle_core::Device::Cpu)
                .unwrap();
        let got: Vec<f32> = crate::qlinear::fake_quantize_int8(&t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut want = x;
        round_trip_in_place(&mut want);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want));
    }

    #[test]
    fn tiny_block_constants_are_powers_of_two() {
        assert_eq!(TINY_BLOCK, 2f32.powi(-100));
        assert_eq!(TINY_PRESCALE, 2f32.powi(64));
    }

    #[test]
    fn halves_round_away_from_zero() {
        let mut v = [0f32; ACT_BLOCK];
        v[0] = 127.0; // amax 127: scale 1, so t = x
        for (i, x) in [0.5f32, -0.5, 1.5, -1.5, 2.5, 0.49999997, -0.49999997, 126.5]
            .iter()
            .enumerate()
        {
            v[i + 1] = *x;
        }
        let mut q = [0i8; ACT_BLOCK];
        quantize_block(&v, &mut q);
        assert_eq!(&q[1..9], &[1, -1, 2, -2, 3, 0, 0, 127]);
    }
}
