//! Parallel loops for the CPU kernels, with a cut-off below which work runs inline: waking a
//! worker costs microseconds, more than a small layer's whole GEMV at decode time. Called on a
//! pool worker, a loop forks with rayon's `join`; called from any other thread, the caller works
//! through the loop together with the pool's workers rather than sleeping while they do, up to
//! a size (`HANDOVER_WORK`) from which it hands the loop over after all.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

/// Below this many weights a matmul runs on the calling thread alone.
pub const INLINE_WEIGHTS: usize = 1 << 16;

/// Smallest run of consecutive pieces rayon may split off: about four runs per thread, enough
/// to balance, few enough that rayon's per-split cost (~1 us) stays far below the work.
fn min_len(pieces: usize) -> usize {
    (pieces / (4 * rayon::current_num_threads())).max(1)
}

/// Below this much work (weights touched) a loop called from outside the pool is handed to the
/// pool whole instead of the caller joining in: every loop that runs in parallel at all joins.
/// Handing a loop over puts the caller to sleep until the pool is done, two wake-ups on the
/// critical path: same-process A/B on the no-AMX Xeon (twenty-third session,
/// `scripts/cpu/results/ab-caller-joins-2026-11-28-s23.txt`), batch-1 GEMVs of 64-512 K weights
/// from the main thread took 0.37-0.65x the time joining up to 576x576 (SmolLM2's k / v and q /
/// o projections), 0.82-0.87x at 512-768 rows of 576. The activation-packing loops of the AMX
/// kernels keep [`AMX_PACK_JOIN_MIN`].
pub const JOIN_MIN_WEIGHTS: usize = INLINE_WEIGHTS;

/// The join floor of the AMX kernels' activation-packing loops (75-200 K at batch 16 on 576-wide
/// shapes): joining made those calls 1.04-1.26x slower on an AMX host (fifteenth session,
/// `scripts/cpu/results/ab-caller-joins-2026-11-27-s15.txt`), so they are handed to the pool
/// below 512 K.
pub const AMX_PACK_JOIN_MIN: usize = 1 << 19;

static CALLER_JOINS: AtomicBool = AtomicBool::new(true);

/// From this much work (weights touched) on, a loop called from outside the pool is handed to
/// the pool whole after all: the caller sleeps through it, and its two wake-ups (about 25-35 us
/// on the Zen 5 host) are a few percent of such a call. Joined long calls ran in spells of
/// 100-300 ms at the one-thread time — the caller and its helper sharing one vCPU while the
/// other ran idle, presumably where the scheduler placed the woken helper — NVFP4 W4A8 batch 16
/// on 11008x4096 (work 90 M) at 3.7-4.2 against 1.85-2.0 ms, in 4 of 5 runs of 1.5 s from the
/// main thread; handed over, none in 5 (1.87-2.10 ms), as from a pool worker. Joined, such
/// spells were rare below it (4096x4096 W4A8 batch 16, work 34 M: 3 of 289 blocks of 50 calls
/// slow, handing over cost 3-4%; 11008x4096 batch 1, 45 M: none of 456).
static HANDOVER_WORK: AtomicUsize = AtomicUsize::new(1 << 26);

/// Sets the work from which a loop called from outside the pool is handed to the pool whole
/// (see [`HANDOVER_WORK`]), for A/B measurements.
#[doc(hidden)]
pub fn set_handover_work(work: usize) {
    HANDOVER_WORK.store(work, Ordering::Relaxed);
}

/// Turns on or off (default on) the calling thread's share of a parallel loop called from
/// outside the pool, for same-process A/B measurements.
#[doc(hidden)]
pub fn set_caller_joins(on: bool) {
    CALLER_JOINS.store(on, Ordering::Relaxed);
}

/// Whether a parallel loop runs on the calling thread and `threads - 1` pool workers instead of
/// being handed to the pool: from a thread outside the pool, below [`HANDOVER_WORK`]; handed
/// over, the caller would sleep while the pool works and be woken when it is done (two wake-ups
/// on a small call's critical path).
/// Asked only where the pool has other threads (a pool of one runs the loop inline: [`alone`]).
fn caller_joins(work: usize, join_min: usize) -> bool {
    work >= join_min
        && work < HANDOVER_WORK.load(Ordering::Relaxed)
        && rayon::current_thread_index().is_none()
        && CALLER_JOINS.load(Ordering::Relaxed)
}

