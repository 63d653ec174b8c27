//! Hidden-state codecs: rows of `f32` activations to bytes and back.
//!
//! | codec | bytes per value | error |
//! |---|---|---|
//! | [`Codec::F32`] | 4 | none: bit-exact, NaN payloads included |
//! | [`Codec::F16`] | 2 | binary16 round-to-nearest-even (relative 2⁻¹¹) |
//! | [`Codec::Q8`] | 34 per 32 | at most `d / 2` per value, `d` its block's scale |
//!
//! Every codec is little-endian whatever the machine. Byte layouts:
//!
//! - F32: each value's IEEE-754 binary32 bits, 4 bytes.
//! - F16: each value rounded to IEEE-754 binary16, 2 bytes. A finite value beyond binary16's
//!   range (|x| ≥ 65520) is refused with [`CodecError::OutOfRange`] rather than turned into an
//!   infinity; infinities and NaNs pass through as themselves.
//! - Q8: the values in blocks of [`Q8_BLOCK`] (the last block holds the remainder, so any count
//!   encodes without padding). A block of `m` values is `2 + m` bytes: its scale `d` as
//!   binary16, then `m` signed bytes `q`, each value decoding as `q × d`. The encoder takes the
//!   smallest binary16 `d ≥ max|x| / 127` (rounding the scale up keeps every `|x / d| ≤ 127`, so
//!   nothing clips) and `q = round(x / d)`. Non-finite values are refused
//!   ([`CodecError::NonFinite`]); so is a block whose scale would not fit binary16. A decoder
//!   refuses a scale that is negative or not finite, and reads `q = -128` (never written) as
//!   `-128 × d`.
//!
//! The byte length alone determines the value count for every codec, so a truncated or padded
//! payload is caught as [`CodecError::BadLength`] without trusting any count the peer sent.

use half::f16;
use half::slice::HalfFloatSliceExt as _;
use std::fmt;

/// Values per Q8 block.
pub const Q8_BLOCK: usize = 32;
/// Bytes of a full Q8 block: a binary16 scale and 32 signed bytes.
pub const Q8_BLOCK_BYTES: usize = Q8_BLOCK + 2;

/// Values converted per pass through the stack buffer of the F16 paths.
const F16_CHUNK: usize = 256;

/// The smallest magnitude binary16 rounds to infinity (65504 plus half a step).
const F16_OVERFLOW: f32 = 65520.0;

/// How activations are laid out in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Codec {
    /// IEEE-754 binary32, 4 bytes a value. Lossless.
    F32,
    /// IEEE-754 binary16, 2 bytes a value.
    F16,
    /// 8-bit symmetric blocks of 32 values with a binary16 scale, 34 bytes per block.
    Q8,
}

