//! W4A8 (see `w4a8`) from batch 5 on AVX-512 VNNI hosts.
//!
//! The weight is decoded 16 rows at a time into bytes laid out for `vpdpbusd` with one output
//! row per 32-bit lane: vector `v` of a group holds, in lane `l`, four weights of row `l` as
//! unsigned bytes `i + 128`, `i` the code's integer weight (E2M1: twice its value; NF4 and
//! bitsandbytes FP4: the codebook rounded to int8, `decode::Int8Codebook`). The activations are
//! broadcast four at a time, so one instruction makes 64 products and the sums stay in the lane
//! of their row: no horizontal reduction, and a block's integer sum is converted and scaled once
//! per 16 rows (per 16 or 32 weights of a row; bitsandbytes blocks of 64 and more per 32, the
//! activation block, then once more per weight block) instead of once per 64 products as in the
//! dot-product kernels.
//!
//! Order: decoding a step of 64 weights transposes 16 rows x 8 dwords of codes, so that dword
//! `q` (weights `8q .. 8q + 8`) of every row shares a vector; its even weights (`8q`, `8q + 2`,
//! `8q + 4`, `8q + 6`: the low nibbles, or the high ones for bitsandbytes, which stores a byte's
//! first weight in its high nibble) become one vector and its odd weights the next. The
//! activations are permuted the same way once per call (within each 8: even, then odd).
//!
//! A group is decoded and multiplied in K slices of 1024 weights, so that the decoded slice
//! and a pass's activations stay in L1 across the passes (8 activation rows each) over it; the
//! first pass over a slice prefetches the codes the decoder reads next.
//!
//! Each block's integer sum is exact, so the result equals the f32 product with the dequantized
//! activations up to f32 rounding, as for the other W4A8 kernels.

use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};

use super::aligned::{AlignedBuf, AlignedVec};
use super::parallel::for_each_index;
use super::rows::{Rows, ScaleSrc, E4M3_BITS_SCALE};
use super::w4a8::{Int8Acts, ACT_BLOCK};
use super::w4a8_gemv::{offset_table, IntWeights, W_OFFSET};

/// Output rows per group: one per 32-bit lane.
const ROWS: usize = 16;
/// Weights of a row per decode step (32 code bytes).
const STEP: usize = 64;
/// Activation rows per pass over a group's decoded weights (three accumulators each fit the 32
/// vector registers).
const PASS_ROWS: usize = 8;
/// Weights of a row per K slice: a group's slice decoded (16 KiB of bytes, 4 KiB of scales)
/// and a pass's activations (8 KiB) stay in the 48 KiB L1 across the passes over it.
const K_SLICE: usize = 1024;

static SWITCH: super::switch::Switch = super::switch::Switch::new("Q4_W4A8_TILES");

static ARITH_SCALES: AtomicBool = AtomicBool::new(true);

/// Turns the arithmetic NVFP4 / MXFP4 scale decode ([`ScaleDecode`]) on or off (default on;
/// off, every table is gathered from), for same-process A/B measurements
/// (`examples/ab_w4a8_scales`).
#[doc(hidden)]
pub fn set_arith_scales(on: bool) {
    ARITH_SCALES.store(on, Ordering::Relaxed);
}

/// Smallest batch this kernel takes; below it the AVX2 int8 GEMV runs. Same-process A/B
/// (`examples/ab_tile_decode … vnni` with `Q4_VNNI_MIN_BATCH=2`, cache-cold, time against the
/// GEMV, NVFP4 and MXFP4 on 4096x4096, 11008x4096, 1536x576, 49152x576, 576x1536): batch 2
/// 0.78-1.35x, 3 0.45-1.23x, 4 0.64-1.16x (SmolLM2's 576x1536 down projection slower), 5
/// 0.50-0.76x, 8 0.39-0.67x.
pub const MIN_BATCH: usize = 5;

static MIN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(MIN_BATCH);

/// The smallest batch this kernel takes ([`MIN_BATCH`] unless set for a measurement).
pub fn min_batch() -> usize {
    MIN.load(Ordering::Relaxed)
}

/// Sets [`min_batch`], for same-process A/B measurements.
#[doc(hidden)]
pub fn set_min_batch(batch: usize) {
    MIN.store(batch, Ordering::Relaxed);
}

/// Turns this kernel on or off (default on where [`usable`]), for same-process A/B
/// measurements; off, W4A8 batches take the AVX2 int8 kernel up to 16 and the f32 kernels on
/// the activations' round trip above.
#[doc(hidden)]
pub fn set_enabled(on: bool) {
    SWITCH.set(on);
}

/// Whether this kernel runs `w`'s W4A8 products from [`min_batch`] rows: [`host_usable`] and
/// integer weights it takes (`int_weights`).
pub fn usable(w: &Rows<'_>) -> bool {
    host_usable() && int_weights(w).is_some()
}

/// [`IntWeights::of`] `w` where the tiles take it: E2M1 weights, or a bitsandbytes codebook
/// stored high nibble first in blocks of 32 to 1024 that divide [`K_SLICE`].
fn int_weights(w: &Rows<'_>) -> Option<IntWeights> {
    let iw = IntWeights::of(w)?;
    let codebook = matches!(w.scales, ScaleSrc::F32(_));
    let fits = w.high_first && w.block >= ACT_BLOCK && K_SLICE.is_multiple_of(w.block);
    (!codebook || fits).then_some(iw)
}

/// [`usable`]'s host half: on (not turned off by [`set_enabled`] or `Q4_W4A8_TILES=0`) and
/// AVX-512 BW + VNNI present. AMX hosts take it too: on a 16-core Xeon with AMX (the GPU
/// machine's host) it ran W4A8 at 0.67-0.95x the time of the AMX tile GEMM on the int8 round trip
/// at batches 16 and 64 with 2 threads, 0.58-0.80x with 16, and at 0.45-0.67x of the AVX2 int8
/// GEMV at batches 5-8 with 2 threads (16 threads: 0.46-0.80x, 1536x576 1.13x).
pub fn host_usable() -> bool {
    SWITCH.on() && super::avx512::vnni_usable()
}

/// Where block `b` (of `nab` per row) of activation row `m` lies in [`Acts`]' layout
/// interleaved by pass, counted in blocks: a pass's 8 rows of one block side by side.
fn interleaved(m: usize, b: usize, nab: usize) -> usize {
    (m / PASS_ROWS * nab + b) * PASS_ROWS + m % PASS_ROWS
}

