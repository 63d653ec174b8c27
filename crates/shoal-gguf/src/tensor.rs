//! Tensor descriptions and views, and the one shape check shared by the reader and the writer,
//! so a file this crate writes is exactly a file it accepts.

use crate::{GgmlType, GgufError};

/// Most dimensions a GGUF tensor may have.
pub const MAX_DIMS: usize = 4;

/// Where a tensor lives in the file and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Element type.
    pub dtype: GgmlType,
    /// Dimensions as in the file: `dims[0]` (ne0) is the row length, the fastest-varying.
    pub dims: Vec<u64>,
    /// Absolute byte offset of the data in [`crate::GgufFile::bytes`].
    pub offset: usize,
    /// Size of the data in bytes.
    pub n_bytes: usize,
}

impl TensorInfo {
    /// Total element count.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Elements per row (ne0).
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }

    /// Number of rows (the product of all dimensions but the first).
    pub fn n_rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        match self.n_rows() {
            0 => 0,
            rows => self.n_bytes / rows as usize,
        }
    }
}

/// A tensor's description with its bytes, borrowed from the file.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    /// The description.
    pub info: &'a TensorInfo,
    /// Exactly `info.n_bytes` bytes. Alignment in memory is only guaranteed for mapped files
    /// (to the file's alignment); read multi-byte values with `from_le_bytes`.
    pub data: &'a [u8],
}

impl<'a> TensorView<'a> {
    /// The bytes of row `i`, if it exists.
    pub fn row(&self, i: usize) -> Option<&'a [u8]> {
        let rb = self.info.row_bytes();
        let start = i.checked_mul(rb)?;
        self.data.get(start..start.checked_add(rb)?)
    }
}

/// Validates a shape for `dtype` and returns the tensor's size in bytes.
pub(crate) fn tensor_n_bytes(
    name: &str,
    dtype: GgmlType,
    dims: &[u64],
) -> Result<usize, GgufError> {
    if dims.len() > MAX_DIMS {
        return Err(GgufError::TooManyDims {
            tensor: name.to_owned(),
            n_dims: u32::try_from(dims.len()).unwrap_or(u32::MAX),
        });
    }
    if dims.is_empty() || dims.contains(&0) {
        return Err(GgufError::EmptyTensor {
            tensor: name.to_owned(),
            dims: dims.to_vec(),
        });
    }
    let overflow = || GgufError::ElementCountOverflow {
        tensor: name.to_owned(),
        dims: dims.to_vec(),
    };
    let mut n_elements: u64 = 1;
    for &d in dims {
        n_elements = n_elements.checked_mul(d).ok_or_else(overflow)?;
    }
    // ggml counts elements in i64.
    if n_elements > i64::MAX as u64 {
        return Err(overflow());
    }
    let row_len = dims[0];
    let block = dtype.block_size() as u64;
    if !row_len.is_multiple_of(block) {
        return Err(GgufError::RowNotBlockAligned {
            tensor: name.to_owned(),
            dtype,
            row_len,
            block_size: dtype.block_size(),
        });
    }
    let n_bytes = (n_elements / block)
        .checked_mul(dtype.type_size() as u64)
        .ok_or_else(overflow)?;
    usize::try_from(n_bytes).map_err(|_| overflow())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_block_layout() {
        assert_eq!(
            tensor_n_bytes("t", GgmlType::Q4_1, &[576, 1536]).unwrap(),
            576 / 32 * 20 * 1536
        );
        assert_eq!(tensor_n_bytes("t", GgmlType::F32, &[7]).unwrap(), 28);
        assert!(matches!(
            tensor_n_bytes("t", GgmlType::Q4K, &[576]),
            Err(GgufError::RowNotBlockAligned { row_len: 576, .. })
        ));
        assert!(matches!(
            tensor_n_bytes("t", GgmlType::F32, &[1 << 32, 1 << 32]),
            Err(GgufError::ElementCountOverflow { .. })
        ));
        assert!(matches!(
            tensor_n_bytes("t", GgmlType::F32, &[1 << 62]),
            Err(GgufError::ElementCountOverflow { .. })
        ));
    }

    #[test]
    fn rows_of_a_view() {
        let info = TensorInfo {
            name: "t".into(),
            dtype: GgmlType::F32,
            dims: vec![2, 3],
            offset: 0,
            n_bytes: 24,
        };
        let data: Vec<u8> = (0..24).collect();
        let view = TensorView {
            info: &info,
            data: &data,
        };
        assert_eq!(info.n_elements(), 6);
        assert_eq!(view.row(2), Some(&data[16..24]));
        assert_eq!(view.row(3), None);
    }
}
