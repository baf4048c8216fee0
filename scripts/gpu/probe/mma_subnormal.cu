// Do the tensor cores keep subnormal operands? One mma.sync.m16n8k16 per operand type with
// every A element the same subnormal value s and every B element 2^k, so each output is exactly
// 16 * s * 2^k when subnormals are kept and 0 when they are flushed.
// Build: nvcc -O3 -arch=sm_90 mma_subnormal.cu -o mma_subnormal && ./mma_subnormal
#include <cstdio>
#include <cuda_runtime.h>

template <bool BF16>
__global__ void probe(unsigned a_bits, unsigned b_bits, float* out) {
    const unsigned a = a_bits | (a_bits << 16), b = b_bits | (b_bits << 16);
    float c[4] = {0, 0, 0, 0};
    if (BF16)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a), "r"(a), "r"(a), "r"(a), "r"(b), "r"(b));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a), "r"(a), "r"(a), "r"(a), "r"(b), "r"(b));
    if (threadIdx.x == 0) out[0] = c[0];
}

int main() {
    float* d;
    cudaMalloc(&d, 4);
    struct Case { bool bf16; unsigned a, b; double expect; const char* what; };
    // bf16 0x0040 = 2^-127 (subnormal), 0x7300 = 2^103: 16 * 2^-24 = 2^-20
    // f16 0x0200 = 2^-15 (subnormal), 0x4c00 = 2^4: 16 * 2^-11 = 2^-7
    Case cases[] = {
        {true, 0x0040u, 0x7300u, 16.0 * 0x1p-127 * 0x1p103, "bf16 subnormal 2^-127 x 2^103"},
        {true, 0x0080u, 0x7300u, 16.0 * 0x1p-126 * 0x1p103, "bf16 normal 2^-126 x 2^103"},
        {false, 0x0200u, 0x4c00u, 16.0 * 0x1p-15 * 16.0, "f16 subnormal 2^-15 x 2^4"},
        {false, 0x0001u, 0x4c00u, 16.0 * 0x1p-24 * 16.0, "f16 subnormal 2^-24 x 2^4"},
    };
    for (const Case& c : cases) {
        if (c.bf16) probe<true><<<1, 32>>>(c.a, c.b, d);
        else probe<false><<<1, 32>>>(c.a, c.b, d);
        float h = -1;
        cudaMemcpy(&h, d, 4, cudaMemcpyDeviceToHost);
        printf("%-34s got %.6e expect %.6e -> %s\n", c.what, h, c.expect, h == (float)c.expect ? "kept" : "FLUSHED/WRONG");
    }
    printf("status: %s\n", cudaGetErrorString(cudaGetLastError()));
}
