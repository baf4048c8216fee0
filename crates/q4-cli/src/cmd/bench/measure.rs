//! Timing helpers: medians of many calls, a same-run memory-read bandwidth, and a guard that
//! detects other processes using the CPU while we measure.

use std::time::{Duration, Instant};

use rayon::prelude::*;

/// CPU time (jiffies) used by the whole machine and by this process.
#[derive(Clone, Copy, Debug)]
pub struct CpuSnapshot {
    busy_total: u64,
    ours: u64,
}

impl CpuSnapshot {
    pub fn take() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...
        let idle = cpu.get(3)? + cpu.get(4).copied().unwrap_or(0);
        let total: u64 = cpu.iter().take(8).sum();
        let own = std::fs::read_to_string("/proc/self/stat").ok()?;
        let after_comm = &own[own.rfind(')')? + 2..];
        let f: Vec<&str> = after_comm.split_whitespace().collect();
        let ours = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        Some(CpuSnapshot {
            busy_total: total - idle,
            ours,
        })
    }

    /// CPU time other processes used between `self` and `later`, in cores (1.0 = one core busy).
    pub fn others_since(&self, later: &CpuSnapshot, wall: Duration) -> f64 {
        let ticks = later.busy_total.saturating_sub(self.busy_total) as f64
            - later.ours.saturating_sub(self.ours) as f64;
        let hz = 100.0; // USER_HZ on Linux
        (ticks / hz).max(0.0) / wall.as_secs_f64().max(1e-9)
    }
}

/// One measurement: median seconds per call and how disturbed the machine was.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub median: f64,
    pub others: f64,
}

/// Shortest warm-up before a measurement. A fixed count of warm-up calls is not enough on the
/// shared hosts here: after a quiet or single-threaded spell (building the weight copies) the
/// first contender timed ran its sub-20 us calls up to 1.5x slower than the same contender timed
/// again right after (thirty-second session: 1536x576 NVFP4 batch 1, first 59-79% of the read
/// bandwidth, repeated 87-96%; NF4 took the penalty when it went first). The host gives the two
/// cores their full speed only after a spell of sustained work.
pub const MIN_WARMUP: Duration = Duration::from_millis(200);

/// Times `f` `reps` times after a warm-up of at least `warmup` calls and [`MIN_WARMUP`];
/// retries up to 3 times when other processes used more than `max_others` cores during the
/// warm-up and measurement, and reports the last attempt.
pub fn time<F: FnMut(usize)>(warmup: usize, reps: usize, max_others: f64, mut f: F) -> Timing {
    // One contender in one block: its calls back to back.
    time_interleaved(warmup, MIN_WARMUP, reps, reps, max_others, &mut [&mut f])
        .pop()
        .expect("one timing per contender")
}

/// Like [`time`] for several contenders at once, their calls interleaved in blocks: each round
/// makes `block` calls of every contender in turn, starting one contender further each round.
/// A change of the host's speed during the measurement then hits all of them alike, so their
/// ratios hold even where the absolute times drift. Blocks rather than single calls: one call at
/// a time between other contenders' cost q4's NVFP4 GEMV 1.5-2.5x per call. Retries the whole
/// measurement like [`time`]; every contender reports the same `others`.
pub fn time_interleaved(
    warmup: usize,
    min_warmup: Duration,
    reps: usize,
    block: usize,
    max_others: f64,
    fs: &mut [&mut dyn FnMut(usize)],
) -> Vec<Timing> {
    let block = block.max(1);
    let mut last = Vec::new();
    for _attempt in 0..3 {
        // The disturbance check spans the warm-up too: CPU time is counted in 10 ms ticks, which
        // a measurement of a few milliseconds alone could not resolve.
        let start_cpu = CpuSnapshot::take();
        let warm_start = Instant::now();
        loop {
            for i in 0..warmup {
                fs.iter_mut().for_each(|f| f(i));
            }
            if warmup == 0 || warm_start.elapsed() >= min_warmup {
                break;
            }
        }
        let mut samples = vec![Vec::with_capacity(reps); fs.len()];
        let n = fs.len();
        let mut done = 0;
        for round in 0.. {
            if done >= reps {
                break;
            }
            let calls = block.min(reps - done);
            // Each round starts with the next contender, so none always follows the same one.
            for c in (0..n).map(|c| (c + round) % n) {
                for i in done..done + calls {
                    let t = Instant::now();
                    fs[c](warmup + i);
                    samples[c].push(t.elapsed().as_secs_f64());
                }
            }
            done += calls;
        }
        let wall = warm_start.elapsed();
        let others = match (start_cpu, CpuSnapshot::take()) {
            (Some(a), Some(b)) => a.others_since(&b, wall),
            _ => 0.0,
        };
        last = samples
            .into_iter()
            .map(|mut s| {
                s.sort_by(f64::total_cmp);
                Timing {
                    median: s[s.len() / 2],
                    others,
                }
            })
            .collect();
        if others <= max_others {
            break;
        }
        tracing::warn!(
            "disturbed measurement ({others:.2} cores used by other processes); repeating"
        );
    }
    last
}

