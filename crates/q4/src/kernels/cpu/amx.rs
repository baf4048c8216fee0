//! The tiled GEMM on Intel AMX (Sapphire Rapids and later): decoded weight tiles and the
//! activations go to the tile unit's bf16 dot products (`tdpbf16ps`, 16 x 16 f32 sums of 32
//! products per instruction, about ten times the AVX-512 FMA rate) with f32 accuracy kept.
//!
//! Accuracy: the path takes only weights whose decoded values are exact, normal bfloat16 numbers
//! (NVFP4: E2M1 codes times E4M3 block scales, at most 2 + 4 significant bits; its tensor scale
//! is applied to the sums; MXFP4's E8M0 table reaches 2^-127, where the tile unit would flush
//! subnormal products, so it is not taken), and splits every f32 activation `v` exactly into three bfloat16 pieces
//! by truncation (`v = h + m + l`, 8 significant bits each). The tile unit sums the three
//! products per weight in f32, so the result is the f32 dot product up to summation order.
//! Codebooks that are not exact in bfloat16 (NF4, bitsandbytes FP4) keep the AVX2 kernels: split
//! into pieces too, they needed six products per weight and measured slower than AVX2 at
//! batch 16 (1.46x the time on 4096x4096 NF4) and even at 64.
//!
//! Layout: weights are the A operand (16 weight rows by 32 values of K per tile), activations
//! the B operand in the tile unit's pair layout (row p of a tile holds, for 16 activation rows,
//! the pairs `(x[2p], x[2p + 1])`), so a 16 x 16 result holds 16 weight rows by 16 activation
//! rows. A work unit is 32 weight rows (two A tiles) by up to 32 activation rows (two B tiles):
//! four accumulator tiles stay in the tile registers across a K slice.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;

use super::parallel::for_each_index;

/// Weight rows per work unit (two A tiles).
const UNIT_ROWS: usize = 32;
/// K values per tile.
const STEP: usize = 32;
/// K values decoded per slice (a multiple of the 64-value decode chunk): 32 rows of it as f32
/// and as bf16 stay in L2 next to the activations.
const SLICE: usize = 1024;
/// Bytes of one tile (16 rows of 64 bytes).
const TILE_BYTES: usize = 1024;
/// u32 words of one tile.
const TILE_WORDS: usize = TILE_BYTES / 4;
/// bf16 pieces per value.
const PIECES: usize = 3;

/// AMX-BF16 usable by this process: the CPU has it, the OS saves its state, and the kernel
/// granted this process the tile data permission (Linux asks processes to request it once).
static AVAILABLE: LazyLock<bool> = LazyLock::new(detect);

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the AMX path on or off (default on where available), for same-process A/B
/// measurements; `Q4_AMX=0` turns it off for the process.
#[doc(hidden)]
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

static ENV_OFF: LazyLock<bool> =
    LazyLock::new(|| std::env::var_os("Q4_AMX").is_some_and(|v| v == "0"));

/// Whether the tiled GEMM runs on AMX here.
pub fn usable() -> bool {
    *AVAILABLE && ENABLED.load(Ordering::Relaxed) && !*ENV_OFF
}

/// Whether the CPU and OS support AMX-BF16 (without asking for the permission).
pub fn cpu_has_amx() -> bool {
    let leaf7 = __cpuid_count(7, 0);
    let tile = leaf7.edx & (1 << 24) != 0;
    let bf16 = leaf7.edx & (1 << 22) != 0;
    tile && bf16
        && std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && os_saves_tiles()
}

fn os_saves_tiles() -> bool {
    if !std::is_x86_feature_detected!("xsave") {
        return false;
    }
    // CPUID leaf 1 ECX bit 27 (OSXSAVE): XGETBV may be executed.
    let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
    if !osxsave {
        return false;
    }
    // SAFETY: OSXSAVE is set, so XGETBV(0) is defined.
    let xcr0 = unsafe { _xgetbv(0) };
    // Bits 17 (XTILECFG) and 18 (XTILEDATA).
    xcr0 & (0b11 << 17) == 0b11 << 17
}

fn detect() -> bool {
    if !cpu_has_amx() {
        return false;
    }
    request_permission()
}

#[cfg(target_os = "linux")]
fn request_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM) takes two integers and touches no memory of ours;
    // a kernel without it returns an error.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    r == 0
}

#[cfg(not(target_os = "linux"))]
fn request_permission() -> bool {
    false
}

/// Tile configuration: palette 1, all eight tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn full() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
            c[48 + t] = 16; // rows
        }
        TileConfig(c)
    }
}

