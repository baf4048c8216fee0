//! The tiled GEMM on Intel AMX (Sapphire Rapids and later): decoded weight tiles and the
//! activations go to the tile unit's bf16 dot products (`tdpbf16ps`, 16 x 16 f32 sums of 32
//! products per instruction, about ten times the AVX-512 FMA rate), with f32 accuracy kept for
//! NVFP4 and near it for the codebook formats.
//!
//! Accuracy: the E2M1 path takes only weights whose decoded values are exact, normal bfloat16
//! numbers (NVFP4: E2M1 codes times E4M3 block scales, at most 2 + 4 significant bits; its
//! tensor scale is applied to the sums; MXFP4: E2M1 codes times powers of two, taken where every
//! E8M0 scale lies within 2^±90 — the table reaches 2^-127, where the tile unit would flush
//! subnormal products — and checked by the decoder), and splits every f32 activation `v`
//! exactly into three bfloat16 pieces by truncation (`v = h + m + l`, 8 significant bits each).
//! The tile unit sums the three products per weight in f32, so the result is the f32 dot
//! product up to summation order.
//! Codebooks that are not exact in bfloat16 (NF4, bitsandbytes FP4) take [`codebook`]'s kernel:
//! two rounded pieces of weight and activation and three products per weight, at about 4e-6
//! relative error instead of f32's summation error (exact pieces would need six products,
//! which had measured slower than the AVX2 kernels).
//!
//! NVFP4 tiles are decoded straight from the packed codes into bf16 (per 32 values: the nibbles
//! as 32 word indices, one `vpermw` through the two blocks' rows of a 256 x 16 table of scale
//! byte x code products), never through f32 rows: on a VM with slow L2 traffic the f32 round
//! trip had cost more than the tile products.
//!
//! Layout: weights are the A operand (16 weight rows by 32 values of K per tile), activations
//! the B operand in the tile unit's pair layout (row p of a tile holds, for 16 activation rows,
//! the pairs `(x[2p], x[2p + 1])`), so a 16 x 16 result holds 16 weight rows by 16 activation
//! rows. A work unit is 32 weight rows (two A tiles) by up to 32 activation rows (two B tiles):
//! four accumulator tiles stay in the tile registers across a K slice. With a single activation
//! group (batches 9-16: short prompts) a unit is 48 weight rows instead, and each K step keeps
//! the group's three activation pieces in tile registers while three weight tiles pass through
//! (six tile loads for nine products instead of five for six: on this VM a tile load from
//! aligned memory costs about two tile products, 12.5 against 6 ns).
//!
//! Every buffer the tile unit reads or the decoder writes is 64-byte aligned
//! ([`AlignedBuf`]): a misaligned tile row spans two cache lines and doubled a tile load's cost.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;

use super::aligned::AlignedBuf;
use super::parallel::for_each_index;
use super::prefetch::prefetch;

pub mod codebook;

/// Weight rows per work unit (two A tiles).
const UNIT_ROWS: usize = 32;
/// Weight rows per work unit of the resident layout (three A tiles).
const RESIDENT_ROWS: usize = 48;
/// K values per tile.
const STEP: usize = 32;
/// K values decoded per slice: a unit's rows of it as bf16 tiles (64 KiB for 32 rows, 96 KiB
/// for 48) stay in L2 next to the activations, and a work unit's accumulators are stored once
/// per slice unless they stay in their registers (one group pair). (Slices narrow enough for 48
/// rows to fit L1 measured slower: 288-384 values 0.90-0.98x the speed; with the accumulators
/// held over K, 128 / 256 / 512 values 1.63x / 1.09-1.16x / 1.01x the time at batch 16, and
/// double-buffered so that no tile load meets fresh stores, no better: cause not found.)
const SLICE: usize = 1024;

static SLICE_VALUES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(SLICE);

/// K values per decoded slice (a multiple of [`STEP`]; default [`SLICE`]), for same-process A/B
/// measurements (`ab_tile_decode ... sliceA-B`).
#[doc(hidden)]
pub fn set_slice(values: usize) {
    assert!(values > 0 && values.is_multiple_of(STEP));
    SLICE_VALUES.store(values, Ordering::Relaxed);
}
/// Rows ahead of the decoded one whose codes the tile decoder prefetches.
const DECODE_AHEAD: usize = 8;
/// Bytes of one tile (16 rows of 64 bytes).
const TILE_BYTES: usize = 1024;
/// Bytes from one decoded weight tile to the next: a tile and one line more. Back to back,
/// every row's steps of a slice fell into a few L1 sets (steps 2-4 KiB apart), and the
/// decoder's stores evicted each other. Same-process A/B (`ab_tile_decode`, padded against
/// not, two runs): NVFP4 0.88-0.99x the time at batches 12-64 on 4096- and 11008x4096 (one
/// outlier 1.09x), 0.89-1.03x on 576x1536 and 1536x576 (one slice per row); NF4 0.86-0.99x at
/// batches 12-16; the NF4 decoder alone 0.84x.
const TILE_STRIDE: usize = TILE_BYTES + 64;
/// [`TILE_STRIDE`] in 64-byte vectors.
const TILE_VECS: usize = TILE_STRIDE / 64;
/// u32 words of one tile.
const TILE_WORDS: usize = TILE_BYTES / 4;
/// bf16 pieces per value.
const PIECES: usize = 3;

/// AMX-BF16 usable by this process: the CPU has it, the OS saves its state, and the kernel
/// granted this process the tile data permission (Linux asks processes to request it once).
static AVAILABLE: LazyLock<bool> = LazyLock::new(detect);

static SWITCH: super::switch::Switch = super::switch::Switch::new("Q4_AMX");

/// Turns the AMX path on or off (default on where available), for same-process A/B
/// measurements; `Q4_AMX=0` turns it off for the process.
#[doc(hidden)]
pub fn set_enabled(on: bool) {
    SWITCH.set(on);
}

static DECODE_PREFETCH: AtomicBool = AtomicBool::new(true);

/// Turns the tile decoder's prefetch of later rows on or off (default on), for same-process
/// A/B measurements (`q4-bench-generate --ab-amx-prefetch`).
#[doc(hidden)]
pub fn set_decode_prefetch(on: bool) {
    DECODE_PREFETCH.store(on, Ordering::Relaxed);
}

static PERSIST: AtomicBool = AtomicBool::new(true);

