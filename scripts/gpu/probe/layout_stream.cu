// Does the order of a 4-bit weight in memory limit the batch-1 GEMV's read rate? Loads only (no
// decode), with the fused GEMV's geometry at batch 1 on 8192x8192 and 28672x4096 NVFP4: blocks of
// 8 warps own 16-row tiles (persistent blocks looping over tiles), the warps split K eight ways,
// each thread loads 16 bytes of rows g and g + 8 and their two E4M3 scale bytes a 128-wide step,
// two steps in flight, launched early (PDL). Layouts:
//   0 row-major (the checkpoint's order; what the GEMV reads today), warp w walks steps
//     [w * S/8, (w + 1) * S/8);
//   1 row-major, warp w walks steps w, w + 8, w + 16, ... (a block's warps read adjacent bytes);
//   2 step-major tiles: the 1 KiB of codes (16 rows x 64 B) of each (step, tile) contiguous, rows
//     in order inside it, chunks ordered step-major (all tiles of step 0, then of step 1, ...),
//     so that one warp instruction reads 512 contiguous bytes and the blocks, at the same step,
//     sweep a contiguous region together; scales likewise (128 B per chunk);
//   3 tiles ordered tile-major (a tile's steps contiguous: each warp streams one contiguous run).
// Next to them, the plain grid-stride read of the same bytes (the read floor).
// Build here with the toolchain's nvcc (its lib folder as CUDA_LIB), carry the binary, run it on
// the GPU machine with the CUDA 13 libraries on LD_LIBRARY_PATH (scripts/gpu/env.sh):
//   nvcc -O3 -arch=sm_90 -std=c++17 -cudart shared layout_stream.cu -L$CUDA_LIB -o layout_stream
// Results of 2026-11-29: scripts/gpu/results/h200-2026-11-29-s33/call1-layout-stream.txt.
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>
#include "probe_util.cuh"

typedef unsigned char u8;

template <bool HINT>
__device__ __forceinline__ uint4 ld16(const u8* p) {
    uint4 r;
    if (HINT)
        asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    else
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
__device__ __forceinline__ unsigned ld2(const u8* p) {
    unsigned short r;
    asm volatile("ld.global.nc.u16 %0, [%1];" : "=h"(r) : "l"(p));
    return r;
}

struct Step {
    uint4 a, b;
    unsigned sa, sb;
};

template <int LAYOUT, bool HINT>
__device__ __forceinline__ Step load_step(const u8* codes, const u8* scales, int tiles, int steps,
                                          int row_bytes, int tile, int ks, int g, int t) {
    Step s;
    if (LAYOUT == 2 || LAYOUT == 3) {
        const size_t chunk = LAYOUT == 2 ? (size_t)ks * tiles + tile : (size_t)tile * steps + ks;
        const u8* c = codes + chunk * 1024 + 64 * g + 16 * t;
        const u8* sc = scales + chunk * 128 + 8 * g + 2 * t;
        s.a = ld16<HINT>(c);
        s.b = ld16<HINT>(c + 512);
        s.sa = ld2(sc);
        s.sb = ld2(sc + 64);
    } else {
        const size_t r0 = (size_t)tile * 16 + g;
        const u8* c = codes + r0 * row_bytes + ks * 64 + 16 * t;
        const u8* sc = scales + r0 * (row_bytes / 8) + ks * 8 + 2 * t;
        s.a = ld16<HINT>(c);
        s.b = ld16<HINT>(c + 8 * (size_t)row_bytes);
        s.sa = ld2(sc);
        s.sb = ld2(sc + 8 * (size_t)(row_bytes / 8));
    }
    return s;
}

template <int LAYOUT, bool HINT>
__global__ void __launch_bounds__(256) gemv_loads(const u8* __restrict__ codes, const u8* __restrict__ scales,
                                                  int tiles, int steps, int row_bytes, unsigned* out) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int per = steps / 8;
    unsigned acc = 0;
    bool waited = false;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        auto ks_of = [&](int s) { return LAYOUT == 1 ? w + 8 * s : w * per + s; };
        Step v0 = load_step<LAYOUT, HINT>(codes, scales, tiles, steps, row_bytes, tile, ks_of(0), g, t);
        Step v1 = per > 1 ? load_step<LAYOUT, HINT>(codes, scales, tiles, steps, row_bytes, tile, ks_of(1), g, t) : v0;
        if (!waited) {
            asm volatile("griddepcontrol.wait;" ::: "memory");
            waited = true;
        }
        for (int s = 0; s < per; s += 2) {
            acc ^= v0.a.x ^ v0.a.y ^ v0.a.z ^ v0.a.w ^ v0.b.x ^ v0.b.y ^ v0.b.z ^ v0.b.w ^ v0.sa ^ v0.sb;
            if (s + 2 < per) v0 = load_step<LAYOUT, HINT>(codes, scales, tiles, steps, row_bytes, tile, ks_of(s + 2), g, t);
            if (s + 1 < per) {
                acc ^= v1.a.x ^ v1.a.y ^ v1.a.z ^ v1.a.w ^ v1.b.x ^ v1.b.y ^ v1.b.z ^ v1.b.w ^ v1.sa ^ v1.sb;
                if (s + 3 < per) v1 = load_step<LAYOUT, HINT>(codes, scales, tiles, steps, row_bytes, tile, ks_of(s + 3), g, t);
            }
        }
    }
    if (acc == 0x12345678u) out[0] = acc;
}

