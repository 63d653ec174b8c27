//! Parsing a GGUF byte string into metadata and tensor descriptions. Every read goes through a
//! bounds-checked cursor, every count is checked against the bytes left before anything is
//! allocated from it, and tensor data is never copied: only its offsets are recorded.

use std::collections::HashMap;

use crate::error::Location;
use crate::tensor::{MAX_DIMS, tensor_n_bytes};
use crate::value::{MetaArray, MetaValue, StringArray, ValueType};
use crate::{GgmlType, GgufError, Metadata, TensorInfo};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of tensor data when the file does not say otherwise.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// The metadata key that overrides [`DEFAULT_ALIGNMENT`].
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Deepest nesting of arrays inside arrays the reader accepts (bounds recursion).
pub const MAX_ARRAY_NESTING: usize = 8;

/// What a file parses into; the bytes themselves stay with the caller.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    pub tensor_index: HashMap<String, usize>,
    pub alignment: usize,
    pub data_offset: usize,
}

/// Which part of the file a read belongs to; turned into an owned [`Location`] only on error,
/// so the happy path allocates nothing for it.
#[derive(Clone, Copy)]
enum Ctx<'k> {
    Header,
    Key(u64),
    Value(&'k str),
    Tensor(u64, Option<&'k str>),
}

impl Ctx<'_> {
    fn location(self) -> Location {
        match self {
            Ctx::Header => Location::Header,
            Ctx::Key(index) => Location::MetadataKey { index },
            Ctx::Value(key) => Location::MetadataValue {
                key: key.to_owned(),
            },
            Ctx::Tensor(index, name) => Location::TensorInfo {
                index,
                name: name.map(str::to_owned),
            },
        }
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn truncated(&self, ctx: Ctx<'_>, needed: u64) -> GgufError {
        GgufError::Truncated {
            at: ctx.location(),
            offset: self.pos as u64,
            needed,
            available: self.remaining() as u64,
        }
    }

    fn take(&mut self, n: usize, ctx: Ctx<'_>) -> Result<&'a [u8], GgufError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or_else(|| self.truncated(ctx, n as u64))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or_else(|| self.truncated(ctx, n as u64))?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, ctx: Ctx<'_>) -> Result<[u8; N], GgufError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let a = *rest
            .first_chunk::<N>()
            .ok_or_else(|| self.truncated(ctx, N as u64))?;
        self.pos += N;
        Ok(a)
    }

    fn u8(&mut self, ctx: Ctx<'_>) -> Result<u8, GgufError> {
        Ok(self.array::<1>(ctx)?[0])
    }

    fn u32(&mut self, ctx: Ctx<'_>) -> Result<u32, GgufError> {
        self.array(ctx).map(u32::from_le_bytes)
    }

    fn u64(&mut self, ctx: Ctx<'_>) -> Result<u64, GgufError> {
        self.array(ctx).map(u64::from_le_bytes)
    }

    /// A length-prefixed string, borrowed from the buffer.
    fn str(&mut self, ctx: Ctx<'_>) -> Result<&'a str, GgufError> {
        let len = self.u64(ctx)?;
        let len = usize::try_from(len).map_err(|_| self.truncated(ctx, len))?;
        let offset = self.pos as u64;
        let bytes = self.take(len, ctx)?;
        std::str::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 {
            at: ctx.location(),
            offset,
        })
    }

    /// Reads an element count and checks it against the bytes left.
    fn count(&mut self, ctx: Ctx<'_>, min_bytes_each: usize) -> Result<usize, GgufError> {
        let count = self.u64(ctx)?;
        let remaining = self.remaining();
        let fits = count
            .checked_mul(min_bytes_each as u64)
            .is_some_and(|need| need <= remaining as u64);
        if !fits {
            return Err(GgufError::CountTooLarge {
                at: ctx.location(),
                count,
                min_bytes_each: min_bytes_each as u64,
                remaining: remaining as u64,
            });
        }
        // Fits in the remaining bytes, so fits in usize.
        Ok(count as usize)
    }

    fn value_type(&mut self, ctx: Ctx<'_>) -> Result<ValueType, GgufError> {
        let type_id = self.u32(ctx)?;
        ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
            at: ctx.location(),
            type_id,
        })
    }

    fn bool(&mut self, ctx: Ctx<'_>) -> Result<bool, GgufError> {
        match self.u8(ctx)? {
            0 => Ok(false),
            1 => Ok(true),
            byte => Err(GgufError::InvalidBool {
                at: ctx.location(),
                byte,
            }),
        }
    }

    fn value(&mut self, ty: ValueType, key: &str, depth: usize) -> Result<MetaValue, GgufError> {
        let ctx = Ctx::Value(key);
        Ok(match ty {
            ValueType::U8 => MetaValue::U8(self.u8(ctx)?),
            ValueType::I8 => MetaValue::I8(i8::from_le_bytes(self.array(ctx)?)),
            ValueType::U16 => MetaValue::U16(u16::from_le_bytes(self.array(ctx)?)),
            ValueType::I16 => MetaValue::I16(i16::from_le_bytes(self.array(ctx)?)),
            ValueType::U32 => MetaValue::U32(self.u32(ctx)?),
            ValueType::I32 => MetaValue::I32(i32::from_le_bytes(self.array(ctx)?)),
            ValueType::U64 => MetaValue::U64(self.u64(ctx)?),
            ValueType::I64 => MetaValue::I64(i64::from_le_bytes(self.array(ctx)?)),
            ValueType::F32 => MetaValue::F32(f32::from_le_bytes(self.array(ctx)?)),
            ValueType::F64 => MetaValue::F64(f64::from_le_bytes(self.array(ctx)?)),
            ValueType::Bool => MetaValue::Bool(self.bool(ctx)?),
            ValueType::String => MetaValue::String(self.str(ctx)?.to_owned()),
            ValueType::Array => MetaValue::Array(self.meta_array(key, depth + 1)?),
        })
    }

    /// Reads `count` fixed-size little-endian elements in one bounds check.
    fn fixed<const N: usize, T>(
        &mut self,
        count: usize,
        ctx: Ctx<'_>,
        decode: fn([u8; N]) -> T,
    ) -> Result<Vec<T>, GgufError> {
        // `count` was checked against the remaining bytes with N as the element size.
        let bytes = self.take(count.saturating_mul(N), ctx)?;
        Ok(bytes
            .chunks_exact(N)
            .filter_map(|c| c.first_chunk::<N>().map(|a| decode(*a)))
            .collect())
    }

    /// Total text bytes of the next `n` strings, found by hopping over the length prefixes so
    /// the text buffer is allocated once at its exact size. Zero if the strings do not fit:
    /// the real read then reports exactly where.
    fn string_bytes_ahead(&self, n: usize) -> usize {
        let mut pos = self.pos;
        let mut total = 0usize;
        for _ in 0..n {
            let Some(len) = self
                .buf
                .get(pos..)
                .and_then(|rest| rest.first_chunk::<8>())
                .map(|b| u64::from_le_bytes(*b))
            else {
                return 0;
            };
            let Some(next) = usize::try_from(len)
                .ok()
                .and_then(|len| pos.checked_add(8)?.checked_add(len))
                .filter(|&next| next <= self.buf.len())
            else {
                return 0;
            };
            total += next - pos - 8;
            pos = next;
        }
        total
    }

    fn meta_array(&mut self, key: &str, depth: usize) -> Result<MetaArray, GgufError> {
        let ctx = Ctx::Value(key);
        if depth > MAX_ARRAY_NESTING {
            return Err(GgufError::NestingTooDeep {
                key: key.to_owned(),
                max: MAX_ARRAY_NESTING,
            });
        }
        let elem = self.value_type(ctx)?;
        let n = self.count(ctx, elem.min_encoded_size())?;
        Ok(match elem {
            ValueType::U8 => MetaArray::U8(self.take(n, ctx)?.to_vec()),
            ValueType::I8 => MetaArray::I8(self.fixed(n, ctx, i8::from_le_bytes)?),
            ValueType::U16 => MetaArray::U16(self.fixed(n, ctx, u16::from_le_bytes)?),
            ValueType::I16 => MetaArray::I16(self.fixed(n, ctx, i16::from_le_bytes)?),
            ValueType::U32 => MetaArray::U32(self.fixed(n, ctx, u32::from_le_bytes)?),
            ValueType::I32 => MetaArray::I32(self.fixed(n, ctx, i32::from_le_bytes)?),
            ValueType::U64 => MetaArray::U64(self.fixed(n, ctx, u64::from_le_bytes)?),
            ValueType::I64 => MetaArray::I64(self.fixed(n, ctx, i64::from_le_bytes)?),
            ValueType::F32 => MetaArray::F32(self.fixed(n, ctx, f32::from_le_bytes)?),
            ValueType::F64 => MetaArray::F64(self.fixed(n, ctx, f64::from_le_bytes)?),
            ValueType::Bool => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.bool(ctx)?);
                }
                MetaArray::Bool(v)
            }
            ValueType::String => {
                let mut out = StringArray::with_capacity(n, self.string_bytes_ahead(n));
                for _ in 0..n {
                    out.push(self.str(ctx)?);
                }
                MetaArray::String(out)
            }
            ValueType::Array => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.meta_array(key, depth + 1)?);
                }
                MetaArray::Array(v)
            }
        })
    }
}