/// Turns on or off (default on) keeping the accumulators in their tile registers over all of K
/// when the batch is one group pair, for same-process A/B measurements
/// (`q4-bench-generate --ab-amx-persist`).
#[doc(hidden)]
pub fn set_persist(on: bool) {
    PERSIST.store(on, Ordering::Relaxed);
}

static RESIDENT: AtomicBool = AtomicBool::new(true);

/// Turns the resident-activation kernel for one activation group on or off (default on), for
/// same-process A/B measurements (`q4-bench-generate --ab-amx-resident`).
#[doc(hidden)]
pub fn set_resident(on: bool) {
    RESIDENT.store(on, Ordering::Relaxed);
}

/// Whether the tiled GEMM runs on AMX here.
pub fn usable() -> bool {
    *AVAILABLE && SWITCH.on()
}

/// Whether the CPU and OS support AMX-BF16 (without asking for the permission).
pub fn cpu_has_amx() -> bool {
    let leaf7 = __cpuid_count(7, 0);
    let tile = leaf7.edx & (1 << 24) != 0;
    let bf16 = leaf7.edx & (1 << 22) != 0;
    tile && bf16
        && std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512bf16")
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

/// Tile registers. Two-register layout ([`two_groups`], [`one_group`]): accumulators 0-3
/// (weight tile a, activation tile b at 2b + a), weight tiles 4-5, activation tiles 6-7.
/// Resident layout ([`one_group_resident`]): accumulators 0-2, weight tiles 3-4, the three
/// activation pieces 5-7.
mod tile {
    use super::*;

    /// The thread's tile configuration (zeros where none is loaded).
    ///
    /// # Safety
    /// AMX usable.
    #[inline(always)]
    pub unsafe fn stored() -> TileConfig {
        let mut c = TileConfig([0; 64]);
        asm!("sttilecfg [{}]", in(reg) c.0.as_mut_ptr(), options(nostack));
        c
    }

    /// Loads `cfg`, or releases the tiles where it is all zeros (palette 0: no configuration).
    ///
    /// # Safety
    /// AMX usable; `cfg` a valid configuration or zeros.
    #[inline(always)]
    pub unsafe fn load(cfg: &TileConfig) {
        if cfg.0[0] == 0 {
            asm!("tilerelease", options(nostack, nomem));
        } else {
            asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
        }
    }

    /// The tiles configured for q4's kernels on this thread while it lives; dropping it puts
    /// back the configuration the thread had before (or none). Other code on the thread may
    /// rely on its own: candle's AMX kernels configure a thread once and keep using that
    /// configuration, so releasing the tiles (or leaving q4's configuration in place) under
    /// them makes their next tile instruction fault (or compute with the wrong tile shapes).
    pub struct Configured {
        saved: TileConfig,
    }

    impl Configured {
        /// Stores the thread's configuration and loads `cfg`.
        ///
        /// # Safety
        /// AMX usable; `cfg` a valid configuration.
        #[inline(always)]
        pub unsafe fn new(cfg: &TileConfig) -> Configured {
            let saved = stored();
            load(cfg);
            Configured { saved }
        }
    }

    impl Drop for Configured {
        #[inline(always)]
        fn drop(&mut self) {
            // SAFETY: a `Configured` exists only where AMX is usable (`new`'s contract); the
            // saved bytes are a configuration the CPU stored itself, or zeros (none was loaded:
            // the tiles are released).
            unsafe { load(&self.saved) };
        }
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
    load!(load_t2, "tmm2");
    load!(load_t3, "tmm3");
    load!(load_t5, "tmm5");

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
    dp!(c0_t3_t5, "tmm0", "tmm3", "tmm5");
    dp!(c0_t3_t6, "tmm0", "tmm3", "tmm6");
    dp!(c0_t3_t7, "tmm0", "tmm3", "tmm7");
    dp!(c1_t4_t5, "tmm1", "tmm4", "tmm5");
    dp!(c1_t4_t6, "tmm1", "tmm4", "tmm6");
    dp!(c1_t4_t7, "tmm1", "tmm4", "tmm7");
    dp!(c2_t3_t5, "tmm2", "tmm3", "tmm5");
    dp!(c2_t3_t6, "tmm2", "tmm3", "tmm6");
    dp!(c2_t3_t7, "tmm2", "tmm3", "tmm7");
    // The codebook layout ([`super::codebook`]).
    dp!(c0_t2_t6, "tmm0", "tmm2", "tmm6");
    dp!(c0_t2_t7, "tmm0", "tmm2", "tmm7");
    dp!(c1_t5_t6, "tmm1", "tmm5", "tmm6");

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

/// The three truncated bfloat16 pieces of `v` (as bit patterns): what [`activation_tiles`]
/// computes sixteen lanes at a time.
#[cfg(test)]
fn pieces(v: f32) -> [u16; PIECES] {
    const HI: u32 = 0xffff_0000;
    let h = v.to_bits() & HI;
    let r = v - f32::from_bits(h);
    let m = r.to_bits() & HI;
    let l = (r - f32::from_bits(m)).to_bits() & HI;
    [(h >> 16) as u16, (m >> 16) as u16, (l >> 16) as u16]
}

/// Source column (within a 32-value step) of the value at position `i` of an A-tile row: the
/// decoder emits a step's low nibbles (even columns) first, then its high nibbles (odd columns).
/// The activations are laid out in the same order, so the dot products see matching pairs.
#[inline]
fn step_source(i: usize) -> usize {
    if i < STEP / 2 {
        2 * i
    } else {
        2 * (i - STEP / 2) + 1
    }
}

/// [`activation_tiles`] one value at a time: the test oracle.
#[cfg(test)]
fn activation_tiles_scalar(x: &[f32], batch: usize, k: usize, steps: usize) -> Vec<u32> {
    let groups = batch.div_ceil(16);
    let mut out = vec![0; groups * steps * PIECES * TILE_WORDS];
    let src: [usize; STEP] = std::array::from_fn(step_source);
    // One (group, step) per chunk.
    super::parallel::for_each_chunk_mut_joining_from(
        &mut out,
        PIECES * TILE_WORDS,
        batch * k * 8,
        super::parallel::AMX_PACK_JOIN_MIN,
        |c, tile| {
            let (g, s) = (c / steps, c % steps);
            for j in 0..16.min(batch - g * 16) {
                let row = &x[(g * 16 + j) * k..][..k];
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
                        tile[q * TILE_WORDS + p * 16 + j] = a[q] as u32 | (b[q] as u32) << 16;
                    }
                }
            }
        },
    );
    out
}

/// Activations in the B layout: `[group of 16 rows][step of 32 K][piece][pair p][row j]` as u32
/// (the bf16 pieces of the step's values at positions 2p and 2p + 1, low half first), zero past
/// the batch and past K. Each row's 32 values of a step are split in two registers, paired by
/// one word permute and scattered to their tile column (the scalar loop cost ~5% of a 12-token
/// prefill).
///
/// `out` (zeros, `groups * steps * PIECES * TILE_WORDS` words) receives the tiles.
///
/// # Safety
/// AVX-512F/BW present.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn activation_tiles(x: &[f32], batch: usize, k: usize, steps: usize, out: &mut [u32]) {
    activation_pieces::<PIECES>(x, batch, k, steps, out)
}

