//! Same-process A/B of the parallel loops' caller share: a matmul called from the main thread
//! runs its loops on it and the pool's other workers (claiming pieces as they go) against
//! handing each whole loop to the pool. Calls alternate on cache-cold weights (copies rotating over `LLC_MIB` x 3 of memory);
//! prints the median µs per call of each and their ratio.
//!
//! `cargo run --release -p q4 --example ab_caller_joins [-- SHAPES BATCHES ROUNDS LLC_MIB]`.

mod ab;

use candle_core::{Device, Module, Tensor};
use q4::kernels::cpu::parallel::set_caller_joins;
use q4::{Format, QLinear, QTensor, QuantSpec};

fn main() {
    let dev = Device::Cpu;
    let args: Vec<String> = std::env::args().collect();
    let shapes = args
        .get(1)
        .map_or("4096x4096,11008x4096,1536x576,49152x576", |s| s.as_str());
    let batches: Vec<usize> = args
        .get(2)
        .map_or("1,4", |s| s.as_str())
        .split(',')
        .map(|b| b.parse().expect("batch"))
        .collect();
    let rounds: usize = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(200);
    let llc_mib: usize = args.get(4).and_then(|v| v.parse().ok()).unwrap_or(32);
    println!("shape        format batch copies  caller_joins_us  pool_only_us  ratio");
    for shape in shapes.split(',') {
        let (n, k) = ab::parse_shape(shape);
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
        for format in [Format::Nvfp4, Format::Nf4] {
            let copies = ((3 * llc_mib) << 20) / (n * k * 9 / 16) + 1;
            let lins: Vec<QLinear> = (0..copies)
                .map(|_| {
                    let q = QTensor::quantize(&w, &QuantSpec::new(format)).unwrap();
                    QLinear::new(q, None).unwrap()
                })
                .collect();
            for &batch in &batches {
                let x = Tensor::randn(0f32, 1.0, (batch, k), &dev).unwrap();
                let (a, b) =
                    ab::interleave(rounds.max(copies), 10, copies, &set_caller_joins, &|c| {
                        std::hint::black_box(lins[c].forward(&x).unwrap());
                    });
                println!(
                    "{shape:<12} {:<6} {batch:>5} {copies:>6} {a:>16.1} {b:>13.1} {:>6.3}",
                    format.to_string(),
                    a / b
                );
            }
        }
    }
}
