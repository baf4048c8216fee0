// Fused 4-bit prefill GEMM for Hopper (sm_90a): y[m, n] = wfactor * sum_k W[n, k] x[m, k] with
// the weight decoded tile by tile in shared memory, never written to global memory.
//
// A block computes 256 weight rows x 128 tokens with two warpgroups; warpgroup wg owns weight
// rows 128wg .. 128wg + 127 and issues two wgmma.m64n128k16 per 16-wide K slice: A = 64 of its
// decoded weight rows, B = the block's token tile, both K-major in shared memory with the 128-byte swizzle (16-byte
// chunk c of row r at r * 128 + ((c ^ (r % 8)) * 16) within a 1024-byte aligned tile), f32
// accumulators in registers (the weight rows are wgmma's M, so the output tile is transposed
// through shared memory at the end).
//
// The tile is tall in weight rows because the token tile is the expensive operand to stream
// (2 bytes per element, re-read by every block row): 256 x 128 moves 31% fewer bytes from L2
// than 128 x 256 for the same work.
//
// Per 64-wide K step: every thread copies (cp.async) 4 chunks of the token tile, the 32 code
// bytes it will decode (one weight row) and the row's 4 E4M3 scale bytes into a ring of STAGES
// stages, STAGES - 2 steps ahead; then decodes its 64 weights (NVFP4, arithmetically as in gemv.cu: E2M1 bits in
// the bf16 exponent field times the pre-multiplied scale, exact) into one of two decoded
// buffers, and its warpgroup issues the step's four wgmmas, leaving one step's wgmmas in
// flight while the next step is decoded.
//
// Operands are exactly the chunked path's (bf16 value * E4M3 scale, times 2^-7 here), so the
// two paths differ only in f32 summation order.
//
// Defines: STAGES (3..5), BN (256).

#ifndef STAGES
#define STAGES 4
#endif
#ifndef PROBE
#define PROBE 0
#endif
#define BM 256
#define BN 128
#define BK 64
#define X_STAGE (BN * BK * 2)        // token tile: 128 rows of 128 bytes
#define RAW_STAGE (BM * BK / 2)      // code bytes: 32 per thread
#define SC_STAGE (BM * 4)            // scale bytes: 4 per thread
#define STAGE_BYTES (X_STAGE + RAW_STAGE + SC_STAGE)
#define A_BUF (BM * BK * 2)          // decoded weight rows of one step
#define SMEM_BYTES (STAGES * STAGE_BYTES + 2 * A_BUF + 1024)

#define MAG_POS 6
#define ARITH_PRE 6.64613997892457936e35f /* 2^119 */
#define ARITH_GAIN 128.0f

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async4(u32 dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }
// Generic-proxy writes to shared memory (cp.async, st.shared) made visible to wgmma's reads.
__device__ __forceinline__ void fence_async_shared() {
    if (PROBE != 1) asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
__device__ __forceinline__ void wg_barrier(int wg) {
    asm volatile("bar.sync %0, 128;" ::"r"(wg + 1) : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }
// Keeps the compiler from moving accumulator accesses across the asynchronous wgmmas.
__device__ __forceinline__ void fence_acc(float* d) {
#pragma unroll
    for (int i = 0; i < 64; i++) asm volatile("" : "+f"(d[i])::"memory");
}
// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ u64 desc_sw128(u32 addr) {
    return (u64)((addr & 0x3ffffu) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}
// Exact product of a bf16 pair and a splatted scale (the -0 addend keeps signed zeros).
__device__ __forceinline__ u32 pair_scale(u32 a, u32 s) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(s), "r"(0x80008000u));
    return d;
}
// bf16 pair (nibble J, nibble J + 4) of `w` as value * 2^-126 (see gemv.cu, ARITH).
template <int J>
__device__ __forceinline__ u32 e2m1_pair(u32 w) {
    constexpr int up = MAG_POS - 4 * J;
    u32 mag;
    if constexpr (up >= 0) mag = w << up;
    else mag = w >> -up;
    mag &= 0x00070007u << MAG_POS;
    const u32 sgn = (w << (12 - 4 * J)) & 0x80008000u;
    return mag | sgn;
}
// D[64 x 128] += A[64 x 16] * B[16 x 128], both operands from shared memory (K-major, 128-byte
// swizzle), f32 accumulators in the m64n128 fragment layout.
__device__ __forceinline__ void wgmma_m64n128k16(float* d, u64 desc_a, u64 desc_b) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "n"(1));
}

