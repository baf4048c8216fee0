//! Timing helpers: medians of many calls, a same-run memory-read bandwidth, and a guard that
//! detects other processes using the CPU while we measure.

use std::time::{Duration, Instant};

use rayon::prelude::*;

/// Clock ticks per second of `/proc`'s CPU times (USER_HZ on Linux).
const USER_HZ: f64 = 100.0;

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
        (ticks / USER_HZ).max(0.0) / wall.as_secs_f64().max(1e-9)
    }

    /// CPU time this process used between `self` and `later`, in cores: with every thread of a
    /// parallel call running, about the pool's size; where two of its threads shared one CPU
    /// while another sat idle (a scheduling spell of this shared host), about one less.
    pub fn ours_since(&self, later: &CpuSnapshot, wall: Duration) -> f64 {
        let ticks = later.ours.saturating_sub(self.ours) as f64;
        (ticks / USER_HZ) / wall.as_secs_f64().max(1e-9)
    }
}

/// One measurement: median seconds per call and how disturbed the machine was.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub median: f64,
    pub others: f64,
    /// CPU this process used during the warm-up and measurement, in cores
    /// ([`CpuSnapshot::ours_since`]); the same for contenders measured together.
    pub cores: f64,
    /// Every attempt was disturbed ([`Guard`]): this is the last of [`ATTEMPTS`], kept.
    pub disturbed: bool,
}

/// Measurements made before a disturbed one is kept (and marked as such).
pub const ATTEMPTS: usize = 3;

/// Shortest warm-up before a measurement. A fixed count of warm-up calls is not enough on the
/// shared hosts here: after a quiet or single-threaded spell (building the weight copies) the
/// first contender timed ran its sub-20 us calls up to 1.5x slower than the same contender timed
/// again right after (thirty-second session: 1536x576 NVFP4 batch 1, first 59-79% of the read
/// bandwidth, repeated 87-96%; NF4 took the penalty when it went first). The host gives the two
/// cores their full speed only after a spell of sustained work.
pub const MIN_WARMUP: Duration = Duration::from_millis(200);

/// What makes a measurement disturbed, so that it is repeated: other processes using more than
/// `max_others` cores, or this process using fewer than `min_cores` (a parallel call whose
/// threads shared a CPU while another sat idle ran at one thread's speed: 2x the time of a
/// 1536x576 NF4 batch-64 call in a full run of the thirty-fifth session, where such calls
/// used 1.9-2.0 cores otherwise). `min_cores` 0 checks nothing of this process.
#[derive(Clone, Copy, Debug)]
pub struct Guard {
    pub max_others: f64,
    pub min_cores: f64,
}

impl Guard {
    /// Only the other processes' use is checked.
    pub fn others(max_others: f64) -> Guard {
        Guard {
            max_others,
            min_cores: 0.0,
        }
    }

    /// The other processes' use, and this process's use of at least three quarters of the
    /// rayon pool (where it has more than one thread): for calls that run on every thread.
    pub fn parallel(max_others: f64) -> Guard {
        let threads = rayon::current_num_threads();
        Guard {
            max_others,
            min_cores: if threads > 1 {
                0.75 * threads as f64
            } else {
                0.0
            },
        }
    }

    /// Why a measurement with these readings is disturbed, if it is.
    fn disturbed(&self, others: f64, cores: f64) -> Option<String> {
        if others > self.max_others {
            Some(format!("{others:.2} cores used by other processes"))
        } else if cores < self.min_cores {
            Some(format!(
                "{cores:.2} cores used by this process, fewer than {:.2}",
                self.min_cores
            ))
        } else {
            None
        }
    }
}

/// Times `f` `reps` times after a warm-up of at least `warmup` calls and [`MIN_WARMUP`];
/// measures again (up to [`ATTEMPTS`] in all) when `guard` finds the warm-up and measurement
/// disturbed, and reports the last attempt, marked [`Timing::disturbed`] if it was too.
pub fn time<F: FnMut(usize)>(warmup: usize, reps: usize, guard: Guard, mut f: F) -> Timing {
    // One contender in one block: its calls back to back.
    time_interleaved(warmup, MIN_WARMUP, reps, reps, guard, &mut [&mut f])
        .pop()
        .expect("one timing per contender")
}

