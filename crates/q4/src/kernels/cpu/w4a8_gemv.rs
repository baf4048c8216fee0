//! W4A8 (see `w4a8`) at batches 1-4 on AVX-512 VNNI hosts: integer weights (E2M1: NVFP4,
//! MXFP4; the bitsandbytes NF4 / FP4 codebooks rounded to int8) times the int8 activations with
//! `vpdpbusd`, 128 weights per 64-byte code load.
//!
//! The 64 code bytes of a group give two vectors of weight bytes through one `vpshufb` table
//! each (low nibbles, high nibbles; the integer weight plus an offset, unsigned as `vpdpbusd`
//! wants), and two `vpdpbusd` against an activation row held in the same order make, in 32-bit
//! lane `i`, the integer sum of weights `8i .. 8i + 8` times their activations: the lanes of
//! the f32 group kernel (`avx512_groups`), so its scale vectors serve here too. Each lane's sum
//! starts from minus the offset times its activations' sum, is converted once and scaled by
//! its weight and activation scales: about 14 vector operations per 128 weights at batch 1
//! where the f32 kernel takes about 30, so the GEMV is bound by memory rather than by the
//! decode; further activation rows reuse the decoded weight bytes (five operations each).
//!
//! Same-process A/B on the Zen 5 host (thirty-fourth session, cache-cold, two threads,
//! `examples/ab_w4a8_gemv`, `scripts/cpu/results/ab-w4a8-gemv-*-2026-11-29-s34.txt`): batch 1
//! NVFP4 0.49-0.94x the time of the AVX2 int8 GEMV it replaces, NF4 0.84-1.10x the f32 kernels
//! on the activations' round trip; batches 2 and 4 0.44-0.86x (0.44-0.60x on the 4096-wide
//! shapes); batch 1 against weight-only f32 NVFP4 0.87-1.06x where memory bounds both. Warm,
//! 4096x4096 NVFP4 took 86 against the f32 kernel's 150 µs.

use std::arch::x86_64::*;

use super::aligned::AlignedVec;
use super::avx512::l2_distance;
use super::avx512_groups::GroupScales;
use super::prefetch::{prefetch, prefetch_l2, PREFETCH_AHEAD};
use super::rows::{Rows, ScaleSrc};
use super::w4a8::{Int8Acts, ACT_BLOCK, E2M1_X2};

/// Weights per group: one 64-byte load of codes.
const GROUP: usize = 128;
/// Weights of a row's last, half group (rows of an odd number of 64-weight chunks).
const HALF: usize = 64;

/// Added to the integer weights (-127..=127) so that the weight bytes are unsigned, as
/// `vpdpbusd` wants of its first operand; each sum starts from `-128` times its activations'
/// sum instead.
pub(super) const W_OFFSET: i32 = 128;

/// The integer weight of each code and the factor back to its value (`values[c] == ints[c] *
/// gain`, up to f32 rounding for the int8 codebooks): what the VNNI kernels multiply.
#[derive(Clone, Copy)]
pub struct IntWeights {
    pub(super) ints: [i8; 16],
    pub(super) gain: f32,
}

impl IntWeights {
    /// E2M1 weights with byte scales (NVFP4, MXFP4) that the int8 kernels take
    /// (`w4a8::supported`): twice the values, gain 1/2. Bitsandbytes codebooks rounded to int8
    /// (`Rows::int8_codebook`) with f32 absmax on aligned rows of whole 64-weight chunks: gain
    /// `1 / factor`.
    pub fn of(w: &Rows<'_>) -> Option<IntWeights> {
        match (w.scales, w.int8_codebook) {
            (ScaleSrc::Table { .. }, _) if super::w4a8::supported(w) => Some(IntWeights {
                ints: E2M1_X2,
                gain: 0.5,
            }),
            (ScaleSrc::F32(_), Some(c)) if w.aligned && w.k.is_multiple_of(HALF) => {
                Some(IntWeights {
                    ints: c.ints,
                    gain: 1.0 / c.factor,
                })
            }
            _ => None,
        }
    }
}

static SWITCH: super::switch::Switch = super::switch::Switch::new("Q4_W4A8_GEMV");

