//! Larger batches: decode a tile of weight rows (sized for the L2 cache) into f32, then run the
//! `gemm` crate's dense micro-kernel on it. Only one tile per thread exists at a time.

use std::cell::RefCell;

use super::parallel::for_each_chunk_mut;
use super::rows::Rows;
use super::transpose_into;

/// f32 values per decoded tile (256 KiB: half of this machine's L2).
const TILE_FLOATS: usize = 64 * 1024;

thread_local! {
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `y[m, n] = sum_k x[m, k] W[n, k]` for `batch > 8`.
pub fn matmul(w: &Rows<'_>, x: &[f32], batch: usize, y: &mut [f32]) {
    matmul_decoded(w.n, w.k, |r, out| w.decode_row(r, out), x, batch, y)
}

/// The tiled GEMM over any weight whose rows `decode_row(r, out)` can write as f32.
pub fn matmul_decoded<D: Fn(usize, &mut [f32]) + Sync + Send>(
    n: usize,
    k: usize,
    decode_row: D,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
) {
    let tile_rows = (TILE_FLOATS / k.max(1)).clamp(8, 256).min(n);
    // Output is produced as yt[n][m] (disjoint per tile) and transposed at the end.
    let mut yt = vec![0f32; n * batch];
    for_each_chunk_mut(&mut yt, tile_rows * batch, n * k * batch / 8, |t, out| {
        TILE.with_borrow_mut(|tile| {
            // One tile buffer per thread, kept across calls: repeated forwards allocate nothing
            // weight-sized.
            if tile.len() < tile_rows * k {
                tile.resize(tile_rows * k, 0.0);
            }
            let r0 = t * tile_rows;
            let rows = out.len() / batch;
            for r in 0..rows {
                decode_row(r0 + r, &mut tile[r * k..(r + 1) * k]);
            }
            // SAFETY: plain f32 GEMM on valid, non-overlapping buffers: dst `out` is rows x batch
            // (element (m, j) at j * batch + m), lhs `x` is batch x k row-major, rhs is the tile
            // viewed as k x rows (element (kk, j) at j * k + kk); all strides stay in bounds.
            unsafe {
                gemm::gemm(
                    batch,
                    rows,
                    k,
                    out.as_mut_ptr(),
                    batch as isize,
                    1,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    tile.as_ptr(),
                    k as isize,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        })
    });
    transpose_into(&yt, n, batch, y);
}
