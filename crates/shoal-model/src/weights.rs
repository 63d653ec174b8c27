//! Binding of a layer range's tensors: names, shapes and types checked once at load, so the
//! forward pass never looks a tensor up by name or re-validates it.

use crate::ModelError;
use crate::config::{Arch, ModelConfig};
use shoal_gguf::{GgmlType, GgufFile};
use shoal_kernels::WeightMatrix;
use shoal_types::LayerRange;
use std::ops::Range;

/// A matrix inside the model file: `rows` outputs of `cols` inputs.
#[derive(Debug, Clone)]
pub struct Matrix {
    /// Element type.
    pub dtype: GgmlType,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    bytes: Range<usize>,
}

impl Matrix {
    /// A kernel view of the matrix over the model's bytes.
    pub fn view<'a>(&self, file: &'a [u8]) -> Result<WeightMatrix<'a>, ModelError> {
        let data = file.get(self.bytes.clone()).ok_or_else(|| {
            ModelError::Metadata(format!("tensor bytes {:?} outside the file", self.bytes))
        })?;
        Ok(WeightMatrix::new(self.dtype, self.rows, self.cols, data)?)
    }
}

/// Weights of one transformer block.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) wq: Matrix,
    pub(crate) wk: Matrix,
    pub(crate) wv: Matrix,
    pub(crate) bq: Option<Vec<f32>>,
    pub(crate) bk: Option<Vec<f32>>,
    pub(crate) bv: Option<Vec<f32>>,
    pub(crate) wo: Matrix,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) gate: Matrix,
    pub(crate) up: Matrix,
    pub(crate) down: Matrix,
}

/// The tensors one shard needs: its blocks, plus the embedding when it is first and the output
/// head when it is last.
#[derive(Debug, Clone)]
pub struct ShardWeights {
    pub(crate) embed: Option<Matrix>,
    pub(crate) layers: Vec<LayerWeights>,
    pub(crate) output_norm: Option<Vec<f32>>,
    pub(crate) output: Option<Matrix>,
}

struct Binder<'a> {
    file: &'a GgufFile,
}

impl Binder<'_> {
    fn info(&self, name: &str) -> Result<&shoal_gguf::TensorInfo, ModelError> {
        self.file
            .tensor_info(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_owned(),
            })
    }

    fn matrix(&self, name: &str, cols: usize, rows: usize) -> Result<Matrix, ModelError> {
        let info = self.info(name)?;
        let expected = vec![cols as u64, rows as u64];
        if info.dims != expected {
            return Err(ModelError::TensorShape {
                name: name.into(),
                found: info.dims.clone(),
                expected,
            });
        }
        if info.dtype == GgmlType::Q8K {
            return Err(ModelError::TensorType {
                name: name.into(),
                dtype: info.dtype,
            });
        }
        Ok(Matrix {
            dtype: info.dtype,
            rows,
            cols,
            bytes: info.offset..info.offset + info.n_bytes,
        })
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let info = self.info(name)?;
        if info.dims != [len as u64] {
            return Err(ModelError::TensorShape {
                name: name.into(),
                found: info.dims.clone(),
                expected: vec![len as u64],
            });
        }
        let view = self.file.tensor(name)?;
        let mut out = vec![0.0; len];
        shoal_kernels::dequantize_row(info.dtype, view.data, &mut out)?;
        Ok(out)
    }

    fn optional_vector(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>, ModelError> {
        match self.file.tensor_info(name) {
            Some(_) => self.vector(name, len).map(Some),
            None => Ok(None),
        }
    }
}

impl ShardWeights {
    /// Binds and checks the tensors of `range` in `file`.
    pub fn bind(file: &GgufFile, cfg: &ModelConfig, range: LayerRange) -> Result<Self, ModelError> {
        let b = Binder { file };
        let (h, kv, ffn) = (cfg.hidden, cfg.kv_dim(), cfg.ffn);
        let embed = b.matrix("token_embd.weight", h, cfg.vocab)?;
        let mut layers = Vec::with_capacity(range.len() as usize);
        for l in range.iter() {
            let n = |t: &str| format!("blk.{l}.{t}");
            let (bq, bk, bv) = match cfg.arch {
                Arch::Qwen2 => (
                    Some(b.vector(&n("attn_q.bias"), h)?),
                    Some(b.vector(&n("attn_k.bias"), kv)?),
                    Some(b.vector(&n("attn_v.bias"), kv)?),
                ),
                Arch::Llama => (
                    b.optional_vector(&n("attn_q.bias"), h)?,
                    b.optional_vector(&n("attn_k.bias"), kv)?,
                    b.optional_vector(&n("attn_v.bias"), kv)?,
                ),
            };
            layers.push(LayerWeights {
                attn_norm: b.vector(&n("attn_norm.weight"), h)?,
                wq: b.matrix(&n("attn_q.weight"), h, h)?,
                wk: b.matrix(&n("attn_k.weight"), h, kv)?,
                wv: b.matrix(&n("attn_v.weight"), h, kv)?,
                bq,
                bk,
                bv,
                wo: b.matrix(&n("attn_output.weight"), h, h)?,
                ffn_norm: b.vector(&n("ffn_norm.weight"), h)?,
                gate: b.matrix(&n("ffn_gate.weight"), h, ffn)?,
                up: b.matrix(&n("ffn_up.weight"), h, ffn)?,
                down: b.matrix(&n("ffn_down.weight"), ffn, h)?,
            });
        }
        let last = range.is_last(cfg.n_layers);
        let (output_norm, output) = if last {
            let norm = b.vector("output_norm.weight", h)?;
            // A model without `output.weight` ties its output head to the embedding.
            let head = match file.tensor_info("output.weight") {
                Some(_) => b.matrix("output.weight", h, cfg.vocab)?,
                None => embed.clone(),
            };
            (Some(norm), Some(head))
        } else {
            (None, None)
        };
        Ok(Self {
            embed: range.is_first().then_some(embed),
            layers,
            output_norm,
            output,
        })
    }

    /// Bytes of weights this shard reads per token (a measure of its memory traffic).
    pub fn weight_bytes(&self) -> usize {
        let m = |m: &Matrix| m.bytes.len();
        self.layers
            .iter()
            .map(|l| m(&l.wq) + m(&l.wk) + m(&l.wv) + m(&l.wo) + m(&l.gate) + m(&l.up) + m(&l.down))
            .sum::<usize>()
            + self.output.as_ref().map_or(0, m)
    }
}