/// [`activation_tiles`] with `P` pieces per value: three exact ones by truncation (`P == 3`), or
/// two by rounding to nearest (`P == 2`: `x ≈ h + m`, `h` the nearest bfloat16 to `x` and `m`
/// the nearest to `x - h`, for [`codebook`]'s three-product sums).
///
/// # Safety
/// AVX-512F/BW and AVX512-BF16 present.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn activation_pieces<const P: usize>(
    x: &[f32],
    batch: usize,
    k: usize,
    steps: usize,
    out: &mut [u32],
) {
    const { assert!(P == 2 || P == 3) };
    assert_eq!(out.len(), batch.div_ceil(16) * steps * P * TILE_WORDS);
    // Output word 2p (low half of pair p) takes the bf16 (high word) of column a_p, word 2p + 1
    // that of column b_p, in `step_source` order; columns 16-31 come from the second register.
    let word_of = |c: usize| (2 * c + 1) as i16;
    let mut idx = [0i16; 32];
    for p in 0..16 {
        idx[2 * p] = word_of(step_source(2 * p));
        idx[2 * p + 1] = word_of(step_source(2 * p + 1));
    }
    let idx = _mm512_loadu_si512(idx.as_ptr().cast());
    let hi = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let col_offsets = _mm512_set_epi32(
        240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 16, 0,
    );
    super::parallel::for_each_chunk_mut_joining_from(
        out,
        P * TILE_WORDS,
        batch * k * 8,
        super::parallel::AMX_PACK_JOIN_MIN,
        |c, tile| {
            let (g, s) = (c / steps, c % steps);
            let col = s * STEP;
            let valid = (k - col).min(STEP);
            let m0 = if valid >= 16 {
                0xffff
            } else {
                (1u16 << valid) - 1
            };
            let m1 = if valid >= 32 {
                0xffff
            } else if valid > 16 {
                (1u16 << (valid - 16)) - 1
            } else {
                0
            };
            for j in 0..16.min(batch - g * 16) {
                // SAFETY: the masks keep both loads inside row g * 16 + j of `x` (columns < k);
                // the scatters write words p * 16 + j (< 256) of each of the chunk's P tiles.
                unsafe {
                    let row = x.as_ptr().add((g * 16 + j) * k + col);
                    let v0 = _mm512_maskz_loadu_ps(m0, row);
                    let v1 = _mm512_maskz_loadu_ps(m1, row.add(16));
                    let split = |v: __m512| -> [__m512i; P] {
                        if P == 2 {
                            // Each piece as an f32 whose high word is the rounded bfloat16.
                            let widen = |b: __m256bh| {
                                _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                                    std::mem::transmute::<__m256bh, __m256i>(b),
                                ))
                            };
                            let h = widen(_mm512_cvtneps_pbh(v));
                            let r = _mm512_sub_ps(v, _mm512_castsi512_ps(h));
                            let m = widen(_mm512_cvtneps_pbh(r));
                            std::array::from_fn(|q| [h, m][q])
                        } else {
                            let h = _mm512_and_si512(_mm512_castps_si512(v), hi);
                            let r = _mm512_sub_ps(v, _mm512_castsi512_ps(h));
                            let m = _mm512_and_si512(_mm512_castps_si512(r), hi);
                            let r2 = _mm512_sub_ps(r, _mm512_castsi512_ps(m));
                            // The permute keeps only each piece's high word: `l` needs no mask.
                            std::array::from_fn(|q| [h, m, _mm512_castps_si512(r2)][q])
                        }
                    };
                    let (p0, p1) = (split(v0), split(v1));
                    for q in 0..P {
                        let words = _mm512_permutex2var_epi16(p0[q], idx, p1[q]);
                        _mm512_i32scatter_epi32::<4>(
                            tile.as_mut_ptr().add(q * TILE_WORDS + j).cast(),
                            col_offsets,
                            words,
                        );
                    }
                }
            }
        },
    );
}

/// E8M0 scale bytes whose products with E2M1 values the tile GEMM takes: 2^-90 .. 2^90 (exact,
/// normal bfloat16 numbers far from both ends of the range; the E8M0 table itself reaches
/// 2^-127, where the tile unit would flush subnormal products).
pub const E8M0_BYTES: std::ops::RangeInclusive<u8> = 127 - 90..=127 + 90;

/// E2M1 weights (NVFP4, MXFP4) as the tile GEMM reads them: packed codes (low nibble first),
/// one scale byte per block of 16 (NVFP4's E4M3, without the tensor scale, so that every decoded
/// value is exact in bfloat16) or 32 values (MXFP4's E8M0) looked up in `table`, and the code
/// values.
pub struct E2m1Tiles<'a> {
    pub codes: &'a [u8],
    pub scale_bytes: &'a [u8],
    pub table: &'a [f32; 256],
    pub values: &'a [f32; 16],
    /// Values per scale byte: 16 or 32.
    pub block: usize,
    /// Scale bytes outside this range make the GEMM refuse the weight (MXFP4: products that
    /// would be subnormal or near overflow in bfloat16); `None` where every byte's products are
    /// exact normal numbers ([`products_exact`]).
    pub byte_range: Option<std::ops::RangeInclusive<u8>>,
    pub n: usize,
    pub k: usize,
    pub row_bytes: usize,
    pub row_blocks: usize,
}

