//! CUDA kernels against the CPU path (feature `cuda`).
//!
//! * NVRTC: every kernel family compiles for the GPUs q4 targets, the native FP4 kernel for
//!   sm_120a / sm_121a (and not for Hopper). Needs NVRTC only, so it runs without a GPU.
//! * On a GPU (skipped with a printed reason when there is none): dequantize and quantize
//!   bit-exact with the CPU, matmul within 1e-3 relative error of an f32 reference, W4A4
//!   bit-identical with the CPU emulation, and 10,000 calls keeping device memory flat. Every
//!   output buffer is poisoned (NaN) before the kernels write it.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Module, Tensor};
use q4::kernels::cuda::module_cache::{self, compile_cubin, source};
use q4::kernels::cuda::plan;
use q4::qtensor::{QuantSpec, Quantized};
use q4::{ActQuant, Format, NonFinite, QLinear, QTensor};
use q4_formats::bnb::Absmax;
use q4_formats::mxfp4::ScaleRule;

mod cuda_common;
use cuda_common::{assert_same_bits, bits_f32, data};

fn gpu() -> Option<Device> {
    let report = q4::probe::cuda_report();
    if report.status != "ok" || report.devices.is_empty() {
        eprintln!(
            "skipped: no usable CUDA device ({}: {})",
            report.status,
            report.detail.unwrap_or_default()
        );
        return None;
    }
    q4::kernels::cuda::poison_outputs(true);
    Some(Device::new_cuda(0).expect("CUDA device 0"))
}

/// The multiprocessor count of device 0 where it runs the fused wgmma prefill GEMM (Hopper,
/// compute capability 9.0).
fn fused_gemm_sms(_dev: &Device) -> Option<usize> {
    let report = q4::probe::cuda_report();
    let d = report.devices.first()?;
    (d.compute_capability == "9.0").then_some(d.multiprocessors as usize)
}

fn bits_u16(t: &Tensor) -> Vec<u16> {
    let t = t.to_device(&Device::Cpu).unwrap().flatten_all().unwrap();
    match t.dtype() {
        DType::BF16 => t
            .to_vec1::<half::bf16>()
            .unwrap()
            .into_iter()
            .map(|v| v.to_bits())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()
            .unwrap()
            .into_iter()
            .map(|v| v.to_bits())
            .collect(),
        other => panic!("{other:?}"),
    }
}

const SHAPES: [(usize, usize); 6] = [
    (1, 32),
    (3, 64),
    (17, 96),
    (64, 256),
    (129, 1024),
    (5, 4096),
];

#[test]
fn nvrtc_compiles_every_kernel_family() {
    for arch in ["sm_80", "sm_90"] {
        for out in 0..3 {
            compile_cubin(
                "dequant",
                &source(module_cache::DEQUANT, &[("OUT_T", out)]),
                arch,
            )
            .unwrap();
            compile_cubin("w4a4", &source(module_cache::W4A4, &[("OUT_T", out)]), arch).unwrap();
        }
        compile_cubin("quant", &source(module_cache::QUANT, &[]), arch).unwrap();
        for fmt in 0..3 {
            for (opt, out) in [(1, 1), (2, 2), (2, 0)] {
                // The arithmetic E2M1 decode exists for NVFP4.
                let ariths: &[i64] = if fmt == 0 { &[0, 1] } else { &[0] };
                for (nt, mt) in [(1, 1), (8, 2)] {
                    for (&arith, depth) in ariths.iter().zip([2, 4]).chain([(&0, 3)]) {
                        let d = [
                            ("FMT", fmt),
                            ("OPT", opt),
                            ("OUT_T", out),
                            ("NT", nt),
                            ("MT", mt),
                            ("WARPS", 4),
                            ("ARITH", arith),
                            ("IN_T", out),
                            ("DEPTH", depth),
                            ("KFULL", arith),
                        ];
                        compile_cubin("gemv", &source(module_cache::GEMV, &d), arch)
                            .unwrap_or_else(|e| panic!("{d:?} {arch}: {e}"));
                        // The activation ring (batches 9-64), at two and at eight N tiles,
                        // with the most stages the plan takes there.
                        for xnt in [2, 8] {
                            let base = plan::gemv_static_smem(arith == 0, 4, xnt, false);
                            let Some(stages) = (2..=4).rev().find(|&s| {
                                base + plan::gemv_stage_smem(xnt, s) <= plan::GEMV_STATIC_SMEM_LIMIT
                            }) else {
                                continue;
                            };
                            let (xnt, stages) = (xnt as i64, stages as i64);
                            let mut d = d.to_vec();
                            d.retain(|(n, _)| *n != "NT");
                            d.extend([("NT", xnt), ("XSTAGE", stages)]);
                            compile_cubin("gemv", &source(module_cache::GEMV, &d), arch)
                                .unwrap_or_else(|e| panic!("{d:?} {arch}: {e}"));
                        }
                        if nt == 1 && arith == 1 {
                            // Batch 1 of the arithmetic decode: step addresses from registers,
                            // the staged activation row at its longest beside the sums of a
                            // 16-warp split, under each weight-load cache hint.
                            for hint in 0..=4 {
                                let mut d = d.to_vec();
                                d.retain(|(n, _)| *n != "WARPS");
                                d.extend([
                                    ("WARPS", 16),
                                    ("KWARPS", 16),
                                    ("CLAMPED", 1),
                                    ("ADDR", 1),
                                    ("IMADDEC", 1),
                                    ("XB1", plan::GEMV_STAGED_ROW_MAX_STEPS as i64),
                                    ("LDHINT", hint),
                                ]);
                                compile_cubin("gemv", &source(module_cache::GEMV, &d), arch)
                                    .unwrap_or_else(|e| panic!("{d:?} {arch}: {e}"));
                            }
                        }
                        if nt == 1 {
                            // The warps of a block splitting K (batches 1-8), with the
                            // multiply-add E2M1 decode, and the largest such blocks the plan
                            // takes (`plan::gemv_static_smem`): 16 warps at one N tile, and two
                            // N tiles for the arithmetic decode.
                            let mut d = d.to_vec();
                            d.extend([("KWARPS", 2), ("IMADDEC", 1)]);
                            compile_cubin("gemv", &source(module_cache::GEMV, &d), arch)
                                .unwrap_or_else(|e| panic!("{d:?} {arch}: {e}"));
                            let big_nt = if arith == 1 { 2 } else { 1 };
                            for (name, v) in [("WARPS", 16), ("KWARPS", 16), ("NT", big_nt)] {
                                d.retain(|(n, _)| *n != name);
                                d.push((name, v));
                            }
                            compile_cubin("gemv", &source(module_cache::GEMV, &d), arch)
                                .unwrap_or_else(|e| panic!("{d:?} {arch}: {e}"));
                            // Two M tiles per warp with the warps splitting K, at the most N
                            // tiles whose sums fit beside the tables.
                            let m2_nt = (1..=2)
                                .rev()
                                .find(|&t| {
                                    plan::gemv_static_smem(arith == 0, 8, 2 * t, true)
                                        <= plan::GEMV_STATIC_SMEM_LIMIT
                                })
                                .unwrap_or(1) as i64;
                            for (name, v) in [("WARPS", 8), ("KWARPS", 8), ("NT", m2_nt), ("MT", 2)]
                            {
                                d.retain(|(n, _)| *n != name);
                                d.push((name, v));
                            }
                            compile_cubin("gemv", &source(module_cache::GEMV, &d), arch)
                                .unwrap_or_else(|e| panic!("{d:?} {arch}: {e}"));
                        }
                    }
                }
            }
        }
    }
}

