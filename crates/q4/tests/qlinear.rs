//! QLinear's fused kernels against the reference (dequantize to f32, then candle's matmul), the
//! exact W4A4 emulation against an independent exact reference, and bad input.

use candle_core::{DType, Device, Module, Tensor};
use proptest::prelude::*;
use q4::kernels::cpu::w4a4;
use q4::qtensor::QuantSpec;
use q4::{ActQuant, Format, QLinear, QTensor};
use q4_formats::nvfp4::Nvfp4Tensor;

fn randn(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut u = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 / (1u64 << 53) as f64) as f32
    };
    (0..n)
        .map(|_| (u() + u() + u() + u() - 2.0) * 0.8)
        .collect()
}

fn f32_values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (f32_values(a), f32_values(b));
    let num: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    assert!(a.iter().all(|x| x.is_finite()), "non-finite output");
    (num / den.max(1e-30)).sqrt() as f32
}

fn spec(format: Format, block: usize, pad: bool, double_quant: bool) -> QuantSpec {
    QuantSpec {
        block_size: block,
        pad,
        double_quant,
        ..QuantSpec::new(format)
    }
}

fn check(
    format: Format,
    block: usize,
    n: usize,
    k: usize,
    batch: usize,
    seed: u64,
    double_quant: bool,
) {
    let pad = matches!(format, Format::Nvfp4 | Format::Mxfp4) && !k.is_multiple_of(block);
    let w = Tensor::from_vec(randn(seed, n * k), (n, k), &Device::Cpu).unwrap();
    let bias = Tensor::from_vec(randn(seed + 1, n), n, &Device::Cpu).unwrap();
    let layer = QLinear::from_dense(
        &w,
        Some(bias),
        Some(&spec(format, block, pad, double_quant)),
    )
    .unwrap();
    // Leading dimensions: [batch] as [1, batch] to exercise reshaping.
    let x = Tensor::from_vec(randn(seed + 2, batch * k), (1, batch, k), &Device::Cpu).unwrap();
    let fused = layer.forward(&x).unwrap();
    let reference = layer.forward_reference(&x).unwrap();
    assert_eq!(fused.dims(), &[1, batch, n]);
    let e = rel_err(&fused, &reference);
    assert!(
        e <= 1e-5,
        "{format} block {block} n={n} k={k} batch={batch}: f32 rel err {e}"
    );
    // bf16 activations: against the reference on the same (bf16-rounded) activations, so the
    // error measured is the kernel's and the bf16 output's, not the input rounding's.
    let xb = x.to_dtype(DType::BF16).unwrap();
    let fused = layer.forward(&xb).unwrap();
    assert_eq!(fused.dtype(), DType::BF16);
    let xr = xb.to_dtype(DType::F32).unwrap();
    let e = rel_err(&fused, &layer.forward_reference(&xr).unwrap());
    assert!(
        e <= 1e-2,
        "{format} n={n} k={k} batch={batch}: bf16 rel err {e}"
    );
}

