//! Helpers shared by the CLI tests (each test file compiles its own copy; not all use all).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A file or directory under the repository's `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
