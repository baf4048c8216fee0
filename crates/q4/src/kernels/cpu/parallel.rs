//! Parallel loops for the CPU kernels, with a cut-off below which work runs inline.
//!
//! Parallel work runs on candle's own persistent worker pool: candle runs its element-wise ops
//! there and its workers spin briefly between ops, so a decode step's many small matmuls find
//! them awake; a second pool (rayon's) would compete with those workers for the same cores.

use std::sync::Mutex;

/// Below this many weights a matmul runs on the calling thread alone.
pub const INLINE_WEIGHTS: usize = 1 << 16;

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
        return;
    }
    // Each piece sits behind its own (never contended) lock, so workers take disjoint mutable
    // pieces without unsafe code.
    let pieces: Vec<Mutex<&mut [T]>> = data.chunks_mut(chunk).map(Mutex::new).collect();
    candle_core::utils::barrier_pool().execute_chunked(pieces.len(), |range| {
        for i in range {
            let mut piece = pieces[i].lock().unwrap_or_else(|e| e.into_inner());
            f(i, &mut piece);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_is_visited_once_inline_and_in_parallel() {
        for work in [0, INLINE_WEIGHTS] {
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
