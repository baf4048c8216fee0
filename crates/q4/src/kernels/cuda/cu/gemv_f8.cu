// Batch-1 NVFP4 GEMV on Hopper's FP8 tensor cores (sm_90a): y[n] = wfactor * sum_k W[n, k] x[k]
// for bf16 activations.
//
// E2M1 is exact in E4M3 (magnitude to bits 2-4, sign to bit 7: the value times 2^-6), so a
// 32-bit code word becomes two E4M3 operand words in two or three integer operations each
// (`f8_lo`, `f8_hi`), where the 16-bit operands of gemv.cu take twelve and four bf16x2 scale
// multiplies. `mma.sync` with E4M3 operands is not native on sm_90 (ptxas expands it into f16
// HMMAs), so a warpgroup issues wgmma.m64n8k32 with A (its 64 rows' decoded weights) from
// registers and B from shared memory.
//
// The block scale cannot ride in an E4M3 operand (E2M1 x E4M3 needs more significant bits), so
// it is applied to f32 block sums, and batch 1 leaves room for that in B's eight columns:
// thread t of a row quad holds 8 weights of one 16-value block per wgmma (word wi of its 16
// code bytes: k 4t .. 4t + 3 the even elements, k 16 + 4t .. the odd ones), and B column 2t + j
// holds activation term j at thread t's k positions only (zeros elsewhere). D[row][2t + j] is
// then the sum over thread t's own weights, and it lands in thread t's own accumulators. Two
// wgmmas (words 2h, 2h + 1) make block h's sums, scaled once by its E4M3 value in f32.
//
// Activations: two E4M3 terms, hi = rn(x) and lo = rn(x - hi), after a power-of-two scale that
// brings the block's K slice's largest magnitude to [2^7, 2^8]. A bf16 activation's remainder
// has at most four significant bits, so hi + lo is exact wherever lo stays an E4M3 normal (down
// to about 2^-12 of the slice's largest value; below, an absolute error under 2^-17 of it). A
// slice with an infinity or NaN gives NaN sums. The block stages its slice once, as B tiles of
// 256 bytes per wgmma (1 KiB per 128-wide step), after the wait for the kernel ahead; the first
// weight loads are issued before that wait.
//
// Block: one warpgroup over one tile of 64 rows and one K slice. Grid: row tiles x `split` K
// slices; with split > 1 each block writes its slice's f32 sums to `partial` and counts itself
// in at its tile's counter, and the tile's last block adds the slices in slice order (as
// gemv_reduce would, without a second kernel in the stream: 1.3-2.4 us a call) and resets the
// counter for the next call. Both buffers are kept across calls (a fresh one inside a captured
// CUDA graph is an allocation node, which keeps the next kernel from starting early). Rows past N read row N - 1 and are not stored. K is a multiple of 128.
// Held to 96 registers, so that five blocks fit a multiprocessor (at 110, four did, and
// shapes of 600-700 blocks took a second wave).
//
// Defines: OUT_T.

#define THREADS 128

