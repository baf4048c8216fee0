//! The GEMV's early start (programmatic dependent launch, compute capability 9.0 on): a GEMV may
//! begin while the kernel before it still runs, loading weights, and must wait for it before
//! reading its activations. Its own process, so that no output poisoning (a memset between two
//! kernels, which orders them fully) keeps the kernels from overlapping. Skips without a GPU.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Module, Tensor};
use q4::qtensor::QuantSpec;
use q4::{Format, QLinear, QTensor};

mod cuda_common;
use cuda_common::{assert_same_bits, bits_f32, data};

fn gpu() -> Option<Device> {
    let report = q4::probe::cuda_report();
    if report.status != "ok" || report.devices.is_empty() {
        eprintln!("skipped: no usable CUDA device ({})", report.status);
        return None;
    }
    Some(Device::new_cuda(0).expect("CUDA device 0"))
}

/// A chain of dependent GEMVs (each one's input is the previous one's output, the first of them
/// large, so that the next starts long before it ends) gives the same bits launched early as in
/// plain stream order, with fresh outputs or written into buffers made beforehand
/// (`QLinear::forward_into`), for every format, batches of one and two N tiles.
#[test]
fn early_started_gemvs_read_their_predecessors_outputs() {
    let Some(dev) = gpu() else { return };
    let gemv = q4::kernels::cuda::gemv::set_early_start_for_tests;
    for format in [Format::Nvfp4, Format::Nf4, Format::Mxfp4] {
        // (out, in): wide rows (split K), tall, K not a multiple of 128.
        let dims = [4096usize, 8192, 2560, 6144, 1088, 2560, 4096];
        let layers: Vec<QLinear> = dims
            .windows(2)
            .enumerate()
            .map(|(i, d)| {
                let (n, k) = (d[1], d[0]);
                // Spread magnitudes (`data`), scaled so that each layer keeps the activations'
                // size over the chain's 18 layers.
                let w = Tensor::from_vec(data(n * k, i as u64 + 1), (n, k), &dev)
                    .unwrap()
                    .affine(1.0 / (5.0 * (k as f64).sqrt()), 0.0)
                    .unwrap();
                // Quantized on the GPU, then used at once: its storage must be complete first.
                let q = QTensor::quantize(&w, &QuantSpec::new(format)).unwrap();
                QLinear::new(q, None).unwrap()
            })
            .collect();
        for batch in [1usize, 4, 16] {
            for dt in [DType::BF16, DType::F32] {
                let x = Tensor::from_vec(data(batch * dims[0], 99), (batch, dims[0]), &dev)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                // Each output freshly allocated, or written into buffers made beforehand (no
                // allocation between the kernels: the GEMVs run back to back).
                let outs: Vec<Tensor> = dims[1..]
                    .iter()
                    .map(|&n| Tensor::zeros((batch, n), dt, &dev).unwrap())
                    .collect();
                let run = |early: bool, into: bool| {
                    gemv(Some(early));
                    let mut y = x.clone();
                    for _ in 0..3 {
                        for (l, out) in layers.iter().zip(&outs) {
                            y = if into {
                                l.forward_into(&y, out).unwrap();
                                out.clone()
                            } else {
                                l.forward(&y).unwrap()
                            };
                        }
                    }
                    gemv(None);
                    bits_f32(&y)
                };
                let plain = run(false, false);
                assert_eq!(plain.len(), batch * dims[dims.len() - 1]);
                assert!(plain.iter().all(|b| f32::from_bits(*b).is_finite()));
                for (early, into) in [(true, false), (false, true), (true, true)] {
                    let got = run(early, into);
                    assert_same_bits(
                        &got,
                        &plain,
                        plain.len(),
                        format_args!(
                            "{format:?} batch {batch} {dt:?} early {early} into {into} against \
                             stream order"
                        ),
                    );
                }
            }
        }
    }
}