/// The fused prefill GEMM needs `wgmma`, which exists only for sm_90a: it compiles there for
/// both weight families and every pipeline depth, and NVRTC refuses it for plain sm_90.
#[test]
fn nvrtc_compiles_the_wgmma_gemm_for_sm90a_only() {
    for fmt in [0, 1, 2] {
        for stages in 2..=5 {
            let src = source(module_cache::GEMM_SM90, &[("STAGES", stages), ("FMT", fmt)]);
            compile_cubin("gemm_sm90", &src, "sm_90a")
                .unwrap_or_else(|e| panic!("FMT {fmt} STAGES {stages}: {e}"));
        }
        // The narrow build (128 tokens per block) and the producer warpgroup.
        for (bn, producer) in [(128, 0), (128, 1), (256, 1)] {
            let defines = [("FMT", fmt), ("BN", bn), ("PRODUCER", producer)];
            let src = source(module_cache::GEMM_SM90, &defines);
            compile_cubin("gemm_sm90", &src, "sm_90a")
                .unwrap_or_else(|e| panic!("FMT {fmt} BN {bn} PRODUCER {producer}: {e}"));
        }
    }
    let src = source(module_cache::GEMM_SM90, &[("STAGES", 4)]);
    assert!(compile_cubin("gemm_sm90", &src, "sm_90").is_err());
}

#[test]
fn nvrtc_compiles_native_fp4_for_blackwell_only() {
    for arch in ["sm_120a", "sm_121a"] {
        let cubin = compile_cubin(
            "w4a4_native",
            &source(module_cache::SM120, &[("OUT_T", 0)]),
            arch,
        )
        .unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert!(cubin.len() > 1000);
    }
    // Hopper has no block-scaled FP4 MMA: the compile must fail, with NVRTC's log in the error.
    let err = compile_cubin(
        "w4a4_native",
        &source(module_cache::SM120, &[("OUT_T", 0)]),
        "sm_90",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("NVRTC failed") && err.contains("sm_90"),
        "{err}"
    );
    assert_eq!(plan::native_fp4_target((12, 1)), Some("sm_121a"));
}

#[test]
fn dequantize_is_bit_exact() {
    let Some(dev) = gpu() else { return };
    let specs = [
        QuantSpec::new(Format::Nvfp4),
        QuantSpec::new(Format::Mxfp4),
        QuantSpec::new(Format::Nf4),
        QuantSpec::new(Format::Fp4).with_block(128),
        QuantSpec {
            double_quant: true,
            ..QuantSpec::new(Format::Nf4).with_block(32)
        },
        QuantSpec {
            pad: true,
            ..QuantSpec::new(Format::Nvfp4)
        },
        QuantSpec {
            pad: true,
            ..QuantSpec::new(Format::Mxfp4)
        },
    ];
    let mut shapes = SHAPES.to_vec();
    shapes.push((7, 40)); // padded rows for NVFP4/MXFP4, blocks straddling rows for bitsandbytes
    for (si, spec) in specs.iter().enumerate() {
        for &(r, c) in &shapes {
            if !spec.pad
                && matches!(spec.format, Format::Nvfp4 | Format::Mxfp4)
                && c % spec.block_size != 0
            {
                continue;
            }
            let w =
                Tensor::from_vec(data(r * c, (si * 100 + r) as u64), (r, c), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, spec).unwrap();
            let qg = q.to_device(&dev).unwrap();
            for dt in [DType::F32, DType::BF16, DType::F16] {
                let cpu = q.dequantize(dt).unwrap();
                let gpu = qg.dequantize(dt).unwrap();
                assert_eq!(gpu.dims(), &[r, c]);
                let same = if dt == DType::F32 {
                    bits_f32(&cpu) == bits_f32(&gpu)
                } else {
                    bits_u16(&cpu) == bits_u16(&gpu)
                };
                assert!(same, "{:?} {r}x{c} {dt:?}", spec.format);
            }
        }
    }
}