__device__ __forceinline__ u32 f8_lo(u32 w) {
    // Low nibbles (elements 0, 2, 4, 6): magnitude to bits 2-4, sign from bit 3 to bit 5, then
    // to bit 7 (adding three times a set bit 5 carries it there and no further).
    const u32 v = (w << 2) & 0x3c3c3c3cu;
    return v + (v & 0x20202020u) * 3u;
}
__device__ __forceinline__ u32 f8_hi(u32 w) {
    // High nibbles (elements 1, 3, 5, 7): the sign is already at bit 7.
    return ((w >> 2) & 0x1c1c1c1cu) | (w & 0x80808080u);
}
__device__ __forceinline__ uint4 ld_stream(const u8* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}
__device__ __forceinline__ u32 ld_u16(const u8* p) {
    unsigned short r;
    asm volatile("ld.global.nc.u16 %0, [%1];" : "=h"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ uint4 ld_act(const u16* p) {
    uint4 r;
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// D[64 x 8] (+)= A[64 x 32] (registers, E4M3) * B[32 x 8] (shared memory, K-major, no swizzle).
template <int ACCUM>
__device__ __forceinline__ void wgmma_f8(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u64 desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0,%1,%2,%3}, {%4,%5,%6,%7}, %8, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "n"(ACCUM));
}
__device__ __forceinline__ void fence4(float* d) {
#pragma unroll
    for (int i = 0; i < 4; i++) asm volatile("" : "+f"(d[i])::"memory");
}
// Two E4M3 bytes (low byte first) -> f32.
__device__ __forceinline__ void e4m3x2_f32(u32 b2, float& lo, float& hi) {
    u32 h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"((unsigned short)b2));
    asm("cvt.f32.f16 %0, %1;" : "=f"(lo) : "h"((unsigned short)(h2 & 0xffffu)));
    asm("cvt.f32.f16 %0, %1;" : "=f"(hi) : "h"((unsigned short)(h2 >> 16)));
}
// Scaled activations a, b -> their hi and lo E4M3 terms, each as a byte pair (a low).
__device__ __forceinline__ void f8_terms(float a, float b, u32& hi, u32& lo) {
    u32 xh, hf, r;
    unsigned short h, l;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(xh) : "f"(b), "f"(a));
    asm("cvt.rn.satfinite.e4m3x2.f16x2 %0, %1;" : "=h"(h) : "r"(xh));
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(hf) : "h"(h));
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(xh), "r"(hf));
    asm("cvt.rn.satfinite.e4m3x2.f16x2 %0, %1;" : "=h"(l) : "r"(r));
    hi = h;
    lo = l;
}
__device__ __forceinline__ uint4 one_word(int at, u32 v) {
    return make_uint4(at == 0 ? v : 0u, at == 1 ? v : 0u, at == 2 ? v : 0u, at == 3 ? v : 0u);
}

// A compile-time buffer index for the step lambda.
template <int V>
struct Idx {
    static constexpr int value = V;
};

struct Frag {
    uint4 w[2];  // rows g and g + 8: 16 code bytes each
    u32 s[2];    // their two E4M3 block scales
};

