//! Same-process A/B of the parallel loops' caller share: a matmul called from the main thread
//! runs its loops on it and the pool's other workers (claiming pieces as they go) against
//! handing each whole loop to the pool. Calls alternate on cache-cold weights (copies rotating
//! over `LLC_MIB` x 3 of memory); prints the median µs per call of each and their ratio.
//!
//! `cargo run --release -p q4 --example ab_caller_joins [-- SHAPES BATCHES ROUNDS LLC_MIB]`.

mod ab;

use q4::kernels::cpu::parallel::set_caller_joins;
use q4::Format;

fn main() {
    let args = ab::ColdArgs::parse("4096x4096,11008x4096,1536x576,49152x576", "1,4");
    args.run(
        &[Format::Nvfp4, Format::Nf4],
        ("caller_joins", "pool_only"),
        &set_caller_joins,
    );
}
