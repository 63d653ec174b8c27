//! Writing GGUF v3 files. Tensors are validated when added, using the same shape check as the
//! reader, and their data can be streamed in one tensor at a time so a multi-gigabyte model is
//! never held in memory whole.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::reader::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_ARRAY_NESTING};
use crate::tensor::tensor_n_bytes;
use crate::value::{MetaArray, MetaValue};
use crate::{GgmlType, GgufError, Metadata};

/// The version this writer produces.
pub const WRITE_VERSION: u32 = 3;

#[derive(Debug)]
struct PendingTensor {
    name: String,
    dtype: GgmlType,
    dims: Vec<u64>,
    n_bytes: usize,
    data: Option<Vec<u8>>,
}

/// Collects metadata and tensors, then writes a file.
///
/// Tensor data is either attached up front ([`GgufWriter::add_tensor`]) or declared
/// ([`GgufWriter::declare_tensor`]) and streamed later through [`GgufWriter::begin`].
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Metadata,
    tensors: Vec<PendingTensor>,
    names: HashSet<String>,
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// The metadata added so far.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Adds a metadata entry. `general.alignment` must be a power-of-two integer that fits u32;
    /// it is always written as u32.
    pub fn add_metadata(
        &mut self,
        key: impl Into<String>,
        value: impl Into<MetaValue>,
    ) -> Result<(), GgufError> {
        let key = key.into();
        let mut value = value.into();
        if let MetaValue::Array(a) = &value
            && array_depth(a) > MAX_ARRAY_NESTING
        {
            return Err(GgufError::NestingTooDeep {
                key,
                max: MAX_ARRAY_NESTING,
            });
        }
        if key == ALIGNMENT_KEY {
            let n = value
                .as_integer()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| n.is_power_of_two())
                .ok_or_else(|| GgufError::BadAlignment {
                    value: format!("{value:?}"),
                })?;
            if !self.tensors.is_empty() {
                // Offsets are computed at write time, but refusing late changes keeps the rule
                // simple: alignment is part of the file's identity, set it first.
                return Err(GgufError::BadAlignment {
                    value: format!("{n} (set after tensors were added)"),
                });
            }
            value = MetaValue::U32(n);
        }
        self.metadata.insert(key, value)
    }

    /// Tensor data alignment the file will use.
    pub fn alignment(&self) -> usize {
        self.metadata
            .get_u32(ALIGNMENT_KEY)
            .ok()
            .flatten()
            .map_or(DEFAULT_ALIGNMENT, |a| a as usize)
    }

    fn push(
        &mut self,
        name: &str,
        dtype: GgmlType,
        dims: &[u64],
        data: Option<Vec<u8>>,
    ) -> Result<usize, GgufError> {
        let n_bytes = tensor_n_bytes(name, dtype, dims)?;
        if let Some(d) = &data
            && d.len() != n_bytes
        {
            return Err(GgufError::DataSizeMismatch {
                tensor: name.to_owned(),
                expected: n_bytes as u64,
                actual: d.len() as u64,
            });
        }
        if !self.names.insert(name.to_owned()) {
            return Err(GgufError::DuplicateTensor {
                tensor: name.to_owned(),
            });
        }
        self.tensors.push(PendingTensor {
            name: name.to_owned(),
            dtype,
            dims: dims.to_vec(),
            n_bytes,
            data,
        });
        Ok(n_bytes)
    }

    /// Adds a tensor with its data. `dims` are in file order (row length first); the data must
    /// be exactly the size the type and shape imply.
    pub fn add_tensor(
        &mut self,
        name: &str,
        dtype: GgmlType,
        dims: &[u64],
        data: Vec<u8>,
    ) -> Result<(), GgufError> {
        self.push(name, dtype, dims, Some(data)).map(|_| ())
    }

    /// Declares a tensor whose data will be supplied to the [`TensorStream`]; returns its size
    /// in bytes.
    pub fn declare_tensor(
        &mut self,
        name: &str,
        dtype: GgmlType,
        dims: &[u64],
    ) -> Result<usize, GgufError> {
        self.push(name, dtype, dims, None)
    }

    /// Encodes magic, counts, metadata and tensor descriptions, padded to the alignment.
    fn header(&self) -> Vec<u8> {
        let alignment = self.alignment();
        let mut h = Vec::with_capacity(4096);
        h.extend_from_slice(&GGUF_MAGIC);
        h.extend_from_slice(&WRITE_VERSION.to_le_bytes());
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in self.metadata.iter() {
            put_str(&mut h, key);
            h.extend_from_slice(&value.value_type().id().to_le_bytes());
            put_value(&mut h, value);
        }
        let mut rel = 0usize;
        for t in &self.tensors {
            put_str(&mut h, &t.name);
            h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&t.dtype.id().to_le_bytes());
            h.extend_from_slice(&(rel as u64).to_le_bytes());
            rel = (rel + t.n_bytes).next_multiple_of(alignment);
        }
        h.resize(h.len().next_multiple_of(alignment), 0);
        h
    }

    /// Writes the header and returns a stream that takes the tensor data in declaration order.
    pub fn begin<W: Write>(self, mut w: W) -> Result<TensorStream<W>, GgufError> {
        w.write_all(&self.header()).map_err(GgufError::Write)?;
        Ok(TensorStream {
            alignment: self.alignment(),
            w,
            tensors: self.tensors,
            next: 0,
            in_progress: false,
        })
    }

    /// Writes the whole file; every tensor must have been added with its data.
    pub fn write_to<W: Write>(&self, mut w: W) -> Result<W, GgufError> {
        if let Some(t) = self.tensors.iter().find(|t| t.data.is_none()) {
            return Err(GgufError::StreamOrder {
                expected: t.name.clone(),
                got: "<end>".into(),
            });
        }
        w.write_all(&self.header()).map_err(GgufError::Write)?;
        let alignment = self.alignment();
        for t in &self.tensors {
            let data = t.data.as_deref().unwrap_or_default();
            write_padded(&mut w, data, alignment)?;
        }
        w.flush().map_err(GgufError::Write)?;
        Ok(w)
    }

    /// Writes the whole file to `path` (created or truncated).
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<(), GgufError> {
        let path = path.as_ref();
        let io_err = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::create(path).map_err(io_err)?;
        let w = self
            .write_to(BufWriter::with_capacity(1 << 20, file))
            .map_err(|e| match e {
                GgufError::Write(source) => io_err(source),
                other => other,
            })?;
        w.into_inner()
            .map_err(|e| io_err(e.into_error()))?
            .sync_all()
            .map_err(io_err)
    }
}

