//! Batch-1 GEMV on AVX-512 in 128-weight groups: one 64-byte load of codes per group and row.
//!
//! `vpermps` reads only the low four bits of each 32-bit index lane, so a 64-byte load of codes
//! holds the indices of eight vectors at once: the register itself (nibble 0 of each lane), then
//! the register shifted right by 4, 8, ..., 28. A group of 128 weights thus costs one load, seven
//! shifts and eight permutes, where 64-weight chunks ([`super::avx512`]) cost two zero-extensions
//! (port 5), two shifts and four permutes per 64. Lane `i` of every vector holds weights
//! `8i..8i + 8` of the group, so all eight vectors share one scale vector (a block of 16 spans
//! lanes `2m, 2m + 1`): the group's products are summed unscaled and scaled once, with one
//! scale vector built per group instead of two per 64 weights.
//!
//! The activations are permuted once per call to that order ([`group_element`]); a row whose
//! length is an odd number of 64-weight chunks ends with one chunk in [`super::avx512`]'s order.

use std::arch::x86_64::*;
use std::sync::LazyLock;

use super::avx512::{chunk_element, chunk_scales, decode64, pair_products, Pass, CHUNK};
use super::rows::{F32Scales, Rows, Scales, TableScales, BLOCK16, BLOCK32};

/// Bytes of codes the weight stream is prefetched ahead over whole rows: twice the other
/// kernels' [`super::prefetch::PREFETCH_AHEAD`] (rows 4096 wide prefetched two rows ahead got
/// that already). Same-process A/B against 2 KiB, cache-cold, two threads
/// (`scripts/cpu/results/ab-gemv-groups-2026-11-28-s29.txt`): 49152x576 0.90-0.95x the time in
/// four runs, 576x1536 0.93-0.98x, 1536x576 and 960x576 0.95-1.04x (even within the noise).
const PREFETCH_AHEAD: usize = 4096;

/// Weights per group: 64 bytes of codes.
pub const GROUP: usize = 128;

static AVAILABLE: LazyLock<bool> = LazyLock::new(|| {
    std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw")
});

static SWITCH: super::switch::Switch = super::switch::Switch::new("Q4_GEMV_GROUPS");

/// Whether batch-1 GEMVs run on this kernel: AVX-512F and BW present, not turned off by
/// `Q4_GEMV_GROUPS=0` or [`set_enabled`].
pub fn usable() -> bool {
    *AVAILABLE && SWITCH.on()
}

/// Turns the group kernel on or off (default on where available; off, batch 1 runs on the
/// 64-weight chunk kernel), for same-process A/B measurements and tests.
#[doc(hidden)]
pub fn set_enabled(on: bool) {
    SWITCH.set(on);
}

/// Position in the group of the weight that permuted slot `p` (0..128) holds: slot `16s + i` is
/// nibble `s` of 32-bit lane `i` (byte `4i + s / 2`; low nibble first unless `high_first`).
#[inline]
pub fn group_element(p: usize, high_first: bool) -> usize {
    let (s, lane) = (p / 16, p % 16);
    let byte = 4 * lane + s / 2;
    2 * byte + usize::from((s % 2 == 1) != high_first)
}

/// Reorders one activation row of `k` values into the order of the batch-1 group kernel: whole
/// groups by [`group_element`], then a last whole 64-chunk (if any) by [`chunk_element`]; the
/// tail (k % 64) stays in place.
pub fn permute_activations(x: &[f32], k: usize, high_first: bool, out: &mut [f32]) {
    assert!(x.len() == k && out.len() == k);
    let groups = k / GROUP;
    if *AVAILABLE {
        for g in 0..groups {
            // SAFETY: AVX-512F present; group g's 128 values lie inside `x` and `out`.
            unsafe {
                transpose_group(
                    x.as_ptr().add(g * GROUP),
                    out.as_mut_ptr().add(g * GROUP),
                    high_first,
                )
            };
        }
    } else {
        let order: [usize; GROUP] = std::array::from_fn(|p| group_element(p, high_first));
        for (src, dst) in x[..groups * GROUP]
            .chunks_exact(GROUP)
            .zip(out[..groups * GROUP].chunks_exact_mut(GROUP))
        {
            for (d, &o) in dst.iter_mut().zip(&order) {
                *d = src[o];
            }
        }
    }
    let mut done = groups * GROUP;
    if k - done >= CHUNK {
        for p in 0..CHUNK {
            out[done + p] = x[done + chunk_element(p, high_first)];
        }
        done += CHUNK;
    }
    out[done..].copy_from_slice(&x[done..]);
}

/// Index vectors of [`transpose_group`]: `[high_first][stage][output vector]`.
type TransposeIndices = [[[[i32; 16]; 8]; 3]; 2];