__shared__ u32 scale_tab[256];

extern "C" __global__ void __launch_bounds__(256, 1)
gemm_sm90(const u8* __restrict__ codes, const u8* __restrict__ scales, const u16* __restrict__ x,
          u16* __restrict__ y, int M, int N, int K, float wfactor) {
    extern __shared__ u8 dyn[];
    const u32 tid = threadIdx.x;
    const int wg = (int)(tid >> 7);
    {
        const u16 h = f32_to_bf16(e4m3_decode(tid) * ARITH_PRE);
        scale_tab[tid] = (u32)h | ((u32)h << 16);
    }
    // The swizzle pattern repeats every 1024 bytes: tiles start on such a boundary.
    const u32 base = (smem_addr(dyn) + 1023u) & ~1023u;
    u8* const gbase = dyn + (base - smem_addr(dyn));
    const int n0 = (int)blockIdx.x * BM, m0 = (int)blockIdx.y * BN;
    const int steps = K / BK;

    // This thread's weight row (clamped: rows past N are computed, never stored).
    const int crow = min(n0 + (int)tid, N - 1);
    const u8* csrc = codes + (i64)crow * (K / 2);
    const u8* ssrc = scales + (i64)crow * (K / 16);
    // Its token-tile chunks: rows r0 + 32j, 16-byte chunk ch (the same swizzled slot in each).
    const int r0 = (int)(tid >> 3), ch = (int)(tid & 7);
    const u32 xdst = r0 * 128 + ((ch ^ (r0 & 7)) << 4);
    const u16* xsrc[4];
    u32 xbytes[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int m = m0 + r0 + 32 * j;
        // Token rows past M are zero-filled (src size 0) from a valid address.
        xsrc[j] = x + (i64)min(m, M - 1) * K + ch * 8;
        xbytes[j] = m < M ? 16u : 0u;
    }

    auto load = [&](int stage, int kt) {
        const u32 s = base + stage * STAGE_BYTES;
        const int k0 = kt * BK;
#pragma unroll
        for (int j = 0; j < 4; j++) cp_async16(s + xdst + 4096 * j, xsrc[j] + k0, xbytes[j]);
        cp_async16(s + X_STAGE + tid * 32, csrc + k0 / 2, 16u);
        cp_async16(s + X_STAGE + tid * 32 + 16, csrc + k0 / 2 + 16, 16u);
        cp_async4(s + X_STAGE + RAW_STAGE + tid * 4, ssrc + k0 / 16);
    };

    float acc[2][64];
#pragma unroll
    for (int b = 0; b < 2; b++)
#pragma unroll
        for (int i = 0; i < 64; i++) acc[b][i] = 0.0f;

#pragma unroll
    for (int s = 0; s < STAGES - 2; s++) {
        if (s < steps) load(s, s);
        cp_async_commit();
    }
    const int rl = (int)tid & 127;
    const u32 a_base = base + STAGES * STAGE_BYTES + wg * (A_BUF / 2);
    fence_acc(acc[0]);
    fence_acc(acc[1]);
    for (int kt = 0; kt < steps; kt++) {
        cp_async_wait<STAGES - 3>();
        fence_async_shared();
        // Stage kt is in for every thread, and both warpgroups have retired step kt - 2's
        // wgmmas: its ring slot may be refilled.
        __syncthreads();
        {
            const int nk = kt + STAGES - 2;
            if (nk < steps) load(nk % STAGES, nk);
            cp_async_commit();
        }
        const int stage = kt % STAGES;
        const u8* sp = gbase + stage * STAGE_BYTES;
        const uint4 w0 = *(const uint4*)(sp + X_STAGE + tid * 32);
        const uint4 w1 = *(const uint4*)(sp + X_STAGE + tid * 32 + 16);
        const u32 sc4 = *(const u32*)(sp + X_STAGE + RAW_STAGE + tid * 4);
        // Decoded buffer kt % 2 was last read by step kt - 2's wgmmas (retired).
        u8* arow = gbase + STAGES * STAGE_BYTES + (kt & 1) * A_BUF + wg * (A_BUF / 2) + rl * 128;
#pragma unroll
        for (int q = 0; q < 8 && PROBE != 2; q++) {
            const uint4& w = q < 4 ? w0 : w1;
            const u32 word = (q & 3) == 0 ? w.x : ((q & 3) == 1 ? w.y : ((q & 3) == 2 ? w.z : w.w));
            const u32 s = scale_tab[(sc4 >> (8 * (q >> 1))) & 0xffu];
            const u32 p0 = pair_scale(e2m1_pair<0>(word), s), p1 = pair_scale(e2m1_pair<1>(word), s);
            const u32 p2 = pair_scale(e2m1_pair<2>(word), s), p3 = pair_scale(e2m1_pair<3>(word), s);
            // (n0, n4) (n1, n5) (n2, n6) (n3, n7) -> elements 0..7 in order.
            const uint4 v = make_uint4(prmt(p0, p1, 0x5410u), prmt(p2, p3, 0x5410u),
                                       prmt(p0, p1, 0x7632u), prmt(p2, p3, 0x7632u));
            *(uint4*)(arow + ((q ^ (rl & 7)) << 4)) = v;
        }
        fence_async_shared();
        wg_barrier(wg);
        wgmma_fence();
        const u32 a_addr = a_base + (kt & 1) * A_BUF, b_addr = base + stage * STAGE_BYTES;
#pragma unroll
        for (int ks = 0; ks < BK / 16 && PROBE != 3; ks++) {
            const u64 db = desc_sw128(b_addr + 32 * ks);
            wgmma_m64n128k16(acc[0], desc_sw128(a_addr + 32 * ks), db);
            wgmma_m64n128k16(acc[1], desc_sw128(a_addr + 8192 + 32 * ks), db);
        }
        wgmma_commit();
        wgmma_wait<1>();
    }
    wgmma_wait<0>();
    fence_acc(acc[0]);
    fence_acc(acc[1]);

    // Epilogue: the warpgroup's 128 x 128 tile, transposed through shared memory (rows of 136
    // so that the fragment stores do not conflict), then 16-byte stores along y's rows.
    __syncthreads();
    u16* stg = (u16*)gbase + wg * (BN * 136);
    {
        const int warp = (int)(tid >> 5) & 3, lane = (int)(tid & 31), g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int b = 0; b < 2; b++)
#pragma unroll
            for (int j = 0; j < 16; j++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int token = 8 * j + 2 * t + (i & 1);
                    const int row = 64 * b + 16 * warp + g + 8 * (i >> 1);
                    stg[token * 136 + row] = f32_to_bf16(acc[b][4 * j + i] * wfactor);
                }
    }
    wg_barrier(wg);
    const bool vec = (N & 7) == 0;
    for (int c = (int)(tid & 127); c < BN * 16; c += 128) {
        const int token = c >> 4, cc = c & 15;
        const int m = m0 + token, n = n0 + 128 * wg + 8 * cc;
        if (m >= M || n >= N) continue;
        const u16* src = stg + token * 136 + 8 * cc;
        if (vec) {
            *(uint4*)(y + (i64)m * N + n) = *(const uint4*)src;
        } else {
            for (int e = 0; e < 8 && n + e < N; e++) y[(i64)m * N + n + e] = src[e];
        }
    }
}