/// Tensor data being written after the header (see [`GgufWriter::begin`]).
#[derive(Debug)]
pub struct TensorStream<W: Write> {
    w: W,
    tensors: Vec<PendingTensor>,
    next: usize,
    alignment: usize,
    /// Set while a [`TensorSink`] is open; left set if one is dropped unfinished, which poisons
    /// the stream (the bytes written so far cannot be taken back).
    in_progress: bool,
}

impl<W: Write> TensorStream<W> {
    fn check_not_poisoned(&self) -> Result<(), GgufError> {
        match self.tensors.get(self.next) {
            Some(t) if self.in_progress => Err(GgufError::StreamOrder {
                expected: format!("end of `{}` (its sink was dropped unfinished)", t.name),
                got: "more data".into(),
            }),
            _ => Ok(()),
        }
    }

    /// Writes every following tensor whose data was attached up front.
    fn flush_attached(&mut self) -> Result<(), GgufError> {
        self.check_not_poisoned()?;
        while let Some(t) = self.tensors.get_mut(self.next) {
            let Some(data) = t.data.take() else {
                break;
            };
            write_padded(&mut self.w, &data, self.alignment)?;
            self.next += 1;
        }
        Ok(())
    }

    /// The name of the next declared tensor whose data is expected.
    pub fn next_tensor(&mut self) -> Result<Option<&str>, GgufError> {
        self.flush_attached()?;
        Ok(self.tensors.get(self.next).map(|t| t.name.as_str()))
    }

    /// Starts the data of tensor `name`, which must be the next declared one; the data can then
    /// be written in pieces, so a large tensor never has to be in memory whole.
    pub fn begin_tensor(&mut self, name: &str) -> Result<TensorSink<'_, W>, GgufError> {
        self.flush_attached()?;
        let Some(t) = self.tensors.get(self.next) else {
            return Err(GgufError::StreamOrder {
                expected: "<end>".into(),
                got: name.to_owned(),
            });
        };
        if t.name != name {
            return Err(GgufError::StreamOrder {
                expected: t.name.clone(),
                got: name.to_owned(),
            });
        }
        let remaining = t.n_bytes;
        self.in_progress = true;
        Ok(TensorSink {
            stream: self,
            remaining,
        })
    }

    /// Writes the data of tensor `name`, which must be the next declared one, in one piece.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<(), GgufError> {
        let mut sink = self.begin_tensor(name)?;
        if sink.remaining != data.len() {
            let expected = sink.remaining as u64;
            // Nothing was written yet, so the stream is still usable.
            sink.stream.in_progress = false;
            return Err(GgufError::DataSizeMismatch {
                tensor: name.to_owned(),
                expected,
                actual: data.len() as u64,
            });
        }
        sink.write(data)?;
        sink.finish()
    }

    /// Checks every tensor was written, flushes, and returns the sink.
    pub fn finish(mut self) -> Result<W, GgufError> {
        self.flush_attached()?;
        if let Some(t) = self.tensors.get(self.next) {
            return Err(GgufError::StreamOrder {
                expected: t.name.clone(),
                got: "<end>".into(),
            });
        }
        self.w.flush().map_err(GgufError::Write)?;
        Ok(self.w)
    }
}

