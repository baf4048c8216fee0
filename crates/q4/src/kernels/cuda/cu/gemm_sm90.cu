// Fused 4-bit prefill GEMM for Hopper (sm_90a): y[m, n] = wfactor * sum_k W[n, k] x[m, k] with
// the 4-bit weight (NVFP4; MXFP4 with FMT 1, bitsandbytes with FMT 2) decoded straight into
// wgmma's register operand, never written to memory.
//
// A block computes 128 weight rows x BN tokens (256, or 128 for narrow tiles) with two MMA
// warpgroups; warpgroup wg owns weight rows 64wg .. 64wg + 63 and issues wgmma.m64nBNk16 with A
// from registers (its decoded weight rows) and B = the block's token tile in shared memory
// (K-major, 128-byte swizzle), f32 accumulators in registers (the weight rows are wgmma's M, so
// the output tile is transposed through shared memory at the end).
//
// Tensor-memory-accelerator copies (TMA) bring each 64-wide K step's token tile (BN x 64
// bf16), code bytes (128 x 32) and scale bytes (128 x 16: the four steps around this one) into a
// ring of STAGES stages (mbarriers `loaded` and `free`). With PRODUCER a third warpgroup, which
// gives most of its registers to the other two, issues each step's copies as soon as both MMA
// warpgroups have retired that stage's wgmmas; without, the first MMA thread does. Each MMA
// thread decodes its own A fragments of step kt + 1 (two weight rows, 32 weights) from the
// staged code bytes while step kt's wgmmas run: a code byte's two E2M1 nibbles become a bf16
// pair with their bits placed in the exponent field (value * 2^-126) times the row's E4M3 scale
// pre-multiplied by 2^119, exact; the pair (k, k + 1) is one register of the fragment.
//
// Block order (RASTER): token tiles fastest in groups of RASTER_GROUP (4), so that the blocks
// running at once read the same weight rows.
//
// Rows past N and tokens past M are zero-filled by the TMA (never stored). NVFP4 needs
// K % 256 == 0 (the scale copy is 16 bytes wide).
//
// Operands are exactly the chunked path's (bf16 value * E4M3 scale, times 2^-7 here), so the
// two paths differ only in f32 summation order.
//
// FMT 1 (MXFP4, OCP: E2M1 codes low nibble first, an E8M0 scale per 32): the same placed pairs
// times 2^(e - 1) (and 2^(e - 128) more where e > 128), exactly the chunked path's bf16(value *
// 2^(e - 127)); the scale copy covers eight steps (needs K % 512 == 0).
//
// FMT 2 (bitsandbytes NF4 / FP4, high nibble first, f32 absmax per block of bs >= 64 within a
// row, codebook `cb`): each nibble's codebook value times the absmax in f32, rounded once to
// bf16 (again the chunked path's operands); a code byte's two codebook values come from one
// 64-bit load of a lane-replicated pair table (BNB_PAIRS, below); the scale copy is 4 absmax
// values (needs K % (4 bs) == 0).
//
// Defines: STAGES (2..5), FMT (0 NVFP4, 1 MXFP4, 2 bitsandbytes), BN (tokens per block: 256,
// or 128 for narrow tiles), PRODUCER (1: a third warpgroup issues the copies), RASTER (block order:
// 0 weight-row tiles fastest, 1 token tiles fastest in groups of RASTER_GROUP), BNB_PAIRS (FMT 2:
// 1 the pair table, 0 two lookups in a 16-entry table), PROBE (kernel development: 2 skips the
// decode, 3 the wgmmas, 4 both).

