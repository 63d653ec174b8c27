//! An opened GGUF file: the bytes (memory-mapped or owned) plus what was parsed from them.
//! Tensor views borrow from the file, so tensor data is never copied by this crate.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::Path;

use crate::mmap::map_readonly;
use crate::reader::parse;
use crate::{GgufError, Metadata, TensorInfo, TensorView};

/// Where the bytes of a file live.
enum Backing {
    /// A read-only memory map of a file on disk.
    Mapped(memmap2::Mmap),
    /// An in-memory copy (e.g. a model decrypted into memory only).
    Owned(Vec<u8>),
}

/// The bytes of a GGUF file before parsing: a read-only memory map of a file on disk, or an
/// owned buffer (e.g. a model decrypted into memory, never written to disk). Both go through
/// the same validation in [`GgufFile::parse`]; holding them first lets a caller check the bytes
/// (a manifest's hash, an encryption header) before they are parsed.
pub struct GgufBytes(Backing);

impl GgufBytes {
    /// Memory-maps the file at `path` read-only. The file must not be modified in place while
    /// the map (or the `GgufFile` parsed from it) lives.
    pub fn map(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let io_err = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let map = map_readonly(&file).map_err(io_err)?;
        Ok(Self(Backing::Mapped(map)))
    }

    /// All the bytes.
    pub fn as_slice(&self) -> &[u8] {
        match &self.0 {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
        }
    }

    /// Whether the bytes are a memory map (as opposed to an owned buffer).
    pub fn is_mapped(&self) -> bool {
        matches!(self.0, Backing::Mapped(_))
    }
}

impl From<Vec<u8>> for GgufBytes {
    fn from(bytes: Vec<u8>) -> Self {
        Self(Backing::Owned(bytes))
    }
}

impl fmt::Debug for GgufBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufBytes")
            .field("mapped", &self.is_mapped())
            .field("len", &self.as_slice().len())
            .finish()
    }
}

/// A parsed, validated GGUF file. Every tensor's bytes are known to lie inside the file,
/// aligned and without overlap.
pub struct GgufFile {
    backing: GgufBytes,
    version: u32,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: usize,
    data_offset: usize,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("mapped", &self.is_mapped())
            .field("len", &self.bytes().len())
            .field("version", &self.version)
            .field("metadata_entries", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses the file at `path`.
    ///
    /// The file must not be modified in place while the returned value lives (replace model
    /// files by writing a new file and renaming it).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        Self::parse(GgufBytes::map(path)?)
    }

    /// Parses an in-memory copy of a file.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(GgufBytes::from(bytes))
    }

    /// Parses and validates `bytes`, mapped or owned alike.
    pub fn parse(backing: GgufBytes) -> Result<Self, GgufError> {
        let p = parse(backing.as_slice())?;
        Ok(Self {
            backing,
            version: p.version,
            metadata: p.metadata,
            tensors: p.tensors,
            tensor_index: p.tensor_index,
            alignment: p.alignment,
            data_offset: p.data_offset,
        })
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.backing.as_slice()
    }

    /// Whether the bytes are a memory map (as opposed to an owned copy).
    pub fn is_mapped(&self) -> bool {
        self.backing.is_mapped()
    }

    /// Format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The key/value metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// `general.architecture`, e.g. `llama`.
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.metadata.require_str("general.architecture")
    }

    /// Alignment of tensor data in bytes.
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Absolute offset where the tensor data section starts.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// All tensor descriptions, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The description of tensor `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(*self.tensor_index.get(name)?)
    }

    /// Tensor `name` with its bytes.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>, GgufError> {
        let not_found = || GgufError::TensorNotFound {
            name: name.to_owned(),
        };
        let info = self.tensor_info(name).ok_or_else(not_found)?;
        // Bounds were validated at parse time; `get` keeps this panic-free regardless.
        let data = self
            .bytes()
            .get(info.offset..info.offset + info.n_bytes)
            .ok_or_else(not_found)?;
        Ok(TensorView { info, data })
    }
}