#[test]
fn fused_agrees_with_reference_on_fixed_shapes() {
    for &batch in &[1, 2, 3, 7, 16, 64] {
        for (format, block) in [
            (Format::Nvfp4, 16),
            (Format::Nf4, 64),
            (Format::Fp4, 64),
            (Format::Mxfp4, 32),
        ] {
            check(
                format,
                block,
                37,
                256,
                batch,
                batch as u64 * 31 + block as u64,
                false,
            );
        }
    }
    // Shapes large enough for the multithreaded GEMV and GEMM paths.
    check(Format::Nvfp4, 16, 1100, 1024, 1, 21, false);
    check(Format::Nf4, 64, 1100, 1024, 3, 22, false);
    check(Format::Mxfp4, 32, 600, 2048, 16, 23, false);
    // Double quantization, wide blocks, blocks straddling rows, padded rows.
    check(Format::Nf4, 64, 29, 192, 3, 7, true);
    check(Format::Nf4, 4096, 9, 512, 2, 8, false);
    check(Format::Nf4, 64, 13, 96, 5, 9, false);
    check(Format::Nvfp4, 16, 11, 40, 4, 10, false);
    check(Format::Mxfp4, 32, 11, 72, 17, 11, false);
    // The tiled GEMM: blocks wider than a K slice (batch 300, and 140 on AVX2 hosts: the `gemm`
    // crate's slices; batches 20 and 70, and 140 on AVX-512 hosts: whole rows in q4's
    // dot-product kernel), padded rows whose last slice is short and odd, rows that straddle
    // blocks, several row tiles.
    check(Format::Nf4, 1024, 40, 2048, 20, 12, false);
    check(Format::Nf4, 1024, 40, 2048, 70, 35, false);
    check(Format::Nf4, 1024, 40, 2048, 140, 36, false);
    check(Format::Nf4, 1024, 40, 2048, 300, 37, false);
    // 576-wide rows at batch 200: the dot-product kernel on AVX-512 hosts, the `gemm` crate's
    // elsewhere.
    check(Format::Nf4, 64, 70, 576, 200, 38, false);
    check(Format::Nvfp4, 16, 19, 300, 9, 13, false);
    check(Format::Nf4, 64, 13, 96, 20, 14, false);
    check(Format::Fp4, 64, 1000, 640, 33, 15, true);
    // Chunk-order tile decode: a padded row's tail after its last whole chunk, blocks of two
    // chunks.
    check(Format::Nvfp4, 16, 70, 1100, 20, 28, false);
    check(Format::Nf4, 128, 50, 640, 12, 29, false);
    // Wide rows: whole in q4's dot-product kernel up to 128 activation rows, in K slices (a
    // short last one) for the `gemm` crate's above.
    check(Format::Nvfp4, 16, 40, 1100, 40, 33, false);
    check(Format::Nvfp4, 16, 40, 1100, 140, 34, false);
    // Batches 9-16 over rows wider than 1024 (whole-row tiles with AVX2, else passes of the
    // GEMV, see `gemv_passes_agree_with_reference`), a row tail.
    check(Format::Nvfp4, 16, 70, 1088, 9, 24, false);
    check(Format::Nf4, 64, 45, 1100, 12, 25, false);
    check(Format::Nf4, 1024, 40, 2048, 16, 26, false);
    check(Format::Mxfp4, 32, 33, 1536, 13, 27, false);
}

/// The GEMV passes for batches 9-16 (8 rows + the rest), forced: hosts without AVX2 take them
/// for rows wider than 1024. Other tests of this binary may run meanwhile with passes on: their
/// kernel choice changes, not their tolerance.
#[test]
fn gemv_passes_agree_with_reference() {
    use q4::kernels::cpu::{default_gemv_passes_min_k, set_gemv_passes_min_k};
    set_gemv_passes_min_k(0);
    check(Format::Nvfp4, 16, 70, 1088, 9, 30, false);
    check(Format::Nf4, 64, 45, 1100, 12, 31, false);
    check(Format::Mxfp4, 32, 33, 576, 16, 32, false);
    set_gemv_passes_min_k(default_gemv_passes_min_k());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn fused_agrees_with_reference_on_random_shapes(
        fmt in 0usize..4, n in 1usize..70, kb in 1usize..12, batch in prop::sample::select(vec![1usize, 2, 3, 4, 5, 6, 7, 8, 9, 16, 33]), seed in 0u64..1000
    ) {
        let (format, block) = [(Format::Nvfp4, 16), (Format::Nf4, 64), (Format::Fp4, 32), (Format::Mxfp4, 32)][fmt];
        check(format, block, n, kb * 32, batch, seed, false);
    }
}