fn check_alignment(metadata: &Metadata) -> Result<usize, GgufError> {
    let Some(v) = metadata.get(ALIGNMENT_KEY) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let bad = || GgufError::BadAlignment {
        value: format!("{v:?}"),
    };
    let n = v.as_integer().ok_or_else(bad)?;
    let n = u32::try_from(n).map_err(|_| bad())?;
    if !n.is_power_of_two() {
        return Err(bad());
    }
    Ok(n as usize)
}

fn check_header(c: &mut Cursor<'_>) -> Result<u32, GgufError> {
    let head = c.buf.get(..4).unwrap_or(c.buf);
    if head != GGUF_MAGIC {
        return Err(GgufError::BadMagic {
            found: head.to_vec(),
        });
    }
    c.pos = 4;
    let version = c.u32(Ctx::Header)?;
    match version {
        2 | 3 => Ok(version),
        v if (2..=3).contains(&v.swap_bytes()) => Err(GgufError::BigEndian {
            version: v.swap_bytes(),
        }),
        v => Err(GgufError::UnsupportedVersion { version: v }),
    }
}

/// Smallest tensor description: name length, n_dims, type, offset.
const MIN_TENSOR_INFO_BYTES: usize = 8 + 4 + 4 + 8;
/// Smallest metadata entry: key length, type tag, a one-byte value.
const MIN_KV_BYTES: usize = 8 + 4 + 1;

