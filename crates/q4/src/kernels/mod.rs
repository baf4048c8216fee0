//! Compute kernels over [`QTensor`](crate::QTensor) storage.

pub mod cpu;
pub mod cuda;
