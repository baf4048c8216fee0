//! `q4 bench linear` end to end on a tiny shape, both timing orders: every contender gets a row
//! with a finite time, the plain read of the layer's bytes only where the weights are
//! cache-cold, Q4K is reported as not applicable where rows are not whole super-blocks, and the
//! results go to stdout.

use std::process::Command;

fn bench(extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_q4"))
        .args([
            "bench",
            "linear",
            "--shapes",
            "64x256,32x96",
            "--batches",
            "1,16",
            "--reps",
            "3",
            "--llc-mib",
            "1",
            // CI machines are shared: do not spend time repeating disturbed measurements.
            "--max-others",
            "100",
        ])
        .args(extra)
        .output()
        .expect("q4 runs");
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn check(text: &str) {
    for shape in ["64x256", "32x96"] {
        for batch in ["1", "16"] {
            for imp in ["q4-nvfp4", "q4-nf4", "candle-f32", "candle-q4_0"] {
                let row = text
                    .lines()
                    .find(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        f.len() > 4 && f[0] == shape && f[1] == batch && f[3] == imp
                    })
                    .unwrap_or_else(|| panic!("no {shape} batch {batch} {imp} row in:\n{text}"));
                let ms: f64 = row.split_whitespace().nth(4).unwrap().parse().unwrap();
                assert!(ms.is_finite() && ms > 0.0, "{row}");
            }
        }
    }
    // The layer-sized plain read is timed where the weights are cache-cold (batch 1) only.
    let read_rows = |batch: &str| {
        text.lines()
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 4 && f[1] == batch && f[3] == "plain-read"
            })
            .count()
    };
    assert_eq!((read_rows("1"), read_rows("16")), (2, 0), "{text}");
    // 256-wide rows take Q4K; 96-wide ones cannot.
    assert!(text
        .lines()
        .any(|l| l.starts_with("64x256") && l.contains("candle-q4k")));
    assert!(text
        .lines()
        .any(|l| l.starts_with("32x96") && l.contains("candle-q4k") && l.contains("n/a")));
}

#[test]
fn sequential_and_interleaved_report_every_contender() {
    check(&bench(&[]));
    check(&bench(&["--interleave"]));
}