/// A group's 128 activations are a 16 x 8 matrix (`x[8i + s]`, `i` the lane, `s` the nibble)
/// that the kernel reads transposed (`out[16s + i]`, with `s ^ 1` for bitsandbytes). In eight
/// vectors, element `e = 8i + s` starts in vector `i >> 1`, lane `8(i & 1) + s`; three stages of
/// two-source permutes each trade one bit of the vector index for one of the lane (stage `t`
/// pairs vectors that differ in bit `t`), the last placing every element in its final lane.
static TRANSPOSE: LazyLock<TransposeIndices> = LazyLock::new(|| {
    let mut idx = [[[[0i32; 16]; 8]; 3]; 2];
    for (hf, stages) in idx.iter_mut().enumerate() {
        // (vector, lane) of element e after each stage.
        let target = |stage: usize, e: usize| -> (usize, usize) {
            let (i, s) = (e / 8, (e % 8) ^ hf);
            let bit = |v: usize, b: usize| (v >> b) & 1;
            match stage {
                // vector (i3 i2 s0), lane (i0 s2 s1 i1)
                0 => (
                    (bit(i, 3) << 2) | (bit(i, 2) << 1) | bit(s, 0),
                    (bit(i, 0) << 3) | (bit(s, 2) << 2) | (bit(s, 1) << 1) | bit(i, 1),
                ),
                // vector (i3 s1 s0), lane (i0 s2 i2 i1)
                1 => (
                    (bit(i, 3) << 2) | (bit(s, 1) << 1) | bit(s, 0),
                    (bit(i, 0) << 3) | (bit(s, 2) << 2) | (bit(i, 2) << 1) | bit(i, 1),
                ),
                _ => (s, i),
            }
        };
        let mut at: Vec<(usize, usize)> = (0..GROUP).map(|e| (e / 16, e % 16)).collect();
        for (t, stage) in stages.iter_mut().enumerate() {
            let next: Vec<(usize, usize)> = (0..GROUP).map(|e| target(t, e)).collect();
            for e in 0..GROUP {
                let ((v0, l0), (v1, l1)) = (at[e], next[e]);
                debug_assert_eq!(v0 & !(1 << t), v1 & !(1 << t), "stage {t} pairs vectors");
                // Source operand A is the pair's vector with bit t clear, B (lanes 16-31) set.
                stage[v1][l1] = (l0 + 16 * ((v0 >> t) & 1)) as i32;
            }
            at = next;
        }
    }
    idx
});

/// Transposes one group of activations into the kernel's order ([`TRANSPOSE`]).
///
/// # Safety
/// AVX-512F present; `src` and `dst` valid for 128 values.
#[target_feature(enable = "avx512f")]
unsafe fn transpose_group(src: *const f32, dst: *mut f32, high_first: bool) {
    let stages = &TRANSPOSE[usize::from(high_first)];
    let mut v: [__m512; 8] = std::array::from_fn(|j| _mm512_loadu_ps(src.add(16 * j)));
    for (t, stage) in stages.iter().enumerate() {
        let prev = v;
        for (o, ix) in stage.iter().enumerate() {
            let a = o & !(1 << t);
            let ix = _mm512_loadu_si512(ix.as_ptr() as *const _);
            v[o] = _mm512_permutex2var_ps(prev[a], ix, prev[a | 1 << t]);
        }
    }
    for (s, vs) in v.iter().enumerate() {
        _mm512_storeu_ps(dst.add(16 * s), *vs);
    }
}

/// A group's scale vector: lane `i` holds the scale of weights `8i..8i + 8`.
pub(super) trait GroupScales: Scales {
    /// # Safety
    /// AVX-512F and BW present; the group (columns `col..col + 128` of the row whose scales
    /// start at `base`) lies inside the row.
    unsafe fn group<const BK: u8>(&self, base: usize, col: usize, shift: u32) -> __m512;

    /// The scales of a row's last, half group (columns `col..col + 64`) in lanes 0-7, lanes
    /// 8-15 repeating some of them: only the half group's own scales are read (the blocks past
    /// it may not exist), and a caller whose upper lanes hold zero sums gets zeros there (the
    /// repeated scales are the row's, so a NaN among them is the row's NaN anyway).
    ///
    /// # Safety
    /// AVX-512F and BW present; columns `col..col + 64` lie inside the row, `col` a multiple of
    /// 64.
    unsafe fn half_group<const BK: u8>(&self, base: usize, col: usize, shift: u32) -> __m512;
}

/// Lanes 0-7 `[s0, s0, s1, s1, .., s3, s3]` and 8-15 again from a vector whose lanes 0-3 hold
/// the scales `s0..s3` of a half group of 16-wide blocks (`BK == BLOCK16`); else `[s0 x4,
/// s1 x4]` twice from lanes 0-1, for 32-wide blocks. The lanes above those are not read.
#[inline(always)]
unsafe fn spread_half<const BK: u8>(v: __m512) -> __m512 {
    let idx = if BK == BLOCK16 {
        _mm512_set_epi32(3, 3, 2, 2, 1, 1, 0, 0, 3, 3, 2, 2, 1, 1, 0, 0)
    } else {
        _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0)
    };
    _mm512_permutexvar_ps(idx, v)
}

/// The scale bytes of a group (eight of 16-wide blocks if `BK == BLOCK16`, else four of 32-wide
/// ones) broadcast to every 128-bit lane, for the byte controls below.
#[inline(always)]
unsafe fn group_bytes<const BK: u8>(p: *const u8) -> __m512i {
    if BK == BLOCK16 {
        _mm512_set1_epi64(std::ptr::read_unaligned(p as *const i64))
    } else {
        _mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32))
    }
}

/// The scale bytes of a half group (four of 16-wide blocks if `BK == BLOCK16`, else two of
/// 32-wide ones) repeated through every 32-bit lane, so that the full group's byte controls,
/// which pick bytes 0-7 of each 128-bit lane, spread them with lanes 8-15 copying lanes 0-7.
#[inline(always)]
unsafe fn half_bytes<const BK: u8>(p: *const u8) -> __m512i {
    if BK == BLOCK16 {
        _mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32))
    } else {
        _mm512_set1_epi16(std::ptr::read_unaligned(p as *const i16))
    }
}

/// `vpshufb` control turning eight scale bytes (broadcast to every 128-bit lane) into the
/// zero-extended indices `[b0, b0, b1, b1, ..., b7, b7]` (16-wide blocks: lanes `2m, 2m + 1`).
#[repr(align(64))]
struct Ctrl([u8; 64]);