/// Exact W4A4 reference: dequantize activations and weight with unit tensor scales (every value
/// is then an exact multiple of 2^-10), sum the products exactly in i128, round once to f32, and
/// apply alpha = s2x * s2w — with none of the kernel's code paths.
fn w4a4_reference(w: &Nvfp4Tensor, xq: &Nvfp4Tensor) -> Vec<f32> {
    let unit = |t: &Nvfp4Tensor| -> Vec<f32> {
        Nvfp4Tensor {
            scale2: 1.0,
            ..t.clone()
        }
        .dequantize()
        .unwrap()
    };
    let (wd, xd) = (unit(w), unit(xq));
    let k = w.cols;
    let mut y = vec![0f32; xq.rows * w.rows];
    for m in 0..xq.rows {
        for n in 0..w.rows {
            let mut acc: i128 = 0;
            for i in 0..k {
                let a = (xd[m * k + i] as f64 * 1024.0) as i128;
                let b = (wd[n * k + i] as f64 * 1024.0) as i128;
                assert_eq!(
                    a as f64,
                    xd[m * k + i] as f64 * 1024.0,
                    "not a multiple of 2^-10"
                );
                acc += a * b;
            }
            y[m * w.rows + n] = (acc as f32) * (1.0 / (1u64 << 20) as f32) * (xq.scale2 * w.scale2);
        }
    }
    y
}

#[test]
fn w4a4_is_bit_exact_with_explicit_quantize_dequantize_reference() {
    for (n, k, batch, seed) in [(33, 128, 1, 1u64), (20, 256, 7, 2), (64, 64, 16, 3)] {
        let w = Tensor::from_vec(randn(seed, n * k), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, &QuantSpec::new(Format::Nvfp4)).unwrap();
        let xs = randn(seed + 9, batch * k);
        let x = Tensor::from_vec(xs.clone(), (batch, k), &Device::Cpu).unwrap();
        for act in [
            ActQuant::Nvfp4Dynamic,
            ActQuant::Nvfp4Static {
                input_scale: 0.0011,
            },
        ] {
            let layer = QLinear::new(q.clone(), None)
                .unwrap()
                .with_act_quant(act)
                .unwrap();
            let y = f32_values(&layer.forward(&x).unwrap());
            let xq = w4a4::quantize_activations(&xs, k, act).unwrap();
            let q4_formats_w = match q.to_formats().unwrap() {
                q4::Quantized::Nvfp4(t) => t,
                _ => unreachable!(),
            };
            let want = w4a4_reference(&q4_formats_w, &xq);
            assert_eq!(
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{act:?}"
            );
            // And it is close to the float reference (fake-quantized activations, dense matmul).
            let e = rel_err(
                &layer.forward(&x).unwrap(),
                &layer.forward_reference(&x).unwrap(),
            );
            assert!(e < 1e-5, "{act:?}: {e}");
        }
    }
}

