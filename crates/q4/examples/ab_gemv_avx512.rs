//! Same-process A/B of the AVX-512 GEMV against the AVX2 one: calls with each kernel alternate
//! on cache-cold weights (copies rotating over `LLC_MIB` x 3 of memory), so the host's noise
//! hits both alike; prints the median µs per call of each and their ratio.
//!
//! `cargo run --release -p q4 --example ab_gemv_avx512 [-- SHAPES BATCHES ROUNDS LLC_MIB]`,
//! SHAPES like `4096x4096,576x1536` (default: the shapes and SmolLM2's decode shapes).

#[cfg(target_arch = "x86_64")]
mod ab;

#[cfg(target_arch = "x86_64")]
use q4::Format;

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
    let args = ab::ColdArgs::parse("4096x4096,11008x4096,1536x576,576x1536,49152x576", "1,4");
    args.run(
        &[Format::Nvfp4, Format::Nf4, Format::Mxfp4],
        ("avx512", "avx2"),
        &set_enabled,
    );
}