/// The activations as the kernel reads them.
struct Acts {
    /// The codes, each 8 values reordered as `0 2 4 6 1 3 5 7`, interleaved by pass: the 32
    /// values of activation block `b` of row `m` at [`interleaved`]`(m, b, k / 32) * 32`, so
    /// that one pointer, stepped 256 bytes a block, reaches a pass's 8 rows at fixed
    /// displacements.
    q: AlignedVec<i8>,
    /// `batch x k / cblock`: `-128` times the sum of the activation codes of each block of
    /// `cblock` (the weight block, or for blocks wider than 32 the activation block).
    corr: Vec<i32>,
    /// The quantizer's activation scales, interleaved by pass as the codes: block `b` of row
    /// `m` at [`interleaved`]`(m, b, k / 32)`.
    d: Vec<f32>,
    k: usize,
    cblock: usize,
}

impl Acts {
    fn new(a: &Int8Acts, batch: usize, block: usize) -> Acts {
        let cblock = block.min(ACT_BLOCK);
        let k = a.k;
        let nab = k / ACT_BLOCK;
        let mut q = AlignedVec::<i8>::zeroed(batch.next_multiple_of(PASS_ROWS) * k);
        let qs = q.as_mut_slice();
        for (m, row) in a.q.as_slice()[..batch * k].chunks_exact(k).enumerate() {
            for (b, src) in row.chunks_exact(ACT_BLOCK).enumerate() {
                let at = interleaved(m, b, nab) * ACT_BLOCK;
                for (dst, src) in qs[at..at + ACT_BLOCK]
                    .chunks_exact_mut(8)
                    .zip(src.chunks_exact(8))
                {
                    for i in 0..4 {
                        dst[i] = src[2 * i];
                        dst[4 + i] = src[2 * i + 1];
                    }
                }
            }
        }
        let mut d = vec![0f32; batch.next_multiple_of(PASS_ROWS) * nab];
        for (i, &v) in a.d[..batch * nab].iter().enumerate() {
            d[interleaved(i / nab, i % nab, nab)] = v;
        }
        let corr = a.q.as_slice()[..batch * k]
            .chunks_exact(cblock)
            .map(|b| -W_OFFSET * b.iter().map(|&v| i32::from(v)).sum::<i32>())
            .collect();
        Acts {
            q,
            corr,
            d,
            k,
            cblock,
        }
    }
}

thread_local! {
    /// One group's decoded K slice (`16 * K_SLICE` bytes), its block scales (`16` per block)
    /// and the group's partial sums (`16` per activation row), kept across calls: repeated
    /// forwards allocate nothing weight-sized.
    static GROUP: RefCell<(AlignedBuf<u8>, AlignedBuf<f32>, AlignedBuf<f32>)> =
        const { RefCell::new((AlignedBuf::new(), AlignedBuf::new(), AlignedBuf::new())) };
}

/// `y[m, n] = sum_k q(x)[m, k] W[n, k]` (`batch x n`, row-major) for the quantized activations
/// `x` of `batch` rows.
///
/// # Panics
/// If `w` is not [`usable`] (the caller checks).
pub fn matmul(w: &Rows<'_>, x: &Int8Acts, batch: usize, y: &mut [f32]) {
    assert!(
        usable(w),
        "the VNNI W4A8 kernel does not take this weight here"
    );
    assert!(x.k == w.k && x.q.len() >= batch * w.k && y.len() == batch * w.n);
    let scale_decode = match w.scales {
        ScaleSrc::Table { table, .. } if ARITH_SCALES.load(Ordering::Relaxed) => {
            // SAFETY: `usable` checked AVX-512F/BW.
            unsafe { ScaleDecode::detect(table) }
        }
        _ => ScaleDecode::Table,
    };
    matmul_decoding(w, x, batch, y, scale_decode);
}

/// [`matmul`] with the scale decode given (the caller's contract: [`usable`], the shapes).
fn matmul_decoding(
    w: &Rows<'_>,
    x: &Int8Acts,
    batch: usize,
    y: &mut [f32],
    scale_decode: ScaleDecode,
) {
    let iw = int_weights(w).expect("usable() checked the weight");
    let (n, k) = (w.n, w.k);
    let acts = Acts::new(x, batch, w.block);
    let groups = n.div_ceil(ROWS);
    // The pointer crosses threads as an address; each group writes only its own 16 columns.
    let y_addr = y.as_mut_ptr() as usize;
    for_each_index(groups, n * k * batch / 8, |g| {
        GROUP.with_borrow_mut(|(wt, st, acc)| {
            let kmax = K_SLICE.min(k);
            let wt = wt.slice(ROWS * kmax);
            let st = st.slice(ROWS * (kmax / w.block));
            let acc = acc.slice(ROWS * batch.next_multiple_of(PASS_ROWS));
            let r0 = g * ROWS;
            let rows = ROWS.min(n - r0);
            let pf = super::prefetch::enabled();
            let mut k0 = 0;
            while k0 < k {
                let kw = K_SLICE.min(k - k0);
                let last = k0 + kw == k;
                // The first pass over a slice asks for the codes and scales the decoder reads
                // next: the same rows' next slice, or after the last one the next group's first
                // (the rows that follow: a thread's groups are consecutive).
                let next = if !pf {
                    None
                } else if !last {
                    Some(NextSlice::of(w, r0, k0 + kw, K_SLICE.min(k - k0 - kw)))
                } else if r0 + ROWS < n {
                    Some(NextSlice::of(w, r0 + ROWS, 0, kmax))
                } else {
                    None
                };
                // SAFETY: `usable` checked AVX-512 BW + VNNI and a weight `int_weights`
                // takes (`iw`): E2M1 codes with byte scales, or a bitsandbytes int8 codebook with
                // f32 absmax in rows of whole blocks dividing K_SLICE; rows whose length is a
                // multiple of 64; rows r0 .. r0 + rows exist and k0 + kw <= k, both multiples of
                // the block; `wt`, `st` and `acc` have the
                // sizes the decoder and the passes use. The passes read those buffers and
                // `acts` (batch rows of k values) and on the last slice write elements
                // (m, r0 .. r0 + rows) of `y` (batch x n) only, disjoint from other groups'.
                unsafe {
                    decode_group(w, &iw, r0, rows, k0, kw, wt, st, scale_decode);
                    let out = last.then_some(Output {
                        y: y_addr as *mut f32,
                        n,
                        r0,
                        rows,
                        gain: iw.gain,
                    });
                    let mut m0 = 0;
                    while m0 < batch {
                        let mb = (batch - m0).min(PASS_ROWS);
                        let slice = Slice {
                            k0,
                            kw,
                            first: k0 == 0,
                        };
                        let io = PassIo {
                            wt,
                            st,
                            x: &acts,
                            m0,
                            slice,
                            accp: acc.as_mut_ptr().add(m0 * ROWS),
                            out,
                            next: if m0 == 0 { next } else { None },
                        };
                        run_pass(mb, w.block, io);
                        m0 += mb;
                    }
                }
                k0 += kw;
            }
        })
    });
}

