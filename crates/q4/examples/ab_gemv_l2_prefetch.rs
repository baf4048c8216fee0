//! Same-process A/B of the AVX-512 GEMVs' L2 prefetch of the weight stream (`prefetcht1` three
//! times the L1 distance ahead; batch 1: `kernels::cpu::avx512_groups`, 2-8: `avx512`) against
//! the L1 prefetch alone: calls alternate on cache-cold weights (copies rotating over `LLC_MIB` x 3
//! of memory); prints the median µs per call of each and their ratio.
//!
//! `cargo run --release -p q4 --example ab_gemv_l2_prefetch [-- SHAPES BATCHES ROUNDS LLC_MIB]`.

mod ab;

use q4::kernels::cpu::prefetch::set_l2_enabled;
use q4::Format;

fn main() {
    let args = ab::ColdArgs::parse(
        "4096x4096,11008x4096,1536x576,49152x576,576x1536,2048x8192",
        "1",
    );
    args.run(
        &[Format::Nvfp4, Format::Nf4, Format::Mxfp4],
        ("l1_and_l2", "l1_only"),
        &set_l2_enabled,
    );
}