impl Ctrl {
    /// `bytes` through this control (`vpshufb`).
    #[inline(always)]
    unsafe fn spread(&self, bytes: __m512i) -> __m512i {
        _mm512_shuffle_epi8(bytes, _mm512_load_si512(self.0.as_ptr() as *const _))
    }
}

static PAIRS_CTRL: Ctrl = Ctrl(byte_ctrl(2, 0));
/// The same for four bytes and 32-wide blocks: `[b0 x4, b1 x4, b2 x4, b3 x4]`.
static QUADS_CTRL: Ctrl = Ctrl(byte_ctrl(4, 0));
/// Eight E4M3 bytes to the top byte of 32-bit lanes `2m, 2m + 1` ([`E4m3Scales`]).
static E4M3_CTRL: Ctrl = Ctrl(byte_ctrl(2, 3));
/// Four E8M0 bytes to bits 16-23 of 32-bit lanes `4m..4m + 4` ([`E8m0Scales`]).
static E8M0_CTRL: Ctrl = Ctrl(byte_ctrl(4, 2));

/// Control bytes putting scale byte `lane / per` into byte `at` of 32-bit lane `lane`, zeros
/// (0x80) in its other bytes.
const fn byte_ctrl(per: usize, at: usize) -> [u8; 64] {
    let mut c = [0x80u8; 64];
    let mut lane = 0;
    while lane < 16 {
        c[4 * lane + at] = (lane / per) as u8;
        lane += 1;
    }
    c
}

/// Blend of the scales of weights `col..col + 64` (lanes 0-7) and `col + 64..` (lanes 8-15):
/// blocks of 64 and more.
#[inline(always)]
unsafe fn halves<S: Scales>(s: &S, base: usize, col: usize, shift: u32) -> __m512 {
    _mm512_mask_blend_ps(
        0xff00,
        _mm512_set1_ps(s.at(base + (col >> shift))),
        _mm512_set1_ps(s.at(base + ((col + CHUNK) >> shift))),
    )
}

impl GroupScales for TableScales<'_> {
    #[inline(always)]
    unsafe fn group<const BK: u8>(&self, base: usize, col: usize, shift: u32) -> __m512 {
        match BK {
            BLOCK16 | BLOCK32 => {
                let p = self.bytes.as_ptr().add(base + (col >> shift));
                self.gather::<BK>(group_bytes::<BK>(p))
            }
            _ => halves(self, base, col, shift),
        }
    }

    #[inline(always)]
    unsafe fn half_group<const BK: u8>(&self, base: usize, col: usize, shift: u32) -> __m512 {
        let i = base + (col >> shift);
        match BK {
            BLOCK16 | BLOCK32 => self.gather::<BK>(half_bytes::<BK>(self.bytes.as_ptr().add(i))),
            _ => _mm512_set1_ps(self.at(i)),
        }
    }
}

impl TableScales<'_> {
    /// The table's values of scale `bytes` ([`group_bytes`] / [`half_bytes`]) spread to their
    /// lanes: 16-wide blocks if `BK == BLOCK16`, else 32-wide ones.
    #[inline(always)]
    unsafe fn gather<const BK: u8>(&self, bytes: __m512i) -> __m512 {
        let ctrl = if BK == BLOCK16 {
            &PAIRS_CTRL
        } else {
            &QUADS_CTRL
        };
        _mm512_i32gather_ps::<4>(ctrl.spread(bytes), self.table.as_ptr())
    }
}

/// NVFP4 scales decoded by arithmetic ([`Rows::e4m3_factor`]): a group's eight E4M3 bytes
/// shuffled to the top byte of their lanes, shifted arithmetically right by four (bits 20-27,
/// the sign copied into bits 27-31), masked to sign, exponent and mantissa, and multiplied by
/// `factor` — one shuffle and three vector operations for eight scales, no table lookups.
#[derive(Clone, Copy)]
pub(super) struct E4m3Scales<'a> {
    /// The same scales through their table, for the last 64-chunk of a row.
    pub table: TableScales<'a>,
    pub factor: f32,
}

impl Scales for E4m3Scales<'_> {
    #[inline(always)]
    unsafe fn at(&self, i: usize) -> f32 {
        self.table.at(i)
    }

    #[inline(always)]
    fn prefetch(&self, i: usize) {
        self.table.prefetch(i)
    }
}

impl GroupScales for E4m3Scales<'_> {
    #[inline(always)]
    unsafe fn group<const BK: u8>(&self, base: usize, col: usize, shift: u32) -> __m512 {
        debug_assert!(BK == BLOCK16);
        let p = self.table.bytes.as_ptr().add(base + (col >> shift));
        self.values(group_bytes::<BLOCK16>(p))
    }

    #[inline(always)]
    unsafe fn half_group<const BK: u8>(&self, base: usize, col: usize, shift: u32) -> __m512 {
        debug_assert!(BK == BLOCK16);
        let p = self.table.bytes.as_ptr().add(base + (col >> shift));
        self.values(half_bytes::<BLOCK16>(p))
    }
}

impl E4m3Scales<'_> {
    /// The scales of E4M3 `bytes` ([`group_bytes`] / [`half_bytes`]) spread to their lanes.
    #[inline(always)]
    unsafe fn values(&self, bytes: __m512i) -> __m512 {
        let top = E4M3_CTRL.spread(bytes);
        _mm512_mul_ps(e4m3_scaled_bits(top), _mm512_set1_ps(self.factor))
    }
}