/// Why activations could not be encoded or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The byte length is not what any number of values of the codec takes.
    #[error("{len} bytes are not a whole number of {codec} values")]
    BadLength {
        /// The codec.
        codec: Codec,
        /// The length received.
        len: usize,
    },
    /// The payload holds another number of values than the caller expected.
    #[error("{codec} payload holds {got} values where {expected} were expected")]
    WrongCount {
        /// The codec.
        codec: Codec,
        /// Values expected.
        expected: usize,
        /// Values the payload holds.
        got: usize,
    },
    /// A value count that is not a whole number of rows.
    #[error("{values} values are not whole rows of width {width}")]
    Ragged {
        /// Values.
        values: usize,
        /// Row width.
        width: u32,
    },
    /// A NaN or infinity the codec cannot carry.
    #[error("value {index} is not finite and {codec} cannot carry it")]
    NonFinite {
        /// The codec.
        codec: Codec,
        /// Index of the value.
        index: usize,
    },
    /// A finite value beyond what the codec can represent.
    #[error("value {index} is beyond {codec}'s range")]
    OutOfRange {
        /// The codec.
        codec: Codec,
        /// Index of the (first) offending value.
        index: usize,
    },
    /// A Q8 block whose scale is negative or not finite.
    #[error("Q8 block {block} has a scale that is negative or not finite")]
    BadScale {
        /// Index of the block.
        block: usize,
    },
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Codec {
    /// Every codec.
    pub const ALL: [Codec; 3] = [Codec::F32, Codec::F16, Codec::Q8];

    /// A stable lower-case name ("f32", "f16", "q8") for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Codec::F32 => "f32",
            Codec::F16 => "f16",
            Codec::Q8 => "q8",
        }
    }

    /// Whether a round trip is bit-exact.
    pub fn is_exact(self) -> bool {
        self == Codec::F32
    }

    /// Bytes `values` values take.
    pub fn encoded_len(self, values: usize) -> usize {
        match self {
            Codec::F32 => values.saturating_mul(4),
            Codec::F16 => values.saturating_mul(2),
            Codec::Q8 => {
                let rest = values % Q8_BLOCK;
                (values / Q8_BLOCK)
                    .saturating_mul(Q8_BLOCK_BYTES)
                    .saturating_add(if rest == 0 { 0 } else { 2 + rest })
            }
        }
    }

    /// Values a payload of `len` bytes holds, or [`CodecError::BadLength`].
    pub fn decoded_len(self, len: usize) -> Result<usize, CodecError> {
        let bad = CodecError::BadLength { codec: self, len };
        match self {
            Codec::F32 if len.is_multiple_of(4) => Ok(len / 4),
            Codec::F16 if len.is_multiple_of(2) => Ok(len / 2),
            Codec::Q8 => {
                let (blocks, rest) = (len / Q8_BLOCK_BYTES, len % Q8_BLOCK_BYTES);
                match rest {
                    0 => Ok(blocks * Q8_BLOCK),
                    // A partial block holds its scale and at least one value.
                    3.. => Ok(blocks * Q8_BLOCK + rest - 2),
                    _ => Err(bad),
                }
            }
            _ => Err(bad),
        }
    }

    /// Appends the encoding of `values` to `out`. On error `out` is left as it was.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) -> Result<(), CodecError> {
        let start = out.len();
        out.resize(start + self.encoded_len(values.len()), 0);
        let Some(dst) = out.get_mut(start..) else {
            return Ok(()); // unreachable: the resize made the room
        };
        let done = match self {
            Codec::F32 => {
                encode_f32(values, dst);
                Ok(())
            }
            Codec::F16 => encode_f16(values, dst),
            Codec::Q8 => encode_q8(values, dst),
        };
        if done.is_err() {
            out.truncate(start);
        }
        done
    }

    /// Appends the values `bytes` decode to onto `out`; returns how many. On error `out` is
    /// left as it was.
    pub fn decode(self, bytes: &[u8], out: &mut Vec<f32>) -> Result<usize, CodecError> {
        let n = self.decoded_len(bytes.len())?;
        let start = out.len();
        out.resize(start + n, 0.0);
        let done = match out.get_mut(start..) {
            Some(dst) => self.decode_into(bytes, dst),
            None => Ok(()), // unreachable: the resize made the room
        };
        if done.is_err() {
            out.truncate(start);
        }
        done.map(|()| n)
    }

    /// Decodes `bytes` into `out`, which must be exactly as long as the payload's values.
    pub fn decode_into(self, bytes: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
        let n = self.decoded_len(bytes.len())?;
        if n != out.len() {
            return Err(CodecError::WrongCount {
                codec: self,
                expected: out.len(),
                got: n,
            });
        }
        match self {
            Codec::F32 => {
                for (x, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                Ok(())
            }
            Codec::F16 => {
                decode_f16(bytes, out);
                Ok(())
            }
            Codec::Q8 => decode_q8(bytes, out),
        }
    }
}

