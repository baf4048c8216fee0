//! The local cache (`$Q4_HOME`, default `~/.cache/q4`) and running package-manager clients
//! (pip, npm) to fill it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// The cache root: `$Q4_HOME`, else `$XDG_CACHE_HOME/q4`, else `~/.cache/q4`.
pub fn q4_home() -> Result<PathBuf> {
    match q4::cache_home::q4_home() {
        Some(h) => Ok(h),
        None => bail!("cannot locate a cache directory: set Q4_HOME"),
    }
}

/// A package-manager client failed (not installed, registry unreachable, package missing).
#[derive(Debug, thiserror::Error)]
#[error("`{command}` failed: {detail}")]
pub struct ToolError {
    pub command: String,
    pub detail: String,
}

/// Runs the first of `candidates` (each a program and its leading arguments) that exists,
/// with `args` appended, in `cwd`. `override_var` names an environment variable that replaces
/// the candidates (e.g. `Q4_PIP="python3 -m pip"`). Output is captured; failures carry the
/// tail of stderr.
pub fn run_tool(
    override_var: &str,
    candidates: &[&str],
    args: &[&str],
    cwd: &Path,
) -> std::result::Result<(), ToolError> {
    let own;
    let candidates: Vec<&str> = match std::env::var(override_var) {
        Ok(v) if !v.trim().is_empty() => {
            own = v;
            vec![own.as_str()]
        }
        _ => candidates.to_vec(),
    };
    let mut tried = Vec::new();
    for cand in &candidates {
        let mut parts = cand.split_whitespace();
        let Some(program) = parts.next() else {
            continue;
        };
        let command = format!("{cand} {}", args.join(" "));
        let out = Command::new(program)
            .args(parts)
            .args(args)
            .current_dir(cwd)
            .output();
        match out {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => tried.push(cand.to_string()),
            Err(e) => {
                return Err(ToolError {
                    command,
                    detail: e.to_string(),
                })
            }
            Ok(o) if o.status.success() => return Ok(()),
            Ok(o) => {
                let stderr = String::from_utf8_lossy(&o.stderr);
                let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(ToolError {
                    command,
                    detail: format!("{} ({})", o.status, tail.join(" / ")),
                });
            }
        }
    }
    Err(ToolError {
        command: candidates.join(" | "),
        detail: format!("not installed (tried {})", tried.join(", ")),
    })
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Copies `reader` into `out` while hashing; returns the hex SHA-256.
pub fn copy_hashing(reader: &mut impl Read, out: &mut impl Write) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n])?;
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_input() {
        let mut out = Vec::new();
        let h = copy_hashing(&mut &b"abc"[..], &mut out).unwrap();
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(out, b"abc");
    }

    #[test]
    fn missing_tool_is_reported() {
        let e = run_tool(
            "Q4_TEST_UNSET_TOOL_VAR",
            &["q4-surely-not-a-program"],
            &["x"],
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not installed"), "{e}");
    }
}
