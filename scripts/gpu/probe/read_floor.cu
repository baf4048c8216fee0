// Read floor: how long does the GPU take just to read a GEMV-sized weight, with nothing else to
// do, in the way `q4 bench gpu-linear` times the GEMV (back-to-back launches over rotating
// buffers, CUDA events around a batch of calls), with and without programmatic dependent launch
// (the GEMV's early start)? Next to it, in the same process: the device-to-device copy of 1 GiB
// (what `%copy` divides by) and one 1 GiB read in a single kernel (the sustained read rate).
// Build and run on the GPU machine:
//   nvcc -O3 -arch=sm_90 read_floor.cu -o read_floor && ./read_floor
#include <cstdio>
#include <initializer_list>
#include <cuda_runtime.h>
#include "probe_util.cuh"

// Element j of w (zeros past n16), bypassing L1 as the GEMV's weight loads do.
__device__ __forceinline__ uint4 load16(const uint4* __restrict__ w, size_t j, size_t n16) {
    uint4 r = make_uint4(0, 0, 0, 0);
    if (j < n16)
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                     : "l"(w + j));
    return r;
}

// Every warp streams contiguous 512-byte pieces (one 16-byte load per lane), DEPTH loads in
// flight, over a grid-stride loop; with PDL the first loads are issued before
// `griddepcontrol.wait`, as the GEMV issues its first weight loads before waiting for the kernel
// ahead. The XOR of everything read is kept so that no load is dead.
template <int DEPTH, bool PDL>
__global__ void __launch_bounds__(256) read_all(const uint4* __restrict__ w, size_t n16, unsigned* out) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned acc = 0;
    uint4 v[DEPTH];
#pragma unroll
    for (int d = 0; d < DEPTH; d++) {
        const size_t j = i + d * stride;
        v[d] = load16(w, j, n16);
    }
    if (PDL) asm volatile("griddepcontrol.wait;" ::: "memory");
    for (; i < n16; i += DEPTH * stride) {
#pragma unroll
        for (int d = 0; d < DEPTH; d++) {
            acc ^= v[d].x ^ v[d].y ^ v[d].z ^ v[d].w;
            const size_t j = i + (d + DEPTH) * stride;
            v[d] = load16(w, j, n16);
        }
    }
    if (acc == 0x12345678u) out[0] = acc;
}

template <int DEPTH, bool PDL>
void launch(const char* buf, size_t bytes, int blocks, unsigned* out) {
    launch_256(read_all<DEPTH, PDL>, blocks, PDL, (const uint4*)buf, bytes / 16, out);
}

// Median of 5 batches of `calls` back-to-back reads of `bytes`, each from the next of the
// rotating copies in `total` bytes: microseconds per call.
template <int DEPTH, bool PDL>
double time_reads(const char* buf, size_t total, size_t bytes, int calls, unsigned* out) {
    int per_sm = 0, sms = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, read_all<DEPTH, PDL>, 256, 0);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    const size_t slot = (bytes + 4095) / 4096 * 4096;
    const int copies = (int)(total / slot);
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    float t[5];
    for (int warm = 0; warm < 3; warm++) launch<DEPTH, PDL>(buf, bytes, sms * per_sm, out);
    for (int rep = 0; rep < 5; rep++) {
        cudaEventRecord(a);
        for (int c = 0; c < calls; c++) launch<DEPTH, PDL>(buf + (c % copies) * slot, bytes, sms * per_sm, out);
        cudaEventRecord(b);
        cudaEventSynchronize(b);
        cudaEventElapsedTime(&t[rep], a, b);
    }
    for (int x = 0; x < 5; x++)
        for (int y = x + 1; y < 5; y++)
            if (t[y] < t[x]) { float s = t[x]; t[x] = t[y]; t[y] = s; }
    return t[2] * 1e3 / calls;
}

int main() {
    const size_t total = 1ull << 30;
    char *buf, *dst;
    unsigned* out;
    cudaMalloc(&buf, total);
    cudaMalloc(&dst, total);
    cudaMalloc(&out, 4);
    cudaMemset(buf, 1, total);
    cudaMemset(dst, 0, total);
    cudaDeviceProp p;
    cudaGetDeviceProperties(&p, 0);
    printf("# %s, %d SMs\n", p.name, p.multiProcessorCount);

    // Copy bandwidth as `q4 bench gpu-linear` measures it: 1 GiB, bytes read + written.
    const double copy_gbs = ::copy_gbs(buf, dst, total);
    printf("copy 1 GiB: %.0f GB/s (read + write)\n", copy_gbs);

    {
        const double us = time_reads<4, false>(buf, total, total, 5, out);
        printf("read 1 GiB, one kernel, depth 4: %8.1f us %6.0f GB/s (%.1f%% of copy)\n", us, total / us * 1e-3,
               100.0 * total / us * 1e-3 / copy_gbs);
    }
    // 8192x8192 NVFP4 (codes + E4M3 scales), 28672x4096, and Qwen3-4B's q/k/v, o, gate/up, down.
    for (size_t bytes : {37748736ull, 66060288ull, 8847360ull, 5898240ull, 28016640ull, 14008320ull}) {
        for (int pdl = 0; pdl < 2; pdl++) {
            const double u2 = pdl ? time_reads<2, true>(buf, total, bytes, 40, out) : time_reads<2, false>(buf, total, bytes, 40, out);
            const double u4 = pdl ? time_reads<4, true>(buf, total, bytes, 40, out) : time_reads<4, false>(buf, total, bytes, 40, out);
            const double u = u2 < u4 ? u2 : u4;
            printf("read %6.2f MB back to back, %s: depth 2 %6.1f us, depth 4 %6.1f us; best %6.0f GB/s (%.1f%% of copy)\n",
                   bytes * 1e-6, pdl ? "early start (PDL)" : "plain           ", u2, u4, bytes / u * 1e-3,
                   100.0 * bytes / u * 1e-3 / copy_gbs);
        }
    }
    cudaError_t e = cudaDeviceSynchronize();
    printf("status: %s\n", cudaGetErrorString(e));
    return 0;
}