impl E2m1Tiles<'_> {
    /// Panics unless the buffers cover `n` rows of `k` values: the decoder reads whole steps
    /// unchecked within these bounds.
    pub fn check(&self) {
        assert!(
            (self.block == 16 || self.block == 32)
                && self.row_blocks * self.block >= self.k
                && self.row_bytes * 2 >= self.row_blocks * self.block
                && self.codes.len() >= self.n * self.row_bytes
                && self.scale_bytes.len() >= self.n * self.row_blocks,
            "E2M1 tiles: buffers do not cover {} x {} in blocks of {}",
            self.n,
            self.k,
            self.block
        );
    }

    /// Decodes weight rows `r0..r0 + unit_rows` (rows from `n` on as zeros), columns
    /// `k0..k0 + steps * STEP`, into A tiles `[step][tile]` [`TILE_STRIDE`] bytes apart, each
    /// 16 rows by 32 values (bf16, in [`step_source`] order; columns from `k` on as zeros).
    ///
    /// `products` is [`E2m1Tiles::products`].
    ///
    /// # Safety
    /// AVX-512F/BW present; `unit_rows` a multiple of 16; `k0` a multiple of [`STEP`];
    /// `out.len() >= steps * unit_rows / 16 * TILE_STRIDE / 2`; `products.len() == 256 * 16`;
    /// the codes and scale bytes hold `n` rows of `row_bytes` and `row_blocks` (whole blocks
    /// covering `k`).
    ///
    /// Returns false if a scale byte lies outside [`E2m1Tiles::byte_range`] (the tiles are then
    /// not to be used).
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn decode(
        &self,
        products: &[u16],
        r0: usize,
        unit_rows: usize,
        k0: usize,
        steps: usize,
        out: &mut [u16],
    ) -> bool {
        match &self.byte_range {
            None => {
                self.decode_with::<false>(products, r0, unit_rows, k0, steps, out, 0..=255);
                true
            }
            Some(range) => {
                self.decode_with::<true>(products, r0, unit_rows, k0, steps, out, range.clone())
            }
        }
    }

    /// [`decode`](Self::decode), checking the scale bytes against `range` or not.
    ///
    /// # Safety
    /// As for [`decode`](Self::decode).
    #[target_feature(enable = "avx512f,avx512bw")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn decode_with<const CHECK: bool>(
        &self,
        products: &[u16],
        r0: usize,
        unit_rows: usize,
        k0: usize,
        steps: usize,
        out: &mut [u16],
        range: std::ops::RangeInclusive<u8>,
    ) -> bool {
        let mut in_range = true;
        debug_assert_eq!(products.len(), 256 * 16);
        debug_assert!(
            unit_rows.is_multiple_of(16) && out.len() >= steps * unit_rows / 16 * TILE_STRIDE / 2
        );
        let rows = unit_rows.min(self.n - r0);
        let full = steps.min((self.k - k0) / STEP);
        let table = products.as_ptr();
        let base = out.as_mut_ptr().cast::<__m512i>();
        let prefetch_on = super::prefetch::enabled() && DECODE_PREFETCH.load(Ordering::Relaxed);
        for r in 0..unit_rows {
            // Step s of row r is vector (s * unit_tiles + r / 16) * TILE_VECS + r % 16.
            let dst = base.add((r / 16) * TILE_VECS + r % 16);
            let step_vecs = unit_rows / 16 * TILE_VECS;
            if r >= rows {
                for s in 0..steps {
                    _mm512_storeu_si512(dst.add(s * step_vecs), _mm512_setzero_si512());
                }
                continue;
            }
            let codes = self.codes.as_ptr().add((r0 + r) * self.row_bytes + k0 / 2);
            let scales = self
                .scale_bytes
                .as_ptr()
                .add((r0 + r) * self.row_blocks + k0 / self.block);
            // A step's two halves: two 16-value blocks, or both in one 32-value block.
            let (first, second) = if self.block == 16 { (2, 1) } else { (1, 0) };
            // Each row is a short stream of its own (a slice of it: at most 512 code bytes), so
            // the hardware prefetcher barely ramps up: ask for a later row's lines now.
            if prefetch_on && r + DECODE_AHEAD < rows {
                let ahead = DECODE_AHEAD * self.row_bytes;
                for b in (0..steps * 16).step_by(64) {
                    prefetch(codes.wrapping_add(ahead + b));
                }
                prefetch(scales.wrapping_add(DECODE_AHEAD * self.row_blocks));
            }
            for s in 0..full {
                let c = _mm_loadu_si128(codes.add(s * 16).cast());
                let (b0, b1) = (*scales.add(first * s), *scales.add(first * s + second));
                if CHECK {
                    in_range &= range.contains(&b0) && range.contains(&b1);
                }
                let (b0, b1) = (b0 as usize, b1 as usize);
                let t = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_loadu_si256(table.add(b0 * 16).cast())),
                    _mm256_loadu_si256(table.add(b1 * 16).cast()),
                );
                _mm512_storeu_si512(dst.add(s * step_vecs), lookup(c, t));
            }
            for s in full..steps {
                let col = k0 + s * STEP;
                let v = if col < self.k {
                    if CHECK {
                        let blk = (r0 + r) * self.row_blocks + col / self.block;
                        let last = (r0 + r + 1) * self.row_blocks;
                        in_range &= self.scale_bytes[blk..last.min(blk + 2)]
                            .iter()
                            .all(|b| range.contains(b));
                    }
                    self.last_step(products, r0 + r, col)
                } else {
                    _mm512_setzero_si512()
                };
                _mm512_storeu_si512(dst.add(s * step_vecs), v);
            }
        }
        in_range
    }

    /// The row's last step, short of 32 columns (from `col`, a multiple of [`STEP`] below `k`),
    /// as bf16 in [`step_source`] order: copies what the row holds (one or two 16-value blocks,
    /// or part of a 32-value one); a missing second half and the columns past `k` read as zeros.
    ///
    /// # Safety
    /// AVX-512F/BW present; `row < n`; `products.len() == 256 * 16`; the codes and scale bytes
    /// hold `n` rows of `row_bytes` and `row_blocks` (whole blocks covering `k`).
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline(never)]
    unsafe fn last_step(&self, products: &[u16], row: usize, col: usize) -> __m512i {
        let row_of = |b: u8| products.as_ptr().add(b as usize * 16).cast::<__m256i>();
        let blk = row * self.row_blocks + col / self.block;
        let byte0 = row * self.row_bytes + col / 2;
        let two = col + 16 < self.k;
        let mut tmp = [0u8; 16];
        let avail = (self.row_bytes - col / 2).min(if two { 16 } else { 8 });
        tmp[..avail].copy_from_slice(&self.codes[byte0..byte0 + avail]);
        let lo = _mm256_loadu_si256(row_of(self.scale_bytes[blk]));
        let hi = if two {
            let second = if self.block == 16 { blk + 1 } else { blk };
            _mm256_loadu_si256(row_of(self.scale_bytes[second]))
        } else {
            _mm256_setzero_si256()
        };
        lookup(
            _mm_loadu_si128(tmp.as_ptr().cast()),
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi),
        )
    }

    /// [`products`] of this weight's code values and scale table.
    pub fn products(&self) -> Vec<u16> {
        products(self.values, self.table)
    }
}

