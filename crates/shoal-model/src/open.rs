//! Opening a model file at rest: encrypted or plain, checked against its manifest when it has
//! one. The one function callers use instead of [`Model::open`].

use crate::{Model, ModelError};
use shoal_gguf::{GgufBytes, GgufFile};
use shoal_vault::{FileEntry, KeyProvider, Manifest, VaultError};
use std::path::{Path, PathBuf};

/// Which manifest to check a model file against.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ManifestCheck<'a> {
    /// `<file>.manifest.json` if it exists; none otherwise.
    #[default]
    Sidecar,
    /// This manifest, which must exist and list the file.
    File(&'a Path),
    /// None, even if a sidecar exists.
    Skip,
}

/// How [`open_model_with`] opens a file.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions<'a> {
    /// Keys for encrypted files; an encrypted file without them is refused.
    pub keys: Option<&'a dyn KeyProvider>,
    /// The manifest to check against.
    pub manifest: ManifestCheck<'a>,
}

/// What [`open_model_with`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// Whether the file was encrypted (and so decrypted into memory).
    pub encrypted: bool,
    /// The manifest the file was checked against, if any.
    pub manifest: Option<PathBuf>,
}

/// Opens the model at `path`: decrypts it into memory if it is encrypted (with a key from
/// `keys`), checks it against `<path>.manifest.json` if that exists, else maps it as is.
pub fn open_model(
    path: impl AsRef<Path>,
    keys: Option<&dyn KeyProvider>,
) -> Result<Model, ModelError> {
    let opts = OpenOptions {
        keys,
        manifest: ManifestCheck::Sidecar,
    };
    open_model_with(path.as_ref(), &opts).map(|(m, _)| m)
}

/// Opens the model at `path` as `opts` say; see [`open_model`].
///
/// The file is mapped once. An encrypted file is recognised by its magic and decrypted from
/// the map into one owned buffer (the plaintext never touches disk); a manifest's size is
/// checked first and its sha256 computed in the same pass as the decryption. A plain file's
/// mapped bytes are hashed before they are parsed. Either way the bytes that are checked are
/// the bytes that are used.
pub fn open_model_with(
    path: &Path,
    opts: &OpenOptions<'_>,
) -> Result<(Model, OpenReport), ModelError> {
    let manifest = find_manifest(path, opts.manifest)?;
    let entry = manifest.as_ref().map(|(_, e)| e);
    let bytes = GgufBytes::map(path)?;
    let encrypted = shoal_vault::is_encrypted(bytes.as_slice());
    let file = if encrypted {
        let plain = shoal_vault::decrypt_bytes(bytes.as_slice(), path, opts.keys, entry)?;
        drop(bytes);
        GgufFile::from_bytes(plain)?
    } else {
        if let Some(e) = entry {
            e.verify_bytes(path, bytes.as_slice())
                .map_err(VaultError::from)?;
        }
        GgufFile::parse(bytes)?
    };
    let model = Model::from_file(file)?;
    let report = OpenReport {
        encrypted,
        manifest: manifest.map(|(p, _)| p),
    };
    tracing::info!(
        path = %path.display(),
        encrypted,
        manifest = ?report.manifest,
        "model opened"
    );
    Ok((model, report))
}

/// The manifest to check `path` against and the file's entry in it.
fn find_manifest(
    path: &Path,
    check: ManifestCheck<'_>,
) -> Result<Option<(PathBuf, FileEntry)>, ModelError> {
    let manifest_path = match check {
        ManifestCheck::Skip => return Ok(None),
        ManifestCheck::File(p) => p.to_path_buf(),
        ManifestCheck::Sidecar => {
            let p = Manifest::sidecar_path(path);
            // A sidecar that exists but cannot be read is an error, not an absence.
            match std::fs::symlink_metadata(&p) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                _ => p,
            }
        }
    };
    let manifest = Manifest::load(&manifest_path).map_err(VaultError::from)?;
    let entry = manifest
        .entry_for(path, &manifest_path)
        .map_err(VaultError::from)?
        .clone();
    Ok(Some((manifest_path, entry)))
}
