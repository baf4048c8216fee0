// Shared by the standalone probes in this folder (each built alone with nvcc, see its header).
#pragma once
#include <cuda_runtime.h>

// Launches `kernel` with 256-thread blocks; with `early`, allowed to start before the kernel
// ahead of it in the stream has finished (programmatic dependent launch), as q4's GEMV does.
template <typename... P, typename... A>
static void launch_256(void (*kernel)(P...), int blocks, bool early, A... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(256);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = early ? 1 : 0;
    cudaLaunchKernelEx(&cfg, kernel, args...);
}

// Device-to-device copy bandwidth as `q4 bench gpu-linear` reports it (bytes read + written per
// second, GB/s): the best of 5 batches of 5 copies of `bytes` from `src` to `dst`.
static double copy_gbs(const void* src, void* dst, size_t bytes) {
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    float best = 1e30f;
    cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice);
    for (int rep = 0; rep < 5; rep++) {
        cudaEventRecord(a);
        for (int c = 0; c < 5; c++) cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice);
        cudaEventRecord(b);
        cudaEventSynchronize(b);
        float t = 0.0f;
        cudaEventElapsedTime(&t, a, b);
        best = t < best ? t : best;
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return 2.0 * bytes * 5 / (best * 1e-3) * 1e-9;
}