/// Turns this kernel on or off (default on where it applies; off, its batches take the AVX2
/// int8 GEMV, or the f32 kernels on the activations' round trip), for same-process A/B
/// measurements and tests.
#[doc(hidden)]
pub fn set_enabled(on: bool) {
    SWITCH.set(on);
}

/// Whether W4A8 products of `w` at batches 1-[`MAX_BATCH`] run here: AVX-512 BW + VNNI, not
/// turned off (`Q4_W4A8_GEMV=0`, [`set_enabled`]), and integer weights it takes
/// ([`IntWeights::of`]).
pub fn usable(w: &Rows<'_>) -> bool {
    taken(w).is_some()
}

/// `w`'s integer weights where this kernel runs its W4A8 products ([`usable`]), for the
/// caller to pass to [`rows`].
pub fn taken(w: &Rows<'_>) -> Option<IntWeights> {
    (SWITCH.on() && super::avx512::vnni_usable())
        .then(|| IntWeights::of(w))
        .flatten()
}

/// Most activation rows a call takes; from `w4a8_vnni::MIN_BATCH` the tiles are faster.
pub const MAX_BATCH: usize = 4;

/// The activation rows as the kernel reads them, per row and group of 128 (the last one padded
/// with zeros): the 64 codes of the even weights (`8i + 2j` at `4i + j`) then the 64 of the odd
/// ones (`8i + 2j + 1`); per lane `i`, minus the weights' offset times the sum of codes
/// `8i .. 8i + 8`; and per lane the scale of its activation block.
pub struct Acts {
    codes: AlignedVec<i8>,
    corr: AlignedVec<i32>,
    scales: AlignedVec<f32>,
    groups: usize,
    batch: usize,
}

impl Acts {
    /// The first `batch` rows of `a` (1 to [`MAX_BATCH`]).
    pub fn new(a: &Int8Acts, batch: usize) -> Acts {
        assert!(
            (1..=MAX_BATCH).contains(&batch),
            "batch {batch} is not 1-{MAX_BATCH}"
        );
        let k = a.k;
        let groups = k.div_ceil(GROUP);
        let mut codes = AlignedVec::<i8>::zeroed(batch * groups * GROUP);
        let mut corr = AlignedVec::<i32>::zeroed(batch * groups * 16);
        let mut scales = AlignedVec::<f32>::zeroed(batch * groups * 16);
        let (cs, rs, ss) = (
            codes.as_mut_slice(),
            corr.as_mut_slice(),
            scales.as_mut_slice(),
        );
        for m in 0..batch {
            let q = &a.q.as_slice()[m * k..(m + 1) * k];
            let d = &a.d[m * (k / ACT_BLOCK)..];
            for (g, src) in q.chunks(GROUP).enumerate() {
                let at = m * groups + g;
                let dst = &mut cs[at * GROUP..(at + 1) * GROUP];
                for (i, eight) in src.chunks_exact(8).enumerate() {
                    for j in 0..4 {
                        dst[4 * i + j] = eight[2 * j];
                        dst[HALF + 4 * i + j] = eight[2 * j + 1];
                    }
                    rs[at * 16 + i] = -W_OFFSET * eight.iter().map(|&v| i32::from(v)).sum::<i32>();
                    ss[at * 16 + i] = d[(g * GROUP + 8 * i) / ACT_BLOCK];
                }
            }
        }
        Acts {
            codes,
            corr,
            scales,
            groups,
            batch,
        }
    }
}

/// Each code's integer weight plus [`W_OFFSET`], in every 128-bit lane: the `vpshufb` table
/// of the VNNI kernels' unsigned weight bytes.
///
/// # Safety
/// AVX-512F present.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn offset_table(iw: &IntWeights) -> __m512i {
    let mut t = [0u8; 16];
    for (o, &v) in t.iter_mut().zip(&iw.ints) {
        *o = (i32::from(v) + W_OFFSET) as u8;
    }
    _mm512_broadcast_i32x4(_mm_loadu_si128(t.as_ptr() as *const __m128i))
}

