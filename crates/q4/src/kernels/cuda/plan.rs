//! Which CUDA kernel serves which call, as a pure function of the compute capability, format
//! and batch size. Compiled in every build so that `q4 doctor` can say what a CUDA build would
//! do on this machine's GPUs.

use serde::Serialize;

use crate::Format;

/// Largest activation batch the fused dequantize-on-the-fly GEMV serves; larger batches
/// dequantize chunks of the weight (up to 128 MB) and run cuBLAS.
pub const FUSED_MAX_BATCH: usize = 64;

/// The kernels a format uses on one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CudaPlan {
    /// Batches 1..=FUSED_MAX_BATCH.
    pub decode: &'static str,
    /// Larger batches (prefill).
    pub prefill: &'static str,
    /// NVFP4 activation quantization (W4A4); `n/a` for other formats.
    pub w4a4: &'static str,
}

/// NVRTC in CUDA 13 targets sm_75 and newer.
pub fn arch_supported(cc: (u32, u32)) -> bool {
    cc >= (7, 5)
}

/// `mma.sync.m16n8k16` with f16 operands (sm_80+), used by the fused GEMV.
pub fn has_mma_f16(cc: (u32, u32)) -> bool {
    cc >= (8, 0)
}

/// Blackwell FP4 tensor cores.
pub fn has_fp4_tensor_cores(cc: (u32, u32)) -> bool {
    matches!(cc.0, 10..=12)
}

/// The target q4's native block-scaled FP4 kernel is compiled for on this device: the warp-level
/// `mma.sync ... kind::mxf4nvf4.block_scale` of sm_120a / sm_121a. Data-center Blackwell
/// (sm_100a / sm_103a) only has the block-scaled MMA as `tcgen05.mma`, for which q4 has no
/// kernel yet: those devices use the exact emulation.
pub fn native_fp4_target(cc: (u32, u32)) -> Option<&'static str> {
    match cc {
        (12, 0) => Some("sm_120a"),
        (12, 1) => Some("sm_121a"),
        _ => None,
    }
}

/// Kernel names (also used in logs and benchmarks).
pub mod names {
    pub const GEMV_MMA: &str =
        "gemv-mma (fused 4-bit decode via pair table, bf16/f16 mma.sync, f32 accumulate)";
    pub const GEMV_MMA_ARITH: &str =
        "gemv-mma (fused arithmetic E2M1 decode, bf16/f16 mma.sync, f32 accumulate)";
    pub const DEQUANT_CUBLAS: &str = "dequant (chunks up to 128 MB) + cuBLAS GEMM";
    pub const W4A4_NATIVE_SM120: &str = "native FP4 mma.sync block_scale (sm_120a/121a)";
    pub const W4A4_EXACT: &str = "exact integer emulation (i64 accumulate)";
    pub const NOT_APPLICABLE: &str = "n/a";
}

/// Whether the fused GEMV decodes NVFP4 arithmetically (E2M1 bits placed into the operand's
/// exponent field) rather than through its shared-memory pair table: the default, measured
/// faster on the H100; `Q4_GEMV_ARITH=0` selects the table (kernel development).
pub fn nvfp4_arith_decode() -> bool {
    static ON: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| std::env::var("Q4_GEMV_ARITH").ok().is_none_or(|v| v != "0"));
    *ON
}

/// The plan for `format` on a device of compute capability `cc`.
pub fn plan(cc: (u32, u32), format: Format) -> CudaPlan {
    // Before sm_80 (Turing) every batch takes the dequantize + cuBLAS path.
    let decode = if !has_mma_f16(cc) {
        names::DEQUANT_CUBLAS
    } else if format == Format::Nvfp4 && nvfp4_arith_decode() {
        names::GEMV_MMA_ARITH
    } else {
        names::GEMV_MMA
    };
    let w4a4 = match (format, native_fp4_target(cc)) {
        (Format::Nvfp4, Some(_)) => names::W4A4_NATIVE_SM120,
        (Format::Nvfp4, None) => names::W4A4_EXACT,
        _ => names::NOT_APPLICABLE,
    };
    CudaPlan {
        decode,
        prefill: names::DEQUANT_CUBLAS,
        w4a4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_follow_the_hardware() {
        let h100 = plan((9, 0), Format::Nvfp4);
        assert_eq!(h100.decode, names::GEMV_MMA_ARITH);
        assert_eq!(plan((9, 0), Format::Nf4).decode, names::GEMV_MMA);
        assert_eq!(h100.w4a4, names::W4A4_EXACT);
        assert_eq!(plan((12, 1), Format::Nvfp4).w4a4, names::W4A4_NATIVE_SM120);
        // sm_100 has FP4 tensor cores but no q4 kernel for them (tcgen05): exact emulation.
        assert!(has_fp4_tensor_cores((10, 0)));
        assert_eq!(plan((10, 0), Format::Nvfp4).w4a4, names::W4A4_EXACT);
        assert_eq!(plan((12, 1), Format::Nf4).w4a4, names::NOT_APPLICABLE);
        assert_eq!(plan((7, 5), Format::Nf4).decode, names::DEQUANT_CUBLAS);
        assert!(!arch_supported((7, 0)));
        assert_eq!(native_fp4_target((9, 0)), None);
        assert!(has_fp4_tensor_cores((11, 0)));
    }
}
