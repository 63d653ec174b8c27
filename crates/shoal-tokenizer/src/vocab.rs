//! Token storage: every token's text and rendered bytes in two flat arenas, the token types, and
//! an open-addressing index from text to id. Flat arenas keep construction to a handful of
//! allocations for a 50k-token vocabulary, keep lookups (150k of them while resolving merge
//! rules) cache-friendly, and make lookups by `&str` slices of the input free of allocation.

use crate::TokenizerError;
use crate::hash::hash_bytes;
use crate::spec::TokenType;

const EMPTY: u32 = u32::MAX;

/// The vocabulary of a tokenizer, independent of the algorithm.
#[derive(Debug)]
pub(crate) struct Vocab {
    text: String,
    text_ends: Vec<usize>,
    types: Vec<TokenType>,
    slots: Vec<u32>,
    mask: usize,
}

impl Vocab {
    /// Builds the arenas and the text index. When several tokens share a text, the index keeps
    /// the last one, as llama.cpp's text-to-id map does.
    pub(crate) fn new(tokens: &[String], types: Vec<TokenType>) -> Result<Self, TokenizerError> {
        if tokens.is_empty() {
            return Err(TokenizerError::EmptyVocabulary);
        }
        if u32::try_from(tokens.len()).is_err() || tokens.len() == EMPTY as usize {
            return Err(TokenizerError::VocabularyTooLarge { size: tokens.len() });
        }
        let total: usize = tokens.iter().map(String::len).sum();
        let mut text = String::with_capacity(total);
        let mut text_ends = Vec::with_capacity(tokens.len());
        for t in tokens {
            text.push_str(t);
            text_ends.push(text.len());
        }
        let n = tokens.len();
        let capacity = (n * 2).next_power_of_two();
        let mut vocab = Self {
            text,
            text_ends,
            types,
            slots: vec![EMPTY; capacity],
            mask: capacity - 1,
        };
        for id in 0..n as u32 {
            vocab.insert(id);
        }
        Ok(vocab)
    }

    fn insert(&mut self, id: u32) {
        let key = self.text_of(id).as_bytes();
        let mut slot = hash_bytes(key) as usize & self.mask;
        loop {
            let current = self.slots[slot];
            if current == EMPTY {
                self.slots[slot] = id;
                return;
            }
            if self.text_of(current).as_bytes() == key {
                self.slots[slot] = id;
                return;
            }
            slot = (slot + 1) & self.mask;
        }
    }

    /// Number of tokens.
    pub(crate) fn len(&self) -> usize {
        self.text_ends.len()
    }

    /// The id whose text is exactly `key`.
    #[inline]
    pub(crate) fn lookup(&self, key: &str) -> Option<u32> {
        let bytes = key.as_bytes();
        let mut slot = hash_bytes(bytes) as usize & self.mask;
        loop {
            let id = self.slots[slot];
            if id == EMPTY {
                return None;
            }
            if self.text_of(id).as_bytes() == bytes {
                return Some(id);
            }
            slot = (slot + 1) & self.mask;
        }
    }

    /// Looks up many keys, appending one result per key to `out`: the same answers as
    /// [`Vocab::lookup`], but the loads of different keys are issued stage by stage so their
    /// cache misses overlap instead of queuing (tokenizer construction is bound by them).
    pub(crate) fn lookup_batch(&self, keys: &[&str], out: &mut Vec<Option<u32>>) {
        const BATCH: usize = 32;
        for chunk in keys.chunks(BATCH) {
            let mut slot = [0usize; BATCH];
            let mut first = [EMPTY; BATCH];
            for (k, key) in chunk.iter().enumerate() {
                slot[k] = hash_bytes(key.as_bytes()) as usize & self.mask;
            }
            for k in 0..chunk.len() {
                first[k] = self.slots[slot[k]];
            }
            for (k, key) in chunk.iter().enumerate() {
                let key = key.as_bytes();
                let mut s = slot[k];
                let mut id = first[k];
                let found = loop {
                    if id == EMPTY {
                        break None;
                    }
                    if self.text_of(id).as_bytes() == key {
                        break Some(id);
                    }
                    s = (s + 1) & self.mask;
                    id = self.slots[s];
                };
                out.push(found);
            }
        }
    }

    /// The stored text of token `id` (which must be in range).
    #[inline]
    pub(crate) fn text_of(&self, id: u32) -> &str {
        let i = id as usize;
        let start = if i == 0 { 0 } else { self.text_ends[i - 1] };
        &self.text[start..self.text_ends[i]]
    }

    /// The type of token `id` (which must be in range).
    #[inline]
    pub(crate) fn type_of(&self, id: u32) -> TokenType {
        self.types[id as usize]
    }

    /// Overrides a token's type (llama.cpp promotes some well-known marker texts to control).
    pub(crate) fn set_type(&mut self, id: u32, ty: TokenType) {
        self.types[id as usize] = ty;
    }
}

/// The bytes every token stands for, in one arena: what decoding concatenates.
#[derive(Debug)]
pub(crate) struct Pieces {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Pieces {
    /// Renders every token of `vocab` once, `render(text, type, out)` appending its bytes.
    pub(crate) fn render(
        vocab: &Vocab,
        mut render: impl FnMut(&str, TokenType, &mut Vec<u8>),
    ) -> Self {
        let mut bytes = Vec::with_capacity(vocab.text.len());
        let mut ends = Vec::with_capacity(vocab.len());
        for id in 0..vocab.len() as u32 {
            render(vocab.text_of(id), vocab.type_of(id), &mut bytes);
            ends.push(bytes.len());
        }
        Self { bytes, ends }
    }

    /// The bytes of token `id`, if it is in range.
    #[inline]
    pub(crate) fn get(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.bytes[start..end])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    fn vocab(tokens: &[&str]) -> Vocab {
        let tokens: Vec<String> = tokens.iter().map(|s| s.to_string()).collect();
        let types = vec![TokenType::Normal; tokens.len()];
        Vocab::new(&tokens, types).unwrap()
    }

    #[test]
    fn lookup_finds_every_token_and_nothing_else() {
        let texts = ["a", "b", "ab", "", "héllo", "<|x|>"];
        let v = vocab(&texts);
        for (id, t) in texts.iter().enumerate() {
            assert_eq!(v.lookup(t), Some(id as u32));
            assert_eq!(v.text_of(id as u32), *t);
        }
        assert_eq!(v.lookup("abc"), None);
        let keys: Vec<&str> = texts
            .iter()
            .chain(&["abc", "A"])
            .copied()
            .cycle()
            .take(100)
            .collect();
        let mut batch = Vec::new();
        v.lookup_batch(&keys, &mut batch);
        let single: Vec<Option<u32>> = keys.iter().map(|k| v.lookup(k)).collect();
        assert_eq!(batch, single);
        assert_eq!(v.lookup("A"), None);
    }

    #[test]
    fn duplicate_texts_resolve_to_the_last_id() {
        let v = vocab(&["x", "y", "x"]);
        assert_eq!(v.lookup("x"), Some(2));
        assert_eq!(v.text_of(0), "x");
    }

    #[test]
    fn empty_vocabulary_is_an_error() {
        assert!(matches!(
            Vocab::new(&[], vec![]),
            Err(TokenizerError::EmptyVocabulary)
        ));
    }
}
