//! `q4 bench decode-runner` end to end on the CPU with a tiny config: a row per format with a
//! finite rate, the ratio against bf16, and clear errors for bad arguments.

mod common;

use std::process::Command;

fn q4(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_q4"))
        .args(args)
        .output()
        .expect("q4 runs")
}

#[test]
fn reports_each_format_against_bf16() {
    let cfg = common::fixture("tiny-qwen3").join("config.json");
    let o = q4(&[
        "bench",
        "decode-runner",
        "--device",
        "cpu",
        "--config",
        common::s(&cfg),
        "--tokens",
        "6",
        "--runs",
        "2",
        "--formats",
        "bf16,nvfp4,nf4",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let rows: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("format"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let formats: Vec<&str> = rows.iter().map(|r| r[0]).collect();
    assert_eq!(formats, ["bf16", "nvfp4", "nf4"], "{out}");
    for r in &rows {
        let rate: f64 = r[2].parse().unwrap();
        assert!(rate.is_finite() && rate > 0.0, "{out}");
        // Two runs listed after the ratio.
        assert_eq!(r.len(), 6, "{out}");
    }
    assert_eq!(rows[0][3], "1.00", "{out}");
}

#[test]
fn refuses_bad_arguments() {
    let cfg = common::fixture("tiny-qwen3").join("config.json");
    let cfg = common::s(&cfg);
    let o = q4(&[
        "bench",
        "decode-runner",
        "--device",
        "cpu",
        "--config",
        cfg,
        "--tokens",
        "0",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("at least 1"));
    // The fixture's context is 128 positions.
    let o = q4(&[
        "bench",
        "decode-runner",
        "--device",
        "cpu",
        "--config",
        cfg,
        "--tokens",
        "200",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("context length"));
    let o = q4(&[
        "bench",
        "decode-runner",
        "--device",
        "cpu",
        "--config",
        "/nonexistent.json",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent.json"));
    let o = q4(&[
        "bench",
        "decode-runner",
        "--device",
        "cpu",
        "--config",
        cfg,
        "--tokens",
        "6",
        "--formats",
        "q9",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown format q9"));
}
