//! Parallel loops for the CPU kernels, with a cut-off below which work runs inline: waking a
//! worker costs microseconds, more than a small layer's whole GEMV at decode time.

use rayon::prelude::*;

/// Below this many weights a matmul runs on the calling thread alone.
pub const INLINE_WEIGHTS: usize = 1 << 16;

/// Smallest run of consecutive pieces rayon may split off: about four runs per thread, enough
/// to balance, few enough that rayon's per-split cost (~1 us) stays far below the work.
fn min_len(pieces: usize) -> usize {
    (pieces / (4 * rayon::current_num_threads())).max(1)
}

/// Calls `f(i, chunk)` for consecutive `chunk`-sized pieces of `data`: in parallel when
/// `work` (weights touched) is large, inline otherwise.
pub fn for_each_chunk_mut<T: Send, F: Fn(usize, &mut [T]) + Sync + Send>(
    data: &mut [T],
    chunk: usize,
    work: usize,
    f: F,
) {
    let chunk = chunk.max(1);
    if work < INLINE_WEIGHTS || data.len() <= chunk {
        data.chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
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
    if work < INLINE_WEIGHTS || count <= 1 {
        (0..count).for_each(f);
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
}
