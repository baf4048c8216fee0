// One decode step of q4-llm's runner on a CUDA device (model/cuda_step.rs), compiled by q4's NVRTC
// cache after common.cuh. The token and its position are read from device memory (`tp`: token,
// position), so that one captured CUDA graph serves every step. The residual stream, the
// queries and the KV cache are f32 (the eager path's dtype); the projections' inputs and outputs
// are bf16 (what the fused GEMV takes).
//
// Each kernel starts with `pdl_trigger(); pdl_wait();` (common.cuh): launched early
// (programmatic dependent launch), it lets the next kernel start (a GEMV then loads its first
// weights) and waits for the previous one before it reads or writes anything.

// resid = table[token] (rows of n; TABLE_BF16 picks the table's dtype).
extern "C" __global__ void embed(const void* __restrict__ table, const u32* __restrict__ tp,
                                 float* __restrict__ resid, int n, int table_bf16) {
    pdl_trigger();
    pdl_wait();
    const i64 row = (i64)tp[0] * n;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        resid[i] = table_bf16 ? bf16_to_f32(((const u16*)table)[row + i]) : ((const float*)table)[row + i];
}

// resid += delta (bf16; skipped when delta is null), then out = bf16(resid / rms(resid) * w).
// One block.
extern "C" __global__ void add_rmsnorm(float* __restrict__ resid, const u16* __restrict__ delta,
                                       const float* __restrict__ w, u16* __restrict__ out, int n,
                                       float eps) {
    pdl_trigger();
    pdl_wait();
    __shared__ float sh[32];
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = resid[i];
        if (delta != 0) {
            v += bf16_to_f32(delta[i]);
            resid[i] = v;
        }
        ss += v * v;
    }
    const float inv = 1.0f / sqrtf(block_sum(ss, sh) / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = f32_to_bf16(resid[i] * inv * w[i]);
}

// The new position's q, k and v from the fused projection's output qkv = [q (hq d) | k (hkv d) |
// v (hkv d)] (bf16): bias added (when given, f32), q and k normalised per head (Qwen3, when
// given: weights of d f32) and rotated (NeoX halves, cos / sin tables [positions][d / 2] at row
// *pos); q to q_out (f32, hq d), k and v into the caches [hkv][cap][d] (f32) at *pos.
// Block h: q heads, then k heads, then v heads; blockDim.x = d / 2 rounded up to a warp.
extern "C" __global__ void qkv_rope_append(const u16* __restrict__ qkv, const float* __restrict__ bias,
                                           const float* __restrict__ q_norm, const float* __restrict__ k_norm,
                                           float eps, const float* __restrict__ cos_t,
                                           const float* __restrict__ sin_t, const u32* __restrict__ tp,
                                           float* __restrict__ q_out, float* __restrict__ k_cache,
                                           float* __restrict__ v_cache, int hq, int hkv, int d, int cap) {
    pdl_trigger();
    pdl_wait();
    __shared__ float sh[32];
    const int head = blockIdx.x, half = d / 2, i = threadIdx.x;
    const u32 p = tp[1];
    const int kind = head < hq ? 0 : head < hq + hkv ? 1 : 2;  // q, k, v
    const i64 at = (i64)head * d;
    float a = 0.0f, b = 0.0f;
    if (i < half) {
        a = bf16_to_f32(qkv[at + i]);
        b = bf16_to_f32(qkv[at + i + half]);
        if (bias != 0) {
            a += bias[at + i];
            b += bias[at + i + half];
        }
    }
    const float* norm = kind == 0 ? q_norm : kind == 1 ? k_norm : 0;
    if (norm != 0) {  // the same for the whole block
        const float inv = 1.0f / sqrtf(block_sum(a * a + b * b, sh) / (float)d + eps);
        if (i < half) {
            a = a * inv * norm[i];
            b = b * inv * norm[i + half];
        }
    }
    if (i >= half) return;
    if (kind == 2) {
        float* dst = v_cache + ((i64)(head - hq - hkv) * cap + p) * d;
        dst[i] = a;
        dst[i + half] = b;
        return;
    }
    const float c = cos_t[(i64)p * half + i], s = sin_t[(i64)p * half + i];
    const float ra = a * c - b * s, rb = b * c + a * s;
    float* dst = kind == 0 ? q_out + at : k_cache + ((i64)(head - hq) * cap + p) * d;
    dst[i] = ra;
    dst[i + half] = rb;
}