fn encode_f32(values: &[f32], dst: &mut [u8]) {
    for (b, x) in dst.chunks_exact_mut(4).zip(values) {
        b.copy_from_slice(&x.to_le_bytes());
    }
}

fn encode_f16(values: &[f32], dst: &mut [u8]) -> Result<(), CodecError> {
    let mut buf = [f16::ZERO; F16_CHUNK];
    for (chunk, (src, dst)) in values
        .chunks(F16_CHUNK)
        .zip(dst.chunks_mut(2 * F16_CHUNK))
        .enumerate()
    {
        // Finite values from 65520 up round to infinity in binary16. A flag over the chunk
        // vectorises; the index is looked for only when it is set.
        let mut overflow = false;
        for x in src {
            let a = x.abs();
            overflow |= (F16_OVERFLOW..=f32::MAX).contains(&a);
        }
        if overflow {
            let i = src
                .iter()
                .position(|x| (F16_OVERFLOW..=f32::MAX).contains(&x.abs()))
                .unwrap_or(0);
            return Err(CodecError::OutOfRange {
                codec: Codec::F16,
                index: chunk * F16_CHUNK + i,
            });
        }
        let half = &mut buf[..src.len()];
        // Uses the CPU's conversion instructions when it has them (checked at run time).
        half.convert_from_f32_slice(src);
        for (b, h) in dst.chunks_exact_mut(2).zip(half.iter()) {
            b.copy_from_slice(&h.to_le_bytes());
        }
    }
    Ok(())
}

fn decode_f16(bytes: &[u8], out: &mut [f32]) {
    let mut buf = [f16::ZERO; F16_CHUNK];
    for (src, dst) in bytes.chunks(2 * F16_CHUNK).zip(out.chunks_mut(F16_CHUNK)) {
        let half = &mut buf[..dst.len()];
        for (h, b) in half.iter_mut().zip(src.chunks_exact(2)) {
            *h = f16::from_le_bytes([b[0], b[1]]);
        }
        half.convert_to_f32_slice(dst);
    }
}

/// The block scale: the smallest binary16 at least `amax / 127`, or `None` when that is not a
/// finite binary16.
fn q8_scale(amax: f32) -> Option<f16> {
    let scale = amax / 127.0;
    let mut d = f16::from_f32(scale);
    if d.to_f32() < scale {
        // Rounded down: step to the next binary16 up so that no value needs |q| > 127.
        d = f16::from_bits(d.to_bits().checked_add(1)?);
    }
    d.is_finite().then_some(d)
}

fn encode_q8(values: &[f32], dst: &mut [u8]) -> Result<(), CodecError> {
    let full = values.len() / Q8_BLOCK;
    let (whole, tail) = values.split_at(full * Q8_BLOCK);
    let (dst_whole, dst_tail) = dst.split_at_mut(full * Q8_BLOCK_BYTES);
    for (block, (src, dst)) in whole
        .chunks_exact(Q8_BLOCK)
        .zip(dst_whole.chunks_exact_mut(Q8_BLOCK_BYTES))
        .enumerate()
    {
        // Fixed-size views let the compiler unroll and vectorise the block loops.
        let (Ok(src), Ok(dst)) = (
            <&[f32; Q8_BLOCK]>::try_from(src),
            <&mut [u8; Q8_BLOCK_BYTES]>::try_from(dst),
        ) else {
            continue; // unreachable: chunks_exact yields exact sizes
        };
        q8_block(src, dst, block, amax_of_full_block(src))?;
    }
    if !tail.is_empty() {
        let amax = tail.iter().try_fold(0.0f32, |m, x| {
            let a = x.abs();
            (a <= f32::MAX).then_some(if a > m { a } else { m })
        });
        q8_block(tail, dst_tail, full, amax)?;
    }
    Ok(())
}

