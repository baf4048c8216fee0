//! Quick single-call timing of the fused kernels on a warm (L2-resident) weight, to separate
//! compute throughput from memory bandwidth while tuning. Not a benchmark of record.
use std::time::Instant;

use candle_core::{Device, Tensor};
use q4::qtensor::QuantSpec;
use q4::{Format, QTensor};

fn main() {
    let (n, k): (usize, usize) = std::env::var("PROBE_SHAPE")
        .ok()
        .and_then(|s| {
            let (a, b) = s.split_once("x")?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .unwrap_or((256, 2048));
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
    let only: Option<String> = std::env::args().nth(1);
    let reps: usize = std::env::args().nth(2).map_or(200, |r| r.parse().unwrap());
    for f in [Format::Nvfp4, Format::Nf4, Format::Mxfp4] {
        if only.as_deref().is_some_and(|o| o != f.name()) {
            continue;
        }
        let q = QTensor::quantize(&w, &QuantSpec::new(f)).unwrap();
        let view = q.host_view().unwrap();
        for batch in [1usize, 4, 8, 16, 32, 64] {
            if std::env::args()
                .nth(3)
                .is_some_and(|b| b.parse::<usize>().unwrap() != batch)
            {
                continue;
            }
            let x = vec![0.5f32; batch * k];
            let mut y = vec![0f32; batch * n];
            for _ in 0..10 {
                q4::kernels::cpu::matmul(&view, &x, batch, &mut y);
            }
            let t = Instant::now();
            for _ in 0..reps {
                q4::kernels::cpu::matmul(&view, &x, batch, &mut y);
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{f} batch {batch}: {:.1} us, {:.2} Gweights/s, {:.1} GFLOP/s",
                s * 1e6,
                (n * k) as f64 / s / 1e9,
                2.0 * (n * k * batch) as f64 / s / 1e9
            );
        }
    }
}