/// Every product of a scale-table entry and a code value as bf16 (`[byte][code]`; exact for the
/// tables [`products_exact`] accepts): the decoder's lookup table.
pub fn products(values: &[f32; 16], table: &[f32; 256]) -> Vec<u16> {
    let mut t = Vec::with_capacity(256 * 16);
    for s in table.iter() {
        for v in values.iter() {
            t.push(half::bf16::from_f32(s * v).to_bits());
        }
    }
    t
}

/// The 16 code bytes of a step looked up in `table` (its two blocks' 16 products each): low
/// nibbles (even columns) to words 0-15, high nibbles to 16-31; words 8-15 of each half belong
/// to the step's second block, so they index the table's second row.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn lookup(codes: __m128i, table: __m512i) -> __m512i {
    let second = _mm512_set_epi16(
        16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0, 16, 16, 16, 16, 16, 16, 16, 16, 0,
        0, 0, 0, 0, 0, 0, 0,
    );
    let w16 = _mm256_cvtepu8_epi16(codes);
    let idx = _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_and_si256(w16, _mm256_set1_epi16(0x0f))),
        _mm256_srli_epi16::<4>(w16),
    );
    _mm512_permutexvar_epi16(_mm512_add_epi16(idx, second), table)
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

/// One K step for one activation group with its three pieces resident in tiles 5-7 and three
/// weight tiles (48 rows): six tile loads serve nine products, where [`one_group`] needs five
/// for six. On the AMX host a `tileloadd` costs about two `tdpbf16ps` (12.5 vs 6 ns from
/// aligned memory), so a step's time follows its loads: 12-token prefill 1.06x (same-process
/// A/B). Four weight tiles through one register (7 loads, 12 products) were slower per row:
/// each reload waits for the products still reading that register.
///
/// # Safety
/// Tiles configured; `a(tile)` (tile < 3) and `b(piece)` point at readable 1 KiB tiles.
#[inline(always)]
unsafe fn one_group_resident(a: impl Fn(usize) -> *const u8, b: impl Fn(usize) -> *const u8) {
    tile::load_t5(b(0));
    tile::load_b0(b(1));
    tile::load_b1(b(2));
    tile::load_t3(a(0));
    tile::load_a0(a(1));
    tile::c0_t3_t5();
    tile::c1_t4_t5();
    tile::c0_t3_t6();
    tile::c1_t4_t6();
    tile::c0_t3_t7();
    tile::load_t3(a(2));
    tile::c1_t4_t7();
    tile::c2_t3_t5();
    tile::c2_t3_t6();
    tile::c2_t3_t7();
}

/// Writes, or (`add`) adds, the sums of stored accumulator tiles to `y` (`batch x n` at
/// `y_addr`): weight rows `r0..r0 + rows` by activation rows `m0..m0 + 16` (those below
/// `batch`), the sum of weight row `r0 + r` and activation row `m0 + j` at
/// `scc[acc(r) * TILE_WORDS + (r % 16) * 16 + j]`.
///
/// # Safety
/// `y_addr` is the address of a `batch x n` f32 matrix; `m0 < batch`, `r0 + rows <= n`; no
/// other thread accesses its columns `r0..r0 + rows` meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn write_sums(
    y_addr: usize,
    n: usize,
    batch: usize,
    r0: usize,
    rows: usize,
    m0: usize,
    scc: &[f32],
    add: bool,
    acc: impl Fn(usize) -> usize,
) {
    for j in 0..16.min(batch - m0) {
        // SAFETY: row m0 + j < batch, columns r0..r0 + rows <= n (the caller's promise).
        let out = unsafe {
            std::slice::from_raw_parts_mut((y_addr as *mut f32).add((m0 + j) * n + r0), rows)
        };
        for (r, o) in out.iter_mut().enumerate() {
            let v = scc[acc(r) * TILE_WORDS + (r % 16) * 16 + j];
            if add {
                *o += v;
            } else {
                *o = v;
            }
        }
    }
}

/// A thread's decoded weight tiles and stored accumulators (64-byte aligned: see
/// [`AlignedBuf`]).
struct Scratch {
    a: AlignedBuf<u16>,
    c: AlignedBuf<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch { a: AlignedBuf::new(), c: AlignedBuf::new() })
    };
}

/// `y[m, n] = sum_k x[m, k] W'[n, k]` on AMX for NVFP4 weights `w` (their values without the
/// tensor scale; the caller applies it) and `products` = `w.products()`. Callers check
/// [`usable`] and the exactness of `w`'s scale table ([`products_exact`]).
///
/// Returns false, with `y` unspecified, where a scale byte lies outside `w.byte_range`: the
/// caller then runs the f32 kernels.
pub fn matmul_e2m1(
    w: &E2m1Tiles<'_>,
    products: &[u16],
    x: &[f32],
    batch: usize,
    y: &mut [f32],
) -> bool {
    matmul_e2m1_with(w, products, x, batch, y, RESIDENT.load(Ordering::Relaxed))
}

