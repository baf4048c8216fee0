// Read-bandwidth probe: how fast can the GPU stream a 4-bit weight matrix with the fused GEMV's
// access pattern (each warp instruction covers ROWS rows x (512/ROWS) contiguous bytes) versus
// fully coalesced reads? Build and run on the GPU machine:
//   nvcc -O3 -arch=sm_90 access_pattern.cu -o probe && ./probe
#include <cstdio>
#include <initializer_list>
#include <cuda_runtime.h>

// Each warp owns 16 rows and a K slice of them. A warp instruction covers 32 / LPR rows x
// 16 * LPR contiguous bytes (LPR lanes per row); a step is two instructions (1 KiB), like the
// fused GEMV's. The warp walks its rows in groups of 2 * (32 / LPR), each group along the slice,
// DEPTH steps of loads in flight.
template <int LPR, int DEPTH>
__global__ void __launch_bounds__(256) stream(const uint4* __restrict__ w, int rows, int row_bytes,
                                              int slices, unsigned* out) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    constexpr int rpi = 32 / LPR, groups = 16 / (2 * rpi), step_bytes = 16 * LPR;
    const int tiles = rows / 128;
    const int slice_bytes = row_bytes / slices;
    const int steps = slice_bytes / step_bytes;
    unsigned acc = 0;
    for (int item = blockIdx.x; item < tiles * slices; item += gridDim.x) {
        const int tile = item / slices, ky = item % slices;
        for (int grp = 0; grp < groups; grp++) {
            const int row0 = tile * 128 + warp * 16 + grp * 2 * rpi;
            for (int s0 = 0; s0 < steps; s0 += DEPTH) {
                uint4 v[DEPTH][2];
#pragma unroll
                for (int d = 0; d < DEPTH; d++)
#pragma unroll
                    for (int j = 0; j < 2; j++) {
                        const int r = row0 + j * rpi + lane / LPR;
                        const char* p = (const char*)w + (size_t)r * row_bytes + (size_t)ky * slice_bytes +
                                        (size_t)(s0 + d) * step_bytes + 16 * (lane % LPR);
                        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                                     : "=r"(v[d][j].x), "=r"(v[d][j].y), "=r"(v[d][j].z), "=r"(v[d][j].w)
                                     : "l"(p));
                    }
#pragma unroll
                for (int d = 0; d < DEPTH; d++)
#pragma unroll
                    for (int j = 0; j < 2; j++) acc ^= v[d][j].x ^ v[d][j].y ^ v[d][j].z ^ v[d][j].w;
            }
        }
    }
    if (acc == 0x12345678u) out[0] = acc;
}

template <int LPR, int DEPTH>
void run(const char* name, char* buf, size_t total, int rows, int row_bytes, int slices, unsigned* out) {
    if (row_bytes / slices < 16 * LPR * DEPTH) return;
    int per_sm = 0, sms = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, stream<LPR, DEPTH>, 256, 0);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    const size_t mat = (size_t)rows * row_bytes;
    const int copies = (int)(total / mat);
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    float best[5];
    for (int rep = 0; rep < 5; rep++) {
        cudaEventRecord(a);
        for (int c = 0; c < 40; c++)
            stream<LPR, DEPTH><<<sms * per_sm, 256>>>((const uint4*)(buf + (c % copies) * mat), rows, row_bytes, slices, out);
        cudaEventRecord(b);
        cudaEventSynchronize(b);
        cudaEventElapsedTime(&best[rep], a, b);
    }
    float m = best[0];
    for (float x : best) m = x < m ? x : m;
    const double us = m * 1e3 / 40;
    printf("%-34s rows=%6d row_bytes=%5d slices=%2d blocks/SM=%d: %7.1f us  %6.0f GB/s\n", name, rows, row_bytes,
           slices, per_sm, us, mat / us * 1e-3);
}

int main() {
    const size_t total = 512ull << 20;
    char* buf;
    unsigned* out;
    cudaMalloc(&buf, total);
    cudaMalloc(&out, 4);
    cudaMemset(buf, 1, total);
    for (int shape = 0; shape < 2; shape++) {
        const int rows = shape == 0 ? 8192 : 28672, row_bytes = shape == 0 ? 4096 : 2048;
        for (int slices : {1, 4, 8}) {
            run<4, 2>("gemv: 8 rows x 64 B/instr, depth 2", buf, total, rows, row_bytes, slices, out);
            run<8, 2>("4 rows x 128 B, depth 2", buf, total, rows, row_bytes, slices, out);
            run<16, 2>("2 rows x 256 B, depth 2", buf, total, rows, row_bytes, slices, out);
            run<32, 2>("1 row x 512 B, depth 2", buf, total, rows, row_bytes, slices, out);
            run<4, 4>("8 rows x 64 B, depth 4", buf, total, rows, row_bytes, slices, out);
            run<32, 4>("1 row x 512 B, depth 4", buf, total, rows, row_bytes, slices, out);
        }
    }
    cudaError_t e = cudaDeviceSynchronize();
    printf("status: %s\n", cudaGetErrorString(e));
    return 0;
}