/// Tile registers: accumulators 0-3 (weight tile a, activation tile b at 2b + a), weight tiles
/// 4-5, activation tiles 6-7.
mod tile {
    use super::*;

    /// # Safety
    /// AMX usable; `cfg` a valid configuration.
    #[inline(always)]
    pub unsafe fn configure(cfg: &TileConfig) {
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
    }

    /// # Safety
    /// Tiles configured by this thread.
    #[inline(always)]
    pub unsafe fn release() {
        asm!("tilerelease", options(nostack, nomem));
    }

    /// # Safety
    /// Tiles configured.
    #[inline(always)]
    pub unsafe fn zero_accumulators() {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
    }

    macro_rules! load {
        ($name:ident, $reg:literal) => {
            /// # Safety
            /// Tiles configured; `p` points at 1 KiB readable memory (16 rows of 64 bytes).
            #[inline(always)]
            pub unsafe fn $name(p: *const u8) {
                asm!(
                    concat!("tileloadd ", $reg, ", [{p} + {s}*1]"),
                    p = in(reg) p,
                    s = in(reg) 64usize,
                    options(nostack, readonly)
                );
            }
        };
    }
    load!(load_a0, "tmm4");
    load!(load_a1, "tmm5");
    load!(load_b0, "tmm6");
    load!(load_b1, "tmm7");

    macro_rules! dp {
        ($name:ident, $c:literal, $a:literal, $b:literal) => {
            /// # Safety
            /// Tiles configured and loaded.
            #[inline(always)]
            pub unsafe fn $name() {
                asm!(
                    concat!("tdpbf16ps ", $c, ", ", $a, ", ", $b),
                    options(nostack, nomem)
                );
            }
        };
    }
    dp!(c0_a0_b0, "tmm0", "tmm4", "tmm6");
    dp!(c1_a1_b0, "tmm1", "tmm5", "tmm6");
    dp!(c2_a0_b1, "tmm2", "tmm4", "tmm7");
    dp!(c3_a1_b1, "tmm3", "tmm5", "tmm7");

    /// # Safety
    /// Tiles configured; `p` points at 4 KiB writable memory.
    #[inline(always)]
    pub unsafe fn store_accumulators(p: *mut f32) {
        asm!(
            "tilestored [{p} + {s}*1], tmm0",
            "tilestored [{p} + {s}*1 + 1024], tmm1",
            "tilestored [{p} + {s}*1 + 2048], tmm2",
            "tilestored [{p} + {s}*1 + 3072], tmm3",
            p = in(reg) p,
            s = in(reg) 64usize,
            options(nostack)
        );
    }
}

/// The three truncated bfloat16 pieces of `v` (as bit patterns).
#[inline]
fn pieces(v: f32) -> [u16; PIECES] {
    const HI: u32 = 0xffff_0000;
    let h = v.to_bits() & HI;
    let r = v - f32::from_bits(h);
    let m = r.to_bits() & HI;
    let l = (r - f32::from_bits(m)).to_bits() & HI;
    [(h >> 16) as u16, (m >> 16) as u16, (l >> 16) as u16]
}

/// Source position (within a 32-value step) of the value at position `i` of a packed A-tile
/// row: packing 2 x 16 values with `vpackusdw` interleaves them by 128-bit lane (four from the
/// first vector, four from the second, per lane). The activations are laid out in the same
/// order, so the dot products see matching pairs.
#[inline]
fn packed_source(i: usize) -> usize {
    let (lane, j) = (i / 8, i % 8);
    if j < 4 {
        4 * lane + j
    } else {
        16 + 4 * lane + j - 4
    }
}

/// Activations in the B layout: `[group of 16 rows][step of 32 K][piece][pair p][row j]` as u32
/// (the bf16 pieces of the step's values at packed positions 2p and 2p + 1, low half first),
/// zero past the batch and past K.
fn activation_tiles(x: &[f32], batch: usize, k: usize, steps: usize, out: &mut Vec<u32>) {
    let groups = batch.div_ceil(16);
    out.clear();
    out.resize(groups * steps * PIECES * TILE_WORDS, 0);
    let src: [usize; STEP] = std::array::from_fn(packed_source);
    for m in 0..batch {
        let (g, j) = (m / 16, m % 16);
        let row = &x[m * k..(m + 1) * k];
        for s in 0..steps {
            let base = (g * steps + s) * PIECES * TILE_WORDS;
            let piece_of = |i: usize| {
                let kk = s * STEP + src[i];
                if kk < k {
                    pieces(row[kk])
                } else {
                    [0; PIECES]
                }
            };
            for p in 0..STEP / 2 {
                let (a, b) = (piece_of(2 * p), piece_of(2 * p + 1));
                for q in 0..PIECES {
                    out[base + q * TILE_WORDS + p * 16 + j] = a[q] as u32 | (b[q] as u32) << 16;
                }
            }
        }
    }
}