/// The data of one tensor being written in pieces (see [`TensorStream::begin_tensor`]).
/// Dropping it without [`TensorSink::finish`] leaves the stream unusable.
#[derive(Debug)]
pub struct TensorSink<'a, W: Write> {
    stream: &'a mut TensorStream<W>,
    remaining: usize,
}

impl<W: Write> TensorSink<'_, W> {
    fn tensor_name(&self) -> String {
        self.stream
            .tensors
            .get(self.stream.next)
            .map_or_else(String::new, |t| t.name.clone())
    }

    fn n_bytes(&self) -> usize {
        self.stream
            .tensors
            .get(self.stream.next)
            .map_or(0, |t| t.n_bytes)
    }

    /// Bytes still expected.
    pub fn remaining(&self) -> usize {
        self.remaining
    }

    /// Appends a piece of the tensor's data; more than the tensor's size is an error.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), GgufError> {
        if chunk.len() > self.remaining {
            return Err(GgufError::DataSizeMismatch {
                tensor: self.tensor_name(),
                expected: self.n_bytes() as u64,
                actual: (self.n_bytes() - self.remaining + chunk.len()) as u64,
            });
        }
        self.stream.w.write_all(chunk).map_err(GgufError::Write)?;
        self.remaining -= chunk.len();
        Ok(())
    }

    /// Checks the tensor is complete and writes its padding.
    pub fn finish(self) -> Result<(), GgufError> {
        if self.remaining != 0 {
            return Err(GgufError::DataSizeMismatch {
                tensor: self.tensor_name(),
                expected: self.n_bytes() as u64,
                actual: (self.n_bytes() - self.remaining) as u64,
            });
        }
        let n_bytes = self.n_bytes();
        let pad = n_bytes.next_multiple_of(self.stream.alignment) - n_bytes;
        write_zeros(&mut self.stream.w, pad)?;
        self.stream.next += 1;
        self.stream.in_progress = false;
        Ok(())
    }
}

fn write_padded<W: Write>(w: &mut W, data: &[u8], alignment: usize) -> Result<(), GgufError> {
    w.write_all(data).map_err(GgufError::Write)?;
    write_zeros(w, data.len().next_multiple_of(alignment) - data.len())
}

fn write_zeros<W: Write>(w: &mut W, mut pad: usize) -> Result<(), GgufError> {
    const ZEROS: [u8; 64] = [0; 64];
    while pad > 0 {
        let n = pad.min(ZEROS.len());
        w.write_all(&ZEROS[..n]).map_err(GgufError::Write)?;
        pad -= n;
    }
    Ok(())
}

/// Levels of array nesting: 1 for an array of scalars.
fn array_depth(a: &MetaArray) -> usize {
    match a {
        MetaArray::Array(inner) => 1 + inner.iter().map(array_depth).max().unwrap_or(0),
        _ => 1,
    }
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
}

fn put_value(h: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => h.push(*x),
        MetaValue::I8(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => h.push(u8::from(*x)),
        MetaValue::String(s) => put_str(h, s),
        MetaValue::Array(a) => put_array(h, a),
    }
}

fn put_array(h: &mut Vec<u8>, a: &MetaArray) {
    fn each<T: Copy, const N: usize>(h: &mut Vec<u8>, v: &[T], enc: fn(T) -> [u8; N]) {
        for x in v {
            h.extend_from_slice(&enc(*x));
        }
    }
    h.extend_from_slice(&a.element_type().id().to_le_bytes());
    h.extend_from_slice(&(a.len() as u64).to_le_bytes());
    match a {
        MetaArray::U8(v) => h.extend_from_slice(v),
        MetaArray::I8(v) => each(h, v, i8::to_le_bytes),
        MetaArray::U16(v) => each(h, v, u16::to_le_bytes),
        MetaArray::I16(v) => each(h, v, i16::to_le_bytes),
        MetaArray::U32(v) => each(h, v, u32::to_le_bytes),
        MetaArray::I32(v) => each(h, v, i32::to_le_bytes),
        MetaArray::U64(v) => each(h, v, u64::to_le_bytes),
        MetaArray::I64(v) => each(h, v, i64::to_le_bytes),
        MetaArray::F32(v) => each(h, v, f32::to_le_bytes),
        MetaArray::F64(v) => each(h, v, f64::to_le_bytes),
        MetaArray::Bool(v) => h.extend(v.iter().map(|&b| u8::from(b))),
        MetaArray::String(v) => {
            for s in v {
                put_str(h, s);
            }
        }
        MetaArray::Array(v) => {
            for inner in v {
                put_array(h, inner);
            }
        }
    }
}
