// Quantizers, bit-exact with q4-formats: the same IEEE operations in the same order, with
// explicit round-to-nearest intrinsics so that no contraction or approximation can creep in.
// Inputs are f32 (bf16/f16 tensors are widened exactly before the call).

// max |x| as ordered bit patterns (NaN/Inf compare above every finite value, as on the CPU).
// With zero_nonfinite, NaN/Inf count as 0 (NonFinite::Zero).
extern "C" __global__ void amax_bits(const float* __restrict__ x, i64 n, u32* __restrict__ out,
                                     int zero_nonfinite) {
    u32 m = 0;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        u32 a = f2u(x[i]) & 0x7fffffffu;
        if (zero_nonfinite && a >= 0x7f800000u) a = 0;
        m = max(m, a);
    }
    m = warp_max_u32(m);
    if ((threadIdx.x & 31) == 0 && m != 0) atomicMax(out, m);
}

// Index of the first NaN/Inf (out starts at ~0).
extern "C" __global__ void first_nonfinite(const float* __restrict__ x, i64 n, u64* __restrict__ out) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        if ((f2u(x[i]) & 0x7fffffffu) >= 0x7f800000u) atomicMin(out, (u64)i);
    }
}

// The swizzled (128x4-tiled) offset of scale (r, c) in a matrix of kp (multiple of 4) columns,
// FORMATS.md section 3.7; the native FP4 kernels read activation scales in this layout.
__device__ __forceinline__ i64 swizzled_offset(i64 r, i64 c, i64 kp) {
    return ((r / 128) * (kp / 4) + c / 4) * 512 + (r % 32) * 16 + ((r % 128) / 32) * 4 + (c % 4);
}

// Loads the N values of a block starting at column c0 of `row` into v: columns past `cols`
// (padding) and non-finite values become 0, as on the CPU. Returns the block's largest
// magnitude as f32 bits.
template <int N>
__device__ __forceinline__ u32 load_block(const float* __restrict__ x, int row, int cols, int c0,
                                          float* v) {
    u32 m = 0;
#pragma unroll
    for (int i = 0; i < N; i++) {
        float xv = (c0 + i < cols) ? x[(i64)row * cols + c0 + i] : 0.0f;
        u32 a = f2u(xv) & 0x7fffffffu;
        if (a >= 0x7f800000u) { xv = 0.0f; a = 0; }
        v[i] = xv;
        m = max(m, a);
    }
    return m;
}

// NVFP4 (ModelOpt): one thread per block of 16. The tensor scale is `s2_fixed`, or, with
// `dynamic`, fl(amax / 2688) from the device-side amax bits (W4A4 activations). Writes the
// tensor scale to s2_out when given. swizzle_kp > 0 writes the scales in the swizzled layout.
extern "C" __global__ void nvfp4_quant(const float* __restrict__ x, u8* __restrict__ codes,
                                       u8* __restrict__ scales, int rows, int cols, int pc,
                                       const u32* __restrict__ amax, float s2_fixed, int dynamic,
                                       float* __restrict__ s2_out, int swizzle_kp) {
    const float s2 = dynamic ? __fdiv_rn(u2f(*amax), 2688.0f) : s2_fixed;
    const int nb = pc / 16;
    const i64 total = (i64)rows * nb;
    if (s2_out != 0 && blockIdx.x == 0 && threadIdx.x == 0) *s2_out = s2;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
        const int row = (int)(t / nb), b = (int)(t % nb);
        const int c0 = b * 16;
        float v[16];
        const u32 m = load_block<16>(x, row, cols, c0, v);
        u32 sbyte;
        u32 lo = 0, hi = 0;
        if (s2 == 0.0f) {
            sbyte = 0x38u;
        } else {
            float ps = __fdiv_rn(u2f(m), __fmul_rn(6.0f, s2));
            if (ps == 0.0f) ps = 1.0f;
            ps = ps < (1.0f / 512.0f) ? (1.0f / 512.0f) : (ps > 448.0f ? 448.0f : ps);
            sbyte = e4m3_encode(ps);
            const float tsc = __fmul_rn(e4m3_decode(sbyte), s2);
#pragma unroll
            for (int i = 0; i < 16; i++) {
                const float q = __fdiv_rn(v[i], tsc);
                const u32 code = e2m1_mag(fabsf(q)) | ((q < 0.0f) ? 8u : 0u);
                if (i < 8) lo |= code << (4 * i);
                else hi |= code << (4 * (i - 8));
            }
        }
        *(uint2*)(codes + (i64)row * (pc / 2) + c0 / 2) = make_uint2(lo, hi);
        const i64 so = swizzle_kp > 0 ? swizzled_offset(row, b, swizzle_kp) : (i64)row * nb + b;
        scales[so] = (u8)sbyte;
    }
}

// Rounds an f32 to bfloat16 (RNE) and back.
__device__ __forceinline__ float round_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }

// MXFP4 shared exponent (q4_formats::mxfp4::scale_byte). rule: 0 RCEIL, 1 FLOOR, 2 EVEN.
__device__ __forceinline__ u32 mx_scale_byte(u32 amax_bits, int rule, int bf16_input) {
    const float amax = u2f(amax_bits);
    if (rule == 0) {
        float descale = __fdiv_rn(amax, 6.0f);
        if (bf16_input) descale = round_bf16(descale);
        if (descale == 0.0f) return 0;
        float l = (float)log2((double)descale);
        l = ceilf(l);
        l = l < -127.0f ? -127.0f : (l > 127.0f ? 127.0f : l);
        return (u32)((int)l + 127);
    }
    u32 bits = amax_bits;
    if (rule == 2) {
        bits = bf16_input ? ((((bits >> 16) + (1u << 5)) & 0x7f80u) << 16) : ((bits + (1u << 21)) & 0xff800000u);
    }
    if (amax == 0.0f) bits = 0x00800000u;
    int e = (int)((bits >> 23) & 0xffu) - 127 - 2;
    e = e < -127 ? -127 : (e > 128 ? 128 : e);
    return (u32)(e + 127);
}

