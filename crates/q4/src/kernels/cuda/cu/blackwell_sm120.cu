// Native NVFP4 W4A4 on consumer Blackwell (sm_120a, sm_121a / DGX Spark): the warp-level
// block-scaled MMA `mma.sync.m16n8k64.kind::mxf4nvf4.block_scale.scale_vec::4X` with UE4M3
// scales. Weights are the A operand (16 output rows), activations the B operand (8 rows).
// Both scale matrices are read from the 128x4-tiled ("swizzled") layout of FORMATS.md 3.7, in
// which the four scales of one row and one 64-wide k step are one aligned 32-bit word.
//
// Fragment layout (PTX ISA, m16n8k64 e2m1; lane = 4g + t):
//   A reg 0: row g,   k 8t..8t+7      reg 1: row g+8, k 8t..8t+7
//   A reg 2: row g,   k 32+8t..        reg 3: row g+8, k 32+8t..
//   B reg 0: col g,   k 8t..8t+7      reg 1: col g,   k 32+8t..
//   element k = 8t + i sits in nibble i (low nibble first), i.e. in storage order.
//   scale A (thread-id 0): lanes 4g supply row g, lanes 4g+1 row g+8; scale B: lanes 4g, col g;
//   byte j of the word scales k 16j..16j+15.
// kernels/cuda/blackwell.rs mirrors this addressing on the CPU as the test oracle.

__device__ __forceinline__ i64 swz(i64 r, i64 c, i64 kp) {
    return ((r / 128) * (kp / 4) + c / 4) * 512 + (r % 32) * 16 + ((r % 128) / 32) * 4 + (c % 4);
}

extern "C" __global__ void w4a4_sm120(const u8* __restrict__ w, const u8* __restrict__ ws_swz, int w_kp,
                                      const u8* __restrict__ xq, const u8* __restrict__ xs_swz, int x_kp,
                                      const float* __restrict__ s2x, float s2w, void* __restrict__ y,
                                      int N, int M, int K) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int tiles_n = (N + 15) / 16;
    if (warp >= (i64)tiles_n * ((M + 7) / 8)) return;
    const int n0 = (int)(warp % tiles_n) * 16, m0 = (int)(warp / tiles_n) * 8;
    const i64 row_bytes = K / 2;
    const int ra = n0 + g, rb = n0 + g + 8, rs = n0 + g + 8 * (lane & 1), mx = m0 + g;
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int kc = 0; kc < K / 64; kc++) {
        const i64 kb = (i64)kc * 32 + 4 * t;
        const u32 a0 = ra < N ? *(const u32*)(w + ra * row_bytes + kb) : 0u;
        const u32 a1 = rb < N ? *(const u32*)(w + rb * row_bytes + kb) : 0u;
        const u32 a2 = ra < N ? *(const u32*)(w + ra * row_bytes + kb + 16) : 0u;
        const u32 a3 = rb < N ? *(const u32*)(w + rb * row_bytes + kb + 16) : 0u;
        const u32 b0 = mx < M ? *(const u32*)(xq + mx * row_bytes + kb) : 0u;
        const u32 b1 = mx < M ? *(const u32*)(xq + mx * row_bytes + kb + 16) : 0u;
        const u32 sa = rs < N ? *(const u32*)(ws_swz + swz(rs, 4 * kc, w_kp)) : 0u;
        const u32 sb = mx < M ? *(const u32*)(xs_swz + swz(mx, 4 * kc, x_kp)) : 0u;
        const u16 zero = 0;
        asm volatile(
            "mma.sync.aligned.m16n8k64.row.col.kind::mxf4nvf4.block_scale.scale_vec::4X.f32.e2m1.e2m1.f32.ue4m3 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3}, %10, {%12,%12}, %11, {%12,%12};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(sa), "r"(sb), "h"(zero));
    }
    const float alpha = __fmul_rn(*s2x, s2w);
#pragma unroll
    for (int c = 0; c < 4; c++) {
        const int n = n0 + g + 8 * (c >> 1), m = m0 + 2 * t + (c & 1);
        if (n < N && m < M) store_elem<OUT_T>(y, (i64)m * N + n, d[c] * alpha);
    }
}