pub(crate) fn parse(buf: &[u8]) -> Result<Parsed, GgufError> {
    let mut c = Cursor { buf, pos: 0 };
    let version = check_header(&mut c)?;
    let n_tensors = c.u64(Ctx::Header)?;
    let n_kv = c.u64(Ctx::Header)?;
    for (count, min_bytes_each) in [(n_tensors, MIN_TENSOR_INFO_BYTES), (n_kv, MIN_KV_BYTES)] {
        let remaining = c.remaining() as u64;
        if count.saturating_mul(min_bytes_each as u64) > remaining {
            return Err(GgufError::CountTooLarge {
                at: Location::Header,
                count,
                min_bytes_each: min_bytes_each as u64,
                remaining,
            });
        }
    }

    let mut metadata = Metadata::new();
    for index in 0..n_kv {
        let key = c.str(Ctx::Key(index))?;
        let ty = c.value_type(Ctx::Value(key))?;
        let value = c.value(ty, key, 0)?;
        metadata.insert(key, value)?;
    }
    let alignment = check_alignment(&metadata)?;

    // Both counts were bounded by the file length above.
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
    let mut rel_offsets = Vec::with_capacity(n_tensors as usize);
    for index in 0..n_tensors {
        let name = c.str(Ctx::Tensor(index, None))?;
        let ctx = Ctx::Tensor(index, Some(name));
        let n_dims = c.u32(ctx)?;
        if n_dims as usize > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                tensor: name.to_owned(),
                n_dims,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(ctx)?);
        }
        let type_id = c.u32(ctx)?;
        let offset = c.u64(ctx)?;
        let dtype = GgmlType::from_id(type_id).map_err(|_| GgufError::UnknownTensorType {
            tensor: name.to_owned(),
            type_id,
        })?;
        let n_bytes = tensor_n_bytes(name, dtype, &dims)?;
        if !offset.is_multiple_of(alignment as u64) {
            return Err(GgufError::MisalignedTensor {
                tensor: name.to_owned(),
                offset,
                alignment: alignment as u64,
            });
        }
        if tensor_index
            .insert(name.to_owned(), tensors.len())
            .is_some()
        {
            return Err(GgufError::DuplicateTensor {
                tensor: name.to_owned(),
            });
        }
        rel_offsets.push(offset);
        tensors.push(TensorInfo {
            name: name.to_owned(),
            dtype,
            dims,
            offset: 0,
            n_bytes,
        });
    }

    let data_offset = c
        .pos
        .checked_next_multiple_of(alignment)
        .unwrap_or(usize::MAX);
    let file_len = buf.len() as u64;
    for (t, &rel) in tensors.iter_mut().zip(&rel_offsets) {
        let past_end = || GgufError::TensorPastEnd {
            tensor: t.name.clone(),
            offset: rel,
            n_bytes: t.n_bytes as u64,
            file_len,
        };
        let end = (data_offset as u64)
            .checked_add(rel)
            .and_then(|start| start.checked_add(t.n_bytes as u64))
            .ok_or_else(past_end)?;
        if end > file_len {
            return Err(past_end());
        }
        // end <= file_len, so the start fits in usize.
        t.offset = (end - t.n_bytes as u64) as usize;
    }

    let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
    by_offset.sort_unstable_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        if let [a, b] = pair
            && a.offset + a.n_bytes > b.offset
        {
            return Err(GgufError::OverlappingTensors {
                first: a.name.clone(),
                second: b.name.clone(),
            });
        }
    }

    Ok(Parsed {
        version,
        metadata,
        tensors,
        tensor_index,
        alignment,
        data_offset,
    })
}