// MXFP4: one thread per block of 32; IEEE sign bit decides the sign (-0.0 -> 0x8).
extern "C" __global__ void mxfp4_quant(const float* __restrict__ x, u8* __restrict__ codes,
                                       u8* __restrict__ scales, int rows, int cols, int pc,
                                       int rule, int bf16_input) {
    const int nb = pc / 32;
    const i64 total = (i64)rows * nb;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
        const int row = (int)(t / nb), b = (int)(t % nb);
        const int c0 = b * 32;
        float v[32];
        const u32 m = load_block<32>(x, row, cols, c0, v);
        const u32 s = mx_scale_byte(m, rule, bf16_input);
        u32 w[4] = {0, 0, 0, 0};
        if (rule == 0) {
            const float mul = s == 0 ? 1.0f : pow2f(127 - (int)s);
#pragma unroll
            for (int i = 0; i < 32; i++) {
                const float q = __fmul_rn(v[i], mul);
                const u32 code = e2m1_mag(fabsf(q)) | ((f2u(q) >> 31) << 3);
                w[i >> 3] |= code << (4 * (i & 7));
            }
        } else {
            const float div = fmaxf(e8m0_decode(s), 1.17549435e-38f);
#pragma unroll
            for (int i = 0; i < 32; i++) {
                const float q = __fdiv_rn(v[i], div);
                const u32 code = e2m1_mag(fabsf(q)) | ((f2u(q) >> 31) << 3);
                w[i >> 3] |= code << (4 * (i & 7));
            }
        }
        *(uint4*)(codes + (i64)row * (pc / 2) + c0 / 2) = make_uint4(w[0], w[1], w[2], w[3]);
        scales[(i64)row * nb + b] = (u8)s;
    }
}

// bitsandbytes code of a scaled value: number of thresholds strictly below y (NF4), mapped
// through the sorted code order for FP4.
__device__ __forceinline__ u32 bnb_code(float y, int nf4) {
    u32 c = 0;
    if (nf4) {
#pragma unroll
        for (int i = 0; i < 15; i++) c += (u32)(y > u2f(NF4_TH_BITS[i]));
        return c;
    }
#pragma unroll
    for (int i = 0; i < 15; i++) c += (u32)(y > u2f(FP4_TH_BITS[i]));
    return FP4_SORTED[c];
}

// bitsandbytes NF4/FP4: one warp per block of bs over the flat tensor. Full blocks scale by
// x * fl(1 / max(absmax, 1e-38)) and store absmax; the tail block divides by the clamped
// absmax and stores it (bitsandbytes 0.50 CPU). An odd element count pads the last low nibble
// with the code of 0.
extern "C" __global__ void bnb_quant(const float* __restrict__ x, u8* __restrict__ codes,
                                     float* __restrict__ absmax, i64 n, int bs, int nf4) {
    const int lane = threadIdx.x & 31;
    const i64 nblocks = (n + bs - 1) / bs;
    const i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 blk = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; blk < nblocks; blk += warps) {
        const i64 start = blk * bs;
        const i64 end = min(start + bs, n);
        const bool tail = end - start < bs;
        u32 m = 0;
        for (i64 i = start + lane; i < end; i += 32) {
            u32 a = f2u(x[i]) & 0x7fffffffu;
            if (a >= 0x7f800000u) a = 0;
            m = max(m, a);
        }
        m = warp_max_u32(m);
        const float am = u2f(m);
        const float clamped = fmaxf(am, 1e-38f);
        const float inv = __fdiv_rn(1.0f, clamped);
        const u32 pad = bnb_code(0.0f, nf4);
        for (i64 e = start + 2 * lane; e < end; e += 64) {
            float x0 = x[e];
            if ((f2u(x0) & 0x7fffffffu) >= 0x7f800000u) x0 = 0.0f;
            const u32 hi = bnb_code(tail ? __fdiv_rn(x0, clamped) : __fmul_rn(x0, inv), nf4);
            u32 lo = pad;
            if (e + 1 < end) {
                float x1 = x[e + 1];
                if ((f2u(x1) & 0x7fffffffu) >= 0x7f800000u) x1 = 0.0f;
                lo = bnb_code(tail ? __fdiv_rn(x1, clamped) : __fmul_rn(x1, inv), nf4);
            }
            codes[e >> 1] = (u8)((hi << 4) | lo);
        }
        if (lane == 0) absmax[blk] = tail ? clamped : am;
    }
}

// Row-major [rows][cols] scale bytes -> the swizzled layout of a [ceil(rows/128)*128][kp]
// matrix (kp = ceil(cols/4)*4); padding entries are written as 0.
extern "C" __global__ void swizzle_scales(const u8* __restrict__ src, u8* __restrict__ dst, int rows,
                                          int cols, int kp) {
    const i64 mp = (i64)((rows + 127) / 128) * 128;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < mp * kp; i += (i64)gridDim.x * blockDim.x) {
        const i64 r = i / kp, c = i % kp;
        dst[swizzled_offset(r, c, kp)] = (r < rows && c < cols) ? src[r * cols + c] : (u8)0;
    }
}
