// Whole-tensor (or row-chunk) decode: value = codebook[nibble] * block_scale * mul.
// With mul == 1 the result is bit-identical with q4-formats' CPU decode; the GEMM path passes a
// power of two (exact) to keep f16 operands in range and applies the inverse to the output.
// Defined per module: OUT_T (T_F32 / T_BF16 / T_F16).

// Writes 16 consecutive output values: vectorised when `aligned`, else one by one up to `n`.
__device__ __forceinline__ void store16(void* out, i64 base, const float* v, bool aligned, int n) {
    if (aligned && n == 16) {
        if (OUT_T == T_F32) {
            float4* o = (float4*)((float*)out + base);
            o[0] = make_float4(v[0], v[1], v[2], v[3]);
            o[1] = make_float4(v[4], v[5], v[6], v[7]);
            o[2] = make_float4(v[8], v[9], v[10], v[11]);
            o[3] = make_float4(v[12], v[13], v[14], v[15]);
        } else {
            u32 w[8];
#pragma unroll
            for (int i = 0; i < 8; i++) {
                u32 lo, hi;
                if (OUT_T == T_BF16) { lo = f32_to_bf16(v[2 * i]); hi = f32_to_bf16(v[2 * i + 1]); }
                else { lo = f32_to_f16(v[2 * i]); hi = f32_to_f16(v[2 * i + 1]); }
                w[i] = lo | (hi << 16);
            }
            uint4* o = (uint4*)((u16*)out + base);
            o[0] = make_uint4(w[0], w[1], w[2], w[3]);
            o[1] = make_uint4(w[4], w[5], w[6], w[7]);
        }
        return;
    }
    for (int i = 0; i < n; i++) store_elem<OUT_T>(out, base + i, v[i]);
}

// Rows of NVFP4 (scale_kind 0: E4M3 per 16), MXFP4 (1: E8M0 per 32), both low nibble first,
// or bitsandbytes (2: f32 absmax per 1 << block over the flat tensor, high nibble first; needs
// cols % 16 == 0). One thread per 8 code bytes (16 values, inside one block). `codes`, `scales`
// and `out` point at the first row of the chunk; `row0` is its index (bitsandbytes scales are
// indexed from the tensor's start).
extern "C" __global__ void dequant_rows(const u8* __restrict__ codes, const void* __restrict__ scales,
                                        void* __restrict__ out, int rows, int cols, int row_bytes,
                                        int row_blocks, int block, int scale_kind, int cb,
                                        float s2, float mul, int row0) {
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = u2f(CB_BITS[cb][threadIdx.x]);
    __syncthreads();
    const int units = row_bytes >> 3;
    // Blocks stride over rows, threads over a row's 8-byte units (no integer division).
    for (int row = blockIdx.x; row < rows; row += gridDim.x)
    for (int j = threadIdx.x; j < units; j += blockDim.x) {
        const int c0 = j * 16;
        if (c0 >= cols) continue;
        float scale;
        if (scale_kind == 2) {
            scale = ((const float*)scales)[((i64)(row0 + row) * cols + c0) >> block] * mul;
        } else {
            const u8 sb = ((const u8*)scales)[(i64)row * row_blocks + c0 / block];
            scale = (scale_kind == 0 ? e4m3_decode(sb) * s2 : e8m0_decode(sb)) * mul;
        }
        const uint2 w = *(const uint2*)(codes + (i64)row * row_bytes + (i64)j * 8);
        float v[16];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const u32 byte = ((i < 4 ? w.x : w.y) >> (8 * (i & 3))) & 0xffu;
            const u32 first = scale_kind == 2 ? (byte >> 4) : (byte & 15u);
            const u32 second = scale_kind == 2 ? (byte & 15u) : (byte >> 4);
            v[2 * i] = lut[first] * scale;
            v[2 * i + 1] = lut[second] * scale;
        }
        const int n = min(16, cols - c0);
        store16(out, (i64)row * cols + c0, v, (cols & 15) == 0, n);
    }
}

// bitsandbytes: blocks of `bs` over the flat tensor, first element in the high nibble, f32
// absmax per block (bs = 1 << bs_shift). Decodes flat elements [e_begin, e_end) into
// out[0 .. e_end - e_begin).
extern "C" __global__ void dequant_flat(const u8* __restrict__ codes, const float* __restrict__ absmax,
                                        void* __restrict__ out, i64 e_begin, i64 e_end,
                                        i64 code_len, int bs_shift, int cb, float mul) {
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = u2f(CB_BITS[cb][threadIdx.x]);
    __syncthreads();
    const i64 first = e_begin & ~(i64)15;
    const i64 units = (e_end - first + 15) >> 4;
    for (i64 u = (i64)blockIdx.x * blockDim.x + threadIdx.x; u < units;
         u += (i64)gridDim.x * blockDim.x) {
        const i64 e0 = first + u * 16;
        const float scale = absmax[e0 >> bs_shift] * mul;
        u8 b[8];
        if ((e0 >> 1) + 8 <= code_len) {
            const uint2 w = *(const uint2*)(codes + (e0 >> 1));
#pragma unroll
            for (int i = 0; i < 8; i++) b[i] = (u8)(((i < 4 ? w.x : w.y) >> (8 * (i & 3))) & 0xffu);
        } else {
            for (int i = 0; i < 8; i++) b[i] = ((e0 >> 1) + i < code_len) ? codes[(e0 >> 1) + i] : 0;
        }
        float v[16];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            v[2 * i] = lut[b[i] >> 4] * scale;
            v[2 * i + 1] = lut[b[i] & 15u] * scale;
        }
        const i64 lo = max(e0, e_begin), hi = min(e0 + 16, e_end);
        if (lo == e0 && hi == e0 + 16) {
            store16(out, e0 - e_begin, v, ((e0 - e_begin) & 15) == 0, 16);
        } else {
            for (i64 e = lo; e < hi; e++) store_elem<OUT_T>(out, e - e_begin, v[e - e0]);
        }
    }
}
