//! `Int8Table`: a dense matrix stored as int8 in blocks of 32 values with an f32 scale each
//! (`d = amax / 127`, the layout of GGUF's Q8_0 with an f32 scale), for the token embeddings and
//! the output layer of small models, where those tables are about half the bytes read per
//! token. Rows are gathered for embedding lookups; products with it are W8A8: activations are
//! quantized the same way (`w4a8::Int8Acts`) and each block's dot product is an exact integer
//! sum, scaled once. CPU only.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::kernels::cpu::aligned::AlignedVec;
use crate::kernels::cpu::w4a8::{Int8Acts, ACT_BLOCK};

#[derive(Clone, Debug)]
pub struct Int8Table {
    /// Codes, 64-byte aligned: rows of a multiple of 64 bytes then start on cache lines, and the
    /// GEMV's vector loads never straddle two.
    q: AlignedVec<i8>,
    d: Vec<f32>,
    rows: usize,
    cols: usize,
}

impl Int8Table {
    /// Quantizes a `[rows, cols]` tensor (`cols` a multiple of 32, finite values).
    pub fn quantize(w: &Tensor) -> Result<Int8Table> {
        let (rows, cols) = w.dims2()?;
        // In slices of rows, so a large table is never held as f32 at once.
        let step = (1 << 20) / cols.max(1) + 1;
        Self::from_row_chunks(rows, cols, step, |r0, n| {
            Ok(w.narrow(0, r0, n)?
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?)
        })
    }

