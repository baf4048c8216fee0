// Exact NVFP4 W4A4 (kernels/cpu/w4a4.rs): per block of 16 the integer dot product of doubled
// E2M1 values times the two E4M3 scales as integers (x 2^9 each), summed exactly in i64,
// rounded once to f32 and scaled by 2^-20 * alpha, alpha = s2x * s2w. The sum is exact, so the
// order of accumulation (threads, warps) cannot change the result: bit-identical with the CPU.
// Defined per module: OUT_T.

// 2 * E2M1 value of a code as an integer (code 8, -0, is 0).
__device__ __forceinline__ int e2m1_x2(u32 c) {
    const int mag = (int)((0xC8643210u >> (4 * (c & 7u))) & 15u);
    return (c & 8u) ? -mag : mag;
}

// E4M3 value x 2^9 as an integer; -1 marks NaN (0x7f / 0xff).
__device__ __forceinline__ i64 e4m3_x512(u32 b) {
    const u32 e = (b >> 3) & 15u, m = b & 7u;
    if (e == 15u && m == 7u) return -1;
    const i64 mag = e == 0u ? (i64)m : ((i64)(8u + m) << (e - 1u));
    return (b & 0x80u) ? -mag : mag;
}

// One warp per (weight row n, activation row m); lanes stride over the blocks.
// w: [N][row_bytes], ws: [N][blocks]; xq: [M][row_bytes], xs: [M][blocks]; y: [M][N].
extern "C" __global__ void w4a4_exact(const u8* __restrict__ w, const u8* __restrict__ ws,
                                      const u8* __restrict__ xq, const u8* __restrict__ xs,
                                      const float* __restrict__ s2x, float s2w,
                                      void* __restrict__ y, int N, int M, int blocks) {
    const int lane = threadIdx.x & 31;
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= (i64)N * M) return;
    const int n = (int)(warp % N), m = (int)(warp / N);
    const i64 row_bytes = (i64)blocks * 8;
    i64 acc = 0;
    int nan = 0;
    for (int b = lane; b < blocks; b += 32) {
        const uint2 wc = *(const uint2*)(w + (i64)n * row_bytes + (i64)b * 8);
        const uint2 xc = *(const uint2*)(xq + (i64)m * row_bytes + (i64)b * 8);
        int dot = 0;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            const u32 ww = (i < 8 ? wc.x : wc.y) >> (4 * (i & 7));
            const u32 xx = (i < 8 ? xc.x : xc.y) >> (4 * (i & 7));
            dot += e2m1_x2(ww & 15u) * e2m1_x2(xx & 15u);
        }
        const i64 sx = e4m3_x512(xs[(i64)m * blocks + b]);
        const i64 sw = e4m3_x512(ws[(i64)n * blocks + b]);
        const bool xnan = (xs[(i64)m * blocks + b] & 0x7fu) == 0x7fu;
        const bool wnan = (ws[(i64)n * blocks + b] & 0x7fu) == 0x7fu;
        if (xnan || wnan) nan = 1;
        else acc += (i64)dot * sx * sw;
    }
    for (int o = 16; o > 0; o >>= 1) {
        acc += __shfl_xor_sync(0xffffffffu, acc, o);
        nan |= __shfl_xor_sync(0xffffffffu, nan, o);
    }
    if (lane == 0) {
        const float alpha = __fmul_rn(*s2x, s2w);
        const float v = nan ? u2f(0x7fc00000u)
                            : __fmul_rn(__fmul_rn(__ll2float_rn(acc), 9.5367431640625e-07f), alpha);
        store_elem<OUT_T>(y, (i64)m * N + n, v);
    }
}
