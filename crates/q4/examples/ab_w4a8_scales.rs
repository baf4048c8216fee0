//! Same-process A/B of the VNNI W4A8 kernel's arithmetic scale decode (NVFP4's E4M3, MXFP4's
//! E8M0) against gathers from the scale table: W4A8 `QLinear` calls with each alternate on
//! weight copies rotating over 3 x `LLC_MIB` (cache-cold); prints the median µs of each and
//! their ratio.
//!
//! `cargo run --release -p q4 --example ab_w4a8_scales [-- SHAPES BATCHES ROUNDS LLC_MIB
//! FORMAT]` (FORMAT `nvfp4`, the default, or `mxfp4`).

#[cfg(target_arch = "x86_64")]
mod ab;

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("ab_w4a8_scales: the VNNI kernel is x86-64 only");
    std::process::exit(2);
}

#[cfg(target_arch = "x86_64")]
fn main() {
    use q4::kernels::cpu::w4a8_vnni::set_arith_scales;
    let args = ab::ColdArgs::parse("4096x4096,11008x4096,1536x576,49152x576", "5,8,16,64");
    let format = match std::env::args().nth(5).as_deref() {
        None | Some("nvfp4") => q4::Format::Nvfp4,
        Some("mxfp4") => q4::Format::Mxfp4,
        Some(other) => panic!("FORMAT is nvfp4 or mxfp4, not {other}"),
    };
    args.run_w4a8(&[format], ("arith", "gather"), &set_arith_scales);
}