/// Packs `UNIT_ROWS` decoded rows (`rows[r * width ..]`, `width` a multiple of [`STEP`], every
/// value exact in bfloat16) into A tiles `[step][half][16 rows][32 values]` (bf16, values in
/// [`packed_source`] order).
///
/// # Safety
/// AVX-512F and BW present; `rows.len() >= UNIT_ROWS * width`,
/// `out.len() >= width / STEP * 2 * TILE_BYTES / 2`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn weight_tiles(rows: &[f32], width: usize, out: &mut [u16]) {
    debug_assert!(rows.len() >= UNIT_ROWS * width && width.is_multiple_of(STEP));
    let steps = width / STEP;
    debug_assert!(out.len() >= steps * TILE_BYTES);
    let base = out.as_mut_ptr();
    for r in 0..UNIT_ROWS {
        for s in 0..steps {
            let src = rows.as_ptr().add(r * width + s * STEP);
            // The high halves of 2 x 16 f32 bit patterns (their exact bfloat16 values) as 32
            // u16, lane-interleaved.
            let v0 = _mm512_srli_epi32::<16>(_mm512_castps_si512(_mm512_loadu_ps(src)));
            let v1 = _mm512_srli_epi32::<16>(_mm512_castps_si512(_mm512_loadu_ps(src.add(16))));
            let dst = base.add(((s * 2 + r / 16) * 16 + r % 16) * STEP);
            _mm512_storeu_si512(dst.cast(), _mm512_packus_epi32(v0, v1));
        }
    }
}

/// Significant bits of `v`'s binary expansion (0 for zero, 24 for non-finite values).
fn significant_bits(v: f32) -> u32 {
    if !v.is_finite() {
        return 24;
    }
    if v == 0.0 {
        return 0;
    }
    let bits = v.to_bits();
    let exp = (bits >> 23) & 0xff;
    let mant = bits & 0x7f_ffff;
    let full = if exp == 0 { mant } else { mant | 0x80_0000 };
    32 - full.leading_zeros() - full.trailing_zeros()
}

/// Whether every product of a codebook value and a block scale is exact in bfloat16 (8
/// significant bits) and far from its subnormal and overflow ranges (the tile unit flushes
/// subnormal inputs): true for E2M1 codes with E4M3 scales unscaled by a tensor scale; false for
/// the full E8M0 table (2^-127 .. 2^127).
/// Non-finite scales are ignored (their blocks decode to non-finite values either way).
pub fn products_exact(codebook: &[f32; 16], scales: &[f32]) -> bool {
    let finite = |vs: &[f32]| {
        vs.iter()
            .copied()
            .filter(|v| v.is_finite())
            .collect::<Vec<_>>()
    };
    let (codebook, scales) = (finite(codebook), finite(scales));
    let (codebook, scales) = (codebook.as_slice(), scales.as_slice());
    let bits = |vs: &[f32]| vs.iter().map(|&v| significant_bits(v)).max().unwrap_or(0);
    let in_range = |vs: &[f32]| {
        vs.iter()
            .all(|v| v.abs() < 1e30 && (*v == 0.0 || v.abs() > 1e-30))
    };
    bits(codebook) + bits(scales) <= 8 && in_range(codebook) && in_range(scales)
}

/// One K step for two activation groups (the accumulators hold weight tile a by group b at
/// 2b + a): each loaded tile serves two products.
///
/// # Safety
/// Tiles configured; `a(half)`, `b0(piece)`, `b1(piece)` point at readable 1 KiB tiles.
#[inline(always)]
unsafe fn two_groups(
    a: impl Fn(usize) -> *const u8,
    b0: impl Fn(usize) -> *const u8,
    b1: impl Fn(usize) -> *const u8,
) {
    tile::load_a0(a(0));
    tile::load_a1(a(1));
    for q in 0..PIECES {
        tile::load_b0(b0(q));
        tile::load_b1(b1(q));
        tile::c0_a0_b0();
        tile::c1_a1_b0();
        tile::c2_a0_b1();
        tile::c3_a1_b1();
    }
}

