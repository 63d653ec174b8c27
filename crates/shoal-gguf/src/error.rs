//! The one error type of this crate. Every malformation of a file has its own variant naming
//! what is wrong and where, so callers (and tests) can tell a truncated download from a file
//! written by a buggy converter without parsing messages.

use std::fmt;
use std::path::PathBuf;

use crate::GgmlType;

/// Where in a file a read failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// The fixed header: magic, version, tensor count, metadata count.
    Header,
    /// The key of the metadata entry with this index.
    MetadataKey {
        /// Zero-based index of the entry.
        index: u64,
    },
    /// The value of the metadata entry with this key (including its type tag).
    MetadataValue {
        /// The entry's key.
        key: String,
    },
    /// The description (name, shape, type, offset) of the tensor with this index.
    TensorInfo {
        /// Zero-based index of the tensor.
        index: u64,
        /// The tensor's name, once it has been read.
        name: Option<String>,
    },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Header => f.write_str("the header"),
            Location::MetadataKey { index } => write!(f, "the key of metadata entry {index}"),
            Location::MetadataValue { key } => write!(f, "the value of metadata key `{key}`"),
            Location::TensorInfo {
                index,
                name: Some(name),
            } => write!(f, "the description of tensor {index} (`{name}`)"),
            Location::TensorInfo { index, name: None } => {
                write!(f, "the description of tensor {index}")
            }
        }
    }
}