/// What a pass reads and writes besides its rows: the group's decoded slice (`wt` codes, `st`
/// scales), the activations, the pass's first activation row `m0`, the slice, the group's
/// partial sums (`accp`, 16 per activation row), the output on the last slice, and the slice
/// to prefetch.
#[derive(Clone, Copy)]
struct PassIo<'a> {
    wt: &'a [u8],
    st: &'a [f32],
    x: &'a Acts,
    m0: usize,
    slice: Slice,
    accp: *mut f32,
    out: Option<Output>,
    next: Option<NextSlice>,
}

impl PassIo<'_> {
    /// Where the pass starts: its 8 rows of activation block `k0 / 32`, codes and scales (see
    /// `Acts`), the rows' corrections from the slice's start, and its sums.
    ///
    /// # Safety
    /// AVX-512F present; `x` holds at least `m0 + MB` rows; `accp` as [`start_sums`] needs.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::type_complexity)]
    unsafe fn start<const MB: usize>(
        &self,
    ) -> (*const u8, *const f32, [*const i32; MB], [__m512; MB]) {
        let (x, k0) = (self.x, self.slice.k0);
        let first_block = interleaved(self.m0, k0 / ACT_BLOCK, x.k / ACT_BLOCK);
        let xb = (x.q.as_slice().as_ptr() as *const u8).add(first_block * ACT_BLOCK);
        let db = x.d.as_ptr().add(first_block);
        let crow = std::array::from_fn(|m| {
            x.corr
                .as_ptr()
                .add((self.m0 + m) * (x.k / x.cblock) + k0 / x.cblock)
        });
        (xb, db, crow, start_sums(self.slice.first, self.accp))
    }
}

/// The part of K a pass covers; `first` starts its sums from zero instead of the buffer.
#[derive(Clone, Copy)]
struct Slice {
    k0: usize,
    kw: usize,
    first: bool,
}

/// Where a pass over the last slice stores its rows: `y[m * n + r0 + l]`, lanes `l < rows`,
/// the sums times `gain` (integer weights back to values).
#[derive(Clone, Copy)]
struct Output {
    y: *mut f32,
    n: usize,
    r0: usize,
    rows: usize,
    gain: f32,
}

/// The 16 rows' codes and scales for a slice the decoder reads next, for a pass to prefetch
/// into L1 (any addresses: a prefetch never faults): four code lines per 32 weights of the
/// pass's slice, rows one after another, and each row's scale line early on.
///
/// Into L1, not L2 only (`prefetcht0`, not `t1`): the decoded slice, the pass's activations and
/// these 8.5 KiB fit the 48 KiB L1 together. Same-process A/B on the Zen 5 host, two threads
/// (thirty-fourth session): 0.90x the time on 14336x4096 at batch 16, 0.94-0.97x on 11008x4096
/// at batches 8-32 and 14336x4096 at 64, 0.99-1.0x on 4096x4096 and the 576-wide shapes.
#[derive(Clone, Copy)]
struct NextSlice {
    codes: *const u8,
    row_bytes: usize,
    scales: *const u8,
    /// Bytes of scales per row.
    scale_row_bytes: usize,
    /// Code lines per row of the slice.
    lines: usize,
}

impl NextSlice {
    fn of(w: &Rows<'_>, r0: usize, k0: usize, kw: usize) -> NextSlice {
        let (scales, size) = match w.scales {
            ScaleSrc::Table { bytes, .. } => (bytes.as_ptr(), 1),
            ScaleSrc::F32(v) => (v.as_ptr() as *const u8, 4),
        };
        NextSlice {
            codes: w.codes.as_ptr().wrapping_add(r0 * w.row_bytes + k0 / 2),
            row_bytes: w.row_bytes,
            scales: scales.wrapping_add((r0 * w.row_blocks + k0 / w.block) * size),
            scale_row_bytes: w.row_blocks * size,
            lines: (kw / 128).max(1),
        }
    }

    /// A pass's prefetches at activation block `ab`: four code lines (rows one after another;
    /// `pr` / `pl` the row and line reached) and, over the first 16 blocks, one row's scales.
    #[inline(always)]
    fn prefetch(&self, ab: usize, pr: &mut usize, pl: &mut usize) {
        for _ in 0..4 {
            if *pr < ROWS {
                let line = self.codes.wrapping_add(*pr * self.row_bytes + 64 * *pl);
                // SAFETY: SSE is part of x86-64, and a prefetch never faults, whatever the
                // address.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(line as *const i8) };
                *pl += 1;
                if *pl == self.lines {
                    (*pr, *pl) = (*pr + 1, 0);
                }
            }
        }
        if ab < ROWS {
            let line = self.scales.wrapping_add(ab * self.scale_row_bytes);
            // SAFETY: as above.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line as *const i8) };
        }
    }
}