/// Like [`time`] for several contenders at once, their calls interleaved in blocks: each round
/// makes `block` calls of every contender in turn, starting one contender further each round.
/// A change of the host's speed during the measurement then hits all of them alike, so their
/// ratios hold even where the absolute times drift. Blocks rather than single calls: one call at
/// a time between other contenders' cost q4's NVFP4 GEMV 1.5-2.5x per call. Retries the whole
/// measurement like [`time`]; every contender reports the same `others` and `cores`.
pub fn time_interleaved(
    warmup: usize,
    min_warmup: Duration,
    reps: usize,
    block: usize,
    guard: Guard,
    fs: &mut [&mut dyn FnMut(usize)],
) -> Vec<Timing> {
    let block = block.max(1);
    let mut last = Vec::new();
    for attempt in 1..=ATTEMPTS {
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
        let (others, cores) = match (start_cpu, CpuSnapshot::take()) {
            (Some(a), Some(b)) => (a.others_since(&b, wall), a.ours_since(&b, wall)),
            _ => (0.0, f64::NAN),
        };
        last = samples
            .into_iter()
            .map(|mut s| {
                s.sort_by(f64::total_cmp);
                Timing {
                    median: s[s.len() / 2],
                    others,
                    cores,
                    disturbed: false,
                }
            })
            .collect();
        match guard.disturbed(others, cores) {
            None => break,
            Some(why) if attempt < ATTEMPTS => {
                tracing::warn!("disturbed measurement ({why}); repeating")
            }
            Some(why) => {
                tracing::warn!(
                    "disturbed measurement ({why}) in all {ATTEMPTS} attempts; the last is \
                     kept and marked `disturbed`"
                );
                last.iter_mut().for_each(|t| t.disturbed = true);
            }
        }
    }
    last
}

/// Memory-read bandwidth in bytes/s: a parallel sum over a buffer much larger than the caches,
/// median of several passes.
pub fn read_bandwidth(bytes: usize) -> f64 {
    let v: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    let t = time(1, 7, Guard::parallel(0.1), |_| {
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
    fn a_guard_flags_busy_neighbours_and_idle_threads() {
        let g = Guard {
            max_others: 0.15,
            min_cores: 1.5,
        };
        assert_eq!(g.disturbed(0.1, 1.9), None);
        assert!(g.disturbed(0.3, 1.9).unwrap().contains("other processes"));
        assert!(g.disturbed(0.0, 1.0).unwrap().contains("this process"));
        // Without a reading of this process (no /proc), nothing is concluded from it.
        assert_eq!(g.disturbed(0.0, f64::NAN), None);
        assert_eq!(Guard::others(0.15).disturbed(0.0, 0.2), None);
    }

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
            Guard::others(f64::INFINITY),
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

    /// A measurement disturbed every time is made [`ATTEMPTS`] times and kept, marked; an
    /// undisturbed one once, unmarked.
    #[test]
    fn a_measurement_disturbed_every_time_is_kept_and_marked() {
        if CpuSnapshot::take().is_none() {
            return; // No /proc: this process's CPU use cannot be read, nothing is disturbed.
        }
        let mut calls = 0;
        let never_enough = Guard {
            max_others: f64::INFINITY,
            min_cores: 1e9,
        };
        let mut f = |_: usize| calls += 1;
        let t = time_interleaved(1, Duration::ZERO, 2, 2, never_enough, &mut [&mut f]);
        assert!(t[0].disturbed);
        assert_eq!(
            calls,
            ATTEMPTS * 3,
            "one warm-up and two timed calls an attempt"
        );
        let mut calls = 0;
        let mut f = |_: usize| calls += 1;
        let t = time_interleaved(
            1,
            Duration::ZERO,
            2,
            2,
            Guard::others(f64::INFINITY),
            &mut [&mut f],
        );
        assert!(!t[0].disturbed);
        assert_eq!(calls, 3);
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
        time_interleaved(
            2,
            min,
            reps,
            reps,
            Guard::others(f64::INFINITY),
            &mut [&mut f],
        );
        assert!(started.elapsed() >= min);
        // Rounds of two 1 ms calls until 30 ms have passed: more than one round, and the timed
        // calls only once.
        assert!(warm_calls >= 14, "{warm_calls} warm-up calls");
        assert_eq!(warm_calls % 2, 0);
        assert_eq!(timed_calls, reps);
    }
}