/// W4A8 (int8 activations) equals the reference with int8-round-tripped activations, on the
/// int8 kernel at decode and prefill batches (single weight rows, groups of four activation
/// rows over decoded weight tiles, odd row counts), the f32 fallback (above the int8 kernel's
/// largest batch, or a width not a multiple of its 64), and inputs with leading dimensions; the
/// activation round trip matches `Int8Acts` bit for bit.
#[test]
fn w4a8_matches_the_int8_round_trip_reference() {
    for format in Format::ALL {
        for (n, k, batch, seed) in [
            (33, 128, 1, 1u64),
            (20, 576, 3, 2),
            (7, 64, 8, 3),
            (40, 256, 16, 4),
            (9, 128, 64, 5),
            (6, 96, 5, 6),
            (11, 64, 80, 7),
            (30, 192, 7, 8),
            (25, 320, 12, 9),
        ] {
            let w = Tensor::from_vec(randn(seed, n * k), (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, &QuantSpec::new(format)).unwrap();
            let layer = QLinear::new(q, None)
                .unwrap()
                .with_act_quant(ActQuant::Int8)
                .unwrap();
            let xs = randn(seed + 9, batch * k);
            let x = Tensor::from_vec(xs.clone(), (batch, k), &Device::Cpu).unwrap();
            let rt = q4::qlinear::fake_quantize_int8(&x).unwrap();
            let want_rt = q4::kernels::cpu::w4a8::Int8Acts::quantize(&xs, k).dequantize();
            // Equal as numbers (the tensor path may round a small negative to -0).
            let rt = f32_values(&rt);
            assert!(
                rt.iter().zip(&want_rt).all(|(a, b)| a == b),
                "{format} round trip"
            );
            let y = layer.forward(&x).unwrap();
            let e = rel_err(&y, &layer.forward_reference(&x).unwrap());
            assert!(e < 1e-5, "{format} {n}x{k} batch {batch}: {e}");
            // Leading dimensions and bf16 activations.
            let x3 = x.reshape((1, batch, k)).unwrap();
            let y3 = layer.forward(&x3).unwrap();
            assert_eq!(y3.dims(), &[1, batch, n]);
            let yb = layer.forward(&x3.to_dtype(DType::BF16).unwrap()).unwrap();
            assert_eq!(yb.dtype(), DType::BF16);
            let e = rel_err(
                &yb.to_dtype(DType::F32)
                    .unwrap()
                    .reshape((batch, n))
                    .unwrap(),
                &y,
            );
            assert!(e < 1e-2, "{format} bf16: {e}");
        }
    }
}

/// Weights whose block scales lie outside the range the AMX kernels take (NF4 / bnb-FP4 absmax,
/// MXFP4 E8M0 bytes; all tiny, or one block huge) still agree with the reference at batches
/// that would take them: the kernels refuse them and the f32 kernels answer instead.
#[test]
fn weights_with_extreme_scales_agree_with_reference() {
    let (n, k) = (48, 2048);
    for format in [Format::Nf4, Format::Fp4, Format::Mxfp4] {
        // Every weight tiny (the low bf16 pieces would be subnormal, which the tile unit
        // flushes: about 1e-3 relative error had the kernel taken them), or one block huge.
        for (extreme, all) in [(1e-36f32, true), (1e30, false)] {
            let mut w = randn(77, n * k);
            let scaled = if all {
                0..n * k
            } else {
                5 * k + 64..5 * k + 128
            };
            for v in &mut w[scaled] {
                *v *= extreme;
            }
            let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, &QuantSpec::new(format)).unwrap();
            let layer = QLinear::new(q, None).unwrap();
            for batch in [16, 33] {
                let x = Tensor::from_vec(randn(batch as u64, batch * k), (batch, k), &Device::Cpu)
                    .unwrap();
                // Outputs brought back near 1 (rel_err floors its denominator at 1e-30).
                let unit = |t: Tensor| (t / extreme as f64).unwrap();
                let y = unit(layer.forward(&x).unwrap());
                let e = rel_err(&y, &unit(layer.forward_reference(&x).unwrap()));
                assert!(e < 1e-5, "{format} scale x{extreme} batch {batch}: {e}");
            }
        }
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let w = Tensor::from_vec(randn(1, 8 * 32), (8, 32), &Device::Cpu).unwrap();
    let layer =
        QLinear::from_dense(&w, None, Some(&QuantSpec::new(Format::Nf4).with_block(32))).unwrap();
    let x = Tensor::zeros((2, 31), DType::F32, &Device::Cpu).unwrap();
    let e = layer.forward(&x).unwrap_err().to_string();
    assert!(
        e.contains("expects inputs [..., 32]") && e.contains("[2, 31]"),
        "{e}"
    );
    let x = Tensor::zeros((2, 32), DType::U32, &Device::Cpu).unwrap();
    let e = layer.forward(&x).unwrap_err().to_string();
    assert!(e.contains("must be f32, bf16 or f16"), "{e}");
    let refused = |l: &QLinear, act| l.clone().with_act_quant(act).unwrap_err().to_string();
    let e = refused(&layer, ActQuant::Nvfp4Dynamic);
    assert!(
        e.contains("needs an NVFP4 weight") && e.contains("nf4"),
        "{e}"
    );
    let dense = QLinear::dense(w.clone(), None).unwrap();
    let e = refused(&dense, ActQuant::Int8);
    assert!(
        e.contains("needs a 4-bit weight") && e.contains("dense"),
        "{e}"
    );
    let odd = Tensor::from_vec(randn(2, 4 * 48), (4, 48), &Device::Cpu).unwrap();
    let odd = QLinear::from_dense(&odd, None, Some(&QuantSpec::new(Format::Nvfp4))).unwrap();
    let e = refused(&odd, ActQuant::Int8);
    assert!(e.contains("multiple of 32") && e.contains("48"), "{e}");
    let e = QTensor::quantize(
        &Tensor::zeros((4, 20), DType::F32, &Device::Cpu).unwrap(),
        &QuantSpec::new(Format::Nvfp4),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a multiple of the block size 16"), "{e}");
    let e = QTensor::quantize(
        &Tensor::zeros((4, 32), DType::U8, &Device::Cpu).unwrap(),
        &QuantSpec::new(Format::Nvfp4),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("dtype U8"), "{e}");
    let bad_bias = Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap();
    let e = QLinear::from_dense(&w, Some(bad_bias), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bias must have shape [8]"), "{e}");
}

#[test]
fn fused_layers_give_the_parts_outputs_exactly() {
    let k = 128;
    let ws: Vec<Tensor> = [48usize, 16, 16]
        .iter()
        .enumerate()
        .map(|(i, &n)| Tensor::from_vec(randn(40 + i as u64, n * k), (n, k), &Device::Cpu).unwrap())
        .collect();
    let x = Tensor::from_vec(randn(50, 3 * k), (3, k), &Device::Cpu).unwrap();
    for format in [Format::Nvfp4, Format::Nf4, Format::Mxfp4] {
        let mut spec = QuantSpec::new(format);
        // A shared NVFP4 tensor scale, as fused groups have.
        spec.scale2 = (format == Format::Nvfp4).then_some(0.001);
        let parts: Vec<QLinear> = ws
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let b =
                    (i == 1).then(|| Tensor::from_vec(randn(60, 16), 16, &Device::Cpu).unwrap());
                QLinear::from_dense(w, b, Some(&spec)).unwrap()
            })
            .collect();
        let fused = QLinear::fuse(&parts).unwrap();
        let y = fused.forward(&x).unwrap();
        let want = Tensor::cat(
            &parts
                .iter()
                .map(|p| p.forward(&x).unwrap())
                .collect::<Vec<_>>(),
            1,
        )
        .unwrap();
        let (a, b) = (f32_values(&y), f32_values(&want));
        assert_eq!(a, b, "{format}");
    }
    // NVFP4 parts with their own tensor scales cannot share one scale table.
    let parts: Vec<QLinear> = ws
        .iter()
        .map(|w| QLinear::from_dense(w, None, Some(&QuantSpec::new(Format::Nvfp4))).unwrap())
        .collect();
    let e = QLinear::fuse(&parts).unwrap_err().to_string();
    assert!(e.contains("different tensor scales"), "{e}");
}

#[test]
fn gathered_rows_equal_the_dequantized_rows() {
    let (n, k) = (37, 96);
    let w = Tensor::from_vec(randn(70, n * k), (n, k), &Device::Cpu).unwrap();
    for format in [Format::Nvfp4, Format::Nf4, Format::Mxfp4] {
        let q = QTensor::quantize(
            &w,
            &QuantSpec::new(format).with_block(format.default_block_size().min(32)),
        )
        .unwrap();
        let dense = q.dequantize(DType::F32).unwrap();
        let ids = [0u32, 36, 5, 5, 17];
        let got = f32_values(&q.gather_rows(&ids).unwrap());
        let idx = Tensor::new(&ids, &Device::Cpu).unwrap();
        let want = f32_values(&dense.index_select(&idx, 0).unwrap());
        // Equal values (the sign of zero may differ: the codebooks decode code 8 as -0).
        assert!(got.iter().zip(&want).all(|(a, b)| a == b), "{format}");
        assert!(q
            .gather_rows(&[37])
            .unwrap_err()
            .to_string()
            .contains("outside the 37 rows"));
    }
}

#[test]
fn dense_bf16_weights_agree_with_the_f32_matmul() {
    for (n, k, batch) in [(37, 96, 1), (1100, 1024, 3), (70, 200, 16), (5, 8, 7)] {
        let w = Tensor::from_vec(randn(80 + n as u64, n * k), (n, k), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let layer = QLinear::dense(w.clone(), None).unwrap();
        let x = Tensor::from_vec(randn(90, batch * k), (batch, k), &Device::Cpu).unwrap();
        let y = layer.forward(&x).unwrap();
        let want = x
            .matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
            .unwrap();
        let e = rel_err(&y, &want);
        assert!(e <= 1e-5, "n={n} k={k} batch={batch}: {e}");
    }
}

/// candle's Q4K matmul (AMX where the host has it, configuring each thread's tiles once) and
/// q4's tile kernels take turns on one thread: q4 must leave candle's tile configuration in
/// place. (Before it did, candle's next call faulted with an invalid opcode in `q4 bench
/// linear`, once q4's kernels also ran on the calling thread.) Elsewhere this is a plain
/// agreement test.
#[test]
fn candle_q4k_and_q4_take_turns_on_one_thread() {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor as CandleQTensor};
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.05, (256, 512), &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (64, 512), &dev).unwrap();
    let q4k = QMatMul::from_qtensor(CandleQTensor::quantize(&w, GgmlDType::Q4K).unwrap()).unwrap();
    let first = q4k.forward(&x).unwrap().to_vec2::<f32>().unwrap();
    // Small enough to run on this thread alone, batch 16: q4's tile kernels where AMX is usable.
    let small = w.narrow(0, 0, 64).unwrap().narrow(1, 0, 256).unwrap();
    let xs = x
        .narrow(0, 0, 16)
        .unwrap()
        .narrow(1, 0, 256)
        .unwrap()
        .contiguous()
        .unwrap();
    for format in [Format::Nvfp4, Format::Nf4] {
        let lin = QLinear::new(
            QTensor::quantize(&small, &QuantSpec::new(format)).unwrap(),
            None,
        )
        .unwrap();
        let y = lin.forward(&xs).unwrap();
        let reference = lin.forward_reference(&xs).unwrap();
        let err = rel_err(&y, &reference);
        assert!(err < 1e-5, "{format}: {err}");
        let again = q4k.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(first, again, "candle's Q4K after q4 {format}");
    }
}