/// Decodes weights `k0 .. k0 + kw` of rows `r0 .. r0 + rows` (1 to 16; lanes past them repeat
/// the last row) into `wt` (`kw / 4` vectors of 64 bytes, see the module doc) and their block
/// scales into `st` (per block, 16 lanes).
///
/// # Safety
/// AVX-512F/BW present; `iw` is [`int_weights`] of `w`; rows `r0 .. r0 + rows` exist; `k0`
/// and `kw` are multiples of 64 and of the block with `k0 + kw <= k`; `wt` holds `16 * kw`
/// bytes, 64-byte aligned, and `st` `16 * kw / block` values, 64-byte aligned; `scales` is
/// [`ScaleDecode::detect`] of the weight's table, or [`ScaleDecode::Table`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn decode_group(
    w: &Rows<'_>,
    iw: &IntWeights,
    r0: usize,
    rows: usize,
    k0: usize,
    kw: usize,
    wt: &mut [u8],
    st: &mut [f32],
    scales: ScaleDecode,
) {
    debug_assert!((1..=ROWS).contains(&rows) && r0 + rows <= w.n);
    debug_assert!(k0.is_multiple_of(STEP) && kw.is_multiple_of(STEP) && k0 + kw <= w.k);
    debug_assert!(wt.len() >= ROWS * kw && st.len() >= ROWS * (kw / w.block));
    debug_assert!(wt.as_ptr().align_offset(64) == 0 && st.as_ptr().align_offset(64) == 0);
    // `i + 128` for each code's integer weight `i`.
    let lut = offset_table(iw);
    let nibble = _mm512_set1_epi8(0x0f);
    // Lanes past the last row repeat it: the kernel's stores leave them out.
    let row = |l: usize| r0 + l.min(rows - 1);
    let row_ptr: [*const u8; ROWS] =
        std::array::from_fn(|l| w.codes.as_ptr().add(row(l) * w.row_bytes + k0 / 2));
    let load = |l: usize, c: usize| -> __m256i {
        _mm256_loadu_si256(row_ptr[l].add(c * STEP / 2) as *const __m256i)
    };
    let out = wt.as_mut_ptr() as *mut __m512i;
    for c in 0..kw / STEP {
        let dwords = transpose_rows(|l| load(l, c));
        for (q, &d) in dwords.iter().enumerate() {
            let low = _mm512_shuffle_epi8(lut, _mm512_and_si512(d, nibble));
            let high =
                _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16::<4>(d), nibble));
            let (even, odd) = if w.high_first {
                (high, low)
            } else {
                (low, high)
            };
            _mm512_store_si512(out.add(c * 16 + 2 * q), even);
            _mm512_store_si512(out.add(c * 16 + 2 * q + 1), odd);
        }
    }
    // Scales: the bytes of four blocks of every lane's row in one 32-bit word, then each byte
    // through `scales` (arithmetic, or a gather from the table). Runs of 32 blocks come from
    // one 32-byte load per row and the transposition the codes take: the gather of those words
    // from 16 rows had taken about a third of this decode (perf, NVFP4 4096x4096 batch 16 on the
    // Zen 5 host). A shorter tail gathers, and as a word may reach up to 3 bytes past the
    // group's last row, the last group of a tensor whose rows end short of that takes the
    // scalar loop.
    let (nb, rb) = (kw / w.block, w.row_blocks);
    let (bytes, table) = match w.scales {
        ScaleSrc::Table { bytes, table } => (bytes, table),
        ScaleSrc::F32(absmax) => {
            // bitsandbytes: one f32 per block, gathered for the 16 rows.
            let offsets = row_offsets(rows, rb);
            let base = absmax.as_ptr().add(r0 * rb + k0 / w.block);
            for j in 0..nb {
                let v = _mm512_i32gather_ps::<4>(offsets, base.add(j));
                _mm512_store_ps(st.as_mut_ptr().add(j * ROWS), v);
            }
            return;
        }
    };
    let base = bytes.as_ptr().add(r0 * rb + k0 / w.block);
    // The 16 f32 scales of blocks `j4 .. j4 + 4` (at most `nb`) from their bytes, four per lane.
    let stp = st.as_mut_ptr();
    let store_four = |j4: usize, words: __m512i| {
        for i in 0..(nb - j4).min(4) {
            let v = scales.decode_byte(words, i, table);
            _mm512_store_ps(stp.add((j4 + i) * ROWS), v);
        }
    };
    let runs = nb / 32 * 32;
    for j32 in (0..runs).step_by(32) {
        let words = transpose_rows(|l| {
            _mm256_loadu_si256(base.add(l.min(rows - 1) * rb + j32) as *const __m256i)
        });
        for (q, &wq) in words.iter().enumerate() {
            store_four(j32 + 4 * q, wq);
        }
    }
    if runs == nb {
        return;
    }
    let pad = (4 - nb % 4) % 4;
    if (r0 + rows - 1) * rb + k0 / w.block + nb + pad <= bytes.len() {
        let offsets = row_offsets(rows, rb);
        for j4 in (runs..nb).step_by(4) {
            store_four(
                j4,
                _mm512_i32gather_epi32::<1>(offsets, base.add(j4) as *const i32),
            );
        }
    } else {
        for j in runs..nb {
            for l in 0..ROWS {
                let b = *base.add(l.min(rows - 1) * rb + j);
                *st.get_unchecked_mut(j * ROWS + l) = *table.get_unchecked(b as usize);
            }
        }
    }
}

/// The offsets of 16 rows of `stride` elements in 32-bit lanes, lanes past `rows` repeating the
/// last row.
///
/// # Safety
/// AVX-512F present.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn row_offsets(rows: usize, stride: usize) -> __m512i {
    _mm512_loadu_si512(
        std::array::from_fn::<i32, ROWS, _>(|l| (l.min(rows - 1) * stride) as i32).as_ptr()
            as *const __m512i,
    )
}

/// The 16 × 8 transposition of 32-bit words: `load(l)` gives 32 bytes of row `l` (0-15), and
/// vector `q` of the result holds their word `q` (bytes `4q .. 4q + 4`) in lane `l`.
///
/// # Safety
/// AVX-512F present.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn transpose_rows(load: impl Fn(usize) -> __m256i) -> [__m512i; 8] {
    // z[p] = [row p | row p + 4] for p < 4, [row p + 4 | row p + 8] above: after the two
    // in-lane unpack stages and one 128-bit lane shuffle, lane l holds row l.
    let z: [__m512i; 8] = std::array::from_fn(|p| {
        let (a, b) = if p < 4 { (p, p + 4) } else { (p + 4, p + 8) };
        _mm512_inserti64x4(_mm512_castsi256_si512(load(a)), load(b), 1)
    });
    let lo32: [__m512i; 4] = std::array::from_fn(|i| _mm512_unpacklo_epi32(z[2 * i], z[2 * i + 1]));
    let hi32: [__m512i; 4] = std::array::from_fn(|i| _mm512_unpackhi_epi32(z[2 * i], z[2 * i + 1]));
    // v[h][i]: word i (lanes 0, 2) and 4 + i (lanes 1, 3) of rows 0-7 (h = 0) or 8-15.
    let v: [[__m512i; 4]; 2] = std::array::from_fn(|h| {
        let (a, b) = (2 * h, 2 * h + 1);
        [
            _mm512_unpacklo_epi64(lo32[a], lo32[b]),
            _mm512_unpackhi_epi64(lo32[a], lo32[b]),
            _mm512_unpacklo_epi64(hi32[a], hi32[b]),
            _mm512_unpackhi_epi64(hi32[a], hi32[b]),
        ]
    });
    let mut out = [_mm512_setzero_si512(); 8];
    for i in 0..4 {
        out[i] = _mm512_shuffle_i32x4::<0b10_00_10_00>(v[0][i], v[1][i]);
        out[4 + i] = _mm512_shuffle_i32x4::<0b11_01_11_01>(v[0][i], v[1][i]);
    }
    out
}

/// How [`decode_group`] turns scale bytes into f32 values: a gather from the weight's table,
/// or, where that table is NVFP4's `fl(e4m3(b) * s2)` or MXFP4's `2^(b - 127)` for every byte
/// (checked bit for bit, NaN for NaN, by [`ScaleDecode::detect`]), arithmetic
/// ([`e4m3_bits_times`], [`e4m3_times`], [`e8m0_value`]): the gathers had taken about 12% of an
/// NVFP4 batch-16 call (four of them per 64 weights of 16 rows).
#[derive(Clone, Copy, Debug, PartialEq)]
enum ScaleDecode {
    Table,
    /// [`e4m3_bits_times`] with `c = s2 * 2^120`.
    E4m3Bits {
        c: f32,
    },
    E4m3 {
        s2: f32,
    },
    E8m0,
}