/// The E4M3 byte `b` in bits 24-31 of each 32-bit lane of `top` (the lower bits ignored) as the
/// f32 `e4m3(b) * 2^-120`, exactly: shifted arithmetically right by four (its sign copied into
/// bits 27-31) and masked to sign, exponent and mantissa, so that E4M3's exponent field lands
/// on the f32's (a subnormal E4M3 value becomes an f32 subnormal). 0x7f / 0xff give a finite
/// value, not NaN.
///
/// # Safety
/// AVX-512F present.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn e4m3_scaled_bits(top: __m512i) -> __m512 {
    _mm512_castsi512_ps(_mm512_and_si512(
        _mm512_srai_epi32::<4>(top),
        _mm512_set1_epi32(0x87F0_0000u32 as i32),
    ))
}

/// MXFP4 scales decoded by arithmetic ([`Rows::e8m0_exact`]): a group's four E8M0 bytes
/// shuffled to bits 16-23 of their lanes and shifted left by seven into the f32 exponent field.
#[derive(Clone, Copy)]
pub(super) struct E8m0Scales<'a>(pub TableScales<'a>);

impl Scales for E8m0Scales<'_> {
    #[inline(always)]
    unsafe fn at(&self, i: usize) -> f32 {
        self.0.at(i)
    }

    #[inline(always)]
    fn prefetch(&self, i: usize) {
        self.0.prefetch(i)
    }
}

impl GroupScales for E8m0Scales<'_> {
    #[inline(always)]
    unsafe fn group<const BK: u8>(&self, base: usize, col: usize, shift: u32) -> __m512 {
        debug_assert!(BK == BLOCK32);
        let p = self.0.bytes.as_ptr().add(base + (col >> shift));
        e8m0_values(group_bytes::<BLOCK32>(p))
    }

    #[inline(always)]
    unsafe fn half_group<const BK: u8>(&self, base: usize, col: usize, shift: u32) -> __m512 {
        debug_assert!(BK == BLOCK32);
        let p = self.0.bytes.as_ptr().add(base + (col >> shift));
        e8m0_values(half_bytes::<BLOCK32>(p))
    }
}

/// The scales `2^(b - 127)` of E8M0 `bytes` ([`group_bytes`] / [`half_bytes`]) spread to their
/// lanes: each byte to bits 16-23 of its lanes, shifted left by seven into the exponent field.
#[inline(always)]
unsafe fn e8m0_values(bytes: __m512i) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32::<7>(E8M0_CTRL.spread(bytes)))
}

/// Whether denormal operands read as zero here (MXCSR.DAZ): then the E4M3 arithmetic would
/// lose subnormal scales, and the table decodes them instead.
pub(crate) fn denormals_are_zero() -> bool {
    // SAFETY: reading MXCSR has no preconditions (SSE, part of x86-64).
    #[allow(deprecated)] // `_mm_getcsr` is deprecated in favour of inline assembly, not removed
    let csr = unsafe { _mm_getcsr() };
    csr & 0x40 != 0
}

/// Evaluates `$body` with the group kernels' scales of the rows `$w` as `$s` and their block
/// class as a const `$bk`: NVFP4's E4M3 bytes by arithmetic ([`E4m3Scales`], where
/// `Rows::e4m3_factor` is set, blocks are 16 and denormal operands are honoured), exact E8M0
/// bytes by arithmetic ([`E8m0Scales`], blocks of 32), else the tables and absmax of
/// [`super::rows::with_scales`]. `$body` is expanded once per case.
macro_rules! with_group_scales {
    ($w:expr, |$bk:ident, $s:ident| $body:expr) => {{
        use $crate::kernels::cpu::avx512_groups::{denormals_are_zero, E4m3Scales, E8m0Scales};
        use $crate::kernels::cpu::rows::{ScaleSrc, TableScales, BLOCK16, BLOCK32};
        let w: &$crate::kernels::cpu::rows::Rows<'_> = $w;
        let e4m3 = w
            .e4m3_factor
            .filter(|_| w.block == 16 && !denormals_are_zero());
        match (e4m3, w.scales) {
            (Some(factor), ScaleSrc::Table { bytes, table }) => {
                const $bk: u8 = BLOCK16;
                let table = TableScales { bytes, table };
                let $s = E4m3Scales { table, factor };
                $body
            }
            (None, ScaleSrc::Table { bytes, table }) if w.e8m0_exact && w.block == 32 => {
                const $bk: u8 = BLOCK32;
                let $s = E8m0Scales(TableScales { bytes, table });
                $body
            }
            _ => $crate::kernels::cpu::rows::with_scales!(w, |$bk, $s| $body),
        }
    }};
}
pub(super) use with_group_scales;

impl GroupScales for F32Scales<'_> {
    #[inline(always)]
    unsafe fn group<const BK: u8>(&self, base: usize, col: usize, shift: u32) -> __m512 {
        let p = self.0.as_ptr().add(base + (col >> shift));
        match BK {
            BLOCK16 => _mm512_permutexvar_ps(
                _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0),
                _mm512_castps256_ps512(_mm256_loadu_ps(p)),
            ),
            BLOCK32 => _mm512_permutexvar_ps(
                _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                _mm512_castps128_ps512(_mm_loadu_ps(p)),
            ),
            _ => halves(self, base, col, shift),
        }
    }

    #[inline(always)]
    unsafe fn half_group<const BK: u8>(&self, base: usize, col: usize, shift: u32) -> __m512 {
        let p = self.0.as_ptr().add(base + (col >> shift));
        let v = match BK {
            BLOCK16 => _mm512_castps128_ps512(_mm_loadu_ps(p)),
            BLOCK32 => _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(p as *const f64))),
            _ => return _mm512_set1_ps(*p),
        };
        spread_half::<BK>(v)
    }
}

