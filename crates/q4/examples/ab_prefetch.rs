//! Same-process A/B of the weight prefetch in the batch-1 kernels: calls with and without it
//! alternate on cache-cold weights (copies rotating over 3x the last-level cache), so the
//! host's noise hits both alike; prints the median µs per call of each.
//!
//! `cargo run --release -p q4 --example ab_prefetch [-- SHAPES [ROUNDS]]`, SHAPES like
//! `3072x576,576x1536` (default: SmolLM2's decode shapes and its LM head).

mod ab;

use candle_core::{Device, Module, Tensor};
use q4::kernels::cpu::prefetch::set_enabled;
use q4::{ActQuant, Format, Int8Table, QLinear, QTensor, QuantSpec};

fn main() {
    let dev = Device::Cpu;
    let args: Vec<String> = std::env::args().collect();
    let shapes = args
        .get(1)
        .map_or("3072x576,576x1536,960x576,576x576,49152x576", |s| {
            s.as_str()
        });
    let rounds: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(2000);
    println!("shape      mode            copies  prefetch_us  none_us  ratio");
    // `call(copy)` with the prefetch on and off, interleaved; the two medians.
    let ab = |copies: usize, call: &dyn Fn(usize)| {
        ab::interleave(rounds.max(copies), 20, copies, &set_enabled, call)
    };
    for shape in shapes.split(',') {
        let (n, k) = ab::parse_shape(shape);
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, k), &dev).unwrap();
        for (mode, act) in [("nvfp4", ActQuant::None), ("nvfp4-w4a8", ActQuant::Int8)] {
            let copies = ab::cold_rotation_bytes() / (n * k * 9 / 16) + 1;
            let lins: Vec<QLinear> = (0..copies)
                .map(|_| {
                    let q = QTensor::quantize(&w, &QuantSpec::new(Format::Nvfp4)).unwrap();
                    QLinear::new(q, None).unwrap().with_act_quant(act).unwrap()
                })
                .collect();
            let (a, b) = ab(copies, &|c| {
                std::hint::black_box(lins[c].forward(&x).unwrap());
            });
            println!(
                "{shape:<10} {mode:<15} {copies:>6} {a:>12.1} {b:>8.1} {:>6.3}",
                a / b
            );
        }
        // The token-table forms of an LM head: int8 (W8A8) and bf16.
        let copies = ab::cold_rotation_bytes() / (n * k) + 1;
        let tables: Vec<Int8Table> = (0..copies)
            .map(|_| Int8Table::quantize(&w).unwrap())
            .collect();
        let (a, b) = ab(copies, &|c| {
            std::hint::black_box(tables[c].matmul(&x).unwrap());
        });
        println!(
            "{shape:<10} {:<15} {copies:>6} {a:>12.1} {b:>8.1} {:>6.3}",
            "int8-table",
            a / b
        );
        let copies = ab::cold_rotation_bytes() / (2 * n * k) + 1;
        let dense: Vec<Vec<half::bf16>> = (0..copies)
            .map(|_| {
                w.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .into_iter()
                    .map(half::bf16::from_f32)
                    .collect()
            })
            .collect();
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (a, b) = ab(copies, &|c| {
            let mut y = vec![0f32; n];
            q4::kernels::cpu::dense::matmul_bf16(&dense[c], n, k, &xv, 1, &mut y);
            std::hint::black_box(y);
        });
        println!(
            "{shape:<10} {:<15} {copies:>6} {a:>12.1} {b:>8.1} {:>6.3}",
            "bf16",
            a / b
        );
    }
}