// Single-query attention over the cached positions 0..=*pos: out[h] = bf16(softmax(q_h . K *
// scale) . V) for q head h on kv head h / (hq / hkv). One block of ATTEND_THREADS (a define, 256
// or 512) threads per q head; HEAD_DIM (a define) divides 256 and is a multiple of 4, so that
// the loops below unroll and each thread issues its loads together instead of one round trip
// after another. Scores: cap floats of dynamic shared memory.
#define D HEAD_DIM
#define QUADS (D / 4)                     // threads per value row (4 dims each)
#define GROUPS (ATTEND_THREADS / QUADS)   // value rows summed at once
extern "C" __global__ void __launch_bounds__(ATTEND_THREADS) attend(const float* __restrict__ q, const float* __restrict__ k_cache,
                                  const float* __restrict__ v_cache, const u32* __restrict__ tp,
                                  u16* __restrict__ out, int hq, int hkv, int cap, float scale) {
    pdl_trigger();
    pdl_wait();
    extern __shared__ float sc[];
    __shared__ float sh[32];
    __shared__ __align__(16) float4 qs[QUADS];
    __shared__ __align__(16) float4 part[GROUPS][QUADS];
    const int head = blockIdx.x, kvh = head / (hq / hkv), tid = threadIdx.x;
    const int len = (int)tp[1] + 1;
    const float4* kb = (const float4*)(k_cache + (i64)kvh * cap * D);
    const float4* vb = (const float4*)(v_cache + (i64)kvh * cap * D);
    if (tid < QUADS) {
        float4 x = ((const float4*)(q + (i64)head * D))[tid];
        x.x *= scale; x.y *= scale; x.z *= scale; x.w *= scale;
        qs[tid] = x;
    }
    __syncthreads();
    // Scores: a thread per position, its key row loaded whole before the products.
    float m = -3.0e38f;
    for (int t = tid; t < len; t += ATTEND_THREADS) {
        const float4* kr = kb + (i64)t * QUADS;
        float4 k[QUADS];
#pragma unroll
        for (int j = 0; j < QUADS; j++) k[j] = kr[j];
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < QUADS; j++) {
            const float4 x = qs[j];
            s += k[j].x * x.x + k[j].y * x.y + k[j].z * x.z + k[j].w * x.w;
        }
        sc[t] = s;
        m = fmaxf(m, s);
    }
    m = block_max(m, sh);
    float z = 0.0f;
    for (int t = tid; t < len; t += ATTEND_THREADS) {
        const float e = __expf(sc[t] - m);
        sc[t] = e;
        z += e;
    }
    z = block_sum(z, sh);  // its barriers also publish sc
    // Weighted values: thread (g, c) adds dims 4c..4c+3 of rows g, g + GROUPS, ..., four rows
    // loaded before any is used.
    const int g = tid / QUADS, c = tid % QUADS;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int t0 = g; t0 < len; t0 += 4 * GROUPS) {
        float4 v[4];
        float p[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int t = t0 + u * GROUPS;
            v[u] = vb[(i64)(t < len ? t : 0) * QUADS + c];
            p[u] = t < len ? sc[t] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            acc.x += p[u] * v[u].x; acc.y += p[u] * v[u].y;
            acc.z += p[u] * v[u].z; acc.w += p[u] * v[u].w;
        }
    }
    part[g][c] = acc;
    __syncthreads();
    if (tid < D) {
        const float* pf = (const float*)part;
        float v = 0.0f;
#pragma unroll 8
        for (int k = 0; k < GROUPS; k++) v += pf[k * D + tid];
        out[(i64)head * D + tid] = f32_to_bf16(v / z);
    }
}
#undef D
#undef QUADS
#undef GROUPS

// act = bf16(silu(gate) * up) with gate_up = [gate (n) | up (n)] (bf16).
extern "C" __global__ void silu_mul(const u16* __restrict__ gu, u16* __restrict__ act, int n) {
    pdl_trigger();
    pdl_wait();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float g = bf16_to_f32(gu[i]), u = bf16_to_f32(gu[n + i]);
        act[i] = f32_to_bf16(g / (1.0f + __expf(-g)) * u);
    }
}

// dst = f32(src) for n bf16 values (the logits).
extern "C" __global__ void widen_bf16(const u16* __restrict__ src, float* __restrict__ dst, int n) {
    pdl_trigger();
    pdl_wait();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        dst[i] = bf16_to_f32(src[i]);
}

// Sum of the products of 8 bf16 pairs.
__device__ __forceinline__ float dot8_bf16(uint4 a, uint4 b) {
    const u32 aw[4] = {a.x, a.y, a.z, a.w}, bw[4] = {b.x, b.y, b.z, b.w};
    float s = 0.0f;
#pragma unroll
    for (int e = 0; e < 4; e++) {
        s = fmaf(u2f(aw[e] << 16), u2f(bw[e] << 16), s);
        s = fmaf(u2f(aw[e] & 0xffff0000u), u2f(bw[e] & 0xffff0000u), s);
    }
    return s;
}

// y = W x for a dense bf16 weight [n][k] and bf16 x (the output layer of a model whose
// embeddings are bf16), f32 accumulate and output: cuBLAS's bf16 matmul at batch 1 read this
// 57 MB table at ~0.5 TB/s. 8 warps a block, each warp 4 rows whose 16-byte pieces it loads
// together; x staged in shared memory (k / 8 uint4 of dynamic shared memory); k % 8 == 0.
extern "C" __global__ void __launch_bounds__(256) gemv_bf16(const u16* __restrict__ w, const u16* __restrict__ x,
                                                            float* __restrict__ y, int n, int k) {
    pdl_trigger();
    pdl_wait();
    extern __shared__ uint4 xs[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, k8 = k / 8;
    for (int i = tid; i < k8; i += 256) xs[i] = ((const uint4*)x)[i];
    __syncthreads();
    const int row0 = (blockIdx.x * 8 + warp) * 4;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int j = lane; j < k8; j += 32) {
        uint4 wv[4];
#pragma unroll
        for (int r = 0; r < 4; r++)
            wv[r] = row0 + r < n ? ((const uint4*)(w + (i64)(row0 + r) * k))[j] : make_uint4(0, 0, 0, 0);
        const uint4 xv = xs[j];
#pragma unroll
        for (int r = 0; r < 4; r++) acc[r] += dot8_bf16(wv[r], xv);
    }
#pragma unroll
    for (int r = 0; r < 4; r++) {
        float v = acc[r];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0 && row0 + r < n) y[row0 + r] = v;
    }
}
