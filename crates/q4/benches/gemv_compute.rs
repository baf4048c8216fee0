//! Compute rate of the fused CPU GEMV, one thread, weights warm in L2/L3: how many 4-bit
//! weights per second the decode + FMA loop retires when memory is not the limit. Batch-1 decode
//! can only reach the memory-bandwidth bound if this rate is well above it.
//!
//! Run: `RAYON_NUM_THREADS=1 cargo bench -p q4 --bench gemv_compute`

use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use q4::{ActQuant, Format, QLinear, QTensor, QuantSpec};

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut g = c.benchmark_group("gemv_warm_1thread");
    g.sample_size(30);
    for (n, k) in [(512usize, 4096usize), (1536, 576), (128, 576)] {
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
        for (name, f, act) in [
            ("nvfp4", Format::Nvfp4, ActQuant::None),
            ("nvfp4-w4a8", Format::Nvfp4, ActQuant::Int8),
            ("nf4", Format::Nf4, ActQuant::None),
        ] {
            let q = QTensor::quantize(&w, &QuantSpec::new(f)).unwrap();
            let lin = QLinear::new(q, None).unwrap().with_act_quant(act).unwrap();
            for batch in [1usize, 4] {
                let x = Tensor::randn(0f32, 1.0, (batch, k), &dev).unwrap();
                // Throughput in weights (elements), so formats compare directly.
                g.throughput(Throughput::Elements((n * k) as u64));
                g.bench_function(format!("{name}/{n}x{k}/b{batch}"), |b| {
                    b.iter(|| lin.forward(&x).unwrap())
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
