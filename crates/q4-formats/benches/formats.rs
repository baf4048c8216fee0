//! Quantize / dequantize throughput on a 4096x4096 f32 matrix, beside a plain memory copy of the
//! same 64 MiB measured in the same run (single-threaded `copy_from_slice` and a rayon copy over
//! all cores). Throughput is reported in bytes of the f32 matrix per second.
//!
//! Run: `cargo bench -p q4-formats --bench formats`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use q4_formats::bnb::{self, BnbOptions};
use q4_formats::mxfp4::{self, Mxfp4Options};
use q4_formats::nvfp4::{self, Nvfp4Options};
use rayon::prelude::*;

const N: usize = 4096;

fn weights() -> Vec<f32> {
    // Deterministic weight-like values (xorshift + a crude normal via sum of uniforms).
    let mut s = 0x9E3779B97F4A7C15u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..N * N)
        .map(|_| (next() + next() + next() - 1.5) * 0.05)
        .collect()
}

fn bench(c: &mut Criterion) {
    let w = weights();
    let bytes = (w.len() * 4) as u64;
    let mut g = c.benchmark_group("4096x4096_f32");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(20);

    let mut dst = vec![0f32; w.len()];
    g.bench_function("memcpy/1-thread", |b| b.iter(|| dst.copy_from_slice(&w)));
    g.bench_function("memcpy/rayon", |b| {
        b.iter(|| {
            dst.par_chunks_mut(1 << 16)
                .zip(w.par_chunks(1 << 16))
                .for_each(|(d, s)| d.copy_from_slice(s))
        })
    });

    g.bench_function(BenchmarkId::new("quantize", "nvfp4"), |b| {
        b.iter(|| nvfp4::quantize(&w, N, &Nvfp4Options::default()).unwrap())
    });
    g.bench_function(BenchmarkId::new("quantize", "nf4"), |b| {
        b.iter(|| bnb::quantize(&w, &BnbOptions::nf4()).unwrap())
    });
    g.bench_function(BenchmarkId::new("quantize", "nf4-double-quant"), |b| {
        b.iter(|| {
            bnb::quantize(
                &w,
                &BnbOptions {
                    double_quant: true,
                    ..BnbOptions::nf4()
                },
            )
            .unwrap()
        })
    });
    g.bench_function(BenchmarkId::new("quantize", "fp4"), |b| {
        b.iter(|| bnb::quantize(&w, &BnbOptions::fp4()).unwrap())
    });
    g.bench_function(BenchmarkId::new("quantize", "mxfp4"), |b| {
        b.iter(|| mxfp4::quantize(&w, N, &Mxfp4Options::default()).unwrap())
    });

    let nv = nvfp4::quantize(&w, N, &Nvfp4Options::default()).unwrap();
    let nf = bnb::quantize(&w, &BnbOptions::nf4()).unwrap();
    let fp = bnb::quantize(&w, &BnbOptions::fp4()).unwrap();
    let mx = mxfp4::quantize(&w, N, &Mxfp4Options::default()).unwrap();
    g.bench_function(BenchmarkId::new("dequantize", "nvfp4"), |b| {
        b.iter(|| nv.dequantize_into(&mut dst).unwrap())
    });
    g.bench_function(BenchmarkId::new("dequantize", "nf4"), |b| {
        b.iter(|| nf.dequantize_into(&mut dst).unwrap())
    });
    g.bench_function(BenchmarkId::new("dequantize", "fp4"), |b| {
        b.iter(|| fp.dequantize_into(&mut dst).unwrap())
    });
    g.bench_function(BenchmarkId::new("dequantize", "mxfp4"), |b| {
        b.iter(|| mx.dequantize_into(&mut dst).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