/// The weight bytes of a group's codes `c` (64 code bytes, 128 weights): the low nibbles', the
/// high nibbles'.
///
/// # Safety
/// AVX-512 BW present.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn weight_bytes(c: __m512i, table: __m512i) -> (__m512i, __m512i) {
    let nibble = _mm512_set1_epi8(0x0f);
    let low = _mm512_shuffle_epi8(table, _mm512_and_si512(c, nibble));
    let high = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16::<4>(c), nibble));
    (low, high)
}

/// The integer lane sums of a group's weight bytes times activation row `m`'s codes, from the
/// offset corrections. `low_at`: where in the group's activation codes the low nibbles'
/// weights are (0, the even ones; [`HALF`], the odd ones where the high nibble comes first);
/// `high_at` the other half. A half group's upper lanes meet zero activations and corrections.
///
/// # Safety
/// AVX-512 VNNI present; group `g` of row `m` exists in `x`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn dot(
    (low, high): (__m512i, __m512i),
    x: &Acts,
    m: usize,
    g: usize,
    (low_at, high_at): (usize, usize),
) -> __m512i {
    let at = m * x.groups + g;
    let xc = x.codes.as_ptr().add(at * GROUP);
    let corr = _mm512_load_si512(x.corr.as_ptr().add(at * 16) as *const _);
    let s = _mm512_dpbusd_epi32(corr, low, _mm512_load_si512(xc.add(low_at) as *const _));
    _mm512_dpbusd_epi32(s, high, _mm512_load_si512(xc.add(high_at) as *const _))
}

/// Activation row `m`'s scales of group `g`, per lane.
///
/// # Safety
/// AVX-512F present; group `g` of row `m` exists in `x`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn act_scales(x: &Acts, m: usize, g: usize) -> __m512 {
    _mm512_load_ps(x.scales.as_ptr().add((m * x.groups + g) * 16))
}

/// The lanes of `sum_k W[row0 + r, k] q(x)[m, k]` (activation scales applied, the integer
/// weights' gain not) for `R` rows and `B` activation rows, one vector each: a group's weight
/// bytes are decoded once for all `B` rows.
///
/// # Safety
/// AVX-512 BW + VNNI present ([`usable`]); `s` the scales of `w` with `BK` its block class;
/// rows `row0 .. row0 + R` exist; `x` is [`Acts::new`] of `B` or more rows of `w.k` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
#[allow(clippy::needless_range_loop)] // register blocking reads clearer with indices
unsafe fn rows_acc<const R: usize, const B: usize, const BK: u8, const L2: bool, S: GroupScales>(
    w: &Rows<'_>,
    s: &S,
    table: __m512i,
    x: &Acts,
    row0: usize,
) -> [[__m512; B]; R] {
    let halves = if w.high_first { (HALF, 0) } else { (0, HALF) };
    let shift = w.block.trailing_zeros();
    let row_codes: [*const u8; R] =
        std::array::from_fn(|r| w.codes.as_ptr().add((row0 + r) * w.row_bytes));
    let row_scales: [usize; R] = std::array::from_fn(|r| (row0 + r) * w.row_blocks);
    // As the f32 group kernel: at least two rows ahead (the pair's own second row is being
    // read), and into L2 a further three times that.
    let ahead = PREFETCH_AHEAD.max(2 * w.row_bytes);
    let l2_ahead = if L2 { l2_distance(ahead) } else { 0 };
    let mut acc = [[_mm512_setzero_ps(); B]; R];
    let groups = w.k / GROUP;
    for g in 0..groups {
        for r in 0..R {
            let codes = row_codes[r].add(g * GROUP / 2);
            if L2 {
                prefetch_l2(codes.wrapping_add(l2_ahead));
            }
            prefetch(codes.wrapping_add(ahead));
            if g.is_multiple_of(4) {
                s.prefetch(row_scales[r] + ((g * GROUP + 2 * ahead) >> shift));
            }
            let bytes = weight_bytes(_mm512_loadu_si512(codes as *const _), table);
            let ws = s.group::<BK>(row_scales[r], g * GROUP, shift);
            add_group(&mut acc[r], bytes, ws, x, g, halves);
        }
    }
    if w.k % GROUP == HALF {
        let g = groups;
        for r in 0..R {
            // The half group's 32 code bytes only: the load does not reach past the row.
            let codes = row_codes[r].add(g * GROUP / 2);
            let bytes = weight_bytes(
                _mm512_maskz_loadu_epi8(0xffff_ffff, codes as *const _),
                table,
            );
            let ws = s.half_group::<BK>(row_scales[r], g * GROUP, shift);
            add_group(&mut acc[r], bytes, ws, x, g, halves);
        }
    }
    acc
}

