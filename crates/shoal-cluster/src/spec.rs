//! What the planner needs to know about a model file, read from the file itself.

use shoal_control::ModelSpec;
use shoal_model::{ModelConfig, ModelError};
use shoal_types::ModelId;
use std::path::Path;

/// Why a model file could not be described.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file is not a model shoal can run.
    #[error("{path}: {source}")]
    Model {
        /// The file.
        path: String,
        /// What is wrong with it.
        #[source]
        source: ModelError,
    },
    /// The file could not be read.
    #[error("{path}: {source}")]
    Gguf {
        /// The file.
        path: String,
        /// What is wrong with it.
        #[source]
        source: shoal_gguf::GgufError,
    },
}

/// Describes the GGUF model at `path` for placement: its size, layers, bytes per layer (the
/// largest layer, so a range never under-counts) and KV bytes per token of context.
///
/// `sha256` is the file's digest as the caller verified it (hashing a large file is the
/// caller's choice of when to pay). An encrypted model is opened by the caller (it holds the
/// key) and described with [`spec_of`].
pub fn model_spec(id: ModelId, path: &Path, sha256: String) -> Result<ModelSpec, SpecError> {
    let shown = path.display().to_string();
    let file = shoal_gguf::GgufFile::open(path).map_err(|source| SpecError::Gguf {
        path: shown.clone(),
        source,
    })?;
    spec_of(id, &file, sha256).map_err(|source| SpecError::Model {
        path: shown,
        source,
    })
}

/// Describes an opened (mapped or decrypted) GGUF model, as [`model_spec`] does a file.
pub fn spec_of(
    id: ModelId,
    file: &shoal_gguf::GgufFile,
    sha256: String,
) -> Result<ModelSpec, ModelError> {
    let config = ModelConfig::from_gguf(file)?;
    let mut per_layer = vec![0u64; config.n_layers as usize];
    for t in file.tensors() {
        let layer = t
            .name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(slot) = layer.and_then(|l| per_layer.get_mut(l)) {
            *slot += t.n_bytes as u64;
        }
    }
    let layer_bytes = per_layer.iter().copied().max().unwrap_or(0);
    Ok(ModelSpec {
        id,
        sha256,
        file_bytes: file.bytes().len() as u64,
        n_layers: config.n_layers,
        layer_bytes,
        kv_bytes_per_token: (config.kv_bytes_per_token_layer() as u64) * u64::from(config.n_layers),
        context_length: config.context_length,
    })
}