/// [`matmul_e2m1`] with the resident-activation kernel allowed (for one activation group) or
/// not, whatever the process-wide switch says (tests run both kernels side by side).
fn matmul_e2m1_with(
    w: &E2m1Tiles<'_>,
    products: &[u16],
    x: &[f32],
    batch: usize,
    y: &mut [f32],
    allow_resident: bool,
) -> bool {
    assert!(usable(), "AMX tile GEMM called where AMX is not usable");
    w.check();
    assert_eq!(products.len(), 256 * 16);
    let (n, k) = (w.n, w.k);
    debug_assert_eq!(x.len(), batch * k);
    debug_assert_eq!(y.len(), batch * n);
    let steps = k.div_ceil(STEP);
    let groups = batch.div_ceil(16);
    // Fresh per call (zeros past the batch and K), aligned so that every tile row is one line.
    let mut xb_buf = AlignedBuf::<u32>::new();
    let xb = xb_buf.slice(groups * steps * PIECES * TILE_WORDS);
    // SAFETY: AMX implies AVX-512F/BW and AVX512-BF16 (checked in `cpu_has_amx`).
    unsafe { activation_tiles(x, batch, k, steps, xb) };
    let xb = &*xb;
    // One activation group: 48-row units with the activation pieces resident
    // ([`one_group_resident`]); more: 32-row units, each weight tile serving two groups.
    let resident = groups == 1 && allow_resident;
    let unit_rows = if resident { RESIDENT_ROWS } else { UNIT_ROWS };
    let unit_tiles = unit_rows / 16;
    let units = n.div_ceil(unit_rows);
    let y_addr = y.as_mut_ptr() as usize;
    let cfg = TileConfig::full();
    let slice = SLICE_VALUES.load(Ordering::Relaxed);
    // One group pair: the accumulators stay in their tile registers over all of K (the decoder
    // between slices touches no tile), stored once per unit.
    let persist = groups <= 2 && PERSIST.load(Ordering::Relaxed);
    let in_range = AtomicBool::new(true);
    for_each_index(units, n * k * batch / 8, |u| {
        if !in_range.load(Ordering::Relaxed) {
            return;
        }
        SCRATCH.with_borrow_mut(|sc| {
            let r0 = u * unit_rows;
            let rows = unit_rows.min(n - r0);
            // Each K slice's weight tiles are decoded first, then multiplied with every group
            // pair. (Decoding each step just before its products, with the accumulators kept
            // over all of K, measured 1.03-1.38x the time at batches 16-32: the tile loads then
            // wait for the decoder's stores.)
            let slice_max = slice.min(k.next_multiple_of(STEP));
            let sa = sc.a.slice(slice_max / STEP * unit_tiles * TILE_STRIDE / 2);
            let scc = sc.c.slice(4 * TILE_WORDS);
            // SAFETY: AMX is usable (asserted above) and the configuration is valid.
            let tiles = unsafe { tile::Configured::new(&cfg) };
            let mut k0 = 0;
            while k0 < k {
                let w_cols = slice.min(k - k0);
                let wp = w_cols.next_multiple_of(STEP);
                // SAFETY: AMX implies AVX-512F/BW (checked in `cpu_has_amx`); unit_rows is a
                // multiple of 16; k0 is a multiple of the slice width (itself of STEP), `sa`
                // holds the widest slice's tiles, `products` is the product table, and `w`
                // describes its own buffers.
                if !unsafe { w.decode(products, r0, unit_rows, k0, wp / STEP, sa) } {
                    in_range.store(false, Ordering::Relaxed);
                    break;
                }
                let step0 = k0 / STEP;
                let last = k0 + w_cols >= k;
                for g in (0..groups).step_by(2) {
                    let two = g + 1 < groups;
                    // SAFETY: tiles configured above. Every tile load reads 1 KiB inside
                    // `sa` (step s < wp / STEP, tile < unit_tiles) or inside `xb`
                    // (group < groups, step < steps, piece < PIECES); the store writes the 4 KiB
                    // of `scc`.
                    unsafe {
                        if !persist || k0 == 0 {
                            tile::zero_accumulators();
                        }
                        for s in 0..wp / STEP {
                            let xs = |grp: usize, q: usize| {
                                xb.as_ptr()
                                    .add(((grp * steps + step0 + s) * PIECES + q) * TILE_WORDS)
                                    .cast::<u8>()
                            };
                            let a = |t: usize| {
                                sa.as_ptr()
                                    .add((s * unit_tiles + t) * TILE_STRIDE / 2)
                                    .cast::<u8>()
                            };
                            if resident {
                                one_group_resident(a, |q| xs(g, q));
                            } else if two {
                                two_groups(a, |q| xs(g, q), |q| xs(g + 1, q));
                            } else {
                                one_group(a, |q| xs(g, q));
                            }
                        }
                        if !persist || last {
                            tile::store_accumulators(scc.as_mut_ptr());
                        }
                    }
                    if persist && !last {
                        continue;
                    }
                    // Two-register layout: accumulator 2b + a holds weight rows r0 + 16a + i by
                    // activation rows 16(g + b) + j at [i][j]; for one group, accumulators 2 and
                    // 3 hold more of the sums of 0 and 1. Resident layout: accumulator t holds
                    // weight rows r0 + 16t + i by activation rows j.
                    if !two && !resident {
                        let (c01, c23) = scc.split_at_mut(2 * TILE_WORDS);
                        c01.iter_mut().zip(c23.iter()).for_each(|(a, b)| *a += b);
                    }
                    for b in 0..if two { 2 } else { 1 } {
                        let m0 = (g + b) * 16;
                        let acc = |r: usize| if resident { r / 16 } else { 2 * b + r / 16 };
                        let add = k0 > 0 && !persist;
                        // SAFETY: `y_addr` is `y` (batch x n); m0 < batch, r0 + rows <= n, and
                        // only this unit writes columns r0..r0 + rows.
                        unsafe { write_sums(y_addr, n, batch, r0, rows, m0, scc, add, acc) };
                    }
                }
                k0 += w_cols;
            }
            drop(tiles);
        })
    });
    in_range.into_inner()
}