/// One K step for one activation group: the products go to four accumulators (2 and 3 add to
/// 0 and 1 afterwards) and the two activation registers alternate, so that consecutive tile
/// products rarely wait for each other.
///
/// # Safety
/// As for [`two_groups`].
#[inline(always)]
unsafe fn one_group(a: impl Fn(usize) -> *const u8, b: impl Fn(usize) -> *const u8) {
    tile::load_a0(a(0));
    tile::load_a1(a(1));
    tile::load_b0(b(0));
    tile::load_b1(b(1));
    tile::c0_a0_b0(); // x piece h
    tile::c1_a1_b0();
    tile::c2_a0_b1(); // x piece m
    tile::c3_a1_b1();
    tile::load_b0(b(2));
    tile::c0_a0_b0(); // x piece l
    tile::c1_a1_b0();
}

struct Scratch {
    rows: Vec<f32>,
    a: Vec<u16>,
    c: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch { rows: Vec::new(), a: Vec::new(), c: Vec::new() })
    };
}

/// `y[m, n] = sum_k x[m, k] W[n, k]` on AMX, for weights whose row pieces `decode(r, k0, out)`
/// writes as f32 (`out.len()` values from column `k0`; `k0` is always a multiple of 64).
/// Callers check [`usable`].
/// Every decoded value must be exact in bfloat16 (callers check [`products_exact`]).
pub fn matmul_decoded<D: Fn(usize, usize, &mut [f32]) + Sync + Send>(
    n: usize,
    k: usize,
    decode: &D,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
) {
    assert!(usable(), "AMX tile GEMM called where AMX is not usable");
    debug_assert_eq!(x.len(), batch * k);
    debug_assert_eq!(y.len(), batch * n);
    let steps = k.div_ceil(STEP);
    let groups = batch.div_ceil(16);
    let mut xb = Vec::new();
    activation_tiles(x, batch, k, steps, &mut xb);
    let units = n.div_ceil(UNIT_ROWS);
    let y_addr = y.as_mut_ptr() as usize;
    let cfg = TileConfig::full();
    for_each_index(units, n * k * batch / 8, |u| {
        SCRATCH.with_borrow_mut(|sc| {
            let r0 = u * UNIT_ROWS;
            let rows = UNIT_ROWS.min(n - r0);
            let slice_max = SLICE.min(k.next_multiple_of(STEP));
            sc.rows.resize(UNIT_ROWS * slice_max, 0.0);
            sc.a.resize(slice_max / STEP * TILE_BYTES, 0);
            sc.c.resize(4 * TILE_WORDS, 0.0);
            // SAFETY: AMX is usable (asserted above) and the configuration is valid.
            unsafe { tile::configure(&cfg) };
            let mut k0 = 0;
            while k0 < k {
                let w = SLICE.min(k - k0);
                let wp = w.next_multiple_of(STEP);
                let slice = &mut sc.rows[..UNIT_ROWS * wp];
                for r in 0..UNIT_ROWS {
                    let row = &mut slice[r * wp..(r + 1) * wp];
                    if r < rows {
                        decode(r0 + r, k0, &mut row[..w]);
                        row[w..].fill(0.0);
                    } else {
                        row.fill(0.0);
                    }
                }
                // SAFETY: AMX implies AVX-512F/BW (checked in `cpu_has_amx`); `slice` holds
                // UNIT_ROWS rows of wp (a multiple of STEP) values and `sc.a` was sized for the
                // widest slice.
                unsafe { weight_tiles(slice, wp, &mut sc.a) };
                let step0 = k0 / STEP;
                for g in (0..groups).step_by(2) {
                    let two = g + 1 < groups;
                    // SAFETY: tiles configured above. Every tile load reads 1 KiB inside
                    // `sc.a` (step s < wp / STEP, half < 2) or inside `xb`
                    // (group < groups, step < steps, piece < PIECES); the store writes the 4 KiB
                    // of `sc.c`.
                    unsafe {
                        tile::zero_accumulators();
                        for s in 0..wp / STEP {
                            let xs = |grp: usize, q: usize| {
                                xb.as_ptr()
                                    .add(((grp * steps + step0 + s) * PIECES + q) * TILE_WORDS)
                                    .cast::<u8>()
                            };
                            let a = |half: usize| {
                                sc.a.as_ptr()
                                    .add((s * 2 + half) * TILE_BYTES / 2)
                                    .cast::<u8>()
                            };
                            if two {
                                two_groups(a, |q| xs(g, q), |q| xs(g + 1, q));
                            } else {
                                one_group(a, |q| xs(g, q));
                            }
                        }
                        tile::store_accumulators(sc.c.as_mut_ptr());
                    }
                    // Accumulator 2b + a holds weight rows r0 + 16a + i by activation rows
                    // 16(g + b) + j at [i][j]; for one group, accumulators 2 and 3 hold more
                    // of the sums of 0 and 1.
                    if !two {
                        let (c01, c23) = sc.c.split_at_mut(2 * TILE_WORDS);
                        c01.iter_mut().zip(c23.iter()).for_each(|(a, b)| *a += b);
                    }
                    for b in 0..if two { 2 } else { 1 } {
                        let m0 = (g + b) * 16;
                        for j in 0..16.min(batch - m0) {
                            // SAFETY: row m0 + j < batch of `y`, columns r0..r0 + rows < n:
                            // in bounds, and only this unit writes these columns.
                            let out = unsafe {
                                std::slice::from_raw_parts_mut(
                                    (y_addr as *mut f32).add((m0 + j) * n + r0),
                                    rows,
                                )
                            };
                            for (r, o) in out.iter_mut().enumerate() {
                                let v = sc.c[(2 * b + r / 16) * TILE_WORDS + (r % 16) * 16 + j];
                                if k0 == 0 {
                                    *o = v;
                                } else {
                                    *o += v;
                                }
                            }
                        }
                    }
                }
                k0 += w;
            }
            // SAFETY: this thread configured the tiles above.
            unsafe { tile::release() };
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_sum_back_exactly() {
        for v in [
            1.0f32,
            -2.718_281_7e3,
            1e-20,
            6.0e30,
            0.1,
            -0.0,
            f32::MIN_POSITIVE * 3.0,
        ] {
            let [h, m, l] = pieces(v).map(|b| f32::from_bits((b as u32) << 16));
            assert_eq!(h + m + l, v, "{v}");
        }
    }

    #[test]
    fn packed_order_is_a_permutation_matching_vpackusdw() {
        let mut seen = [false; STEP];
        for i in 0..STEP {
            seen[packed_source(i)] = true;
        }
        assert!(seen.iter().all(|&s| s));
        if !cpu_has_amx() {
            return;
        }
        // One row of 32 distinct bf16-exact values through the packing.
        let mut rows = vec![0f32; UNIT_ROWS * STEP];
        for (i, v) in rows.iter_mut().take(STEP).enumerate() {
            *v = (i + 1) as f32;
        }
        let mut out = vec![0u16; TILE_BYTES];
        // SAFETY: AVX-512F/BW present (cpu_has_amx); buffers sized as documented.
        unsafe { weight_tiles(&rows, STEP, &mut out) };
        for (i, &b) in out.iter().take(STEP).enumerate() {
            let v = f32::from_bits((b as u32) << 16);
            assert_eq!(v, (packed_source(i) + 1) as f32, "position {i}");
        }
    }

    #[test]
    fn exactness_rule() {
        let e2m1 = [
            0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
        ];
        let e4m3 = q4_formats::nvfp4::scale_table(1.0);
        assert!(products_exact(&e2m1, &e4m3));
        let scaled = q4_formats::nvfp4::scale_table(0.37);
        assert!(!products_exact(&e2m1, &scaled));
        assert!(!products_exact(&e2m1, &q4_formats::mxfp4::scale_table()));
        assert!(significant_bits(1.75) == 3 && significant_bits(0.0) == 0);
    }

    /// The AMX GEMM against an f64 reference, over shapes with row, batch and K remainders
    /// (one and two activation groups), with E2M1-like weights (exact in bf16) and activations
    /// that are not.
    #[test]
    fn amx_matches_f64_reference() {
        if !usable() {
            eprintln!("AMX not usable here: skipped");
            return;
        }
        let mut seed = 0x1234_5678_9abc_def1u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for (n, k, batch) in [
            (32, 64, 16),
            (45, 100, 9),
            (70, 1100, 37),
            (33, 2048, 64),
            (16, 32, 1),
            (100, 3000, 20),
        ] {
            // Codes times block scales: exact in bfloat16.
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((rnd() * 12.0).round() / 2.0) * [0.375, 1.0, 0.0078125][i / 16 % 3])
                .collect();
            let x: Vec<f32> = (0..batch * k).map(|_| rnd()).collect();
            let mut y = vec![f32::NAN; batch * n];
            let decode = |r: usize, k0: usize, out: &mut [f32]| {
                out.copy_from_slice(&w[r * k + k0..r * k + k0 + out.len()])
            };
            matmul_decoded(n, k, &decode, &x, batch, &mut y);
            let (mut num, mut den) = (0f64, 0f64);
            for m in 0..batch {
                for r in 0..n {
                    let want: f64 = (0..k)
                        .map(|i| w[r * k + i] as f64 * x[m * k + i] as f64)
                        .sum();
                    num += (y[m * n + r] as f64 - want).powi(2);
                    den += want * want;
                }
            }
            let e = (num / den).sqrt();
            assert!(e < 1e-6, "{n}x{k} batch {batch}: relative error {e}");
        }
    }
}