/// Adds a group's lanes for each of the `B` activation rows to `acc`: the integer sums of the
/// weight `bytes` times the row's codes ([`dot`]), times the weight scales `ws` and the row's
/// activation scales.
///
/// Always inlined (into [`rows_acc`], whose target features it then has), as the group
/// kernels' scale helpers are: outlined, a call per group and row took the warm 4096x4096
/// NVFP4 GEMV to 102 µs against 95-98.
///
/// # Safety
/// AVX-512 VNNI present; group `g` of rows `0 .. B` exists in `x`.
#[inline(always)]
unsafe fn add_group<const B: usize>(
    acc: &mut [__m512; B],
    bytes: (__m512i, __m512i),
    ws: __m512,
    x: &Acts,
    g: usize,
    halves: (usize, usize),
) {
    for (m, a) in acc.iter_mut().enumerate() {
        let sums = _mm512_cvtepi32_ps(dot(bytes, x, m, g, halves));
        let sc = _mm512_mul_ps(ws, act_scales(x, m, g));
        *a = _mm512_fmadd_ps(sums, sc, *a);
    }
}

/// Rows `r0 .. r1` of `w` times the activation rows of `x` (`x.batch` of them) into
/// `out[(row - r0) * batch + m]`.
///
/// # Safety
/// AVX-512 BW + VNNI present and `w` taken ([`usable`], `iw` [`IntWeights::of`] it); rows
/// `r0 .. r1` exist; `x` is [`Acts::new`] of rows of `w.k` values; `out` holds
/// `(r1 - r0) * x.batch` values.
pub unsafe fn rows(w: &Rows<'_>, iw: &IntWeights, x: &Acts, r0: usize, r1: usize, out: &mut [f32]) {
    match x.batch {
        1 => rows_of::<1>(w, iw, x, r0, r1, out),
        2 => rows_of::<2>(w, iw, x, r0, r1, out),
        3 => rows_of::<3>(w, iw, x, r0, r1, out),
        _ => rows_of::<4>(w, iw, x, r0, r1, out),
    }
}

