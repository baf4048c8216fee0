// Throughput of vdpbf16ps against vfmadd231ps and vpermw on this host: twelve independent
// accumulator chains each, one thread. Standalone: `rustc -O -C target-cpu=native
// dpbf16_throughput.rs && taskset -c 1 ./dpbf16_throughput` (run while nothing else runs).
use std::arch::x86_64::*;
use std::time::Instant;

#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dp(n: usize, a: __m512bh, b: __m512bh) -> __m512 {
    let mut acc = [_mm512_setzero_ps(); 12];
    for _ in 0..n {
        for i in 0..12 {
            acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
        }
    }
    let mut s = acc[0];
    for i in 1..12 { s = _mm512_add_ps(s, acc[i]); }
    s
}
#[target_feature(enable = "avx512f")]
unsafe fn fma(n: usize, a: __m512, b: __m512) -> __m512 {
    let mut acc = [_mm512_setzero_ps(); 12];
    for _ in 0..n {
        for i in 0..12 {
            acc[i] = _mm512_fmadd_ps(acc[i], a, b);
        }
    }
    let mut s = acc[0];
    for i in 1..12 { s = _mm512_add_ps(s, acc[i]); }
    s
}
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn perm(n: usize, a: __m512i, b: __m512i) -> __m512i {
    let mut acc = [_mm512_setzero_si512(); 12];
    for i in 0..12 { acc[i] = _mm512_set1_epi32(i as i32); }
    for _ in 0..n {
        for i in 0..12 {
            acc[i] = _mm512_permutexvar_epi16(acc[i], b);
        }
    }
    let mut s = a;
    for i in 0..12 { s = _mm512_xor_si512(s, acc[i]); }
    s
}
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn mix_dp_fma(n: usize, a: __m512bh, b: __m512bh, c: __m512, d: __m512) -> __m512 {
    let mut acc = [_mm512_setzero_ps(); 12];
    for _ in 0..n {
        for i in 0..6 {
            acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
        }
        for i in 6..12 {
            acc[i] = _mm512_fmadd_ps(acc[i], c, d);
        }
    }
    let mut s = acc[0];
    for i in 1..12 { s = _mm512_add_ps(s, acc[i]); }
    s
}
fn main() {
    let n = std::hint::black_box(20_000_000);
    unsafe {
        // Opaque operands, so that no loop folds away.
        use std::hint::black_box as bb;
        let a: __m512bh = std::mem::transmute(_mm512_set1_epi16(bb(0x3f80)));
        let b: __m512bh = std::mem::transmute(_mm512_set1_epi16(bb(0x0000)));
        let c = _mm512_set1_ps(bb(1.0));
        let d = _mm512_set1_ps(bb(0.0));
        for round in 0..3 {
            let t = Instant::now(); let r = fma(n, c, d); let tf = t.elapsed().as_secs_f64();
            let t = Instant::now(); let r2 = dp(n, a, b); let td = t.elapsed().as_secs_f64();
            let t = Instant::now(); let r3 = perm(n, _mm512_set1_epi32(1), _mm512_set1_epi32(3)); let tp = t.elapsed().as_secs_f64();
            let t = Instant::now(); let r4 = mix_dp_fma(n, a, b, c, d); let tm = t.elapsed().as_secs_f64();
            let ops = (n * 12) as f64;
            println!("round {round}: fma {:.3} ns/op, dpbf16 {:.3} ns/op, vpermw {:.3} ns/op, mix {:.3} ns/op  ({} {} {:?} {})",
                tf / ops * 1e9, td / ops * 1e9, tp / ops * 1e9, tm / ops * 1e9,
                _mm512_reduce_add_ps(r), _mm512_reduce_add_ps(r2), _mm512_reduce_add_epi32(r3), _mm512_reduce_add_ps(r4));
        }
    }
}