/// Whether a loop has no other thread to share it with: a pool of one. Called from outside the
/// pool, handing the loop to that one worker would only put the caller to sleep until it is
/// done. Batch-1 GEMVs with `RAYON_NUM_THREADS=1`, two builds alternating (twenty-fourth
/// session, `scripts/cpu/results/single-thread-inline-2026-11-28-s24.txt`): 1536x576 57-155 us
/// handed over against 48-82 inline, 576x576 26-100 against 18-32, 4096x4096 1.0-1.4 ms against
/// 0.87-1.15.
fn alone() -> bool {
    rayon::current_num_threads() == 1
}

/// Runs `drain(true)` on the calling thread and `drain(false)` on `threads - 1` pool workers;
/// each claims pieces until none are left (the caller from the front, the workers from the
/// back, so that each streams through adjacent memory), so a worker that wakes late takes fewer.
fn with_helpers(drain: impl Fn(bool) + Sync) {
    let helpers = rayon::current_num_threads() - 1;
    let finished = AtomicUsize::new(0);
    rayon::in_place_scope(|s| {
        for _ in 0..helpers {
            s.spawn(|_| {
                drain(false);
                finished.fetch_add(1, Ordering::Release);
            });
        }
        drain(true);
        // The scope's own wait would put this thread to sleep until the last helper is done,
        // and waking it costs more than a small call's last piece: spin a while first.
        let start = std::time::Instant::now();
        while finished.load(Ordering::Acquire) < helpers {
            std::hint::spin_loop();
            if start.elapsed() > SPIN_WAIT {
                break;
            }
        }
    });
}

/// Longest the caller spins for its helpers before it sleeps: about the wake-up latency it
/// avoids, short enough not to take a core from the pool for long when its workers are busy.
const SPIN_WAIT: std::time::Duration = std::time::Duration::from_micros(50);

/// A claim takes `1 / (CLAIM_SHARE * threads)` of the pieces left. Each claim is a lock whose
/// cache line crosses cores, so fewer, larger claims win: halves of what is left (1) against
/// eighths (4, until the thirty-second session) took 0.91-1.01x the time from the main thread,
/// same-process A/B on the Zen 5 host (`examples/ab_claim_share`, cache-cold, 600 rounds;
/// 1536x576 batch 1 14.5 against 15.7 us, 49152x576 0.91-0.93x, 4096x4096 0.93-0.95x); 2 gave
/// 0.94-1.03x.
static CLAIM_SHARE: AtomicUsize = AtomicUsize::new(1);

/// Sets the claim size (a claim takes `1 / (share * threads)` of the pieces left), for
/// same-process A/B measurements (`examples/ab_claim_share`).
#[doc(hidden)]
pub fn set_claim_share(share: usize) {
    CLAIM_SHARE.store(share.max(1), Ordering::Relaxed);
}

/// Takes the next pieces off the front or the back of `left`: a share of what is left
/// (guided self-scheduling: few claims, see [`CLAIM_SHARE`], and small ones at the end so that
/// the threads finish together), none when `left` is empty.
fn claim(left: &mut std::ops::Range<usize>, front: bool) -> Option<std::ops::Range<usize>> {
    if left.start >= left.end {
        return None;
    }
    let share = CLAIM_SHARE.load(Ordering::Relaxed) * rayon::current_num_threads();
    let n = ((left.end - left.start) / share).max(1);
    Some(if front {
        let r = left.start..left.start + n;
        left.start += n;
        r
    } else {
        let r = left.end - n..left.end;
        left.end -= n;
        r
    })
}

/// Calls `f(i, chunk)` for consecutive `chunk`-sized pieces of `data`: in parallel when
/// `work` (weights touched) is large, inline otherwise.
pub fn for_each_chunk_mut<T: Send, F: Fn(usize, &mut [T]) + Sync + Send>(
    data: &mut [T],
    chunk: usize,
    work: usize,
    f: F,
) {
    for_each_chunk_mut_joining_from(data, chunk, work, JOIN_MIN_WEIGHTS, f)
}

