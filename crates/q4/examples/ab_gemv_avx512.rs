//! Same-process A/B of the AVX-512 GEMV against the AVX2 one: calls with each kernel alternate
//! on cache-cold weights (copies rotating over `LLC_MIB` x 3 of memory), so the host's noise
//! hits both alike; prints the median µs per call of each and their ratio.
//!
//! `cargo run --release -p q4 --example ab_gemv_avx512 [-- SHAPES BATCHES ROUNDS LLC_MIB]`,
//! SHAPES like `4096x4096,576x1536` (default: the shapes and SmolLM2's decode shapes).

#[cfg(target_arch = "x86_64")]
mod ab;

#[cfg(target_arch = "x86_64")]
use candle_core::{Device, Module, Tensor};
#[cfg(target_arch = "x86_64")]
use q4::{Format, QLinear, QTensor, QuantSpec};

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("ab_gemv_avx512: AVX-512 is an x86-64 feature");
    std::process::exit(2);
}

#[cfg(target_arch = "x86_64")]
fn main() {
    use q4::kernels::cpu::avx512::set_enabled;
    if !q4::kernels::cpu::avx512::usable() {
        eprintln!("ab_gemv_avx512: AVX-512F is not usable on this host");
        std::process::exit(2);
    }
    let dev = Device::Cpu;
    let args: Vec<String> = std::env::args().collect();
    let shapes = args
        .get(1)
        .map_or("4096x4096,11008x4096,1536x576,576x1536,49152x576", |s| {
            s.as_str()
        });
    let batches: Vec<usize> = args
        .get(2)
        .map_or("1,4", |s| s.as_str())
        .split(',')
        .map(|b| b.parse().expect("batch"))
        .collect();
    let rounds: usize = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(200);
    let llc_mib: usize = args.get(4).and_then(|v| v.parse().ok()).unwrap_or(32);
    println!("shape        format batch copies  avx512_us  avx2_us  ratio");
    for shape in shapes.split(',') {
        let (n, k) = ab::parse_shape(shape);
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
        for format in [Format::Nvfp4, Format::Nf4, Format::Mxfp4] {
            let copies = ((3 * llc_mib) << 20) / (n * k * 9 / 16) + 1;
            let lins: Vec<QLinear> = (0..copies)
                .map(|_| {
                    let q = QTensor::quantize(&w, &QuantSpec::new(format)).unwrap();
                    QLinear::new(q, None).unwrap()
                })
                .collect();
            for &batch in &batches {
                let x = Tensor::randn(0f32, 1.0, (batch, k), &dev).unwrap();
                let (a, b) = ab::interleave(rounds.max(copies), 10, copies, &set_enabled, &|c| {
                    std::hint::black_box(lins[c].forward(&x).unwrap());
                });
                println!(
                    "{shape:<12} {:<6} {batch:>5} {copies:>6} {a:>10.1} {b:>8.1} {:>6.3}",
                    format.name(),
                    a / b
                );
            }
        }
    }
}