/// Everything that can go wrong reading, querying or writing a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened, mapped, created or written.
    #[error("I/O error on {path}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: std::io::Error,
    },
    /// Writing to a caller-supplied sink failed.
    #[error("writing GGUF data failed")]
    Write(#[source] std::io::Error),
    /// The file does not start with `GGUF`.
    #[error("not a GGUF file: magic bytes are {found:02x?}, expected \"GGUF\"")]
    BadMagic {
        /// The first four bytes (fewer if the file is shorter).
        found: Vec<u8>,
    },
    /// The version number is one this reader does not handle (v1 and anything above 3).
    #[error("unsupported GGUF version {version} (only versions 2 and 3 are supported)")]
    UnsupportedVersion {
        /// The version as read little-endian.
        version: u32,
    },
    /// The version field reads as a small number only when byte-swapped: a big-endian file.
    #[error("big-endian GGUF file (version {version}); only little-endian files are supported")]
    BigEndian {
        /// The version after byte-swapping.
        version: u32,
    },
    /// The data ended inside a fixed-size field or a string's bytes.
    #[error(
        "file truncated in {at}: {needed} bytes needed at offset {offset}, {available} available"
    )]
    Truncated {
        /// What was being read.
        at: Location,
        /// Absolute offset of the read.
        offset: u64,
        /// Bytes the read needed.
        needed: u64,
        /// Bytes left in the file.
        available: u64,
    },
    /// An element count whose smallest possible encoding is larger than what is left of the file
    /// (checked before anything is allocated from it).
    #[error(
        "count {count} in {at} cannot fit: at least {min_bytes_each} bytes each, {remaining} bytes remain"
    )]
    CountTooLarge {
        /// Which count.
        at: Location,
        /// The count as stored.
        count: u64,
        /// The smallest encoding of one element.
        min_bytes_each: u64,
        /// Bytes left in the file after the count.
        remaining: u64,
    },
    /// A string (key, value, or tensor name) is not UTF-8.
    #[error("invalid UTF-8 in a string in {at} at offset {offset}")]
    InvalidUtf8 {
        /// What was being read.
        at: Location,
        /// Absolute offset of the string's bytes.
        offset: u64,
    },
    /// A metadata value type tag is not one GGUF defines.
    #[error("unknown metadata value type {type_id} in {at}")]
    UnknownValueType {
        /// Where the tag was.
        at: Location,
        /// The tag as stored.
        type_id: u32,
    },
    /// A boolean stored as something other than 0 or 1.
    #[error("invalid boolean byte {byte:#04x} in {at}")]
    InvalidBool {
        /// Where it was.
        at: Location,
        /// The byte as stored.
        byte: u8,
    },
    /// Arrays nested deeper than [`crate::MAX_ARRAY_NESTING`]; refused to bound recursion.
    #[error("arrays nested more than {max} deep in the value of metadata key `{key}`")]
    NestingTooDeep {
        /// The entry's key.
        key: String,
        /// The limit.
        max: usize,
    },
    /// The same metadata key appears twice.
    #[error("duplicate metadata key `{key}`")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
    /// The same tensor name appears twice.
    #[error("duplicate tensor name `{tensor}`")]
    DuplicateTensor {
        /// The repeated name.
        tensor: String,
    },
    /// A tensor type number this build does not know.
    #[error("tensor `{tensor}` has unknown type id {type_id}")]
    UnknownTensorType {
        /// The tensor.
        tensor: String,
        /// The type number as stored.
        type_id: u32,
    },
    /// More than four dimensions.
    #[error("tensor `{tensor}` has {n_dims} dimensions, at most 4 are allowed")]
    TooManyDims {
        /// The tensor.
        tensor: String,
        /// The dimension count as stored.
        n_dims: u32,
    },
    /// No dimensions, or a dimension of zero: the tensor holds no elements.
    #[error("tensor `{tensor}` has no elements (dims {dims:?})")]
    EmptyTensor {
        /// The tensor.
        tensor: String,
        /// Its dimensions, row length first.
        dims: Vec<u64>,
    },
    /// The element count or byte size does not fit in 63 bits / the address space.
    #[error(
        "tensor `{tensor}` is too large: dims {dims:?} overflow the element count or byte size"
    )]
    ElementCountOverflow {
        /// The tensor.
        tensor: String,
        /// Its dimensions, row length first.
        dims: Vec<u64>,
    },
    /// The row length is not a whole number of the type's blocks.
    #[error(
        "tensor `{tensor}`: row length {row_len} is not a multiple of the {dtype} block size {block_size}"
    )]
    RowNotBlockAligned {
        /// The tensor.
        tensor: String,
        /// Its type.
        dtype: GgmlType,
        /// Elements per row (first dimension).
        row_len: u64,
        /// Elements per block of `dtype`.
        block_size: usize,
    },
    /// A tensor's offset is not a multiple of the file's alignment.
    #[error("tensor `{tensor}` at data offset {offset} is not aligned to {alignment} bytes")]
    MisalignedTensor {
        /// The tensor.
        tensor: String,
        /// Offset relative to the start of the data section.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },
    /// A tensor's bytes extend past the end of the file (a truncated download, typically).
    #[error(
        "tensor `{tensor}` data ({n_bytes} bytes at data offset {offset}) extends past the end of the file ({file_len} bytes)"
    )]
    TensorPastEnd {
        /// The tensor.
        tensor: String,
        /// Offset relative to the start of the data section.
        offset: u64,
        /// The tensor's size in bytes.
        n_bytes: u64,
        /// Total file length.
        file_len: u64,
    },
    /// Two tensors share bytes.
    #[error("tensors `{first}` and `{second}` overlap")]
    OverlappingTensors {
        /// The tensor with the lower offset.
        first: String,
        /// The tensor starting inside `first`.
        second: String,
    },
    /// `general.alignment` is not a power of two that fits in 32 bits, or not an integer.
    #[error("bad general.alignment value {value}: must be a power-of-two u32")]
    BadAlignment {
        /// The value as stored, rendered.
        value: String,
    },
    /// A metadata key was asked for but is absent.
    #[error("missing metadata key `{key}`")]
    MissingKey {
        /// The key.
        key: String,
    },
    /// A metadata value has a different type from the one asked for.
    #[error("metadata key `{key}` holds {found}, expected {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// What the caller asked for.
        expected: &'static str,
        /// What the file holds.
        found: &'static str,
    },
    /// An integer metadata value does not fit the requested type.
    #[error("metadata key `{key}` value {value} does not fit in {expected}")]
    OutOfRange {
        /// The key.
        key: String,
        /// What the caller asked for.
        expected: &'static str,
        /// The stored value, rendered.
        value: String,
    },
    /// No tensor has this name.
    #[error("no tensor named `{name}`")]
    TensorNotFound {
        /// The name looked up.
        name: String,
    },
    /// A tensor handed to the writer has a byte length that does not match its type and shape.
    #[error("tensor `{tensor}` has {actual} bytes of data, its type and shape need {expected}")]
    DataSizeMismatch {
        /// The tensor.
        tensor: String,
        /// Bytes implied by type and shape.
        expected: u64,
        /// Bytes supplied.
        actual: u64,
    },
    /// Streamed tensor data arrived out of declaration order, or was missing at the end.
    #[error("tensor data out of order: expected `{expected}`, got `{got}`")]
    StreamOrder {
        /// The next tensor (or `<end>`).
        expected: String,
        /// What was supplied (or `<end>`).
        got: String,
    },
}
