//! Same-process A/B of the weight-only CPU matmul at batches above 8: passes of the GEMV
//! against the tiled GEMM, calls alternating on cache-cold NVFP4 weights (copies rotating over
//! 3x a 32 MiB last-level cache); prints the median µs per call of each.
//!
//! `cargo run --release -p q4 --example ab_gemv_passes [-- ROUNDS [SHAPES [BATCHES [FORMAT]]]]`,
//! SHAPES like `576x1536,4096x4096`, BATCHES like `9,12,16`, FORMAT `nvfp4` (default), `nf4`,
//! or `w4a8`: NVFP4 with int8 activations, whose kernel runs groups of four activation rows
//! either as passes over the weight or over decoded tiles (`set_i8_passes_max_batch`). Only batches 9-16 with rows wider than
//! 1024 take the passes by default (`kernels::cpu::GEMV_PASSES_MAX_BATCH`); the comparison
//! forces the choice both ways, whatever the width.

use candle_core::{Device, Module, Tensor};
use q4::kernels::cpu::{set_gemv_passes_min_k, set_i8_passes_max_batch, GEMV_PASSES_MIN_K};
use q4::ActQuant;
use q4::{Format, QLinear, QTensor, QuantSpec};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn list<T: std::str::FromStr>(arg: Option<String>, default: &str) -> Vec<String>
where
    T::Err: std::fmt::Debug,
{
    arg.unwrap_or_else(|| default.to_string())
        .split(',')
        .map(String::from)
        .collect()
}

fn main() {
    let dev = Device::Cpu;
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|v| v.parse().ok()).unwrap_or(200);
    let shapes = list::<String>(
        args.next(),
        "576x1536,2048x1280,2560x2048,4096x4096,1024x1024,3072x576",
    );
    let batches: Vec<usize> = list::<usize>(args.next(), "9,12,16")
        .iter()
        .map(|b| b.parse().expect("batch"))
        .collect();
    let mode = args.next().unwrap_or_else(|| "nvfp4".into());
    let (format, act) = match mode.as_str() {
        "nf4" => (Format::Nf4, ActQuant::None),
        "w4a8" => (Format::Nvfp4, ActQuant::Int8),
        _ => (Format::Nvfp4, ActQuant::None),
    };
    println!("{mode}: shape  batch  passes_us  tiled_us  ratio");
    for shape in shapes {
        let (n, k) = shape.split_once('x').expect("OUTxIN");
        let (n, k): (usize, usize) = (n.parse().unwrap(), k.parse().unwrap());
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
        let copies = (96usize << 20) / (n * k * 9 / 16) + 1;
        let lins: Vec<QLinear> = (0..copies)
            .map(|_| {
                let q = QTensor::quantize(&w, &QuantSpec::new(format)).unwrap();
                QLinear::new(q, None).unwrap().with_act_quant(act).unwrap()
            })
            .collect();
        for &batch in &batches {
            let x = Tensor::randn(0f32, 1.0, (batch, k), &dev).unwrap();
            let (mut on, mut off) = (Vec::new(), Vec::new());
            for i in 0..rounds {
                for (flag, times) in [(true, &mut on), (false, &mut off)] {
                    // Passes forced at any width, or never (the A/B covers both sides of the
                    // width threshold).
                    set_gemv_passes_min_k(if flag { 0 } else { usize::MAX });
                    set_i8_passes_max_batch(if flag { 64 } else { 0 });
                    let l = &lins[(2 * i + usize::from(flag)) % copies];
                    let t = std::time::Instant::now();
                    std::hint::black_box(l.forward(&x).unwrap());
                    if i >= 5 {
                        times.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                }
            }
            set_gemv_passes_min_k(GEMV_PASSES_MIN_K);
            set_i8_passes_max_batch(12);
            let (a, b) = (median(&mut on), median(&mut off));
            println!("{shape:<10} {batch:>5} {a:>15.1} {b:>9.1} {:>6.3}", a / b);
        }
    }
}