extern "C" __global__ void __launch_bounds__(THREADS, 5)
gemv_f8(const u8* __restrict__ codes, const u8* __restrict__ scales, const u16* __restrict__ x,
        void* __restrict__ y, float* __restrict__ partial, u32* __restrict__ counters, int N, int K, float wfactor,
        int split) {
    extern __shared__ __align__(1024) uint4 xs[];  // the block's B tiles: 64 words a step
    __shared__ u32 wmax[THREADS / 32];
    __shared__ u32 last;
    const int tid = (int)threadIdx.x, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int steps = K >> 7, per = (steps + split - 1) / split;
    const int tile = (int)blockIdx.x / split, ky = (int)blockIdx.x % split;
    const int s0 = ky * per, s1 = min(steps, s0 + per);
    const int row = tile * 64 + 16 * (tid >> 5) + g;  // and row + 8
    const i64 rb = K >> 1, sb = K >> 4;
    const u8* c0 = codes + (i64)min(row, N - 1) * rb + 16 * t;
    const u8* c1 = codes + (i64)min(row + 8, N - 1) * rb + 16 * t;
    const u8* q0 = scales + (i64)min(row, N - 1) * sb + 2 * t;
    const u8* q1 = scales + (i64)min(row + 8, N - 1) * sb + 2 * t;
    auto load = [&](Frag& f, int st) {
        if (st >= s1) return;
        f.w[0] = ld_stream(c0 + (i64)st * 64);
        f.w[1] = ld_stream(c1 + (i64)st * 64);
        f.s[0] = ld_u16(q0 + (i64)st * 8);
        f.s[1] = ld_u16(q1 + (i64)st * 8);
    };
    Frag fa, fb;
    load(fa, s0);
    load(fb, s0 + 1);
    pdl_wait();

    // Stage the block's slice: chunk c (8 values) is word wi = c % 4 of thread t' = (c / 4) % 4's
    // 32 values of step s0 + c / 16. First the slice's largest magnitude (bf16 bits), then the
    // terms under the scale that brings it to [2^7, 2^8] (the second pass reads the row again,
    // from L1 / L2: holding it would cost registers).
    const int nch = (s1 - s0) * 16;
    const u16* xs0 = x + (i64)s0 * 128;
    u32 m = 0;
    for (int c = tid; c < nch; c += THREADS) {
        const uint4 v = ld_act(xs0 + 8 * c);
        m = __vmaxu2(m, __vmaxu2(v.x & 0x7fff7fffu, v.y & 0x7fff7fffu));
        m = __vmaxu2(m, __vmaxu2(v.z & 0x7fff7fffu, v.w & 0x7fff7fffu));
    }
    m = warp_max_u32(max(m & 0xffffu, m >> 16));
    if (lane == 0) wmax[tid >> 5] = m;
    __syncthreads();
    m = max(max(wmax[0], wmax[1]), max(wmax[2], wmax[3]));
    // 2^up brings the largest magnitude (bf16 exponent field m >> 7) to [2^7, 2^8].
    const int up = max(min(134 - (int)(m >> 7), 126), -126);
    const float upf = pow2f(up);
    const float xdown = m >= 0x7f80u ? u2f(0x7fc00000u) : pow2f(6 - up);
    for (int c = tid; c < nch; c += THREADS) {
        const uint4 v = ld_act(xs0 + 8 * c);
        const u32 wv[4] = {v.x, v.y, v.z, v.w};
        float e[8];
#pragma unroll
        for (int q = 0; q < 4; q++) {
            e[2 * q] = u2f(wv[q] << 16) * upf;
            e[2 * q + 1] = u2f(wv[q] & 0xffff0000u) * upf;
        }
        u32 h02, l02, h46, l46, h13, l13, h57, l57;
        f8_terms(e[0], e[2], h02, l02);
        f8_terms(e[4], e[6], h46, l46);
        f8_terms(e[1], e[3], h13, l13);
        f8_terms(e[5], e[7], h57, l57);
        // Tile (step, wi): core 0 (the even elements) then core 1 (the odd), rows 2t' (hi) and
        // 2t' + 1 (lo) of 16 bytes, thread t's word at 4t'; the other words of those rows zero.
        const int tp = (c >> 2) & 3, wi = c & 3;
        uint4* tile_p = xs + ((c >> 4) * 4 + wi) * 16;
        tile_p[2 * tp] = one_word(tp, h02 | (h46 << 16));
        tile_p[2 * tp + 1] = one_word(tp, l02 | (l46 << 16));
        tile_p[8 + 2 * tp] = one_word(tp, h13 | (h57 << 16));
        tile_p[8 + 2 * tp + 1] = one_word(tp, l13 | (l57 << 16));
    }
    __syncthreads();

    // K-major B without swizzle: 8-row x 16-byte core matrices, the two along K 128 bytes apart.
    const u32 xbase = (u32)__cvta_generic_to_shared(xs);
    const u64 dbase = (u64)((xbase & 0x3ffffu) >> 4) | ((u64)(128 >> 4) << 16) | ((u64)(256 >> 4) << 32);
    float acc0 = 0.0f, acc2 = 0.0f;
    u32 A[2][4][4];
    float S[2][2][2];
    auto decode = [&](u32 (&a)[4][4], float (&s)[2][2], const Frag& f) {
#pragma unroll
        for (int wi = 0; wi < 4; wi++) {
            const u32 w0 = wi == 0 ? f.w[0].x : wi == 1 ? f.w[0].y : wi == 2 ? f.w[0].z : f.w[0].w;
            const u32 w1 = wi == 0 ? f.w[1].x : wi == 1 ? f.w[1].y : wi == 2 ? f.w[1].z : f.w[1].w;
            a[wi][0] = f8_lo(w0);
            a[wi][1] = f8_lo(w1);
            a[wi][2] = f8_hi(w0);
            a[wi][3] = f8_hi(w1);
        }
        e4m3x2_f32(f.s[0], s[0][0], s[0][1]);
        e4m3x2_f32(f.s[1], s[1][0], s[1][1]);
    };
    // Step st's wgmmas from buffer B, the next step's decode while they run, then its sums.
    auto step = [&](auto bsel, int st, Frag& fnext) {
        constexpr int B = decltype(bsel)::value;
        float d[2][4];
        // The operands are complete before the fence (else ptxas fences between the wgmmas).
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) asm volatile("" : "+r"(A[B][i][j]));
        wg_fence();
        const u64 desc = dbase + (u64)((st - s0) * 64);
        wgmma_f8<0>(d[0], A[B][0][0], A[B][0][1], A[B][0][2], A[B][0][3], desc);
        wgmma_f8<1>(d[0], A[B][1][0], A[B][1][1], A[B][1][2], A[B][1][3], desc + 16);
        wgmma_f8<0>(d[1], A[B][2][0], A[B][2][1], A[B][2][2], A[B][2][3], desc + 32);
        wgmma_f8<1>(d[1], A[B][3][0], A[B][3][1], A[B][3][2], A[B][3][3], desc + 48);
        wg_commit();
        if (st + 1 < s1) {
            decode(A[1 - B], S[1 - B], fnext);
            load(fnext, st + 3);
        }
        wg_wait0();
        fence4(d[0]);
        fence4(d[1]);
        acc0 = fmaf(d[0][0] + d[0][1], S[B][0][0], acc0);
        acc2 = fmaf(d[0][2] + d[0][3], S[B][1][0], acc2);
        acc0 = fmaf(d[1][0] + d[1][1], S[B][0][1], acc0);
        acc2 = fmaf(d[1][2] + d[1][3], S[B][1][1], acc2);
    };
    if (s0 < s1) {
        decode(A[0], S[0], fa);
        load(fa, s0 + 2);
        int st = s0;
        for (; st + 1 < s1; st += 2) {
            step(Idx<0>{}, st, fb);
            step(Idx<1>{}, st + 1, fa);
        }
        if (st < s1) step(Idx<0>{}, st, fb);
    }
    // The quad's four sums, in a fixed order.
    acc0 += __shfl_xor_sync(0xffffffffu, acc0, 1);
    acc2 += __shfl_xor_sync(0xffffffffu, acc2, 1);
    acc0 += __shfl_xor_sync(0xffffffffu, acc0, 2);
    acc2 += __shfl_xor_sync(0xffffffffu, acc2, 2);
    const float r[2] = {acc0 * xdown, acc2 * xdown};
    if (split == 1) {
#pragma unroll
        for (int h = 0; h < 2; h++)
            if (t == 0 && row + 8 * h < N) store_elem<OUT_T>(y, row + 8 * h, r[h] * wfactor);
        return;
    }
#pragma unroll
    for (int h = 0; h < 2; h++)
        if (t == 0 && row + 8 * h < N) partial[(i64)ky * N + row + 8 * h] = r[h];
    // Visible device-wide before the count (the CUDA programming guide's last-block pattern).
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(counters + tile, 1u) == (u32)(split - 1);
    __syncthreads();
    if (!last) return;
    __threadfence();
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int n = row + 8 * h;
        if (t != 0 || n >= N) continue;
        float v = 0.0f;
        for (int s = 0; s < split; s++) v += __ldcg(partial + (i64)s * N + n);
        store_elem<OUT_T>(y, n, v * wfactor);
    }
    if (tid == 0) counters[tile] = 0;
}