#ifndef STAGES
#define STAGES 4
#endif
#ifndef PROBE
#define PROBE 0
#endif
#ifndef FMT
#define FMT 0
#endif
#ifndef BN
#define BN 256
#endif
#ifndef PRODUCER
#define PRODUCER 0
#endif
#ifndef RASTER
#define RASTER 1
#endif
#ifndef RASTER_GROUP
#define RASTER_GROUP 4
#endif
#define THREADS (256 + 128 * PRODUCER)
#define ACC (BN / 2)
#define BM 128
#define BK 64
#define X_BYTES (BN * BK * 2)      // token tile: BN rows of 128 bytes
#define C_BYTES (BM * BK / 2)      // code bytes: 128 rows of 32
#define S_BYTES (BM * 16)          // scale bytes: 128 rows of 16
#define STAGE_BYTES (X_BYTES + C_BYTES + S_BYTES)
// Dynamic shared memory: STAGES * STAGE_BYTES (at least the epilogue's two 64 x BN transpose
// buffers, 2 * BN * 72 * 2 bytes) + 1024 (alignment slack); gemm_sm90.rs's `smem_bytes`
// computes the same.

#define ARITH_PRE 6.64613997892457936e35f /* 2^119 */

struct __align__(64) TensorMap {
    u64 opaque[16];
};

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n"
        "}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
// 2-D TMA copy of the box at element coordinates (c0 inner, c1 outer) into shared memory.
__device__ __forceinline__ void tma_load_2d(u32 dst, const TensorMap* map, int c0, int c1, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
        "l"((u64)map), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }
// Keeps the compiler from moving accumulator accesses across the asynchronous wgmmas.
__device__ __forceinline__ void fence_acc(float* d) {
#pragma unroll
    for (int i = 0; i < ACC; i++) asm volatile("" : "+f"(d[i])::"memory");
}
// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ u64 desc_sw128(u32 addr) {
    return (u64)((addr & 0x3ffffu) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}
// Exact product of a bf16 pair and a splatted scale (the -0 addend keeps signed zeros).
__device__ __forceinline__ u32 pair_scale(u32 a, u32 s) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(s), "r"(0x80008000u));
    return d;
}
// bf16 pair (low nibble, high nibble) of the byte of `w` that `sel` (0x4440 | byte) picks, as
// value * 2^-126: the byte is copied 12 bits up, so both magnitudes move into place with one
// shift (bits 0-2 -> 6-8, 16-18 -> 22-24) and both signs with another (bits 3 -> 15, 19 -> 31).
__device__ __forceinline__ u32 e2m1_byte_pair(u32 w, u32 sel) {
    const u32 v = prmt(w, 0u, sel) * 0x1001u;
    return ((v << 6) & 0x01c001c0u) | ((v << 12) & 0x80008000u);
}
// D[64 x 256] += A[64 x 16] * B[16 x 256]: A from registers (the m16n8k16 A-fragment layout per
// warp, rows 16w .. 16w + 15), B from shared memory (K-major, 128-byte swizzle), f32
// accumulators in the m64n256 fragment layout.
__device__ __forceinline__ void wgmma_m64n256k16_rs(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u64 desc_b) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %133, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "n"(1));
}

// As wgmma_m64n256k16_rs for 128 tokens (64 accumulators).
__device__ __forceinline__ void wgmma_m64n128k16_rs(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u64 desc_b) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "n"(1));
}

__shared__ u32 scale_tab[256];  // FMT 0 / 1: scale byte -> splatted bf16 factor (see the decode)
#ifndef BNB_PAIRS
#define BNB_PAIRS 1
#endif
#if FMT == 2 && BNB_PAIRS
// BNB_PAIRS: a code byte's two codebook values (high nibble, low nibble) in one 8-byte entry,
// replicated for 16 lanes so that a half-warp's lookups never share a bank: entry (byte, lane)
// at byte * 128 + (lane % 16) * 8 (32 KiB). One 64-bit load per code byte instead of two 32-bit
// loads and their two index computations.
__shared__ __align__(16) float2 cb_pairs[256 * 16];
#else
__shared__ float codebook[16];  // FMT 2
#endif

// bf16 pair (lo, hi) of two f32 values, each rounded to nearest even.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}
__shared__ __align__(8) u64 bars[2 * STAGES];

// A fragments of one 64-wide step: 4 k16 slices x 4 registers.
struct Frags {
    u32 a[4][4];
};