/// `forward_into` writes exactly `forward`'s result into the caller's buffer (with a bias and
/// leading dimensions too), and refuses a buffer of the wrong shape or dtype by name.
#[test]
fn forward_into_writes_the_forward_result_in_place() {
    let w = Tensor::from_vec(randn(7, 24 * 64), (24, 64), &Device::Cpu).unwrap();
    let bias = Tensor::from_vec(randn(8, 24), 24, &Device::Cpu).unwrap();
    for (layer, dt) in [
        (
            QLinear::from_dense(&w, None, Some(&QuantSpec::new(Format::Nvfp4))).unwrap(),
            DType::F32,
        ),
        (
            QLinear::from_dense(&w, Some(bias), Some(&QuantSpec::new(Format::Nf4))).unwrap(),
            DType::BF16,
        ),
    ] {
        let x = Tensor::from_vec(randn(9, 2 * 3 * 64), (2, 3, 64), &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let out = Tensor::zeros((2, 3, 24), dt, &Device::Cpu).unwrap();
        layer.forward_into(&x, &out).unwrap();
        assert_eq!(
            f32_values(&out),
            f32_values(&layer.forward(&x).unwrap()),
            "{dt:?}"
        );
        let wrong = Tensor::zeros((2, 3, 23), dt, &Device::Cpu).unwrap();
        let e = layer.forward_into(&x, &wrong).unwrap_err().to_string();
        assert!(e.contains("[2, 3, 24]") && e.contains("[2, 3, 23]"), "{e}");
        let wrong = Tensor::zeros((2, 3, 24), DType::F16, &Device::Cpu).unwrap();
        let e = layer.forward_into(&x, &wrong).unwrap_err().to_string();
        assert!(e.contains("F16"), "{e}");
    }
}
