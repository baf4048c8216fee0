//! Thread-count plumbing between rayon (q4's kernels) and candle.

/// Call first thing in `main`, before any thread starts: sets `RAYON_NUM_THREADS` (unless the
/// user did) to rayon's own default, the logical CPU count, so that candle stops re-counting the
/// CPUs on every call.
///
/// Why: candle 0.11's CPU matmul asks `candle_core::utils::get_num_threads()` on every call,
/// which (without `RAYON_NUM_THREADS`, on Linux without a CPU mask in the environment) parses
/// `/proc/cpuinfo` through `num_cpus::get_physical` — 44 µs each on the 2-vCPU test host, 61
/// calls per prefill of SmolLM2 (the attention products): 12-token prefills ran 1.086x faster
/// without them (same-process A/B). The
/// global rayon pool, which q4's kernels use, already has this many threads.
pub fn pin_candle_thread_count() {
    let set = std::env::var_os("RAYON_NUM_THREADS");
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let Some(v) = rayon_threads_to_set(set.as_deref().and_then(|s| s.to_str()), logical) {
        std::env::set_var("RAYON_NUM_THREADS", v);
    }
}

/// The `RAYON_NUM_THREADS` value [`pin_candle_thread_count`] sets, given the current one: none
/// when the user set a usable count (rayon and candle both honour it), else `logical`.
fn rayon_threads_to_set(current: Option<&str>, logical: usize) -> Option<String> {
    match current.and_then(|s| s.trim().parse::<usize>().ok()) {
        Some(n) if n > 0 => None,
        _ => Some(logical.max(1).to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::rayon_threads_to_set;

    #[test]
    fn a_users_count_is_kept_and_anything_else_becomes_the_logical_count() {
        assert_eq!(rayon_threads_to_set(Some("3"), 8), None);
        assert_eq!(rayon_threads_to_set(None, 8).as_deref(), Some("8"));
        // Values rayon and candle ignore (then each would count the CPUs itself).
        assert_eq!(rayon_threads_to_set(Some("0"), 2).as_deref(), Some("2"));
        assert_eq!(rayon_threads_to_set(Some("many"), 2).as_deref(), Some("2"));
        assert_eq!(rayon_threads_to_set(None, 0).as_deref(), Some("1"));
    }
}