/// `max |x|` of a full block, or `None` if a value is not finite. Eight running maxima and
/// compare-and-select (rather than `f32::max`, whose NaN rule costs extra work) vectorise.
#[inline(always)]
fn amax_of_full_block(src: &[f32; Q8_BLOCK]) -> Option<f32> {
    let mut lanes = [0.0f32; 8];
    let mut bad = false;
    for chunk in src.chunks_exact(8) {
        for (m, x) in lanes.iter_mut().zip(chunk) {
            let a = x.abs();
            *m = if a > *m { a } else { *m };
            // True for NaN and infinity alike.
            bad |= !a.is_finite();
        }
    }
    let amax = lanes
        .iter()
        .fold(0.0f32, |acc, &m| if m > acc { m } else { acc });
    (!bad).then_some(amax)
}

/// Encodes one block (`src.len() <= 32` values into `2 + src.len()` bytes) given its
/// `max |x|`, or `None` when a value is not finite.
#[inline(always)]
fn q8_block(
    src: &[f32],
    dst: &mut [u8],
    block: usize,
    amax: Option<f32>,
) -> Result<(), CodecError> {
    let at = |i: usize| block * Q8_BLOCK + i;
    let Some(amax) = amax else {
        let i = src.iter().position(|x| !x.is_finite()).unwrap_or(0);
        return Err(CodecError::NonFinite {
            codec: Codec::Q8,
            index: at(i),
        });
    };
    let Some(d) = q8_scale(amax) else {
        let i = src.iter().position(|x| x.abs() == amax).unwrap_or(0);
        return Err(CodecError::OutOfRange {
            codec: Codec::Q8,
            index: at(i),
        });
    };
    let (head, qs) = dst.split_at_mut(2);
    head.copy_from_slice(&d.to_le_bytes());
    let ds = d.to_f32();
    let inv = if ds > 0.0 { 1.0 / ds } else { 0.0 };
    for (q, x) in qs.iter_mut().zip(src) {
        let v = x * inv;
        // Round half away from zero; an add and a truncating cast vectorise where a call to
        // `round` would not. |v| <= 127 (plus rounding), so the clamp only guards.
        let r = (v + 0.5f32.copysign(v)) as i32;
        *q = r.clamp(-127, 127) as i8 as u8;
    }
    Ok(())
}

fn decode_q8(bytes: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
    for (block, (src, dst)) in bytes
        .chunks(Q8_BLOCK_BYTES)
        .zip(out.chunks_mut(Q8_BLOCK))
        .enumerate()
    {
        let (head, qs) = src.split_at(2);
        let d = f16::from_le_bytes([head[0], head[1]]).to_f32();
        if !(d.is_finite() && d >= 0.0) {
            return Err(CodecError::BadScale { block });
        }
        for (x, q) in dst.iter_mut().zip(qs) {
            *x = f32::from(*q as i8) * d;
        }
    }
    Ok(())
}

/// How to choose a codec among those both ends of a link support.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Preference {
    /// F16, else Q8, else F32: half of F32's bytes at a rounding error far below what the
    /// model's own weight quantization adds.
    #[default]
    Balanced,
    /// F32 only: bit-exact hidden states (a split run must equal a whole one).
    Exact,
    /// Q8, else F16, else F32: the fewest bytes, for slow links.
    Smallest,
}

impl Preference {
    /// The codecs this preference accepts, best first.
    pub fn order(self) -> &'static [Codec] {
        match self {
            Preference::Balanced => &[Codec::F16, Codec::Q8, Codec::F32],
            Preference::Exact => &[Codec::F32],
            Preference::Smallest => &[Codec::Q8, Codec::F16, Codec::F32],
        }
    }
}

/// The codec a link should use: the first in `preference`'s order that both `ours` and
/// `theirs` support, or `None` when they share none it accepts.
pub fn negotiate(ours: &[Codec], theirs: &[Codec], preference: Preference) -> Option<Codec> {
    preference
        .order()
        .iter()
        .copied()
        .find(|c| ours.contains(c) && theirs.contains(c))
}