/// [`rows`] for `B == x.batch` activation rows: sixteen weight rows at a time reduced together,
/// the rest one by one.
///
/// # Safety
/// As [`rows`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn rows_of<const B: usize>(
    w: &Rows<'_>,
    iw: &IntWeights,
    x: &Acts,
    r0: usize,
    r1: usize,
    out: &mut [f32],
) {
    debug_assert!(usable(w) && B == x.batch && out.len() >= (r1 - r0) * B);
    let table = offset_table(iw);
    // Integer weights back to values.
    let gain = _mm512_set1_ps(iw.gain);
    macro_rules! run {
        ($bk:expr, $l2:expr, $s:expr) => {{
            let s = $s;
            let mut r = r0;
            while r1 - r >= 16 {
                let mut pairs = [[[_mm512_setzero_ps(); 2]; 8]; B];
                for p in 0..8 {
                    let a = rows_acc::<2, B, { $bk }, { $l2 }, _>(w, &s, table, x, r + 2 * p);
                    for m in 0..B {
                        pairs[m][p] = [a[0][m], a[1][m]];
                    }
                }
                for (m, pm) in pairs.iter().enumerate() {
                    let sums = super::avx512::sum16_rows_pairs(|p| pm[p]);
                    let mut v = [0f32; 16];
                    _mm512_storeu_ps(v.as_mut_ptr(), _mm512_mul_ps(sums, gain));
                    for (i, &y) in v.iter().enumerate() {
                        out[(r - r0 + i) * B + m] = y;
                    }
                }
                r += 16;
            }
            while r < r1 {
                let [a] = rows_acc::<1, B, { $bk }, { $l2 }, _>(w, &s, table, x, r);
                for m in 0..B {
                    out[(r - r0) * B + m] = _mm512_reduce_add_ps(a[m]) * iw.gain;
                }
                r += 1;
            }
        }};
    }
    macro_rules! with_l2 {
        ($bk:expr, $s:expr) => {
            if super::prefetch::l2_enabled() {
                run!($bk, true, $s)
            } else {
                run!($bk, false, $s)
            }
        };
    }
    // The f32 group kernel's scales (E2M1 bytes by arithmetic where it takes them).
    super::avx512_groups::with_group_scales!(w, |BK, s| with_l2!(BK, s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::gemv::rows_portable;
    use crate::test_util::uniform;
    use crate::{Format, QTensor, QuantSpec};
    use candle_core::{Device, Tensor};

    /// Every row of `spec`'s weights against the portable GEMV over the dequantized activations
    /// (the W4A8 reference) on the same integer weights: rows of whole and half groups, row
    /// counts around the 16-row blocks, 1 to 4 activation rows.
    fn check_spec(spec: &QuantSpec) {
        let dev = Device::Cpu;
        let format = spec.format;
        for (n, k) in [
            (1usize, 128usize),
            (17, 576),
            (33, 1024),
            (16, 64),
            (40, 4160),
        ] {
            let w = Tensor::from_vec(uniform(n as u64, n * k, 0.05), (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, spec).unwrap();
            let view = q.host_view().unwrap().with_int8_codebook();
            let rows_w = Rows::new(&view);
            assert!(usable(&rows_w), "{format} {n}x{k}");
            let iw = IntWeights::of(&rows_w).unwrap();
            let x = uniform(7, MAX_BATCH * k, 1.0);
            let a = Int8Acts::quantize(&x, k);
            let xd = a.dequantize();
            // Rows [n][m], as the kernel writes them.
            let mut want = vec![0f32; n * MAX_BATCH];
            rows_portable(&rows_w, &xd, MAX_BATCH, 0, n, &mut want);
            let mag: f32 = xd[..k].iter().map(|v| v.abs()).sum::<f32>() * 0.6;
            let check = |batch: usize, r0: usize, got: &[f32]| {
                for (i, g) in got.iter().enumerate() {
                    let (row, m) = (r0 + i / batch, i % batch);
                    let w = want[row * MAX_BATCH + m];
                    let tol = (1e-5 * w.abs()).max(1e-6 * mag);
                    assert!(
                        (g - w).abs() <= tol,
                        "{format}/{} {n}x{k} batch {batch} row {row} m {m}: {g} vs {w}",
                        spec.block_size
                    );
                }
            };
            for batch in 1..=MAX_BATCH {
                let acts = Acts::new(&a, batch);
                for r0 in [0, n / 2] {
                    let mut got = vec![0f32; (n - r0) * batch];
                    // SAFETY: `usable` checked AVX-512 BW + VNNI and the weight (`iw`); rows
                    // r0..n exist, `acts` holds `batch` rows of k values, `got` holds
                    // (n - r0) * batch values.
                    unsafe { rows(&rows_w, &iw, &acts, r0, n, &mut got) };
                    check(batch, r0, &got);
                }
            }
        }
    }

    /// NVFP4 (E4M3 scales by arithmetic), MXFP4 (E8M0 by arithmetic), NF4 / bitsandbytes FP4
    /// with their codebooks rounded to int8 and f32 absmax per 64, 32 and 16 weights: each
    /// scale source's full and half groups.
    #[test]
    fn matches_the_dequantized_activations() {
        if !super::super::avx512::vnni_usable() {
            return;
        }
        for format in [Format::Nvfp4, Format::Mxfp4, Format::Nf4, Format::Fp4] {
            check_spec(&QuantSpec::new(format));
        }
        // bitsandbytes' smallest block: 32-wide f32 scales.
        check_spec(&QuantSpec::new(Format::Nf4).with_block(32));
    }

    /// With denormal operands read as zero NVFP4's scales come from their table (the E4M3
    /// arithmetic would lose subnormal scales): gathered full and half groups.
    #[test]
    fn nvfp4_table_scales_match_with_denormals_as_zero() {
        if !super::super::avx512::vnni_usable() {
            return;
        }
        let ((), daz) =
            crate::test_util::with_denormals_as_zero(|| check_spec(&QuantSpec::new(Format::Nvfp4)));
        assert!(daz);
    }
}