    /// Builds a `[rows, cols]` table from f32 row slices: `next(r0, n)` returns rows
    /// `r0 .. r0 + n` (`n <= step`), so a source can convert a large table piecewise and the
    /// whole table never exists in a wider type.
    pub fn from_row_chunks(
        rows: usize,
        cols: usize,
        step: usize,
        mut next: impl FnMut(usize, usize) -> Result<Vec<f32>>,
    ) -> Result<Int8Table> {
        if !cols.is_multiple_of(ACT_BLOCK) {
            return Err(Error::msg(format!(
                "an int8 table needs rows of a multiple of {ACT_BLOCK} values, got [{rows}, {cols}]"
            )));
        }
        let mut q = AlignedVec::<i8>::zeroed(rows * cols);
        let mut d = vec![0f32; rows * cols / ACT_BLOCK];
        let step = step.max(1);
        for r0 in (0..rows).step_by(step) {
            let n = step.min(rows - r0);
            let part = next(r0, n)?;
            if part.len() != n * cols {
                return Err(Error::msg(format!(
                    "rows {r0}..{} of an int8 table came with {} values, expected {}",
                    r0 + n,
                    part.len(),
                    n * cols
                )));
            }
            if let Some(i) = part.iter().position(|v| !v.is_finite()) {
                return Err(Error::msg(format!(
                    "cannot store a non-finite value as int8 (row {}, column {})",
                    r0 + i / cols,
                    i % cols
                )));
            }
            let a = Int8Acts::quantize(&part, cols);
            q[r0 * cols..(r0 + n) * cols].copy_from_slice(&a.q);
            d[r0 * cols / ACT_BLOCK..(r0 + n) * cols / ACT_BLOCK].copy_from_slice(&a.d);
        }
        Ok(Int8Table { q, d, rows, cols })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes held (codes and scales).
    pub fn storage_bytes(&self) -> usize {
        self.q.len() + 4 * self.d.len()
    }

    /// Row `r` as f32 into `out` (`cols` values).
    fn decode_row(&self, r: usize, out: &mut [f32]) {
        let q = &self.q[r * self.cols..(r + 1) * self.cols];
        let d = &self.d[r * self.cols / ACT_BLOCK..];
        for ((o, qb), &s) in out.chunks_mut(ACT_BLOCK).zip(q.chunks(ACT_BLOCK)).zip(d) {
            for (o, &v) in o.iter_mut().zip(qb) {
                *o = v as f32 * s;
            }
        }
    }

    /// The whole table as f32 `[rows, cols]`.
    pub fn dequantize(&self) -> Result<Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, o) in out.chunks_mut(self.cols.max(1)).enumerate() {
            self.decode_row(r, o);
        }
        Ok(Tensor::from_vec(out, (self.rows, self.cols), &Device::Cpu)?)
    }

    /// Rows `ids` as f32 `[ids.len(), cols]` (an embedding lookup).
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Tensor> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (&id, o) in ids.iter().zip(out.chunks_mut(self.cols.max(1))) {
            if id as usize >= self.rows {
                return Err(Error::msg(format!(
                    "row {id} is outside the table ({} rows)",
                    self.rows
                )));
            }
            self.decode_row(id as usize, o);
        }
        Ok(Tensor::from_vec(out, (ids.len(), self.cols), &Device::Cpu)?)
    }

    /// `x Tᵀ` for CPU activations `[..., cols]` (f32, bf16 or f16), returned in their dtype:
    /// W8A8, see the module docs.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        if dims.last() != Some(&self.cols) || !x.device().is_cpu() {
            return Err(Error::msg(format!(
                "int8 table [{}, {}] takes CPU activations [..., {}], got {:?} on {:?}",
                self.rows,
                self.cols,
                self.cols,
                dims,
                x.device()
            )));
        }
        let batch: usize = dims[..dims.len() - 1].iter().product();
        let xf: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let xq = Int8Acts::quantize(&xf, self.cols);
        let mut y = vec![0f32; batch * self.rows];
        crate::kernels::cpu::w8a8::matmul(
            &self.q, &self.d, self.rows, self.cols, &xq, batch, &mut y,
        );
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank >= 1") = self.rows;
        Ok(Tensor::from_vec(y, out_dims, &Device::Cpu)?.to_dtype(x.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_within_half_a_step_and_bad_input_is_refused() {
        let w = Tensor::randn(0f32, 1.0, (70, 96), &Device::Cpu).unwrap();
        let t = Int8Table::quantize(&w).unwrap();
        assert_eq!((t.rows(), t.cols()), (70, 96));
        assert_eq!(t.storage_bytes(), 70 * 96 + 4 * 70 * 3);
        let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let back: Vec<f32> = t
            .dequantize()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (bi, (wb, bb)) in wv.chunks(32).zip(back.chunks(32)).enumerate() {
            let step = wb.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in wb.iter().zip(bb) {
                assert!(
                    (a - b).abs() <= 0.5 * step * 1.0001,
                    "block {bi}: {a} vs {b}"
                );
            }
        }
        // Gathered rows are the dequantized rows.
        let g: Vec<f32> = t
            .gather_rows(&[5, 0, 69])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(&g[..96], &back[5 * 96..6 * 96]);
        assert_eq!(&g[192..], &back[69 * 96..]);
        assert!(t
            .gather_rows(&[70])
            .unwrap_err()
            .to_string()
            .contains("outside the table"));
        // The product matches the dequantized operands.
        let x = Tensor::randn(0f32, 1.0, (2, 3, 96), &Device::Cpu).unwrap();
        let y = t.matmul(&x).unwrap();
        assert_eq!(y.dims(), &[2, 3, 70]);
        let xr = crate::qlinear::fake_quantize_int8(&x).unwrap();
        let want = xr
            .broadcast_matmul(&t.dequantize().unwrap().t().unwrap())
            .unwrap();
        let (y, want): (Vec<f32>, Vec<f32>) = (
            y.flatten_all().unwrap().to_vec1().unwrap(),
            want.flatten_all().unwrap().to_vec1().unwrap(),
        );
        let m = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(y.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5 * m));
        // Widths that are not a multiple of 32 and non-finite values are clear errors.
        let bad = Tensor::zeros((2, 40), DType::F32, &Device::Cpu).unwrap();
        assert!(Int8Table::quantize(&bad)
            .unwrap_err()
            .to_string()
            .contains("multiple of 32"));
        let mut v = vec![0f32; 64];
        v[33] = f32::INFINITY;
        let inf = Tensor::from_vec(v, (1, 64), &Device::Cpu).unwrap();
        let e = Int8Table::quantize(&inf).unwrap_err().to_string();
        assert!(e.contains("non-finite") && e.contains("column 33"), "{e}");
        assert!(t
            .matmul(&Tensor::zeros((1, 95), DType::F32, &Device::Cpu).unwrap())
            .is_err());
    }
}