/// The lanes of `sum_k W[row0 + r, k] * x[k]` over chunks `pass.c0..pass.c1` (`c0` even) of each
/// of `R` rows, one vector per row. `xp` holds the activations permuted by
/// [`permute_activations`]; `PF`: whether the weight stream is prefetched, `L2`: also into L2
/// ([`Pass::l2`]; both constants, so that the loop tests neither).
///
/// # Safety
/// AVX-512F and BW present; `w.aligned` with `w.block` a multiple of 16 (and of 64, or dividing
/// 64); rows `row0..row0 + R` exist; the chunks lie inside the rows; `xp` holds `w.k` values.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
#[allow(clippy::needless_range_loop)] // register blocking reads clearer with indices
unsafe fn rows_acc<const R: usize, const BK: u8, const PF: bool, const L2: bool, S: GroupScales>(
    w: &Rows<'_>,
    scales: &S,
    lut: __m512,
    xp: &[f32],
    row0: usize,
    pass: Pass,
) -> [__m512; R] {
    debug_assert!(
        w.aligned
            && w.block.is_multiple_of(16)
            && row0 + R <= w.n
            && pass.c0.is_multiple_of(2)
            && pass.c1 * CHUNK <= w.k
            && xp.len() >= w.k
    );
    let xptr = xp.as_ptr();
    let shift = w.block.trailing_zeros();
    // Per-row bases and the prefetch distances, out of the loop: fewer live values, so the
    // loop keeps them in registers instead of reloading them from the stack.
    let row_codes: [*const u8; R] =
        std::array::from_fn(|r| w.codes.as_ptr().add((row0 + r) * w.row_bytes));
    let row_scales: [usize; R] = std::array::from_fn(|r| (row0 + r) * w.row_blocks);
    let (ahead, l2_ahead) = (pass.ahead, pass.l2_ahead());
    let mut acc = [_mm512_setzero_ps(); R];
    for g in pass.c0 / 2..pass.c1 / 2 {
        let col = g * GROUP;
        let x = xptr.add(col);
        for r in 0..R {
            let codes = row_codes[r].add(col / 2);
            if PF {
                if L2 {
                    super::prefetch::prefetch_l2(codes.wrapping_add(l2_ahead));
                }
                super::prefetch::prefetch(codes.wrapping_add(ahead));
                if g.is_multiple_of(4) {
                    scales.prefetch(row_scales[r] + ((col + 2 * ahead) >> shift));
                }
            }
            let c = _mm512_loadu_si512(codes as *const _);
            // Even and odd nibbles in two sums: two chains of four multiply-adds instead of one
            // of eight (warm, one thread, on a Zen 5 host: 0.94-0.96x the time).
            let mut p = _mm512_mul_ps(_mm512_permutexvar_ps(c, lut), _mm512_loadu_ps(x));
            let mut q = _mm512_mul_ps(
                _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(c), lut),
                _mm512_loadu_ps(x.add(16)),
            );
            macro_rules! nibble {
                ($acc:ident, $s:literal) => {
                    $acc = _mm512_fmadd_ps(
                        _mm512_permutexvar_ps(_mm512_srli_epi32::<{ 4 * $s }>(c), lut),
                        _mm512_loadu_ps(x.add(16 * $s)),
                        $acc,
                    );
                };
            }
            nibble!(p, 2);
            nibble!(q, 3);
            nibble!(p, 4);
            nibble!(q, 5);
            nibble!(p, 6);
            nibble!(q, 7);
            let s = scales.group::<BK>(row_scales[r], col, shift);
            acc[r] = _mm512_fmadd_ps(_mm512_add_ps(p, q), s, acc[r]);
        }
    }
    if pass.c1 % 2 == 1 {
        // The row's last chunk, in the 64-chunk order.
        let c = pass.c1 - 1;
        let col = c * CHUNK;
        let x = xptr.add(col);
        for r in 0..R {
            let v = decode64(row_codes[r].add(col / 2), lut);
            let (s01, s23) = chunk_scales::<BK, S>(scales, row_scales[r], c, shift);
            let (p01, p23) = pair_products(v, x);
            acc[r] = _mm512_fmadd_ps(p01, s01, acc[r]);
            acc[r] = _mm512_fmadd_ps(p23, s23, acc[r]);
        }
    }
    acc
}

/// [`rows_acc`] with the prefetch switch (read once by the caller) as its `PF` and the pass's
/// L2 flag as its `L2`. Hoisting the flag and the per-row bases out of the loop: same-process
/// A/B on the Zen 5 host (thirty-fourth session), 1536x576 warm 0.98x the time on one thread
/// and on two, cache-cold 0.98-1.00x.
///
/// # Safety
/// As for [`rows_acc`].
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn rows_acc_pf<const R: usize, const BK: u8, S: GroupScales>(
    prefetch: bool,
    w: &Rows<'_>,
    scales: &S,
    lut: __m512,
    xp: &[f32],
    row0: usize,
    pass: Pass,
) -> [__m512; R] {
    match (prefetch, pass.l2) {
        (true, true) => rows_acc::<R, BK, true, true, S>(w, scales, lut, xp, row0, pass),
        (true, false) => rows_acc::<R, BK, true, false, S>(w, scales, lut, xp, row0, pass),
        _ => rows_acc::<R, BK, false, false, S>(w, scales, lut, xp, row0, pass),
    }
}

