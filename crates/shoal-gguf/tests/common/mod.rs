//! Hand-assembles GGUF bytes, including malformed ones the writer refuses to produce.
#![allow(dead_code, clippy::unwrap_used)] // shared by several test crates; tests may unwrap

/// A GGUF byte string under construction.
#[derive(Debug, Default, Clone)]
pub struct Raw {
    pub buf: Vec<u8>,
}

impl Raw {
    /// Magic, version and counts.
    pub fn header(version: u32, n_tensors: u64, n_kv: u64) -> Self {
        let mut r = Raw::default();
        r.bytes(b"GGUF").u32(version).u64(n_tensors).u64(n_kv);
        r
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }

    pub fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.str(key).u32(4).u32(v)
    }

    pub fn kv_str(&mut self, key: &str, v: &str) -> &mut Self {
        self.str(key).u32(8).str(v)
    }

    pub fn tensor(&mut self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for d in dims {
            self.u64(*d);
        }
        self.u32(type_id).u64(offset)
    }

    pub fn pad_to(&mut self, alignment: usize) -> &mut Self {
        let n = self.buf.len().next_multiple_of(alignment);
        self.buf.resize(n, 0);
        self
    }

    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.buf.resize(self.buf.len() + n, 0);
        self
    }

    pub fn build(&self) -> Vec<u8> {
        self.buf.clone()
    }
}

/// A valid file with one metadata entry of each kind and two tensors.
pub fn valid_file() -> Vec<u8> {
    use shoal_gguf::{GgmlType, GgufWriter, MetaValue, StringArray};
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "llama").unwrap();
    w.add_metadata("llama.block_count", 2u32).unwrap();
    w.add_metadata("llama.rope.freq_base", 10000.0f32).unwrap();
    w.add_metadata(
        "tokenizer.ggml.tokens",
        ["a", "b", "héllo"].into_iter().collect::<StringArray>(),
    )
    .unwrap();
    w.add_metadata("tokenizer.ggml.token_type", vec![1i32, 1, 3])
        .unwrap();
    w.add_metadata("flag", MetaValue::Bool(true)).unwrap();
    let f32s: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
    w.add_tensor("norm.weight", GgmlType::F32, &[8], f32s)
        .unwrap();
    w.add_tensor("q.weight", GgmlType::Q8_0, &[32, 2], vec![7u8; 68])
        .unwrap();
    w.write_to(Vec::new()).unwrap()
}