/// Norm-wise relative error of `y` (`batch x n`) against the f64 product of `x` (`batch x k`)
/// and `w'` (`w`: `n x k`).
#[cfg(test)]
fn f64_rel_err(y: &[f32], w: &[f32], x: &[f32], n: usize, k: usize) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (m, xm) in x.chunks(k).enumerate() {
        for (r, wr) in w.chunks(k).enumerate().take(n) {
            let want: f64 = wr.iter().zip(xm).map(|(a, b)| *a as f64 * *b as f64).sum();
            num += (y[m * n + r] as f64 - want).powi(2);
            den += want * want;
        }
    }
    (num / den).sqrt()
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
    fn activation_tiles_match_the_scalar_layout() {
        if !cpu_has_amx() {
            return;
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for (batch, k) in [(1usize, 48usize), (12, 576), (17, 70), (33, 1104), (16, 31)] {
            let x: Vec<f32> = (0..batch * k)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    // Wide exponents, both signs, some exact zeros and bf16-exact values.
                    match seed % 7 {
                        0 => 0.0,
                        1 => -1.5,
                        _ => f32::from_bits((seed >> 32) as u32 & 0xbfff_ffff),
                    }
                })
                .collect();
            let steps = k.div_ceil(STEP);
            let mut got = vec![0u32; batch.div_ceil(16) * steps * PIECES * TILE_WORDS];
            // SAFETY: AVX-512F/BW present (cpu_has_amx).
            unsafe { activation_tiles(&x, batch, k, steps, &mut got) };
            assert_eq!(
                got,
                activation_tiles_scalar(&x, batch, k, steps),
                "{batch}x{k}"
            );
        }
    }

    #[test]
    fn step_order_is_a_permutation() {
        let mut seen = [false; STEP];
        for i in 0..STEP {
            seen[step_source(i)] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    static UNSCALED: LazyLock<[f32; 256]> = LazyLock::new(|| q4_formats::nvfp4::scale_table(1.0));

    /// `t` as the tile decoder reads it (block scales without the tensor scale).
    fn tiles(t: &q4_formats::nvfp4::Nvfp4Tensor) -> E2m1Tiles<'_> {
        let kp = q4_formats::nvfp4::padded_cols(t.cols);
        E2m1Tiles {
            codes: &t.packed,
            scale_bytes: &t.scales,
            table: &UNSCALED,
            values: super::super::decode::code_values(crate::Format::Nvfp4),
            block: 16,
            byte_range: None,
            n: t.rows,
            k: t.cols,
            row_bytes: kp / 2,
            row_blocks: kp / 16,
        }
    }

    /// `t`'s scalar dequantization without the tensor scale (`rows x cols`).
    fn unscaled_dense(t: &q4_formats::nvfp4::Nvfp4Tensor) -> Vec<f32> {
        let mut d = q4_formats::nvfp4::Nvfp4Tensor {
            scale2: 1.0,
            ..t.clone()
        }
        .dequantize::<f32>()
        .unwrap();
        d.truncate(t.rows * t.cols);
        d
    }

    fn nvfp4(n: usize, k: usize, seed: u64) -> q4_formats::nvfp4::Nvfp4Tensor {
        let mut s = seed | 1;
        let w: Vec<f32> = (0..n * k)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
            })
            .collect();
        let opts = q4_formats::nvfp4::Nvfp4Options {
            pad: true,
            ..Default::default()
        };
        q4_formats::nvfp4::quantize(&w, k, &opts).unwrap()
    }

    /// The bf16 tiles hold exactly the scalar dequantization (without the tensor scale), in
    /// `step_source` order, zeros past the rows and columns; the last step of a row with an odd
    /// block count reads no byte past the row.
    #[test]
    fn nvfp4_tiles_decode_exactly() {
        if !cpu_has_amx() {
            return;
        }
        for (n, k) in [(40, 48), (32, 64), (17, 1040), (33, 2100)] {
            let t = nvfp4(n, k, 7 + k as u64);
            let dense = unscaled_dense(&t);
            let src = tiles(&t);
            // The whole row from column 0, and (past a slice) from a later slice start.
            for k0 in (0..k).step_by(SLICE) {
                let steps = (k - k0).div_ceil(STEP);
                for unit_rows in [UNIT_ROWS, RESIDENT_ROWS] {
                    for r0 in (0..n).step_by(unit_rows) {
                        let mut out = vec![0xffffu16; steps * unit_rows / 16 * TILE_STRIDE / 2];
                        // SAFETY: AVX-512F/BW present (cpu_has_amx); `out` sized as documented;
                        // the tensor's own buffers; k0 a multiple of STEP; unit_rows of 16s.
                        unsafe { src.decode(&src.products(), r0, unit_rows, k0, steps, &mut out) };
                        check_tiles(&out, &dense, n, k, r0, unit_rows, k0, steps);
                    }
                }
            }
        }
    }

    /// Asserts that `out` holds the decoded tiles of rows `r0..r0 + unit_rows`, columns from
    /// `k0`, of the dense (unscaled) weight `dense` (`n x k`), zeros outside it.
    #[allow(clippy::too_many_arguments)]
    fn check_tiles(
        out: &[u16],
        dense: &[f32],
        n: usize,
        k: usize,
        r0: usize,
        unit_rows: usize,
        k0: usize,
        steps: usize,
    ) {
        {
            {
                for r in 0..unit_rows {
                    for st in 0..steps {
                        for i in 0..STEP {
                            let tile = st * (unit_rows / 16) + r / 16;
                            let got = out[(tile * TILE_STRIDE + (r % 16) * 64) / 2 + i];
                            let (row, col) = (r0 + r, k0 + st * STEP + step_source(i));
                            let want = if row < n && col < k {
                                dense[row * k + col]
                            } else {
                                0.0
                            };
                            assert_eq!(
                                f32::from_bits((got as u32) << 16).to_bits(),
                                want.to_bits(),
                                "{n}x{k} row {row} col {col}"
                            );
                        }
                    }
                }
            }
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

    /// The AMX GEMM on quantized NVFP4 weights against an f64 product of their dequantized
    /// values, over shapes with row, batch and K remainders (one and two activation groups).
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
        for (n, k, batch, resident) in [
            (32, 64, 16, true),
            (32, 64, 16, false),
            (45, 96, 9, true),
            (45, 96, 9, false),
            (70, 1104, 37, true),
            (33, 2048, 64, true),
            (16, 32, 1, true),
            (100, 3008, 20, true),
            (40, 48, 17, true),
            (97, 2100, 12, true),
            (97, 2100, 12, false),
            (48, 576, 3, true),
        ] {
            let x: Vec<f32> = (0..batch * k).map(|_| rnd()).collect();
            let t = nvfp4(n, k, n as u64 * 31 + k as u64);
            let mx = mxfp4(n, k, n as u64 * 7 + k as u64);
            let mx_dense = mx.dequantize::<f32>().unwrap();
            for (src, w, name) in [
                (tiles(&t), unscaled_dense(&t), "nvfp4"),
                (mx_tiles(&mx), mx_dense, "mxfp4"),
            ] {
                let mut y = vec![f32::NAN; batch * n];
                assert!(matmul_e2m1_with(
                    &src,
                    &src.products(),
                    &x,
                    batch,
                    &mut y,
                    resident
                ));
                let e = f64_rel_err(&y, &w, &x, n, k);
                assert!(
                    e < 1e-6,
                    "{name} {n}x{k} batch {batch} (resident {resident}): relative error {e}"
                );
            }
        }
    }

    /// A configuration such as candle's AMX kernels load once per thread (tiles 4-5 of 16 rows
    /// by 32 bytes, 6-7 of 8 rows by 64).
    fn foreign_config() -> TileConfig {
        let mut c = TileConfig::full();
        for t in 4..6 {
            c.0[16 + 2 * t] = 32;
        }
        for t in 6..8 {
            c.0[48 + t] = 8;
        }
        c
    }

    /// A call that runs on this thread (too small to go parallel) leaves the thread's tile
    /// configuration as it found it: another kernel's, or none. (It used to release the tiles,
    /// and candle's next Q4K AMX call on that thread faulted with an invalid opcode.)
    #[test]
    fn calls_leave_the_threads_tile_configuration_as_they_found_it() {
        if !usable() {
            return;
        }
        let (n, k, batch) = (64, 256, 16);
        assert!(n * k * batch / 8 < super::super::parallel::INLINE_WEIGHTS);
        let x: Vec<f32> = (0..batch * k)
            .map(|i| (i % 13) as f32 * 0.1 - 0.6)
            .collect();
        let t = nvfp4(n, k, 5);
        let src = tiles(&t);
        let (codes, scales): (Vec<u8>, Vec<f32>) = (
            (0..n * k / 2).map(|i| (i * 37 % 251) as u8).collect(),
            (0..n * k / 64).map(|i| 0.5 + i as f32 * 0.01).collect(),
        );
        let cb = codebook::CodebookTiles {
            codes: &codes,
            scales: &scales,
            values: &q4_formats::codebook::NF4,
            high_first: true,
            block: 64,
            n,
            k,
            row_bytes: k / 2,
            row_blocks: k / 64,
        };
        let foreign = foreign_config();
        for before in [Some(&foreign), None] {
            for call in 0..3 {
                // SAFETY: AMX usable (checked above); the configuration is valid or none.
                unsafe { tile::load(before.unwrap_or(&TileConfig([0; 64]))) };
                let mut y = vec![0.0; batch * n];
                let ok = match call {
                    0 => matmul_e2m1_with(&src, &src.products(), &x, batch, &mut y, true),
                    1 => matmul_e2m1_with(&src, &src.products(), &x, batch, &mut y, false),
                    _ => codebook::matmul(&cb, &x, batch, &mut y),
                };
                assert!(ok);
                // SAFETY: AMX usable.
                let after = unsafe { tile::stored() }.0;
                let want = before.map_or([0; 64], |c| c.0);
                assert_eq!(
                    after,
                    want,
                    "call {call}, configured before: {}",
                    before.is_some()
                );
            }
        }
        // SAFETY: AMX usable; zeros release the tiles.
        unsafe { tile::load(&TileConfig([0; 64])) };
    }

    static MX_SCALES: LazyLock<[f32; 256]> = LazyLock::new(q4_formats::mxfp4::scale_table);

    fn mxfp4(n: usize, k: usize, seed: u64) -> q4_formats::mxfp4::Mxfp4Tensor {
        let mut s = seed | 1;
        let w: Vec<f32> = (0..n * k)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                // Blocks of widely different magnitudes (E8M0 scales 2^-20 .. 2^20).
                let mag = 2f32.powi((i / 32 % 41) as i32 - 20);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * mag
            })
            .collect();
        let opts = q4_formats::mxfp4::Mxfp4Options {
            pad: true,
            ..Default::default()
        };
        q4_formats::mxfp4::quantize(&w, k, &opts).unwrap()
    }

    /// `t` as the tile decoder reads it (scale bytes checked against 2^-90 .. 2^90).
    fn mx_tiles(t: &q4_formats::mxfp4::Mxfp4Tensor) -> E2m1Tiles<'_> {
        let kp = q4_formats::mxfp4::padded_cols(t.cols);
        E2m1Tiles {
            codes: &t.packed,
            scale_bytes: &t.scales,
            table: &MX_SCALES,
            values: super::super::decode::code_values(crate::Format::Mxfp4),
            block: 32,
            byte_range: Some(E8M0_BYTES),
            n: t.rows,
            k: t.cols,
            row_bytes: kp / 2,
            row_blocks: kp / 32,
        }
    }

    /// MXFP4 tiles hold exactly the scalar dequantization, zeros past the rows and columns.
    #[test]
    fn mxfp4_tiles_decode_exactly() {
        if !cpu_has_amx() {
            return;
        }
        for (n, k) in [(40, 48), (32, 64), (17, 1040), (33, 2100)] {
            let t = mxfp4(n, k, 3 + k as u64);
            let dense = t.dequantize::<f32>().unwrap();
            let src = mx_tiles(&t);
            for k0 in (0..k).step_by(SLICE) {
                let steps = (k - k0).div_ceil(STEP);
                for unit_rows in [UNIT_ROWS, RESIDENT_ROWS] {
                    for r0 in (0..n).step_by(unit_rows) {
                        let mut out = vec![0xffffu16; steps * unit_rows / 16 * TILE_STRIDE / 2];
                        // SAFETY: AVX-512F/BW present (cpu_has_amx); `out` sized as documented;
                        // the tensor's own buffers; k0 a multiple of STEP; unit_rows of 16s.
                        let ok = unsafe {
                            src.decode(&src.products(), r0, unit_rows, k0, steps, &mut out)
                        };
                        assert!(ok, "{n}x{k}: scale bytes in range");
                        check_tiles(&out, &dense, n, k, r0, unit_rows, k0, steps);
                    }
                }
            }
        }
    }

    /// An E8M0 byte outside the range (or in a row's last, short step) makes the GEMM refuse
    /// the weight.
    #[test]
    fn mxfp4_out_of_range_bytes_are_refused() {
        if !usable() {
            return;
        }
        let (n, k) = (40, 80);
        for (row, block) in [(3, 0), (39, 2)] {
            for byte in [0u8, 36, 218, 255] {
                let mut t = mxfp4(n, k, 5);
                t.scales[row * 3 + block] = byte;
                let src = mx_tiles(&t);
                let mut y = vec![0.0; 16 * n];
                let x = vec![1.0; 16 * k];
                assert!(
                    !matmul_e2m1_with(&src, &src.products(), &x, 16, &mut y, true),
                    "byte {byte} at row {row} block {block}"
                );
            }
        }
    }
}