/// Memory-read bandwidth in bytes/s: a parallel sum over a buffer much larger than the caches,
/// median of several passes.
pub fn read_bandwidth(bytes: usize) -> f64 {
    let v: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    let t = time(1, 7, 0.1, |_| {
        let s: u64 = v
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .sum();
        std::hint::black_box(s);
    });
    bytes as f64 / t.median
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_calls_every_contender_in_rotating_blocks() {
        let log = std::cell::RefCell::new(Vec::new());
        let mut a = |i: usize| log.borrow_mut().push(('a', i));
        let mut b = |i: usize| log.borrow_mut().push(('b', i));
        let mut c = |i: usize| log.borrow_mut().push(('c', i));
        // No disturbance limit: a single attempt.
        let t = time_interleaved(
            2,
            Duration::ZERO,
            7,
            3,
            f64::INFINITY,
            &mut [&mut a, &mut b, &mut c],
        );
        assert_eq!(t.len(), 3);
        assert!(t.iter().all(|t| t.median.is_finite() && t.median >= 0.0));
        let log = log.into_inner();
        // Warmup: calls 0 and 1 of each, then rounds of up to 3 calls each, starting one
        // contender further each round.
        let timed: Vec<(char, usize)> = log[6..].to_vec();
        let want: Vec<(char, usize)> = [
            ('a', 2..5),
            ('b', 2..5),
            ('c', 2..5),
            ('b', 5..8),
            ('c', 5..8),
            ('a', 5..8),
            ('c', 8..9),
            ('a', 8..9),
            ('b', 8..9),
        ]
        .into_iter()
        .flat_map(|(f, r)| r.map(move |i| (f, i)))
        .collect();
        assert_eq!(timed, want);
        assert_eq!(
            &log[..6],
            &[('a', 0), ('b', 0), ('c', 0), ('a', 1), ('b', 1), ('c', 1)]
        );
    }

    #[test]
    fn warm_up_repeats_its_calls_until_the_minimum_time_has_passed() {
        let mut warm_calls = 0;
        let mut timed_calls = 0;
        let reps = 5;
        let min = Duration::from_millis(30);
        let started = Instant::now();
        let mut f = |i: usize| {
            std::thread::sleep(Duration::from_millis(1));
            if i < 2 {
                warm_calls += 1;
            } else {
                timed_calls += 1;
            }
        };
        time_interleaved(2, min, reps, reps, f64::INFINITY, &mut [&mut f]);
        assert!(started.elapsed() >= min);
        // Rounds of two 1 ms calls until 30 ms have passed: more than one round, and the timed
        // calls only once.
        assert!(warm_calls >= 14, "{warm_calls} warm-up calls");
        assert_eq!(warm_calls % 2, 0);
        assert_eq!(timed_calls, reps);
    }
}