/// Sixteen rows from `row0`, two at a time, reduced together and added to `out[0..16]`.
///
/// # Safety
/// As for [`rows_acc`] over rows `row0..row0 + 16`; `out` holds 16 values.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn rows16<const BK: u8, S: GroupScales>(
    w: &Rows<'_>,
    scales: S,
    lut: __m512,
    xp: &[f32],
    row0: usize,
    pass: Pass,
    out: &mut [f32],
) {
    debug_assert!(out.len() >= 16);
    let pass = Pass {
        ahead: pass.ahead.max(2 * w.row_bytes),
        ..pass
    };
    let prefetch = super::prefetch::enabled();
    let sums = super::avx512::sum16_rows_pairs(|p| {
        rows_acc_pf::<2, BK, S>(prefetch, w, &scales, lut, xp, row0 + 2 * p, pass)
    });
    let o = out.as_mut_ptr();
    _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), sums));
}

/// One row from `row0`, added to `out[0]`.
///
/// # Safety
/// As for [`rows_acc`] with `R = 1`; `out` holds a value.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn row1<const BK: u8, S: GroupScales>(
    w: &Rows<'_>,
    scales: S,
    lut: __m512,
    xp: &[f32],
    row0: usize,
    pass: Pass,
    out: &mut [f32],
) {
    let [v] = rows_acc_pf::<1, BK, S>(super::prefetch::enabled(), w, &scales, lut, xp, row0, pass);
    *out.get_unchecked_mut(0) += _mm512_reduce_add_ps(v);
}

