//! Same-process A/B of the W4A8 VNNI GEMV (`w4a8_gemv`, batches 1-4) against what those
//! batches took before it: the AVX2 int8 GEMV for E2M1 weights (NVFP4), the f32 kernels on the
//! activations' round trip for the bitsandbytes int8 codebooks (NF4). W4A8 `QLinear` calls
//! with each alternate on weight copies rotating over 3 x `LLC_MIB` (cache-cold); prints the
//! median µs of each and their ratio.
//!
//! `cargo run --release -p q4 --example ab_w4a8_gemv [-- SHAPES BATCHES ROUNDS LLC_MIB]`
//! (batches 1, 2 and 4 by default)

#[cfg(target_arch = "x86_64")]
mod ab;

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("ab_w4a8_gemv: the VNNI kernel is x86-64 only");
    std::process::exit(2);
}

#[cfg(target_arch = "x86_64")]
fn main() {
    use q4::kernels::cpu::w4a8_gemv::set_enabled;
    let args = ab::ColdArgs::parse("4096x4096,11008x4096,1536x576,576x1536,49152x576", "1,2,4");
    let formats = [q4::Format::Nvfp4, q4::Format::Nf4];
    args.run_w4a8(&formats, ("vnni", "before"), &set_enabled);
}
