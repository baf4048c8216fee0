//! Same-process A/B of the batch-1 GEMV's 128-weight groups (`kernels::cpu::avx512_groups`)
//! against the 64-weight chunk kernel: calls alternate on cache-cold weights (copies rotating
//! over `LLC_MIB` x 3 of memory, or warm with `LLC_MIB` 0); prints the median µs per call of
//! each and their ratio.
//!
//! `cargo run --release -p q4 --example ab_gemv_groups [-- SHAPES BATCHES ROUNDS LLC_MIB]`.

mod ab;

use q4::kernels::cpu::avx512_groups::set_enabled;
use q4::Format;

fn main() {
    let args = ab::ColdArgs::parse("4096x4096,11008x4096,1536x576,49152x576", "1");
    args.run(
        &[Format::Nvfp4, Format::Nf4, Format::Mxfp4],
        ("groups", "chunks"),
        &set_enabled,
    );
}