/// [`for_each_chunk_mut`] with the caller joining a loop called from outside the pool only from
/// `join_min` weights of work (below, the loop is handed to the pool whole).
pub fn for_each_chunk_mut_joining_from<T: Send, F: Fn(usize, &mut [T]) + Sync + Send>(
    data: &mut [T],
    chunk: usize,
    work: usize,
    join_min: usize,
    f: F,
) {
    let chunk = chunk.max(1);
    if work < INLINE_WEIGHTS || data.len() <= chunk || alone() {
        data.chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else if caller_joins(work, join_min) {
        // The unclaimed pieces and the data they cover.
        let left = Mutex::new((0..data.len().div_ceil(chunk), data));
        with_helpers(|front| loop {
            let (first, claimed) = {
                let mut guard = left.lock().unwrap_or_else(|e| e.into_inner());
                let (pieces, rest) = &mut *guard;
                let Some(take) = claim(pieces, front) else {
                    break;
                };
                let all = std::mem::take(rest);
                let (claimed, kept) = if front {
                    // The last piece may be short.
                    let (c, k) = all.split_at_mut((take.len() * chunk).min(all.len()));
                    (c, k)
                } else {
                    let (k, c) = all.split_at_mut((take.start - pieces.start) * chunk);
                    (c, k)
                };
                *rest = kept;
                (take.start, claimed)
            };
            for (i, c) in claimed.chunks_mut(chunk).enumerate() {
                f(first + i, c);
            }
        });
    } else {
        let min_len = min_len(data.len().div_ceil(chunk));
        data.par_chunks_mut(chunk)
            .enumerate()
            .with_min_len(min_len)
            .for_each(|(i, c)| f(i, c));
    }
}

/// Calls `f(i)` for `i in 0..count`: in parallel when `work` (weights touched) is large, inline
/// otherwise (same policy as [`for_each_chunk_mut`]).
pub fn for_each_index<F: Fn(usize) + Sync + Send>(count: usize, work: usize, f: F) {
    if work < INLINE_WEIGHTS || count <= 1 || alone() {
        (0..count).for_each(f);
    } else if caller_joins(work, JOIN_MIN_WEIGHTS) {
        let left = Mutex::new(0..count);
        with_helpers(|front| loop {
            let take = claim(&mut left.lock().unwrap_or_else(|e| e.into_inner()), front);
            match take {
                Some(range) => range.for_each(&f),
                None => break,
            }
        });
    } else {
        (0..count)
            .into_par_iter()
            .with_min_len(min_len(count))
            .for_each(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Held by the tests that turn the module's switches or depend on their defaults.
    static SWITCHES: Mutex<()> = Mutex::new(());

    /// In a pool of one thread every piece runs on the calling thread, once.
    #[test]
    fn a_pool_of_one_runs_loops_on_the_caller() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        pool.install(|| {
            assert!(alone());
            let me = std::thread::current().id();
            let seen: Vec<_> = (0..100).map(|_| AtomicUsize::new(0)).collect();
            for_each_index(100, 1 << 24, |i| {
                assert_eq!(std::thread::current().id(), me);
                seen[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(seen.iter().all(|c| c.load(Ordering::Relaxed) == 1));
            let mut v = vec![0u8; 1000];
            for_each_chunk_mut(&mut v, 10, 1 << 24, |_, c| {
                assert_eq!(std::thread::current().id(), me);
                c.fill(1);
            });
            assert!(v.iter().all(|&x| x == 1));
        });
    }

    /// Claims from both ends cover every index once, in shrinking shares.
    #[test]
    fn claims_from_both_ends_cover_everything_once() {
        for count in [1, 2, 7, 48, 1536] {
            let mut left = 0..count;
            let mut seen = vec![0; count];
            let mut sizes = Vec::new();
            let mut front = true;
            while let Some(r) = claim(&mut left, front) {
                sizes.push(r.len());
                r.for_each(|i| seen[i] += 1);
                front = !front;
            }
            assert!(seen.iter().all(|&c| c == 1), "{count}");
            assert!(sizes.windows(2).all(|w| w[1] <= w[0]), "{count}: {sizes:?}");
        }
    }

    /// From outside the pool (the caller joining in) and from inside it, with the caller's
    /// share on and off: every piece is visited once.
    #[test]
    fn every_piece_is_visited_once_from_outside_and_inside_the_pool() {
        let check = || {
            for (count, chunk) in [(1000, 7), (97, 1), (4096, 64)] {
                let seen: Vec<_> = (0..count)
                    .map(|_| std::sync::atomic::AtomicU32::new(0))
                    .collect();
                for_each_index(count, JOIN_MIN_WEIGHTS, |i| {
                    seen[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(seen.iter().all(|c| c.load(Ordering::Relaxed) == 1));
                // Joined by the caller, and handed to the pool below a join floor above the work.
                for join_min in [JOIN_MIN_WEIGHTS, usize::MAX] {
                    let mut v = vec![0u32; count];
                    for_each_chunk_mut_joining_from(
                        &mut v,
                        chunk,
                        JOIN_MIN_WEIGHTS,
                        join_min,
                        |i, c| c.iter_mut().for_each(|x| *x += i as u32 + 1),
                    );
                    for (j, x) in v.iter().enumerate() {
                        assert_eq!(*x, (j / chunk) as u32 + 1, "{count} / {chunk} / {join_min}");
                    }
                }
            }
        };
        // Several threads in the global pool, if this test builds it first.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build_global();
        assert!(rayon::current_thread_index().is_none());
        let _switch = SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
        for on in [true, false] {
            set_caller_joins(on);
            check();
            rayon::scope(|_| check());
        }
        set_caller_joins(true);
    }

    /// Several threads outside the pool run loops at once (each joining its own with the shared
    /// workers): every result is right, nothing deadlocks.
    #[test]
    fn concurrent_callers_outside_the_pool_each_get_their_loop_done() {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build_global();
        std::thread::scope(|s| {
            for t in 0..3u32 {
                s.spawn(move || {
                    for round in 0..50u32 {
                        let mut v = vec![0u32; 4099];
                        for_each_chunk_mut(&mut v, 64, JOIN_MIN_WEIGHTS, |i, c| {
                            c.iter_mut().for_each(|x| *x = t * 1000 + round + i as u32)
                        });
                        for (j, x) in v.iter().enumerate() {
                            assert_eq!(*x, t * 1000 + round + (j / 64) as u32);
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn every_chunk_is_visited_once_inline_and_in_parallel() {
        for work in [0, INLINE_WEIGHTS] {
            let seen: Vec<_> = (0..1000)
                .map(|_| std::sync::atomic::AtomicU32::new(0))
                .collect();
            for_each_index(1000, work, |i| {
                seen[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            });
            assert!(seen
                .iter()
                .all(|c| c.load(std::sync::atomic::Ordering::Relaxed) == 1));
            let mut v = vec![0u32; 1000];
            for_each_chunk_mut(&mut v, 7, work, |i, c| {
                c.iter_mut().for_each(|x| *x += i as u32 + 1)
            });
            for (j, x) in v.iter().enumerate() {
                assert_eq!(*x, (j / 7) as u32 + 1);
            }
        }
    }

    /// From outside the pool, a loop between the join floor and [`HANDOVER_WORK`] runs partly
    /// on the caller; from [`HANDOVER_WORK`] on, only on pool workers. The workers' pieces wait
    /// (until a deadline a few seconds out) for the caller to have run one, so that a worker
    /// already awake cannot drain the whole loop before the caller claims: on a busy two-core
    /// CI machine one did, and the test failed. Where the caller never joins, the deadline
    /// passes and the count stays zero.
    #[test]
    fn long_loops_from_outside_the_pool_are_handed_over() {
        if rayon::current_num_threads() < 2 {
            return; // a pool of one runs every loop inline
        }
        let _switch = SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
        let on_caller = |work: usize, wait: std::time::Duration| {
            let count = AtomicUsize::new(0);
            let deadline = std::time::Instant::now() + wait;
            for_each_index(64, work, |_| {
                if rayon::current_thread_index().is_none() {
                    count.fetch_add(1, Ordering::Relaxed);
                } else {
                    while count.load(Ordering::Relaxed) == 0 && std::time::Instant::now() < deadline
                    {
                        std::thread::yield_now();
                    }
                }
            });
            count.load(Ordering::Relaxed)
        };
        let wait = std::time::Duration::from_secs(5);
        let handover = HANDOVER_WORK.load(Ordering::Relaxed);
        assert!(on_caller(JOIN_MIN_WEIGHTS, wait) > 0);
        assert!(on_caller(handover - 1, wait) > 0);
        assert_eq!(on_caller(handover, std::time::Duration::ZERO), 0);
        assert_eq!(on_caller(handover * 2, std::time::Duration::ZERO), 0);
    }
}
