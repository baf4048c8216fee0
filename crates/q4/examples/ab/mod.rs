//! The same-process A/B harness the `ab_*` examples share: calls of two variants alternate, each
//! on the next of many weight copies (cache-cold), so the host's noise hits both alike.

/// `OUTxIN` as `(out, in)`.
pub fn parse_shape(s: &str) -> (usize, usize) {
    let (n, k) = s.split_once('x').expect("shape as OUTxIN");
    (n.parse().expect("OUT"), k.parse().expect("IN"))
}

/// Runs `rounds` rounds of `call(copy)` under `select(true)` then `select(false)`, each call on
/// the next copy (`copies` of them), leaves `select(true)` in force, and returns the median µs
/// per call of each variant, the first `warmup` rounds not counted.
pub fn interleave(
    rounds: usize,
    warmup: usize,
    copies: usize,
    select: &dyn Fn(bool),
    call: &dyn Fn(usize),
) -> (f64, f64) {
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        for (flag, times) in [(true, &mut on), (false, &mut off)] {
            select(flag);
            let t = std::time::Instant::now();
            call((2 * i + usize::from(flag)) % copies);
            if i >= warmup {
                times.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    select(true);
    (median(&mut on), median(&mut off))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