impl ScaleDecode {
    /// With `s2 = table[0x38]` (E4M3 0x38 is 1.0): [`ScaleDecode::E4m3Bits`] if
    /// [`e4m3_bits_times`] gives every entry of `table` (not where denormals read as zero, nor
    /// where `s2 * 2^120` overflows), else [`ScaleDecode::E4m3`] if [`e4m3_times`] does, else
    /// [`ScaleDecode::E8m0`] if [`e8m0_value`] does, else [`ScaleDecode::Table`]. Run once per
    /// call: 0.22-0.27 µs on the 2-vCPU Xeon for the first two checks (a throwaway timing
    /// loop), a few percent of the smallest calls this kernel takes.
    ///
    /// # Safety
    /// AVX-512F present.
    #[target_feature(enable = "avx512f")]
    unsafe fn detect(table: &[f32; 256]) -> ScaleDecode {
        let s2 = table[0x38];
        let bits = ScaleDecode::E4m3Bits {
            c: s2 * E4M3_BITS_SCALE,
        };
        let e4m3 = ScaleDecode::E4m3 { s2 };
        if bits.reproduces(table) {
            bits
        } else if e4m3.reproduces(table) {
            e4m3
        } else if ScaleDecode::E8m0.reproduces(table) {
            ScaleDecode::E8m0
        } else {
            ScaleDecode::Table
        }
    }

    /// Whether this decode gives every entry of `table` bit for bit (NaN for NaN).
    ///
    /// # Safety
    /// AVX-512F present.
    #[target_feature(enable = "avx512f")]
    unsafe fn reproduces(self, table: &[f32; 256]) -> bool {
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let mut got = [0f32; 256];
        for (i, out) in got.chunks_exact_mut(16).enumerate() {
            let idx = _mm512_add_epi32(lanes, _mm512_set1_epi32(16 * i as i32));
            _mm512_storeu_ps(out.as_mut_ptr(), self.decode(idx, table));
        }
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        got.iter().zip(table).all(|(&a, &b)| same(a, b))
    }

    /// The f32 scales of the bytes (0-255) in the 32-bit lanes of `idx`.
    ///
    /// # Safety
    /// AVX-512F present.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn decode(self, idx: __m512i, table: &[f32; 256]) -> __m512 {
        match self {
            ScaleDecode::E4m3Bits { c } => {
                e4m3_bits_times(_mm512_slli_epi32::<24>(idx), _mm512_set1_ps(c))
            }
            ScaleDecode::E4m3 { s2 } => e4m3_times(idx, _mm512_set1_ps(s2)),
            ScaleDecode::E8m0 => e8m0_value(idx),
            ScaleDecode::Table => _mm512_i32gather_ps::<4>(idx, table.as_ptr()),
        }
    }

    /// [`ScaleDecode::decode`] of byte `i` (0-3) of each 32-bit lane of `words`.
    ///
    /// # Safety
    /// AVX-512F present.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn decode_byte(self, words: __m512i, i: usize, table: &[f32; 256]) -> __m512 {
        match self {
            // The byte moved to the top of its lane is all the bit decode needs.
            ScaleDecode::E4m3Bits { c } => e4m3_bits_times(
                _mm512_sll_epi32(words, _mm_cvtsi32_si128(24 - 8 * i as i32)),
                _mm512_set1_ps(c),
            ),
            _ => {
                let idx = _mm512_and_si512(
                    _mm512_srl_epi32(words, _mm_cvtsi32_si128(8 * i as i32)),
                    _mm512_set1_epi32(0xff),
                );
                self.decode(idx, table)
            }
        }
    }
}

/// `fl(e4m3(b) * s2)` for the E4M3 byte `b` in bits 24-31 of each 32-bit lane of `top` (the
/// lower bits are ignored), `c = s2 * 2^120`: the byte's sign to bit 31 and its other seven
/// bits to bits 20-26 make an f32 with E4M3's exponent field, `e4m3(b) * 2^-120` exactly (a
/// normal f32 for a normal E4M3 value, a subnormal one for a subnormal), so one product with `c`
/// is the table's one rounding; 0x7f / 0xff are NaN. Four vector operations and the NaN fix-up,
/// where [`e4m3_times`] takes eleven; it needs subnormal operands honoured (MXCSR.DAZ off) and
/// `c` finite, which [`ScaleDecode::detect`] checks against the whole table.
///
/// # Safety
/// AVX-512F present.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn e4m3_bits_times(top: __m512i, c: __m512) -> __m512 {
    let bits = super::avx512_groups::e4m3_scaled_bits(top);
    let value = _mm512_mul_ps(bits, c);
    let mag = _mm512_set1_epi32(0x07F0_0000);
    let nan = _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(bits), mag), mag);
    _mm512_mask_mov_ps(value, nan, _mm512_set1_ps(f32::NAN))
}

/// `fl(e4m3(b) * s2)` for the byte `b` (0-255) in each 32-bit lane of `idx`, without a table:
/// the magnitude bits moved into an f32 exponent biased by 120 (exact for normal E4M3 values;
/// a subnormal one, `m * 2^-9`, comes out as `2^-7 + m * 2^-10`, from which `2^-7` is taken and
/// the rest doubled, both exact), the sign bit, then one rounding in the product with `s2`, as
/// the table's; 0x7f / 0xff are NaN.
///
/// # Safety
/// AVX-512F present.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn e4m3_times(idx: __m512i, s2: __m512) -> __m512 {
    let mag = _mm512_and_si512(idx, _mm512_set1_epi32(0x7f));
    let normal = _mm512_castsi512_ps(_mm512_add_epi32(
        _mm512_slli_epi32::<20>(mag),
        _mm512_set1_epi32(120 << 23),
    ));
    let subnormal = _mm512_testn_epi32_mask(idx, _mm512_set1_epi32(0x78));
    let unsigned = _mm512_mask_mul_ps(
        normal,
        subnormal,
        _mm512_sub_ps(normal, _mm512_set1_ps(1.0 / 128.0)),
        _mm512_set1_ps(2.0),
    );
    let sign = _mm512_and_si512(_mm512_slli_epi32::<24>(idx), _mm512_set1_epi32(i32::MIN));
    let value = _mm512_mul_ps(
        _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(unsigned), sign)),
        s2,
    );
    let nan = _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7f));
    _mm512_mask_mov_ps(value, nan, _mm512_set1_ps(f32::NAN))
}

