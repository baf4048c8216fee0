//! Same-process A/B of the weight-only CPU matmul at batches above 8: passes of the GEMV
//! against the tiled GEMM, calls alternating on cache-cold NVFP4 weights (copies rotating over
//! 3x the last-level cache); prints the median µs per call of each.
//!
//! `cargo run --release -p q4 --example ab_gemv_passes [-- ROUNDS [SHAPES [BATCHES [FORMAT]]]]`,
//! SHAPES like `576x1536,4096x4096`, BATCHES like `9,12,16`, FORMAT `nvfp4` (default), `nf4`,
//! or `w4a8`: NVFP4 with int8 activations, whose kernel runs groups of four activation rows
//! either as passes over the weight or over decoded tiles (`set_i8_passes_max_batch`). By
//! default batches 9-16 with rows wider than 1024 take the GEMV passes only on hosts without
//! the AVX2 tile kernel (`kernels::cpu::GEMV_PASSES_MAX_BATCH`) and int8 batches up to 12
//! theirs; the comparison forces the choice both ways, whatever the width.

mod ab;

use candle_core::{Device, Module, Tensor};
use q4::kernels::cpu::w4a8::I8_PASSES_MAX_BATCH;
use q4::kernels::cpu::{default_gemv_passes_min_k, set_gemv_passes_min_k, set_i8_passes_max_batch};
use q4::{ActQuant, Format, QLinear, QTensor, QuantSpec};

/// A comma-separated argument, or `default`.
fn list(arg: Option<String>, default: &str) -> Vec<String> {
    arg.unwrap_or_else(|| default.to_string())
        .split(',')
        .map(String::from)
        .collect()
}

fn main() {
    let dev = Device::Cpu;
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|v| v.parse().ok()).unwrap_or(200);
    let shapes = list(
        args.next(),
        "576x1536,2048x1280,2560x2048,4096x4096,1024x1024,3072x576",
    );
    let batches: Vec<usize> = list(args.next(), "9,12,16")
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
        let (n, k) = ab::parse_shape(&shape);
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
        let copies = ab::cold_rotation_bytes() / (n * k * 9 / 16) + 1;
        let lins: Vec<QLinear> = (0..copies)
            .map(|_| {
                let q = QTensor::quantize(&w, &QuantSpec::new(format)).unwrap();
                QLinear::new(q, None).unwrap().with_act_quant(act).unwrap()
            })
            .collect();
        for &batch in &batches {
            let x = Tensor::randn(0f32, 1.0, (batch, k), &dev).unwrap();
            // Passes forced at any width, or never (the A/B covers both sides of the width
            // threshold).
            let select = |passes: bool| {
                set_gemv_passes_min_k(if passes { 0 } else { usize::MAX });
                set_i8_passes_max_batch(if passes { 64 } else { 0 });
            };
            let (a, b) = ab::interleave(rounds, 5, copies, &select, &|c| {
                std::hint::black_box(lins[c].forward(&x).unwrap());
            });
            set_gemv_passes_min_k(default_gemv_passes_min_k());
            set_i8_passes_max_batch(I8_PASSES_MAX_BATCH);
            println!("{shape:<10} {batch:>5} {a:>15.1} {b:>9.1} {:>6.3}", a / b);
        }
    }
}
