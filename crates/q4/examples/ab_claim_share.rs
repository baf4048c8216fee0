//! Same-process A/B of the claim size of the parallel loops a caller outside the pool joins: a
//! claim takes `1 / (SHARE x threads)` of the pieces left, `SHARE` (env, default 1) against 4.
//! Calls from the main thread alternate on cache-cold weights (copies rotating over `LLC_MIB`
//! x 3 of memory); prints the median µs per call of each and their ratio.
//!
//! `SHARE=1 cargo run --release -p q4 --example ab_claim_share [-- SHAPES BATCHES ROUNDS LLC_MIB]`.

mod ab;

use q4::kernels::cpu::parallel::set_claim_share;
use q4::Format;

fn main() {
    let share: usize = std::env::var("SHARE").map_or(1, |s| s.parse().expect("SHARE"));
    let args = ab::ColdArgs::parse("4096x4096,11008x4096,1536x576,49152x576", "1,4");
    args.run(
        &[Format::Nvfp4, Format::Nf4],
        ("share", "quarters"),
        &move |on| set_claim_share(if on { share } else { 4 }),
    );
}