__global__ void __launch_bounds__(256) read_all(const uint4* __restrict__ w, size_t n16, unsigned* out) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned acc = 0;
    uint4 v[2];
    for (int d = 0; d < 2; d++) {
        const size_t j = i + d * stride;
        v[d] = j < n16 ? w[j] : make_uint4(0, 0, 0, 0);
    }
    asm volatile("griddepcontrol.wait;" ::: "memory");
    for (; i < n16; i += 2 * stride) {
        for (int d = 0; d < 2; d++) {
            acc ^= v[d].x ^ v[d].y ^ v[d].z ^ v[d].w;
            const size_t j = i + (d + 2) * stride;
            v[d] = j < n16 ? w[j] : make_uint4(0, 0, 0, 0);
        }
    }
    if (acc == 0x12345678u) out[0] = acc;
}

static float median5(float* t) {
    for (int x = 0; x < 5; x++)
        for (int y = x + 1; y < 5; y++)
            if (t[y] < t[x]) { float s = t[x]; t[x] = t[y]; t[y] = s; }
    return t[2];
}

// Median of 5 batches of 20 back-to-back launches over rotating copies: us per call.
template <typename L>
static double time_calls(L launch_one, int copies) {
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    float t[5];
    for (int c = 0; c < 3; c++) launch_one(c % copies);
    for (int rep = 0; rep < 5; rep++) {
        cudaEventRecord(a);
        for (int c = 0; c < 20; c++) launch_one((rep * 20 + c) % copies);
        cudaEventRecord(b);
        cudaEventSynchronize(b);
        cudaEventElapsedTime(&t[rep], a, b);
    }
    return median5(t) * 1e3 / 20;
}

template <int LAYOUT, bool HINT>
static void run(const char* name, const u8* buf, size_t slot, int copies, int rows, int k, unsigned* out, int sms) {
    int per_sm = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gemv_loads<LAYOUT, HINT>, 256, 0);
    const int tiles = rows / 16, steps = k / 128, row_bytes = k / 2;
    const size_t code_bytes = (size_t)rows * row_bytes;
    const int blocks = tiles < sms * per_sm ? tiles : sms * per_sm;
    const double us = time_calls(
        [&](int c) {
            const u8* base = buf + (size_t)c * slot;
            launch_256(gemv_loads<LAYOUT, HINT>, blocks, true, base, base + code_bytes, tiles, steps, row_bytes, out);
        },
        copies);
    const double bytes = code_bytes * 1.125;
    printf("%-44s %5dx%-5d blocks %4d: %6.1f us %6.0f GB/s\n", name, rows, k, blocks, us, bytes / us * 1e-3);
}

int main() {
    const size_t total = 1ull << 30;
    u8* buf;
    unsigned* out;
    cudaMalloc(&buf, total);
    cudaMalloc(&out, 4);
    cudaMemset(buf, 1, total);
    cudaDeviceProp p;
    cudaGetDeviceProperties(&p, 0);
    int sms = p.multiProcessorCount;
    printf("# %s, %d SMs\n", p.name, sms);
    {
        u8* dst;
        cudaMalloc(&dst, total);
        printf("copy 1 GiB: %.0f GB/s (read + write)\n", copy_gbs(buf, dst, total));
        cudaFree(dst);
    }
    for (int round = 0; round < 2; round++) {
        for (int shape = 0; shape < 2; shape++) {
            const int rows = shape == 0 ? 8192 : 28672, k = shape == 0 ? 8192 : 4096;
            const size_t bytes = (size_t)rows * k / 2 * 9 / 8;
            const size_t slot = (bytes + 4095) / 4096 * 4096;
            const int copies = (int)(total / slot);
            run<0, true>("row-major, slices (today's GEMV), 128B lines", buf, slot, copies, rows, k, out, sms);
            run<0, false>("row-major, slices, no line hint", buf, slot, copies, rows, k, out, sms);
            run<1, true>("row-major, warps interleave steps, 128B", buf, slot, copies, rows, k, out, sms);
            run<2, false>("step-major 1 KiB tiles", buf, slot, copies, rows, k, out, sms);
            run<2, true>("step-major 1 KiB tiles, 128B lines", buf, slot, copies, rows, k, out, sms);
            run<3, false>("tile-major 1 KiB tiles", buf, slot, copies, rows, k, out, sms);
            int per_sm = 0;
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, read_all, 256, 0);
            const double us = time_calls(
                [&](int c) {
                    launch_256(read_all, sms * per_sm, true, (const uint4*)(buf + (size_t)c * slot), bytes / 16, out);
                },
                copies);
            printf("%-44s %5dx%-5d            : %6.1f us %6.0f GB/s\n", "read floor (grid-stride)", rows, k, us,
                   bytes / us * 1e-3);
        }
    }
    cudaError_t e = cudaDeviceSynchronize();
    printf("status: %s\n", cudaGetErrorString(e));
    return 0;
}
