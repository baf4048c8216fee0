//! Where q4 keeps files between runs: the default model, text data, compiled CUDA kernels.

use std::path::PathBuf;

/// The cache root: `$Q4_HOME`, else `$XDG_CACHE_HOME/q4`, else `~/.cache/q4`; `None` where none
/// of those is set.
pub fn q4_home() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("Q4_HOME")
        .or_else(|| var("XDG_CACHE_HOME").map(|x| x.join("q4")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("q4")))
}