fn same_storage(a: &Quantized, b: &Quantized) -> bool {
    match (a, b) {
        (Quantized::Nvfp4(a), Quantized::Nvfp4(b)) => {
            a == b && a.scale2.to_bits() == b.scale2.to_bits()
        }
        (Quantized::Mxfp4(a), Quantized::Mxfp4(b)) => a == b,
        (Quantized::Bnb(a), Quantized::Bnb(b)) => {
            a.packed == b.packed
                && match (&a.absmax, &b.absmax) {
                    (Absmax::Plain(x), Absmax::Plain(y)) => x
                        .iter()
                        .map(|v| v.to_bits())
                        .eq(y.iter().map(|v| v.to_bits())),
                    (Absmax::Nested(x), Absmax::Nested(y)) => x == y,
                    _ => false,
                }
        }
        _ => false,
    }
}

#[test]
fn quantize_is_bit_exact() {
    let Some(dev) = gpu() else { return };
    let mut specs = vec![
        QuantSpec::new(Format::Nvfp4),
        QuantSpec {
            scale2: Some(0.0123),
            ..QuantSpec::new(Format::Nvfp4)
        },
        QuantSpec {
            pad: true,
            ..QuantSpec::new(Format::Nvfp4)
        },
        QuantSpec {
            pad: true,
            ..QuantSpec::new(Format::Mxfp4)
        },
    ];
    for rule in [ScaleRule::Rceil, ScaleRule::Floor, ScaleRule::Even] {
        specs.push(QuantSpec {
            mx_rule: rule,
            ..QuantSpec::new(Format::Mxfp4)
        });
    }
    for f in [Format::Nf4, Format::Fp4] {
        for bs in [32, 64, 256, 4096] {
            specs.push(QuantSpec::new(f).with_block(bs));
        }
        specs.push(QuantSpec {
            double_quant: true,
            ..QuantSpec::new(f)
        });
    }
    let mut shapes = SHAPES.to_vec();
    shapes.extend([(7, 40), (3, 33)]); // odd element count for bitsandbytes
    for (si, spec) in specs.iter().enumerate() {
        for &(r, c) in &shapes {
            if !spec.pad
                && matches!(spec.format, Format::Nvfp4 | Format::Mxfp4)
                && c % spec.block_size != 0
            {
                continue;
            }
            for dt in [DType::F32, DType::BF16] {
                let w = Tensor::from_vec(data(r * c, (si * 31 + c) as u64), (r, c), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let cpu = QTensor::quantize(&w, spec).unwrap();
                let gpu = QTensor::quantize(&w.to_device(&dev).unwrap(), spec).unwrap();
                assert!(gpu.device().is_cuda());
                let (a, b) = (cpu.to_formats().unwrap(), gpu.to_formats().unwrap());
                assert!(same_storage(&a, &b), "{spec:?} {r}x{c} {dt:?}");
            }
        }
    }
}

#[test]
fn quantize_reports_non_finite_like_the_cpu() {
    let Some(dev) = gpu() else { return };
    let mut v = data(4096, 9);
    v[1234] = f32::NAN;
    v[3000] = f32::INFINITY;
    let w = Tensor::from_vec(v, (16, 256), &Device::Cpu).unwrap();
    for f in [Format::Nvfp4, Format::Mxfp4, Format::Nf4] {
        let spec = QuantSpec::new(f);
        let cpu = QTensor::quantize(&w, &spec).unwrap_err().to_string();
        let gpu = QTensor::quantize(&w.to_device(&dev).unwrap(), &spec)
            .unwrap_err()
            .to_string();
        assert_eq!(cpu, gpu, "{f}");
        assert!(gpu.contains("1234"), "{gpu}");
        let zero = QuantSpec {
            non_finite: NonFinite::Zero,
            ..spec
        };
        let a = QTensor::quantize(&w, &zero).unwrap().to_formats().unwrap();
        let b = QTensor::quantize(&w.to_device(&dev).unwrap(), &zero)
            .unwrap()
            .to_formats()
            .unwrap();
        assert!(same_storage(&a, &b), "{f} NonFinite::Zero");
    }
}

fn rel_err(y: &Tensor, reference: &Tensor) -> f64 {
    let y = y
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let r = reference.to_dtype(DType::F64).unwrap();
    let d = (&y - &r)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let n = r
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(d.is_finite(), "non-finite output");
    (d / n).sqrt()
}

#[test]
fn matmul_matches_the_f32_reference() {
    let Some(dev) = gpu() else { return };
    let specs = [
        QuantSpec::new(Format::Nvfp4),
        QuantSpec::new(Format::Mxfp4),
        QuantSpec::new(Format::Nf4),
        QuantSpec::new(Format::Fp4).with_block(128),
    ];
    // (n, k): odd row counts, k = 96 (a partial 128-wide step), k = 40 and 48 (cuBLAS path:
    // k % 32 != 0), bitsandbytes blocks straddling rows at k = 96 with blocks of 128.
    let shapes = [
        (256, 512),
        (300, 1024),
        (64, 4096),
        (4096, 96),
        (33, 48),
        (1000, 2560),
    ];
    let batches = [1, 2, 5, 8, 9, 16, 33, 64, 65, 200];
    for (si, spec) in specs.iter().enumerate() {
        for &(n, k) in &shapes {
            if matches!(spec.format, Format::Nvfp4 | Format::Mxfp4) && k % spec.block_size != 0 {
                continue;
            }
            let w =
                Tensor::from_vec(data(n * k, (si * 7 + n) as u64), (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, spec).unwrap();
            let wd = q.dequantize(DType::F32).unwrap();
            let layer = QLinear::new(q.to_device(&dev).unwrap(), None).unwrap();
            for &b in &batches {
                let x = Tensor::from_vec(data(b * k, (b * 13 + k) as u64), (b, k), &Device::Cpu)
                    .unwrap();
                check_activation_dtypes(&layer, &wd, &x, &dev, spec.format);
            }
        }
    }
}

/// `layer` (on `dev`) against `x Wᵀ` in f32 for `x` as f32, f16 and bf16 activations: output
/// shape and dtype, every output finite (else where the first and last bad ones are), and the
/// relative error (1e-3 for f32 and f16, 4e-3 for bf16).
fn check_activation_dtypes(layer: &QLinear, wd: &Tensor, x: &Tensor, dev: &Device, f: Format) {
    let (b, n, k) = (x.dim(0).unwrap(), wd.dim(0).unwrap(), x.dim(1).unwrap());
    for (dt, tol) in [(DType::F32, 1e-3), (DType::F16, 1e-3), (DType::BF16, 4e-3)] {
        let xd = x.to_dtype(dt).unwrap();
        let reference = xd
            .to_dtype(DType::F32)
            .unwrap()
            .matmul(&wd.t().unwrap())
            .unwrap();
        let y = layer.forward(&xd.to_device(dev).unwrap()).unwrap();
        assert_eq!(y.dims(), &[b, n]);
        assert_eq!(y.dtype(), dt);
        let yv: Vec<f32> = y
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let bad: Vec<usize> = (0..yv.len()).filter(|&i| !yv[i].is_finite()).collect();
        assert!(
            bad.is_empty(),
            "{f:?} {n}x{k} batch {b} {dt:?}: {} non-finite outputs, first at (row {}, col {}), last at (row {}, col {})",
            bad.len(),
            bad[0] / n,
            bad[0] % n,
            bad[bad.len() - 1] / n,
            bad[bad.len() - 1] % n
        );
        let e = rel_err(&y, &reference);
        assert!(
            e <= tol,
            "{f:?} {n}x{k} batch {b} {dt:?}: rel. error {e:.2e}"
        );
    }
}

/// The prefill path over many decoded chunks and a partial last one (chunks forced to 128
/// rows): f32, f16 and bf16 activations against the f32 reference, every 4-bit format.
#[test]
fn chunked_gemm_matches_the_f32_reference() {
    let Some(dev) = gpu() else { return };
    q4::kernels::cuda::gemm::set_chunk_rows_for_tests(128);
    for (si, spec) in [
        QuantSpec::new(Format::Nvfp4),
        QuantSpec::new(Format::Mxfp4),
        QuantSpec::new(Format::Nf4),
    ]
    .iter()
    .enumerate()
    {
        for (n, k) in [(300usize, 1024usize), (128, 1024), (1000, 512)] {
            let w =
                Tensor::from_vec(data(n * k, (si * 5 + n) as u64), (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, spec).unwrap();
            let wd = q.dequantize(DType::F32).unwrap();
            let layer = QLinear::new(q.to_device(&dev).unwrap(), None).unwrap();
            for b in [65usize, 200] {
                let x = Tensor::from_vec(data(b * k, (b * 3 + k) as u64), (b, k), &Device::Cpu)
                    .unwrap();
                check_activation_dtypes(&layer, &wd, &x, &dev, spec.format);
            }
        }
    }
    q4::kernels::cuda::gemm::set_chunk_rows_for_tests(0);
}

/// The fused Hopper prefill GEMM (NVFP4, NF4, FP4 with blocks of 128; bf16 activations; runs
/// only on compute capability 9.0): against the f32 reference and against the chunked
/// dequantize + cuBLAS path in the same process, over K of one scale copy (256; FP4's blocks of
/// 128 need 512, so there both sides take the chunked path), partial row and token tiles, rows
/// not a multiple of 8 (element stores) and a weight narrower than one tile.
#[test]
fn fused_prefill_gemm_matches_the_reference_and_the_chunked_path() {
    let Some(dev) = gpu() else { return };
    let specs = [
        QuantSpec::new(Format::Nvfp4),
        QuantSpec::new(Format::Nf4),
        QuantSpec::new(Format::Fp4).with_block(128),
        QuantSpec::new(Format::Mxfp4),
    ];
    let shapes = [
        (128usize, 256usize),
        (300, 1024),
        (8, 4096),
        (1003, 512),
        (2048, 2560),
    ];
    for (spec, (n, k)) in specs
        .iter()
        .flat_map(|s| shapes.iter().map(move |&nk| (s, nk)))
    {
        let f = spec.format;
        // MXFP4 scales above 2 (E8M0 > 128) take a second factor in the kernel: one weight with
        // large values.
        let big = f == Format::Mxfp4 && n == 300;
        let mut values = data(n * k, (n + 3 * k) as u64);
        if big {
            values.iter_mut().for_each(|v| *v *= 1.0e6);
        }
        let w = Tensor::from_vec(values, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, spec).unwrap();
        let wd = q.dequantize(DType::F32).unwrap();
        let layer = QLinear::new(q.to_device(&dev).unwrap(), None).unwrap();
        // 1300 tokens over 300 rows run as eleven narrow token tiles: several raster groups.
        for b in [65usize, 256, 300, 384, 513, 1300] {
            let x = Tensor::from_vec(data(b * k, (b * 7 + k) as u64), (b, k), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let reference = x
                .to_dtype(DType::F32)
                .unwrap()
                .matmul(&wd.t().unwrap())
                .unwrap();
            let xd = x.to_device(&dev).unwrap();
            q4::kernels::cuda::gemm_sm90::set_enabled_for_tests(Some(true));
            let before = q4::kernels::cuda::gemm_sm90::launches();
            let fused = layer.forward(&xd).unwrap();
            // On Hopper the fused kernel served it (one launch per token-tile kind); elsewhere
            // both sides are the chunked path.
            let want = match fused_gemm_sms(&dev) {
                Some(sms) if plan::gemm_wgmma_serves((9, 0), f, k, spec.block_size, b) => {
                    plan::wgmma_token_launches(b, n.div_ceil(128), sms, true).len()
                }
                _ => 0,
            };
            assert_eq!(
                q4::kernels::cuda::gemm_sm90::launches() - before,
                want,
                "{f:?} {n}x{k} batch {b}: fused kernel launches"
            );
            q4::kernels::cuda::gemm_sm90::set_enabled_for_tests(Some(false));
            let chunked = layer.forward(&xd).unwrap();
            q4::kernels::cuda::gemm_sm90::set_enabled_for_tests(None);
            assert_eq!(fused.dims(), &[b, n]);
            assert_eq!(fused.dtype(), DType::BF16);
            let e = rel_err(&fused, &reference);
            assert!(
                e <= 4e-3,
                "{f:?} {n}x{k} batch {b}: fused rel. error {e:.2e}"
            );
            let chunked32 = chunked
                .to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let d = rel_err(&fused, &chunked32);
            assert!(
                d <= 4e-3,
                "{f:?} {n}x{k} batch {b}: fused vs chunked {d:.2e}"
            );
        }
    }
}

/// The three weight formats of the GEMV comparisons, each on every `(n, k)` of `shapes`, as a
/// layer on `dev` (weights from `data` with seed `n + wseed * k`).
fn gemv_layers<'a>(
    dev: &'a Device,
    shapes: &'a [(usize, usize)],
    wseed: usize,
) -> impl Iterator<Item = (Format, usize, usize, QLinear)> + 'a {
    [Format::Nvfp4, Format::Nf4, Format::Mxfp4]
        .into_iter()
        .flat_map(move |f| shapes.iter().map(move |&(n, k)| (f, n, k)))
        .map(move |(f, n, k)| {
            let w = Tensor::from_vec(data(n * k, (n + wseed * k) as u64), (n, k), &Device::Cpu)
                .unwrap();
            let q = QTensor::quantize(&w, &QuantSpec::new(f)).unwrap();
            (
                f,
                n,
                k,
                QLinear::new(q.to_device(dev).unwrap(), None).unwrap(),
            )
        })
}

/// `b` rows of `k` activations (`data` with seed `b * xseed + k`) of type `dt` on `dev`.
fn gemv_input(dev: &Device, b: usize, k: usize, xseed: usize, dt: DType) -> Tensor {
    Tensor::from_vec(data(b * k, (b * xseed + k) as u64), (b, k), &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
        .to_device(dev)
        .unwrap()
}

/// Split-K GEMVs (batches 1-16) sum their K slices either inside each block (the warps split K)
/// or through a partial buffer and `gemv_reduce`: both add the same slices in the same order,
/// so their outputs are identical bit for bit, and the warp split launches no reduction.
#[test]
fn gemv_warp_split_is_bit_identical_with_the_grid_split() {
    let Some(dev) = gpu() else { return };
    // (n, k): few row tiles and many steps (split K), rows not a multiple of 16, K not a
    // multiple of 128 (a partial last step).
    let shapes = [
        (1000, 2560),
        (64, 4096),
        (300, 1024),
        (77, 4160),
        (6144, 2560),
    ];
    let mut grid_reduces = 0;
    for (f, n, k, layer) in gemv_layers(&dev, &shapes, 5) {
        for b in [1usize, 3, 8, 16] {
            for dt in [DType::F32, DType::BF16] {
                let x = gemv_input(&dev, b, k, 11, dt);
                let gemv = q4::kernels::cuda::gemv::set_warp_split_for_tests;
                let reduces = q4::kernels::cuda::gemv::reduce_launches;
                gemv(Some(true));
                let before = reduces();
                let warp = layer.forward(&x).unwrap();
                // Batches 1-8 split K into powers of two (at most 16 here), which always fit a
                // block; batch 16's split may not.
                if b <= 8 {
                    assert_eq!(
                        reduces(),
                        before,
                        "{f:?} {n}x{k} batch {b}: warp split reduced"
                    );
                }
                gemv(Some(false));
                let before = reduces();
                let grid = layer.forward(&x).unwrap();
                grid_reduces += reduces() - before;
                gemv(None);
                // bf16 outputs widen to f32 exactly.
                let (wb, gb) = (bits_f32(&warp), bits_f32(&grid));
                assert_same_bits(
                    &wb,
                    &gb,
                    b * n,
                    format_args!("{f:?} {n}x{k} batch {b} {dt:?}: warp split against grid split"),
                );
            }
        }
    }
    // The shapes above do split K (into at most 16 slices, which always fit a block): with the
    // warp split off, reductions ran.
    assert!(grid_reduces > 0, "no shape took a split-K plan");
}

/// The shared-memory activation ring changes where the activations are read from, not the
/// sums: GEMVs with the same K slices (forced: the ring changes occupancy, and so the plan's
/// split) are identical bit for bit with and without it, at every number of stages, with rows
/// past the batch and a partial last K step (zeros in the ring).
#[test]
fn gemv_activation_ring_is_bit_identical_with_global_loads() {
    let Some(dev) = gpu() else { return };
    let shapes = [(1000, 2560), (77, 4160), (6144, 2560), (300, 1024)];
    let ring = q4::kernels::cuda::gemv::set_xstage_for_tests;
    let staged = q4::kernels::cuda::gemv::staged_launches;
    let slices = q4::kernels::cuda::gemv::set_split_for_tests;
    q4::kernels::cuda::gemv::set_warp_split_for_tests(Some(false));
    let mut ran = 0;
    for (f, n, k, layer) in gemv_layers(&dev, &shapes, 3) {
        for b in [3usize, 9, 16, 24, 33, 64] {
            for (dt, split) in [(DType::F32, 1), (DType::BF16, 3)] {
                slices(Some(split));
                let x = gemv_input(&dev, b, k, 7, dt);
                ring(Some(0));
                let before = staged();
                let plain = bits_f32(&layer.forward(&x).unwrap());
                assert_eq!(
                    staged(),
                    before,
                    "{f:?} {n}x{k} batch {b}: staged with the ring off"
                );
                for stages in [2u8, 3, 4] {
                    ring(Some(stages));
                    let before = staged();
                    let ringed = bits_f32(&layer.forward(&x).unwrap());
                    ran += staged() - before;
                    assert_same_bits(
                        &ringed,
                        &plain,
                        b * n,
                        format_args!(
                            "{f:?} {n}x{k} batch {b} {dt:?}: a {stages}-stage ring against \
                             global loads"
                        ),
                    );
                }
                ring(None);
                slices(None);
            }
        }
    }
    q4::kernels::cuda::gemv::set_warp_split_for_tests(None);
    // Every format fits the ring at two stages up to two N tiles (batch 16), so it ran.
    assert!(ran > 0, "no GEMV used the activation ring");
}

/// Two 16-row M tiles per warp change which warp computes a row, not its sums: with the same K
/// slices (forced: the tiling changes the number of row tiles, and so the plan's split) GEMVs
/// with one and two M tiles are identical bit for bit, with rows not a multiple of 32, a
/// partial last K step, with and without the activation ring's batches, the slices summed
/// across blocks or (where they fit a block and no ring runs) inside it.
#[test]
fn gemv_m_tiles_are_bit_identical() {
    let Some(dev) = gpu() else { return };
    let shapes = [(1000, 2560), (77, 4160), (6144, 2560), (300, 1024)];
    let tiles = q4::kernels::cuda::gemv::set_m_tiles_for_tests;
    let slices = q4::kernels::cuda::gemv::set_split_for_tests;
    let warp_split = q4::kernels::cuda::gemv::set_warp_split_for_tests;
    let reduces = q4::kernels::cuda::gemv::reduce_launches;
    let mut in_block = 0;
    for (f, n, k, layer) in gemv_layers(&dev, &shapes, 9) {
        for b in [1usize, 3, 8, 9, 16, 24, 33, 64] {
            for (dt, split) in [(DType::F32, 1), (DType::BF16, 2), (DType::BF16, 3)] {
                for ws in [false, true] {
                    slices(Some(split));
                    warp_split(Some(ws));
                    let x = gemv_input(&dev, b, k, 5, dt);
                    tiles(Some(1));
                    let one = bits_f32(&layer.forward(&x).unwrap());
                    tiles(Some(2));
                    let before = reduces();
                    let two = bits_f32(&layer.forward(&x).unwrap());
                    if ws && split == 2 && b <= 8 && reduces() == before {
                        in_block += 1;
                    }
                    tiles(None);
                    warp_split(None);
                    slices(None);
                    assert_same_bits(
                        &two,
                        &one,
                        b * n,
                        format_args!(
                            "{f:?} {n}x{k} batch {b} {dt:?} split {split} (warp split {ws}): \
                             two M tiles against one"
                        ),
                    );
                }
            }
        }
    }
    // Two slices fit every block: with the warp split on, batches 1-8 summed them in the block.
    assert!(
        in_block > 0,
        "no GEMV with two M tiles split K inside its blocks"
    );
}

/// Loads without zero fills (`CLAMPED`: steps past a K slice skipped, chunks past K and rows
/// past N read from clamped in-bounds addresses, activation rows past the batch from the last
/// row) change no stored sum: with the loads forced clamped and forced zero-filled, GEMVs are
/// identical bit for bit — every format (bitsandbytes blocks of 64, 128 and 256), batches 1-64
/// (one to eight N tiles, with and without the activation ring), rows not a multiple of 16, K
/// not a multiple of 128, split K across blocks and inside them.
#[test]
fn gemv_clamped_loads_are_bit_identical() {
    let Some(dev) = gpu() else { return };
    let shapes = [(1000, 2560), (77, 4160), (300, 1024), (6144, 2560)];
    let specs = [
        QuantSpec::new(Format::Nvfp4),
        QuantSpec::new(Format::Mxfp4),
        QuantSpec::new(Format::Nf4),
        QuantSpec::new(Format::Fp4).with_block(128),
        QuantSpec::new(Format::Nf4).with_block(256),
    ];
    let clamped = q4::kernels::cuda::gemv::set_clamped_for_tests;
    let ring = q4::kernels::cuda::gemv::set_xstage_for_tests;
    let warp_split = q4::kernels::cuda::gemv::set_warp_split_for_tests;
    for (si, spec) in specs.iter().enumerate() {
        for &(n, k) in &shapes {
            if k % spec.block_size != 0 && matches!(spec.format, Format::Nvfp4 | Format::Mxfp4) {
                continue;
            }
            let w = Tensor::from_vec(data(n * k, (si * 31 + n + k) as u64), (n, k), &Device::Cpu)
                .unwrap();
            let q = QTensor::quantize(&w, spec).unwrap();
            let layer = QLinear::new(q.to_device(&dev).unwrap(), None).unwrap();
            for b in [1usize, 3, 9, 12, 16, 24, 33, 64] {
                for (dt, stages, ws) in [
                    (DType::F32, None, false),
                    (DType::BF16, None, true),
                    (DType::BF16, Some(0u8), false),
                    (DType::F16, Some(2u8), false),
                ] {
                    let x = gemv_input(&dev, b, k, 11, dt);
                    ring(stages);
                    warp_split(Some(ws));
                    clamped(Some(false));
                    let filled = bits_f32(&layer.forward(&x).unwrap());
                    clamped(Some(true));
                    let out = bits_f32(&layer.forward(&x).unwrap());
                    clamped(None);
                    warp_split(None);
                    ring(None);
                    assert_same_bits(
                        &out,
                        &filled,
                        b * n,
                        format_args!(
                            "{:?} block {} {n}x{k} batch {b} {dt:?} (ring {stages:?}, warp \
                             split {ws}): clamped loads against zero-filled",
                            spec.format, spec.block_size
                        ),
                    );
                }
            }
        }
    }
}

/// At batches 1-8 the GEMV may compute its step addresses from bases held in registers, and
/// at batch 1 NVFP4 may read its activations from a copy of the row staged in shared memory,
/// already regrouped into operand pairs: neither changes a sum, so every combination is
/// identical bit for bit with the plain kernel — NVFP4, NF4 and MXFP4, f32, bf16 and f16
/// activations, the K slices summed inside the block or across blocks, rows not a multiple of
/// 16, K not a multiple of 128 (where neither applies) and a slice too long to stage.
#[test]
fn gemv_batch_one_paths_are_bit_identical() {
    let Some(dev) = gpu() else { return };
    let shapes = [
        (1000, 2560),
        (6144, 2560),
        (300, 1024),
        (77, 4160),
        (2048, 8192),
        (96, 20480),
    ];
    let paths = q4::kernels::cuda::gemv::set_batch_one_paths_for_tests;
    let staged = q4::kernels::cuda::gemv::staged_row_launches;
    let warp_split = q4::kernels::cuda::gemv::set_warp_split_for_tests;
    let mut ran = 0;
    for (f, n, k, layer) in gemv_layers(&dev, &shapes, 13) {
        for b in [1usize, 2, 5] {
            for dt in [DType::F32, DType::BF16, DType::F16] {
                for ws in [false, true] {
                    warp_split(Some(ws));
                    let x = gemv_input(&dev, b, k, 3, dt);
                    paths(Some(false), Some(false));
                    let before = staged();
                    let plain = bits_f32(&layer.forward(&x).unwrap());
                    assert_eq!(
                        staged(),
                        before,
                        "{f:?} {n}x{k} batch {b}: staged while off"
                    );
                    for (addresses, row) in [(true, false), (false, true), (true, true)] {
                        paths(Some(addresses), Some(row));
                        let before = staged();
                        let out = bits_f32(&layer.forward(&x).unwrap());
                        ran += staged() - before;
                        assert_same_bits(
                            &out,
                            &plain,
                            b * n,
                            format_args!(
                                "{f:?} {n}x{k} batch {b} {dt:?} (warp split {ws}, addresses \
                                 {addresses}, staged row {row}) against the plain kernel"
                            ),
                        );
                    }
                    paths(None, None);
                    warp_split(None);
                }
            }
        }
    }
    assert!(ran > 0, "no GEMV staged its activation row");
}

#[test]
fn matmul_keeps_leading_dims_and_bias() {
    let Some(dev) = gpu() else { return };
    let w = Tensor::from_vec(data(128 * 256, 3), (128, 256), &Device::Cpu).unwrap();
    let bias = Tensor::from_vec(data(128, 4), 128, &Device::Cpu).unwrap();
    let cpu =
        QLinear::from_dense(&w, Some(bias.clone()), Some(&QuantSpec::new(Format::Nvfp4))).unwrap();
    let q = match cpu.weight() {
        q4::qlinear::LinearWeight::Quant(q) => q.to_device(&dev).unwrap(),
        _ => unreachable!(),
    };
    let gpu_layer = QLinear::new(q, Some(bias.to_device(&dev).unwrap())).unwrap();
    let x = Tensor::from_vec(data(2 * 3 * 256, 5), (2, 3, 256), &Device::Cpu).unwrap();
    let a = cpu.forward(&x).unwrap();
    let b = gpu_layer.forward(&x.to_device(&dev).unwrap()).unwrap();
    assert_eq!(b.dims(), &[2, 3, 128]);
    assert!(rel_err(&b, &a) < 1e-3);
    // Activations on the wrong device are refused with a clear message.
    let err = gpu_layer.forward(&x).unwrap_err().to_string();
    assert!(err.contains("activations are on"), "{err}");
}

#[test]
fn w4a4_is_bit_identical_with_the_cpu() {
    let Some(dev) = gpu() else { return };
    for (n, k, b) in [(64, 256, 1), (100, 80, 7), (513, 1024, 16), (32, 4096, 3)] {
        let w = Tensor::from_vec(data(n * k, (n + k) as u64), (n, k), &Device::Cpu).unwrap();
        let spec = QuantSpec {
            pad: true,
            ..QuantSpec::new(Format::Nvfp4)
        };
        let q = QTensor::quantize(&w, &spec).unwrap();
        let x = Tensor::from_vec(data(b * k, (b * k) as u64), (b, k), &Device::Cpu).unwrap();
        for act in [
            ActQuant::Nvfp4Dynamic,
            ActQuant::Nvfp4Static { input_scale: 0.004 },
        ] {
            let cpu = QLinear::new(q.clone(), None)
                .unwrap()
                .with_act_quant(act)
                .unwrap();
            let gpu = QLinear::new(q.to_device(&dev).unwrap(), None)
                .unwrap()
                .with_act_quant(act)
                .unwrap();
            let a = cpu.forward(&x).unwrap();
            let g = gpu.forward(&x.to_device(&dev).unwrap()).unwrap();
            assert_eq!(bits_f32(&a), bits_f32(&g), "{n}x{k} batch {b} {act:?}");
        }
    }
}

/// W4A8 on the GPU (int8 round trip of the activations, then the fused GEMV/GEMM) agrees with
/// the CPU's int8 kernel: the same activation round trip (compared as numbers), products within
/// f32 rounding.
#[test]
fn w4a8_agrees_with_the_cpu() {
    let Some(dev) = gpu() else { return };
    for format in [Format::Nvfp4, Format::Mxfp4] {
        for (n, k, b) in [(64, 256, 1), (100, 576, 7), (513, 1024, 16)] {
            let w = Tensor::from_vec(data(n * k, (n + k) as u64), (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, &QuantSpec::new(format)).unwrap();
            let x = Tensor::from_vec(data(b * k, (b * k) as u64), (b, k), &Device::Cpu).unwrap();
            let rt_cpu = q4::qlinear::fake_quantize_int8(&x).unwrap();
            let rt_gpu = q4::qlinear::fake_quantize_int8(&x.to_device(&dev).unwrap()).unwrap();
            let (c, g): (Vec<f32>, Vec<f32>) = (
                rt_cpu.flatten_all().unwrap().to_vec1().unwrap(),
                rt_gpu.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert!(
                c.iter().zip(&g).all(|(a, b)| a == b),
                "{format} {n}x{k} round trip"
            );
            let cpu = QLinear::new(q.clone(), None)
                .unwrap()
                .with_act_quant(ActQuant::Int8)
                .unwrap();
            let gpu = QLinear::new(q.to_device(&dev).unwrap(), None)
                .unwrap()
                .with_act_quant(ActQuant::Int8)
                .unwrap();
            let a = cpu.forward(&x).unwrap();
            let g = gpu.forward(&x.to_device(&dev).unwrap()).unwrap();
            let e = rel_err(&g, &a);
            assert!(e < 1e-3, "{format} {n}x{k} batch {b}: {e}");
        }
    }
    // W4A8 on a bitsandbytes codebook (rounded to int8) is a CPU mode: a clear error here.
    let w = Tensor::from_vec(data(64 * 128, 3), (64, 128), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, &QuantSpec::new(Format::Nf4)).unwrap();
    let gpu = QLinear::new(q.to_device(&dev).unwrap(), None)
        .unwrap()
        .with_act_quant(ActQuant::Int8)
        .unwrap();
    let x = Tensor::from_vec(data(2 * 128, 5), (2, 128), &Device::Cpu).unwrap();
    let e = gpu
        .forward(&x.to_device(&dev).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("only the CPU kernels") && e.contains("nf4"),
        "{e}"
    );
}

#[test]
fn repeated_calls_keep_device_memory_flat() {
    let Some(dev) = gpu() else { return };
    let Device::Cuda(cuda) = &dev else {
        unreachable!()
    };
    let ctx = cuda.cuda_stream().context().clone();
    let w = Tensor::randn(0f32, 0.02, (2048, 2048), &dev).unwrap();
    let layers: Vec<QLinear> = [Format::Nvfp4, Format::Nf4]
        .iter()
        .map(|&f| QLinear::from_dense(&w, None, Some(&QuantSpec::new(f))).unwrap())
        .collect();
    let x1 = Tensor::randn(0f32, 1.0, (1, 2048), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let x2 = Tensor::randn(0f32, 1.0, (80, 2048), &dev).unwrap();
    let run = |i: usize| {
        let l = &layers[i % 2];
        let y = if i % 10 == 9 {
            l.forward(&x2).unwrap()
        } else {
            l.forward(&x1).unwrap()
        };
        drop(y);
    };
    for i in 0..200 {
        run(i);
    }
    cuda.cuda_stream().synchronize().unwrap();
    let (free_before, _) = ctx.mem_get_info().unwrap();
    for i in 0..10_000 {
        run(i);
    }
    cuda.cuda_stream().synchronize().unwrap();
    let (free_after, _) = ctx.mem_get_info().unwrap();
    let grown = free_before as i64 - free_after as i64;
    eprintln!("device memory: {free_before} free before, {free_after} after 10,000 calls");
    assert!(
        grown < 16 << 20,
        "device memory grew by {grown} bytes over 10,000 calls"
    );
}

#[test]
fn module_cache_compiles_each_variant_once() {
    let Some(dev) = gpu() else { return };
    let Device::Cuda(cuda) = &dev else {
        unreachable!()
    };
    let k = module_cache::for_device(cuda).unwrap();
    let before = k.module_count();
    for _ in 0..3 {
        k.function(
            "dequant",
            module_cache::DEQUANT,
            &[("OUT_T", 1)],
            "dequant_rows",
        )
        .unwrap();
    }
    assert!(k.module_count() <= before + 1);
    let err = k
        .function(
            "dequant",
            module_cache::DEQUANT,
            &[("OUT_T", 1)],
            "no_such_kernel",
        )
        .unwrap_err();
    assert!(err.to_string().contains("no_such_kernel"));
}