/// `2^(e - 127)` for the E8M0 byte `e` (0-255) in each 32-bit lane of `idx`, without a table:
/// `e` moved into the f32 exponent, raised to at least `2^-127` (the subnormal 0x00400000, for
/// `e = 0`), and 0xff's infinity turned into NaN by setting the top mantissa bit (`e + 1`'s bit
/// 8, moved to bit 22).
///
/// # Safety
/// AVX-512F present.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn e8m0_value(idx: __m512i) -> __m512 {
    let exp = _mm512_max_epu32(_mm512_slli_epi32::<23>(idx), _mm512_set1_epi32(0x0040_0000));
    let quiet = _mm512_slli_epi32::<14>(_mm512_and_si512(
        _mm512_add_epi32(idx, _mm512_set1_epi32(1)),
        _mm512_set1_epi32(0x100),
    ));
    _mm512_castsi512_ps(_mm512_or_si512(exp, quiet))
}

/// Dispatches [`pass`] (blocks of 16 and 32) or [`pass_wide`] (wider) on the number of
/// activation rows (1-8) and the block size.
///
/// # Safety
/// As [`pass`] / [`pass_wide`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn run_pass(mb: usize, block: usize, io: PassIo<'_>) {
    macro_rules! go {
        ($($m:literal)*) => {
            match (mb, block) {
                $(($m, 16) => pass::<$m, 2>(io),)*
                $(($m, 32) => pass::<$m, 1>(io),)*
                $(($m, _) => pass_wide::<$m>(block / ACT_BLOCK, io),)*
                _ => unreachable!("passes take 1-8 activation rows"),
            }
        };
    }
    go!(1 2 3 4 5 6 7 8)
}

/// The pass's sums at the start of a slice: zero on the first, else `acc` (16 per row).
///
/// # Safety
/// AVX-512F present; `accp` valid for `16 * MB` values, 64-byte aligned, unless `first`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn start_sums<const MB: usize>(first: bool, accp: *const f32) -> [__m512; MB] {
    std::array::from_fn(|m| {
        if first {
            _mm512_setzero_ps()
        } else {
            _mm512_load_ps(accp.add(m * ROWS))
        }
    })
}

/// The pass's sums at the end of a slice: back to `acc`, or on the last slice (`out`) times
/// the gain into the output.
///
/// # Safety
/// AVX-512F present; `accp` valid for `16 * MB` values, 64-byte aligned; `out.y` valid for
/// `(m0 + MB) * n` values, `r0 + rows <= n`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn finish_sums<const MB: usize>(
    acc: &[__m512; MB],
    m0: usize,
    accp: *mut f32,
    out: Option<Output>,
) {
    match out {
        None => {
            for (m, a) in acc.iter().enumerate() {
                _mm512_store_ps(accp.add(m * ROWS), *a);
            }
        }
        Some(Output {
            y,
            n,
            r0,
            rows,
            gain,
        }) => {
            let gain = _mm512_set1_ps(gain);
            let mask: __mmask16 = if rows == ROWS { !0 } else { (1u16 << rows) - 1 };
            for (m, a) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(y.add((m0 + m) * n + r0), mask, _mm512_mul_ps(*a, gain));
            }
        }
    }
}

/// Activation rows `m0 .. m0 + MB` times one decoded K slice of a group. The sums start from
/// zero on the first slice, else from `acc` (16 per row), and go back to `acc`, or on the last
/// slice (`out`) to the output. `BPA` weight blocks per 32-value activation block: each block's
/// integer sums (`vpdpbusd` from the `-128 x` correction) are converted and scaled by the weight
/// scales, the block pair's sum by the activation scale.
///
/// # Safety
/// AVX-512F/BW/VNNI present; `io.wt` / `io.st` hold the slice decoded by [`decode_group`] and
/// `x.cblock == 32 / BPA`; `x` holds at least `m0 + MB` rows of `x.k >= k0 + kw` values; `accp`
/// is valid for `16 * MB` values; `out.y` is valid for `(m0 + MB) * n` values, `r0 + rows <= n`.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn pass<const MB: usize, const BPA: usize>(io: PassIo<'_>) {
    let (x, st, kw) = (io.x, io.st, io.slice.kw);
    debug_assert!(x.cblock * BPA == ACT_BLOCK && x.q.len() >= (io.m0 + MB) * x.k);
    debug_assert!(io.slice.k0 + kw <= x.k && io.m0.is_multiple_of(PASS_ROWS));
    debug_assert!(io.wt.len() >= ROWS * kw && st.len() >= ROWS * (kw / x.cblock));
    // Vectors (four weights of 16 rows) per weight block; a constant, so that the loop over them
    // unrolls and every activation load is a row pointer plus a fixed offset.
    let per_block = 8 / BPA;
    let wv = io.wt.as_ptr() as *const __m512i;
    let (mut xb, mut db, crow, mut acc) = io.start::<MB>();
    let (mut pr, mut pl) = (0usize, 0usize);
    for ab in 0..kw / ACT_BLOCK {
        if let Some(nx) = &io.next {
            nx.prefetch(ab, &mut pr, &mut pl);
        }
        let mut t = [_mm512_setzero_ps(); MB];
        for jb in 0..BPA {
            let j = ab * BPA + jb;
            let mut sums: [__m512i; MB] =
                std::array::from_fn(|m| _mm512_set1_epi32(*crow[m].add(j)));
            for v in 0..per_block {
                let at = j * per_block + v;
                let wq = _mm512_load_si512(wv.add(at));
                for m in 0..MB {
                    let four = (xb.add(m * ACT_BLOCK + 4 * (jb * per_block + v)) as *const i32)
                        .read_unaligned();
                    sums[m] = _mm512_dpbusd_epi32(sums[m], wq, _mm512_set1_epi32(four));
                }
            }
            let s = _mm512_load_ps(st.as_ptr().add(j * ROWS));
            for m in 0..MB {
                let p = _mm512_cvtepi32_ps(sums[m]);
                t[m] = if jb == 0 {
                    _mm512_mul_ps(p, s)
                } else {
                    _mm512_fmadd_ps(p, s, t[m])
                };
            }
        }
        for m in 0..MB {
            acc[m] = _mm512_fmadd_ps(t[m], _mm512_set1_ps(*db.add(m)), acc[m]);
        }
        // An opaque step keeps the broadcasts above on base + displacement addresses: LLVM
        // otherwise indexes them off the loop counter, and a `vpdpbusd` with an indexed memory
        // operand takes two issue slots.
        xb = std::hint::black_box(xb).add(PASS_ROWS * ACT_BLOCK);
        db = std::hint::black_box(db).add(PASS_ROWS);
    }
    finish_sums(&acc, io.m0, io.accp, io.out);
}

