//! Compute rate of the CPU prefill paths (batches 16-256) on SmolLM2's layer shapes, one
//! thread, weights warm: the W4A8 int8 kernel, the weight-only NVFP4 tile decode + f32 GEMM,
//! candle's f32 matmul on the dense weight and, where rows are whole 256-weight super-blocks,
//! candle's `QMatMul` on a GGUF Q4K copy (the peer the W4A8 kernel is measured against). Prefill is compute-bound, so this is the rate
//! that decides `q4 generate`'s prompt speed.
//!
//! Run: `RAYON_NUM_THREADS=1 cargo bench -p q4 --bench gemm_compute [-- filter]`

use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use q4::{ActQuant, Format, QLinear, QTensor, QuantSpec};

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut g = c.benchmark_group("gemm_1thread");
    g.sample_size(20);

    // SmolLM2-135M: fused gate/up, down, fused q/k/v; and a 4096-wide layer (7B-sized rows).
    for (n, k) in [(3072usize, 576usize), (576, 1536), (960, 576), (4096, 4096)] {
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
        let q = QTensor::quantize(&w, &QuantSpec::new(Format::Nvfp4)).unwrap();
        let w4a8 = QLinear::new(q.clone(), None)
            .unwrap()
            .with_act_quant(ActQuant::Int8)
            .unwrap();
        let w4a16 = QLinear::new(q, None).unwrap();
        let q4k = k.is_multiple_of(256).then(|| {
            let t = candle_core::quantized::QTensor::quantize(
                &w,
                candle_core::quantized::GgmlDType::Q4K,
            )
            .unwrap();
            candle_core::quantized::QMatMul::from_qtensor(t).unwrap()
        });
        for batch in [16usize, 64, 256] {
            let x = Tensor::randn(0f32, 1.0, (batch, k), &dev).unwrap();
            // Throughput in multiply-adds.
            g.throughput(Throughput::Elements((n * k * batch) as u64));
            g.bench_function(format!("nvfp4-w4a8/{n}x{k}/b{batch}"), |b| {
                b.iter(|| w4a8.forward(&x).unwrap())
            });
            g.bench_function(format!("nvfp4/{n}x{k}/b{batch}"), |b| {
                b.iter(|| w4a16.forward(&x).unwrap())
            });
            g.bench_function(format!("f32/{n}x{k}/b{batch}"), |b| {
                b.iter(|| x.matmul(&w.t().unwrap()).unwrap())
            });
            if let Some(q4k) = &q4k {
                // The first call repacks the weight (candle 0.11): keep it out of the timing.
                q4k.forward(&x).unwrap();
                g.bench_function(format!("q4k/{n}x{k}/b{batch}"), |b| {
                    b.iter(|| q4k.forward(&x).unwrap())
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