/// Computes weight rows `r0..r1` at batch 1 into `out[row - r0]` over their whole chunks, in K
/// slices as [`super::avx512::rows`] walks them.
///
/// # Safety
/// AVX-512F and BW present ([`usable`]), the GEMV's `simd_fits` geometry, rows in range, `xp`
/// holding one row permuted by [`permute_activations`], `out` holding `r1 - r0` values.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn rows(w: &Rows<'_>, xp: &[f32], r0: usize, r1: usize, out: &mut [f32]) {
    let lut = _mm512_loadu_ps(w.lut.as_ptr());
    out[..r1 - r0].fill(0.0);
    let chunks = w.k / CHUNK;
    // Whole groups per slice, as for the chunk kernel at batch 1.
    let slice = (super::avx512::SLICE_BYTES / (4 * CHUNK)).max(2) & !1;
    with_group_scales!(w, |BK, scales| {
        for mut pass in super::avx512::passes(chunks, slice, w.row_bytes) {
            if pass.c1 - pass.c0 == chunks {
                pass.ahead = PREFETCH_AHEAD;
            }
            let mut r = r0;
            while r1 - r >= 16 {
                rows16::<BK, _>(w, scales, lut, xp, r, pass, &mut out[r - r0..]);
                r += 16;
            }
            while r < r1 {
                row1::<BK, _>(w, scales, lut, xp, r, pass, &mut out[r - r0..]);
                r += 1;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::gemv::rows_portable;
    use crate::kernels::cpu::rows::ScaleSrc;
    use crate::kernels::cpu::rows::E4M3_BITS_SCALE;
    use crate::qtensor::QuantSpec;
    use crate::QTensor;
    use candle_core::{Device, Tensor};
    use proptest::prelude::*;
    use q4_formats::nvfp4::Nvfp4Tensor;
    use q4_formats::Format;

    /// Batch-1 rows `r0..n` of `q` on this kernel against the portable decode-and-dot, within
    /// 1e-5 relative (or 1e-6 of the sum of the products' magnitudes); returns the kernel's
    /// values. (Whole chunks only: every `k` here is a multiple of 64.)
    fn check(q: &QTensor, x: &[f32], r0: usize, what: &str) -> Vec<f32> {
        let view = q.host_view().unwrap();
        let w = Rows::new(&view);
        assert!(super::super::gemv::simd_fits(&w), "{what}: geometry");
        let (n, k) = (w.n, w.k);
        let mut xp = vec![0f32; k];
        permute_activations(x, k, w.high_first, &mut xp);
        let mut got = vec![0f32; n - r0];
        // SAFETY: AVX-512F and BW present (callers check `AVAILABLE`); simd_fits holds; rows
        // r0..n exist; xp holds the row permuted for this kernel; got holds n - r0 values.
        unsafe { rows(&w, &xp, r0, n, &mut got) };
        let mut want = vec![0f32; n - r0];
        rows_portable(&w, x, 1, r0, n, &mut want);
        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
            // Summation order differs: allow for cancellation among large terms too.
            let mag: f32 = (0..k).map(|c| (w.weight(r0 + i, c) * x[c]).abs()).sum();
            let tol = (1e-5 * (1.0 + e.abs())).max(1e-6 * mag);
            let same = (g - e).abs() <= tol || (g.is_nan() && e.is_nan());
            assert!(same, "{what} row {}: {g} vs {e}", r0 + i);
        }
        got
    }

    fn randn(shape: (usize, usize), std: f32) -> Tensor {
        Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap()
    }

    fn row(k: usize) -> Vec<f32> {
        randn((1, k), 1.0).flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn kernel_matches_the_portable_gemv() {
        if !*AVAILABLE {
            return;
        }
        let specs = [
            QuantSpec::new(Format::Nvfp4),
            QuantSpec::new(Format::Mxfp4),
            QuantSpec::new(Format::Nf4),
            QuantSpec::new(Format::Nf4).with_block(32),
            QuantSpec::new(Format::Nf4).with_block(128),
            QuantSpec::new(Format::Nf4).with_block(256),
            QuantSpec::new(Format::Fp4),
        ];
        // K = 64: no group, one chunk; 576: four groups and a chunk; 4160: two K passes, the
        // second a lone chunk; 8320: two passes of groups. 33 / 18 rows: sixteen-row blocks and
        // single rows.
        for spec in specs {
            for (n, k) in [
                (7usize, 64usize),
                (33, 576),
                (5, 1024),
                (3, 192),
                (18, 4160),
                (17, 8320),
            ] {
                let q = QTensor::quantize(&randn((n, k), 0.05), &spec).unwrap();
                if !super::super::gemv::simd_fits(&Rows::new(&q.host_view().unwrap())) {
                    // bitsandbytes blocks longer than a row straddle rows: portable path.
                    continue;
                }
                let what = format!("{} block {} {n}x{k}", spec.format, spec.block_size);
                let x = row(k);
                let all = check(&q, &x, 0, &what);
                // Rows from an offset (the parallel GEMV's row ranges).
                let part = check(&q, &x, 1, &what);
                assert_eq!(&all[1..], &part[..], "{what}: rows from 1");
                if spec.format == Format::Nvfp4 {
                    assert!(Rows::new(&q.host_view().unwrap()).e4m3_factor.is_some());
                }
            }
        }
    }

    /// An NVFP4 tensor with the given scale bytes (cycled over the blocks) and tensor scale.
    fn nvfp4_with_scales(n: usize, k: usize, scales: &[u8], scale2: f32) -> QTensor {
        let q = QTensor::quantize(&randn((n, k), 1.0), &QuantSpec::new(Format::Nvfp4)).unwrap();
        let view = q.host_view().unwrap();
        let t = Nvfp4Tensor {
            rows: n,
            cols: k,
            packed: view.codes.to_vec(),
            scales: (0..n * k / 16).map(|i| scales[i % scales.len()]).collect(),
            scale2,
        };
        QTensor::from_nvfp4(t, (n, k), &Device::Cpu).unwrap()
    }

    #[test]
    fn e4m3_arithmetic_matches_the_table_on_every_finite_byte() {
        if !*AVAILABLE {
            return;
        }
        // Every finite E4M3 byte, subnormals and negative scales included, in eight-block
        // groups at different offsets.
        let finite: Vec<u8> = (0..=255u8).filter(|b| b & 0x7f != 0x7f).collect();
        for scale2 in [1.0f32, 3.7e-3, 200.0, 1e-30] {
            let q = nvfp4_with_scales(19, 576, &finite, scale2);
            let w = Rows::new(&q.host_view().unwrap());
            assert_eq!(w.e4m3_factor, Some(E4M3_BITS_SCALE * scale2));
            // One scale vector against the table, lane by lane.
            let ScaleSrc::Table { bytes, table } = w.scales else {
                panic!("NVFP4 has table scales")
            };
            let s = E4m3Scales {
                table: TableScales { bytes, table },
                factor: w.e4m3_factor.unwrap(),
            };
            for base in (0..bytes.len() - 8).step_by(8) {
                // SAFETY: AVX-512F and BW present; eight bytes from `base` exist.
                let v: [f32; 16] = unsafe { std::mem::transmute(s.group::<BLOCK16>(base, 0, 4)) };
                for (lane, got) in v.iter().enumerate() {
                    let want = table[bytes[base + lane / 2] as usize];
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "byte {:#x}",
                        bytes[base + lane / 2]
                    );
                }
            }
            check(
                &q,
                &row(576),
                0,
                &format!("NVFP4 every finite scale, s2 {scale2}"),
            );
        }
    }

    #[test]
    fn e8m0_arithmetic_matches_the_table() {
        if !*AVAILABLE {
            return;
        }
        let x = row(576);
        // Every byte the arithmetic takes (scales up to 2^127: lane checks only), a range whose
        // products stay finite, and the bytes that keep the table.
        for (bytes, exact) in [
            ((1..=254u8).collect::<Vec<u8>>(), true),
            ((100..=150u8).collect::<Vec<u8>>(), true),
            (vec![0x7f, 0x00, 0x80], false),
            (vec![0x7f, 0xff, 0x80], false),
        ] {
            let q =
                QTensor::quantize(&randn((19, 576), 1.0), &QuantSpec::new(Format::Mxfp4)).unwrap();
            let mut t = match q.to_formats().unwrap() {
                crate::qtensor::Quantized::Mxfp4(t) => t,
                _ => unreachable!(),
            };
            let n_scales = t.scales.len();
            t.scales = (0..n_scales).map(|i| bytes[i % bytes.len()]).collect();
            let q = QTensor::from_mxfp4(t, (19, 576), &Device::Cpu).unwrap();
            let w = Rows::new(&q.host_view().unwrap());
            assert_eq!(w.e8m0_exact, exact, "{bytes:?}");
            if exact {
                let ScaleSrc::Table { bytes, table } = w.scales else {
                    panic!("MXFP4 has table scales")
                };
                let s = E8m0Scales(TableScales { bytes, table });
                for base in (0..bytes.len() - 4).step_by(4) {
                    // SAFETY: AVX-512F and BW present; four bytes from `base` exist.
                    let v: [f32; 16] =
                        unsafe { std::mem::transmute(s.group::<BLOCK32>(base, 0, 5)) };
                    for (lane, got) in v.iter().enumerate() {
                        let want = table[bytes[base + lane / 4] as usize];
                        assert_eq!(got.to_bits(), want.to_bits());
                    }
                }
            }
            if bytes.len() < 254 {
                check(&q, &x, 0, &format!("MXFP4 scales {:?}", &bytes[..3]));
            }
        }
    }

    #[test]
    fn nan_scales_and_huge_tensor_scales_take_the_table() {
        if !*AVAILABLE {
            return;
        }
        // A NaN scale byte (0x7f): the table's NaN reaches the rows that use it.
        let q = nvfp4_with_scales(16, 256, &[0x38, 0x40, 0x7f, 0x30], 1.0);
        assert!(Rows::new(&q.host_view().unwrap()).e4m3_factor.is_none());
        let got = check(&q, &row(256), 0, "NVFP4 with a NaN scale");
        assert!(got.iter().all(|v| v.is_nan()));
        // 2^120 * s2 overflows f32: the table decodes.
        let q = nvfp4_with_scales(16, 256, &[0x38, 0x01], 1e20);
        assert!(Rows::new(&q.host_view().unwrap()).e4m3_factor.is_none());
        check(&q, &row(256), 0, "NVFP4 with a huge tensor scale");
    }

    #[test]
    fn a_table_other_than_e4m3_times_s2_is_read_as_it_is() {
        if !*AVAILABLE {
            return;
        }
        // NVFP4 storage whose table disagrees with its tensor scale (one entry changed, then a
        // table for another scale): the kernel must read the table, not assume it.
        use crate::host_bytes::HostBytes;
        use crate::qtensor::{BlockScales, Buffer};
        let q = nvfp4_with_scales(16, 512, &[0x38, 0x40, 0x30, 0x01], 0.5);
        let view = q.host_view().unwrap();
        let mut changed = q4_formats::nvfp4::scale_table(0.5);
        changed[0x40] *= 1.5;
        let other = q4_formats::nvfp4::scale_table(0.25);
        for (table, expect) in [(changed, None), (other, Some(E4M3_BITS_SCALE * 0.25))] {
            let t = QTensor::from_host_parts(
                Format::Nvfp4,
                16,
                (16, 512).into(),
                HostBytes::owned(view.codes.to_vec()),
                BlockScales::Table {
                    bytes: Buffer::Host(HostBytes::owned(nvfp4_scale_bytes(&q))),
                    table: std::sync::Arc::new(table),
                },
                0.5,
                &Device::Cpu,
            )
            .unwrap();
            let w = Rows::new(&t.host_view().unwrap());
            assert_eq!(w.e4m3_factor, expect, "the factor follows the table");
            check(&t, &row(512), 0, "NVFP4 with its own table");
        }
    }

    fn nvfp4_scale_bytes(q: &QTensor) -> Vec<u8> {
        match q.host_view().unwrap().scales {
            crate::qtensor::HostScales::Table { bytes, .. } => bytes.to_vec(),
            crate::qtensor::HostScales::F32(_) => unreachable!("NVFP4 has byte scales"),
        }
    }

    #[test]
    fn subnormal_scales_with_denormals_as_zero_take_the_table() {
        if !*AVAILABLE {
            return;
        }
        let q = nvfp4_with_scales(16, 512, &[0x01, 0x07, 0x81, 0x00, 0x38], 0.5);
        let x = row(512);
        let plain = check(&q, &x, 0, "NVFP4 subnormal scales");
        let (with_daz, daz) =
            crate::test_util::with_denormals_as_zero(|| check(&q, &x, 0, "NVFP4 subnormal, DAZ"));
        assert!(daz);
        assert_eq!(plain, with_daz);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn any_geometry_matches_the_portable_gemv(
            n in 1usize..40,
            chunks in 1usize..80,
            r0 in 0usize..8,
            format in prop::sample::select(
                vec![Format::Nvfp4, Format::Mxfp4, Format::Nf4, Format::Fp4]
            ),
        ) {
            if *AVAILABLE {
                let k = 64 * chunks;
                let q = QTensor::quantize(&randn((n, k), 0.05), &QuantSpec::new(format)).unwrap();
                check(&q, &row(k), r0.min(n - 1), &format!("{format} {n}x{k}"));
            }
        }
    }

    #[test]
    fn group_order_is_a_permutation_matching_the_nibbles() {
        for hf in [false, true] {
            let mut seen = [false; GROUP];
            for p in 0..GROUP {
                let e = group_element(p, hf);
                assert!(!seen[e], "weight {e} twice");
                seen[e] = true;
                // Slot 16s + i reads nibble s of lane i: byte 4i + s/2.
                assert_eq!(e / 2, 4 * (p % 16) + (p / 16) / 2);
            }
        }
    }

    #[test]
    fn scale_controls_pick_each_lanes_block() {
        for lane in 0..16 {
            assert_eq!(PAIRS_CTRL.0[4 * lane] as usize, lane / 2);
            assert_eq!(QUADS_CTRL.0[4 * lane] as usize, lane / 4);
            assert!(PAIRS_CTRL.0[4 * lane + 1..4 * lane + 4]
                .iter()
                .all(|&b| b == 0x80));
        }
    }

    #[test]
    fn register_transpose_matches_the_order() {
        if !*AVAILABLE {
            return;
        }
        for hf in [false, true] {
            let x: Vec<f32> = (0..3 * GROUP).map(|i| i as f32).collect();
            let mut out = vec![0f32; 3 * GROUP];
            permute_activations(&x, 3 * GROUP, hf, &mut out);
            for g in 0..3 {
                for p in 0..GROUP {
                    let want = (g * GROUP + group_element(p, hf)) as f32;
                    assert_eq!(out[g * GROUP + p], want, "high_first {hf}, slot {p}");
                }
            }
        }
    }

    #[test]
    fn permutation_keeps_the_tail_and_orders_the_last_chunk() {
        // 2 groups, one 64-chunk, 3 tail values.
        let k = 2 * GROUP + CHUNK + 3;
        let x: Vec<f32> = (0..k).map(|i| i as f32).collect();
        let mut out = vec![0f32; k];
        permute_activations(&x, k, false, &mut out);
        for p in 0..GROUP {
            assert_eq!(out[GROUP + p], (GROUP + group_element(p, false)) as f32);
        }
        for p in 0..CHUNK {
            assert_eq!(
                out[2 * GROUP + p],
                (2 * GROUP + chunk_element(p, false)) as f32
            );
        }
        assert_eq!(&out[k - 3..], &x[k - 3..]);
    }
}