/// [`pass`] for weight blocks of `apb` activation blocks (bitsandbytes blocks of 64 and more):
/// each activation block's integer sums are converted and scaled by its activation scale, the
/// weight block's sum of those by the weight scales.
///
/// # Safety
/// As [`pass`], with `x.cblock == 32` and the weight's block `32 * apb`, dividing `kw`.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn pass_wide<const MB: usize>(apb: usize, io: PassIo<'_>) {
    let (x, st, kw) = (io.x, io.st, io.slice.kw);
    debug_assert!(x.cblock == ACT_BLOCK && x.q.len() >= (io.m0 + MB) * x.k);
    debug_assert!(io.slice.k0 + kw <= x.k && io.m0.is_multiple_of(PASS_ROWS));
    debug_assert!(apb >= 1 && kw.is_multiple_of(apb * ACT_BLOCK));
    debug_assert!(io.wt.len() >= ROWS * kw && st.len() >= ROWS * (kw / (apb * ACT_BLOCK)));
    let wv = io.wt.as_ptr() as *const __m512i;
    let (mut xb, mut db, crow, mut acc) = io.start::<MB>();
    let (mut pr, mut pl) = (0usize, 0usize);
    for wb in 0..kw / (apb * ACT_BLOCK) {
        let mut t = [_mm512_setzero_ps(); MB];
        for a in 0..apb {
            let ab = wb * apb + a;
            if let Some(nx) = &io.next {
                nx.prefetch(ab, &mut pr, &mut pl);
            }
            let mut sums: [__m512i; MB] =
                std::array::from_fn(|m| _mm512_set1_epi32(*crow[m].add(ab)));
            for v in 0..8 {
                let wq = _mm512_load_si512(wv.add(ab * 8 + v));
                for m in 0..MB {
                    let four = (xb.add(m * ACT_BLOCK + 4 * v) as *const i32).read_unaligned();
                    sums[m] = _mm512_dpbusd_epi32(sums[m], wq, _mm512_set1_epi32(four));
                }
            }
            for m in 0..MB {
                let p = _mm512_cvtepi32_ps(sums[m]);
                t[m] = _mm512_fmadd_ps(p, _mm512_set1_ps(*db.add(m)), t[m]);
            }
            // Opaque steps, as in `pass`.
            xb = std::hint::black_box(xb).add(PASS_ROWS * ACT_BLOCK);
            db = std::hint::black_box(db).add(PASS_ROWS);
        }
        let s = _mm512_load_ps(st.as_ptr().add(wb * ROWS));
        for m in 0..MB {
            acc[m] = _mm512_fmadd_ps(t[m], s, acc[m]);
        }
    }
    finish_sums(&acc, io.m0, io.accp, io.out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{relative_error, uniform as values};
    use crate::{Format, QTensor, QuantSpec};
    use candle_core::{Device, Tensor};
    use proptest::prelude::*;

    /// Whether this host should run the kernel (so that its tests cannot pass by skipping).
    fn host_has_it() -> bool {
        std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
            && std::env::var_os("Q4_AVX512").is_none_or(|v| v != "0")
            && std::env::var_os("Q4_W4A8_TILES").is_none_or(|v| v != "0")
    }

    /// The kernel against the f32 kernels on the dequantized activations, for one weight shape
    /// and batch; `None` where the kernel is not usable on this host.
    fn error(format: Format, n: usize, k: usize, batch: usize, seed: u64) -> Option<f32> {
        error_in_blocks(QuantSpec::new(format), n, k, batch, seed)
    }

    /// [`error`] for any quantization spec; bitsandbytes weights with their int8 codebook (in
    /// the reference too).
    fn error_in_blocks(
        spec: QuantSpec,
        n: usize,
        k: usize,
        batch: usize,
        seed: u64,
    ) -> Option<f32> {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(values(seed, n * k, 0.05), (n, k), &dev).unwrap();
        let q = QTensor::quantize(&w, &spec).unwrap();
        let view = q.host_view().unwrap().with_int8_codebook();
        let rows = Rows::new(&view);
        if !usable(&rows) {
            assert!(!host_has_it(), "VNNI host, yet the kernel declined");
            return None;
        }
        let x = values(seed ^ 0x9e37_79b9, batch * k, 1.0);
        let xq = Int8Acts::quantize(&x, k);
        let mut got = vec![f32::NAN; batch * n];
        matmul(&rows, &xq, batch, &mut got);
        let mut want = vec![0f32; batch * n];
        super::super::matmul(&view, &xq.dequantize(), batch, &mut want);
        Some(relative_error(&got, &want))
    }

    /// Both E2M1 formats, row counts that leave a partial group, one and several decode steps,
    /// batches that leave partial passes.
    #[test]
    fn vnni_tiles_match_the_dequantized_activations() {
        for format in [Format::Nvfp4, Format::Mxfp4] {
            for (n, k) in [
                (37usize, 128usize),
                (16, 64),
                (5, 576),
                (64, 1024),
                (33, 2304),
            ] {
                for batch in [4, 5, 9, 12, 16, 17, 31, 64] {
                    let Some(e) = error(format, n, k, batch, 7) else {
                        return; // no VNNI (or AMX present) on this host
                    };
                    assert!(e < 1e-6, "{format} {n}x{k} batch {batch}: {e}");
                }
            }
        }
    }

    /// NF4 and bitsandbytes FP4 with their int8 codebooks, every block size the kernel takes
    /// (32: the E2M1 pass; 64-1024: several activation blocks per weight block, a weight block
    /// as wide as a K slice), rows that leave a partial group, K over several slices.
    #[test]
    fn vnni_tiles_take_bitsandbytes_codebooks() {
        for format in [Format::Nf4, Format::Fp4] {
            for (block, n, k, batch) in [
                (64usize, 37usize, 128usize, 5usize),
                (64, 16, 2304, 16),
                (32, 21, 576, 9),
                (128, 40, 1024, 12),
                (256, 17, 3072, 8),
                (1024, 5, 2048, 31),
            ] {
                let spec = QuantSpec::new(format).with_block(block);
                let Some(e) = error_in_blocks(spec, n, k, batch, 5) else {
                    return; // no VNNI on this host
                };
                assert!(
                    e < 1e-6,
                    "{format} block {block} {n}x{k} batch {batch}: {e}"
                );
            }
            // Not taken: blocks that straddle rows, or wider than a K slice.
            for (block, k) in [(64usize, 96usize), (2048, 2048)] {
                let w = Tensor::from_vec(values(1, 4 * k, 0.05), (4, k), &Device::Cpu).unwrap();
                let spec = QuantSpec::new(format).with_block(block);
                let q = QTensor::quantize(&w, &spec).unwrap();
                let view = q.host_view().unwrap().with_int8_codebook();
                assert!(!usable(&Rows::new(&view)), "{format} block {block} k {k}");
            }
            // Nor the exact codebook.
            let w = Tensor::from_vec(values(1, 4 * 128, 0.05), (4, 128), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, &QuantSpec::new(format)).unwrap();
            assert!(!usable(&Rows::new(&q.host_view().unwrap())), "{format}");
        }
    }

    /// The arithmetic scale decodes are NVFP4's tables bit for bit (NaN for NaN) for tensor
    /// scales of every kind and MXFP4's table, and decline tables changed in one entry.
    #[test]
    fn arithmetic_scales_are_the_tables() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        for s2 in [1.0f32, 3.7e-5, 0.1, -2.5, 1e-30, 1e-42, 7e35, 0.0] {
            let table = q4_formats::nvfp4::scale_table(s2);
            // SAFETY: AVX-512F checked above.
            let got = unsafe { ScaleDecode::detect(&table) };
            // A subnormal s2 leaves the product subnormal where E4M3's own exponent is low:
            // still one rounding, so the arithmetic holds there too. The bit decode takes every
            // s2 whose `s2 * 2^120` is finite; the other arithmetic the rest.
            let c = s2 * E4M3_BITS_SCALE;
            let want = if c.is_finite() {
                ScaleDecode::E4m3Bits { c }
            } else {
                ScaleDecode::E4m3 { s2 }
            };
            assert_eq!(got, want, "s2 = {s2}");
        }
        // With denormal operands read as zero the bit decode would lose E4M3's subnormal
        // scales (and a subnormal s2): the other arithmetic is taken, and still exact.
        let table = q4_formats::nvfp4::scale_table(0.75);
        // SAFETY: AVX-512F checked above.
        let (with_daz, daz) =
            crate::test_util::with_denormals_as_zero(|| unsafe { ScaleDecode::detect(&table) });
        assert!(daz);
        assert_eq!(with_daz, ScaleDecode::E4m3 { s2: 0.75 });
        let mx = q4_formats::mxfp4::scale_table();
        // SAFETY: as above.
        assert_eq!(unsafe { ScaleDecode::detect(&mx) }, ScaleDecode::E8m0);
        let mut odd_mx = mx;
        odd_mx[0] = 0.0;
        // SAFETY: as above.
        assert_eq!(unsafe { ScaleDecode::detect(&odd_mx) }, ScaleDecode::Table);
        let mut odd = q4_formats::nvfp4::scale_table(0.25);
        odd[0x41] = 1.5;
        // SAFETY: as above.
        assert_eq!(unsafe { ScaleDecode::detect(&odd) }, ScaleDecode::Table);
    }

    /// Scale bytes of every kind (subnormal, zero, negative, huge, NaN) through the whole kernel,
    /// NVFP4 and MXFP4: the arithmetic decodes give the gathered decode's results bit for bit.
    #[test]
    fn every_scale_byte_through_the_kernel() {
        use crate::qtensor::Quantized;
        let dev = Device::Cpu;
        for (format, k, block) in [
            (Format::Nvfp4, 4096usize, 16usize),
            (Format::Mxfp4, 8192, 32),
        ] {
            let (n, batch) = (16usize, 8usize);
            let w = Tensor::from_vec(values(3, n * k, 0.05), (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, &QuantSpec::new(format)).unwrap();
            // NVFP4: each of the 256 scale bytes once per row, the NaN bytes 0x7f / 0xff only
            // in row 5 (whose outputs are then NaN), the other rows taking the byte below
            // instead. MXFP4: the exponents 0-200 (2^-127, a subnormal, to 2^73; larger ones
            // would overflow every row's sum), 0xff (NaN) in row 5 only.
            let blocks = k / block;
            let fill = |scales: &mut Vec<u8>| {
                for (i, b) in scales.iter_mut().enumerate() {
                    let row5 = i / blocks == 5;
                    *b = match format {
                        Format::Nvfp4 => {
                            let v = (i % 256) as u8;
                            if !row5 && v & 0x7f == 0x7f {
                                v - 1
                            } else {
                                v
                            }
                        }
                        _ if row5 && i % blocks == 7 => 0xff,
                        _ => (i % 201) as u8,
                    };
                }
            };
            let q = match q.to_formats().unwrap() {
                Quantized::Nvfp4(mut t) => {
                    fill(&mut t.scales);
                    QTensor::from_nvfp4(t, (n, k), &dev).unwrap()
                }
                Quantized::Mxfp4(mut t) => {
                    fill(&mut t.scales);
                    QTensor::from_mxfp4(t, (n, k), &dev).unwrap()
                }
                _ => unreachable!("an E2M1 tensor"),
            };
            let view = q.host_view().unwrap();
            let rows = Rows::new(&view);
            if !usable(&rows) {
                assert!(!host_has_it(), "VNNI host, yet the kernel declined");
                return;
            }
            let ScaleSrc::Table { table, .. } = rows.scales else {
                unreachable!("E2M1 formats have byte scales")
            };
            // SAFETY: `usable` checked AVX-512F.
            let decode = unsafe { ScaleDecode::detect(table) };
            assert_ne!(decode, ScaleDecode::Table, "{format}");
            let x = values(11, batch * k, 1.0);
            let xq = Int8Acts::quantize(&x, k);
            let mut got = vec![0f32; batch * n];
            matmul(&rows, &xq, batch, &mut got);
            let mut want = vec![0f32; batch * n];
            matmul_decoding(&rows, &xq, batch, &mut want, ScaleDecode::Table);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                if i % n == 5 {
                    assert!(g.is_nan() && w.is_nan(), "{format} row 5: {g} vs {w}");
                } else {
                    assert!(
                        g.is_finite() && g.to_bits() == w.to_bits(),
                        "{format} {i}: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// A non-finite activation block reaches the outputs of its activation row, as in f32.
    #[test]
    fn non_finite_activations_propagate() {
        let dev = Device::Cpu;
        let (n, k, batch) = (20, 128, 10);
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
        let q = QTensor::quantize(&w, &QuantSpec::new(Format::Nvfp4)).unwrap();
        let view = q.host_view().unwrap();
        let rows = Rows::new(&view);
        if !usable(&rows) {
            assert!(!host_has_it(), "VNNI host, yet the kernel declined");
            return;
        }
        let mut x = vec![0.5f32; batch * k];
        x[3 * k + 70] = f32::INFINITY;
        let mut y = vec![0f32; batch * n];
        matmul(&rows, &Int8Acts::quantize(&x, k), batch, &mut y);
        for (m, row) in y.chunks_exact(n).enumerate() {
            assert_eq!(row.iter().all(|v| v.is_nan()), m == 3, "row {m}");
            assert!(m == 3 || row.iter().all(|v| v.is_finite()));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn agrees_with_the_reference_on_random_shapes(
            n in 1usize..70,
            steps in 1usize..12,
            batch in 4usize..40,
            which in 0usize..4,
            seed in any::<u64>(),
        ) {
            let format = [Format::Nvfp4, Format::Mxfp4, Format::Nf4, Format::Fp4][which];
            if let Some(e) = error(format, n, 64 * steps, batch, seed) {
                prop_assert!(e < 1e-6, "{} {}x{} batch {}: {}", format, n, 64 * steps, batch, e);
            }
        }
    }
}