extern "C" __global__ void __launch_bounds__(THREADS, 1)
gemm_sm90(const __grid_constant__ TensorMap x_map, const __grid_constant__ TensorMap code_map,
          const __grid_constant__ TensorMap scale_map, u16* __restrict__ y, int M, int N, int K,
          float wfactor, int cb, int bs_shift, int m_base) {
    extern __shared__ u8 dyn[];
    const u32 tid = threadIdx.x;
    const int wg = (int)(tid >> 7);
    if (FMT == 0) {
        if (tid < 256) {
            const u16 h = f32_to_bf16(e4m3_decode(tid) * ARITH_PRE);
            scale_tab[tid] = (u32)h | ((u32)h << 16);
        }
    } else if (FMT == 1) {
        // MXFP4: E8M0 byte e -> 2^(e - 1) (the placed pair's 2^-126 makes it 2^(e - 127)),
        // capped at 2^127 (larger scales take a second factor, see the decode); 0xff is NaN.
        if (tid < 256) {
            const u32 h = tid == 255u ? 0x7fc0u : (u32)(min((int)tid - 1, 127) + 127) << 7;
            scale_tab[tid] = h | (h << 16);
        }
    } else {
#if FMT == 2 && BNB_PAIRS
        for (u32 i = tid; i < 256 * 16; i += THREADS)
            cb_pairs[i] = make_float2(u2f(CB_BITS[cb][i >> 8]), u2f(CB_BITS[cb][(i >> 4) & 15u]));
#else
        if (tid < 16) codebook[tid] = u2f(CB_BITS[cb][tid]);
#endif
    }
    // The swizzle pattern repeats every 1024 bytes: tiles start on such a boundary.
    const u32 base = (smem_addr(dyn) + 1023u) & ~1023u;
    u8* const gbase = dyn + (base - smem_addr(dyn));
    const u32 bar0 = smem_addr(bars);
#define LOADED(s) (bar0 + 8u * (u32)(s))
#define FREE(s) (bar0 + 8u * (u32)(STAGES + (s)))
    if (tid == 0) {
        for (int s = 0; s < STAGES; s++) {
            mbar_init(LOADED(s), 1);
            mbar_init(FREE(s), 256);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
#if RASTER
    // Token tiles fastest within groups of RASTER_GROUP: the blocks running at once share
    // weight rows (read from memory about once) and a group's token tiles stay in L2.
    const int bid = (int)(blockIdx.y * gridDim.x + blockIdx.x), rows_n = (int)gridDim.x;
    const int group = bid / (rows_n * RASTER_GROUP), in_group = bid % (rows_n * RASTER_GROUP);
    const int group_tiles = min(RASTER_GROUP, (int)gridDim.y - group * RASTER_GROUP);
    const int n0 = (in_group / group_tiles) * BM;
    const int m0 = m_base + (group * RASTER_GROUP + in_group % group_tiles) * BN;
#else
    // Weight-row tiles fastest: the blocks running at once share token tiles.
    const int n0 = (int)blockIdx.x * BM, m0 = m_base + (int)blockIdx.y * BN;
#endif
    const int steps = K / BK;
#define X_AT(s) (base + (u32)(s) * STAGE_BYTES)
#define C_AT(s) (X_AT(s) + X_BYTES)
#define S_AT(s) (C_AT(s) + C_BYTES)

    auto issue = [&](int kt) {
        const int s = kt % STAGES;
        if (kt >= STAGES) mbar_wait(FREE(s), (u32)((kt / STAGES) - 1) & 1u);
        mbar_expect_tx(LOADED(s), X_BYTES + C_BYTES + S_BYTES);
        tma_load_2d(X_AT(s), &x_map, kt * BK, m0, LOADED(s));
        tma_load_2d(C_AT(s), &code_map, kt * (BK / 2), n0, LOADED(s));
        // NVFP4: 16 scale bytes = steps 4 (kt / 4) .. + 3; MXFP4: 16 bytes = steps 8 (kt / 8)
        // .. + 7; bitsandbytes: 4 absmax values from the step's block rounded down to a
        // multiple of 4.
        const int sc0 = FMT == 0   ? (kt >> 2) * 16
                        : FMT == 1 ? (kt >> 3) * 16
                                   : ((kt * BK) >> bs_shift) & ~3;
        tma_load_2d(S_AT(s), &scale_map, sc0, n0, LOADED(s));
    };

    // This thread's fragment rows (16w + g and + 8 of its warpgroup's 64) and byte column t.
    const int warp = (int)(tid >> 5) & 3, lane = (int)(tid & 31), g = lane >> 2, t = lane & 3;
    const int row = 64 * wg + 16 * warp + g;
    const u32 sel = 0x4440u | (u32)t;
#if FMT == 2 && BNB_PAIRS
    const u32 pair_lane = (u32)(lane & 15) * 8u;  // this lane's copy in a cb_pairs entry
#endif

    // Waits for step kt's copies and decodes its fragments.
    auto decode = [&](Frags& f, int kt) {
        const int s = kt % STAGES;
        mbar_wait(LOADED(s), (u32)(kt / STAGES) & 1u);
        if (PROBE == 2 || PROBE == 4) return;
        const u8* cp = gbase + (C_AT(s) - base);
        // This step's scales in the staged 16 bytes of a row: NVFP4 four bytes, MXFP4 two,
        // bitsandbytes one f32.
        const int soff = FMT == 0 ? 4 * (kt & 3) : FMT == 1 ? 2 * (kt & 7) : 4 * (((kt * BK) >> bs_shift) & 3);
        const u8* sp = gbase + (S_AT(s) - base) + soff;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = row + 8 * h;
            const uint4 lo = *(const uint4*)(cp + r * 32);
            const uint4 hi = *(const uint4*)(cp + r * 32 + 16);
            const u32 sc4 = FMT == 1 ? (u32) * (const u16*)(sp + r * 16) : *(const u32*)(sp + r * 16);
            const u32 words[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
            for (int j = 0; j < 4; j++) {
                // k16 slice j: words 2j (k 2t, 2t+1) and 2j + 1 (k 2t+8, 2t+9), byte t of each.
                if (FMT != 2) {
                    // E2M1, low nibble first. NVFP4: slice j is scale block j of the step;
                    // MXFP4: slices 2i and 2i + 1 are scale block i (scales above 2 take a
                    // second factor below).
                    const int block = FMT == 0 ? j : j >> 1;
                    const u32 sc = scale_tab[(sc4 >> (8 * block)) & 0xffu];
                    f.a[j][h] = pair_scale(e2m1_byte_pair(words[2 * j], sel), sc);  // a0 / a1
                    f.a[j][2 + h] = pair_scale(e2m1_byte_pair(words[2 * j + 1], sel), sc);  // a2 / a3
                } else {
                    // bitsandbytes: one absmax for the step, high nibble first.
                    const float am = u2f(sc4);
#pragma unroll
                    for (int q = 0; q < 2; q++) {
#if FMT == 2 && BNB_PAIRS
                        const float2 v = *(const float2*)((const u8*)cb_pairs + prmt(words[2 * j + q], 0u, sel) * 128u + pair_lane);
                        f.a[j][2 * q + h] = pack_bf16x2(v.x * am, v.y * am);
#else
                        const u32 b = (words[2 * j + q] >> (8 * t)) & 0xffu;
                        f.a[j][2 * q + h] = pack_bf16x2(codebook[b >> 4] * am, codebook[b & 15u] * am);
#endif
                    }
                }
            }
            if (FMT == 1) {
                // MXFP4 scales above 2 (E8M0 e > 128, rare in real weights) were capped at
                // 2^127: the exact remaining factor 2^(e - 128).
                for (int i = 0; i < 2; i++) {
                    const u32 e = (sc4 >> (8 * i)) & 0xffu;
                    if (e > 128u && e != 255u) {
                        const u32 x = (e - 1u) << 7;  // bf16 bits of 2^(e - 128)
#pragma unroll
                        for (int j = 2 * i; j < 2 * i + 2; j++) {
                            f.a[j][h] = pair_scale(f.a[j][h], x | (x << 16));
                            f.a[j][2 + h] = pair_scale(f.a[j][2 + h], x | (x << 16));
                        }
                    }
                }
            }
        }
    };

#if PRODUCER
    // A producer warpgroup: one thread issues every step's copies as soon as its stage is free,
    // so that the MMA warpgroups never wait for each other to refill the ring. It hands most of
    // its registers to them (168 each at launch: 40 here, 232 there).
    if (tid >= 256) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        if (tid == 256)
            for (int kt = 0; kt < steps; kt++) issue(kt);
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
#endif
    float acc[ACC];
#pragma unroll
    for (int i = 0; i < ACC; i++) acc[i] = 0.0f;
    if (!PRODUCER && tid == 0)
        for (int kt = 0; kt < STAGES - 1 && kt < steps; kt++) issue(kt);
    __syncwarp();  // the wgmma instructions below need the whole warp converged

    // Step kt's wgmmas from `cur`, then step kt + 1's decode into `next` while they run.
    auto step = [&](Frags& cur, Frags& next, int kt) {
        const int s = kt % STAGES;
        wgmma_fence();
        fence_acc(acc);
        const u32 b_addr = X_AT(s);
#pragma unroll
        for (int ks = 0; ks < BK / 16 && PROBE != 3 && PROBE != 4; ks++) {
            if (BN == 256)
                wgmma_m64n256k16_rs(acc, cur.a[ks][0], cur.a[ks][1], cur.a[ks][2], cur.a[ks][3],
                                    desc_sw128(b_addr + 32 * ks));
            else
                wgmma_m64n128k16_rs(acc, cur.a[ks][0], cur.a[ks][1], cur.a[ks][2], cur.a[ks][3],
                                    desc_sw128(b_addr + 32 * ks));
        }
        wgmma_commit();
        // Step kt - 1's wgmmas have retired: `next` (their fragments) may be overwritten, and
        // their stage refilled with step kt + STAGES - 1 once the other warpgroup's have too.
        wgmma_wait<1>();
        fence_acc(acc);
        if (kt > 0) mbar_arrive(FREE((kt - 1) % STAGES));
        if (!PRODUCER && tid == 0 && kt + STAGES - 1 < steps) issue(kt + STAGES - 1);
        __syncwarp();
        if (kt + 1 < steps) decode(next, kt + 1);
    };
    Frags fa, fb;
    decode(fa, 0);
    int kt = 0;
    for (; kt + 1 < steps; kt += 2) {
        step(fa, fb, kt);
        step(fb, fa, kt + 1);
    }
    if (kt < steps) step(fa, fb, kt);
    wgmma_wait<0>();
    fence_acc(acc);

    // Epilogue: the warpgroup's 64 x BN tile, transposed through shared memory (rows of 72
    // so that the fragment stores do not conflict; the ring's space, free once both MMA
    // warpgroups are here), then 16-byte stores along y's rows.
    if (PRODUCER)
        asm volatile("bar.sync 3, 256;" ::: "memory");  // the MMA warpgroups only
    else
        __syncthreads();
    u16* stg = (u16*)gbase + wg * (BN * 72);
#pragma unroll
    for (int j = 0; j < BN / 8; j++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int token = 8 * j + 2 * t + (i & 1), r = 16 * warp + g + 8 * (i >> 1);
            stg[token * 72 + r] = f32_to_bf16(acc[4 * j + i] * wfactor);
        }
    asm volatile("bar.sync %0, 128;" ::"r"(wg + 1) : "memory");
    const bool vec = (N & 7) == 0;
    for (int c = (int)(tid & 127); c < BN * 8; c += 128) {
        const int token = c >> 3, ch = c & 7;
        const int m = m0 + token, n = n0 + 64 * wg + 8 * ch;
        if (m >= M || n >= N) continue;
        const u16* src = stg + token * 72 + 8 * ch;
        if (vec) {
            *(uint4*)(y + (i64)m * N + n) = *(const uint4*)src;
        } else {
            for (int e = 0; e < 8 && n + e < N; e++) y[(i64)m * N + n + e] = src[e];
        }
    }
}
