//! 10,000 repeated forward calls keep resident memory flat and never allocate a weight-sized
//! buffer (counted by a wrapping global allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use candle_core::{Device, Module, Tensor};
use q4::qtensor::QuantSpec;
use q4::{Format, QLinear};

struct Counting;

static WATCH: AtomicBool = AtomicBool::new(false);
static THRESHOLD: AtomicUsize = AtomicUsize::new(usize::MAX);
static BIG_ALLOCS: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call unchanged to the system allocator; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if WATCH.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
            if layout.size() >= THRESHOLD.load(Ordering::Relaxed) {
                BIG_ALLOCS.fetch_add(1, Ordering::Relaxed);
            }
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if WATCH.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
            if new_size >= THRESHOLD.load(Ordering::Relaxed) {
                BIG_ALLOCS.fetch_add(1, Ordering::Relaxed);
            }
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn rss_kib() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("linux /proc");
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

#[test]
fn repeated_forwards_keep_memory_flat_and_allocate_nothing_weight_sized() {
    let (n, k) = (1024, 1024);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
    for (format, batch) in [(Format::Nvfp4, 1), (Format::Nf4, 4), (Format::Mxfp4, 16)] {
        let layer = QLinear::from_dense(&w, None, Some(&QuantSpec::new(format))).unwrap();
        let x = Tensor::ones((batch, k), candle_core::DType::F32, &Device::Cpu).unwrap();
        // The packed 4-bit weight is n*k/2 bytes; nothing that large may be allocated per call.
        THRESHOLD.store(n * k / 2, Ordering::SeqCst);
        for _ in 0..200 {
            layer.forward(&x).unwrap();
        }
        // Each thread keeps its kernels' scratch (a decoded tile of up to 512 KiB: "weight-sized"
        // for this small weight) and makes it on the first call it takes part in. Which pool
        // worker helps a call from this thread is up to rayon, so one worker may first help
        // thousands of calls in; every worker runs a call of its own here so that the count
        // below is of per-call allocations only.
        rayon::broadcast(|_| {
            layer.forward(&x).unwrap();
        });
        let before = rss_kib();
        BIG_ALLOCS.store(0, Ordering::SeqCst);
        LARGEST.store(0, Ordering::SeqCst);
        WATCH.store(true, Ordering::SeqCst);
        for _ in 0..10_000 {
            let y = layer.forward(&x).unwrap();
            assert_eq!(y.dims(), &[batch, n]);
        }
        WATCH.store(false, Ordering::SeqCst);
        let after = rss_kib();
        let big = BIG_ALLOCS.load(Ordering::SeqCst);
        let largest = LARGEST.load(Ordering::SeqCst);
        assert_eq!(
            big, 0,
            "{format} batch {batch}: {big} weight-sized allocations (largest {largest} B)"
        );
        assert!(
            (after as f64) <= before as f64 * 1.05,
            "{format} batch {batch}: RSS grew from {before} KiB to {after} KiB"
        );
        eprintln!("{format} batch {batch}: RSS {before} -> {after} KiB, largest allocation per call {largest} B");
    }
}
