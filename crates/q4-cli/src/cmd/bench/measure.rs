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

/// Times `f` `reps` times after `warmup` calls; retries up to 3 times when other processes used
/// more than `max_others` cores during the measurement, and reports the last attempt.
pub fn time<F: FnMut(usize)>(warmup: usize, reps: usize, max_others: f64, mut f: F) -> Timing {
    let mut last = Timing {
        median: f64::NAN,
        others: f64::NAN,
    };
    for _attempt in 0..3 {
        for i in 0..warmup {
            f(i);
        }
        let start_cpu = CpuSnapshot::take();
        let start = Instant::now();
        let mut samples = Vec::with_capacity(reps);
        for i in 0..reps {
            let t = Instant::now();
            f(warmup + i);
            samples.push(t.elapsed().as_secs_f64());
        }
        let wall = start.elapsed();
        let others = match (start_cpu, CpuSnapshot::take()) {
            (Some(a), Some(b)) => a.others_since(&b, wall),
            _ => 0.0,
        };
        samples.sort_by(f64::total_cmp);
        last = Timing {
            median: samples[samples.len() / 2],
            others,
        };
        if others <= max_others {
            break;
        }
        tracing::warn!(
            "disturbed measurement ({others:.2} cores used by other processes); repeating"
        );
    }
    last
}

/// Like [`time`] for several contenders at once, their calls interleaved (each round calls every
/// contender once, in turn): a change of the host's speed during the measurement then hits all
/// of them alike, so their ratios hold even where the absolute times drift. Retries the whole
/// measurement like [`time`]; every contender reports the same `others`.
pub fn time_interleaved(
    warmup: usize,
    reps: usize,
    max_others: f64,
    fs: &mut [&mut dyn FnMut(usize)],
) -> Vec<Timing> {
    let mut last = Vec::new();
    for _attempt in 0..3 {
        for i in 0..warmup {
            fs.iter_mut().for_each(|f| f(i));
        }
        let start_cpu = CpuSnapshot::take();
        let start = Instant::now();
        let mut samples = vec![Vec::with_capacity(reps); fs.len()];
        for i in 0..reps {
            for (f, s) in fs.iter_mut().zip(samples.iter_mut()) {
                let t = Instant::now();
                f(warmup + i);
                s.push(t.elapsed().as_secs_f64());
            }
        }
        let wall = start.elapsed();
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
