//! Token storage: every token's text and rendered bytes in two flat arenas, the token types, and
//! an open-addressing index from text to id. Flat arenas keep construction to a handful of
//! allocations for a 50k-token vocabulary and make lookups by `&str` slices of the input free of
//! allocation.

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
    pieces: Vec<u8>,
    piece_ends: Vec<usize>,
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
        let capacity = (tokens.len() * 2).next_power_of_two();
        let mut vocab = Self {
            text,
            text_ends,
            types,
            pieces: Vec::new(),
            piece_ends: Vec::new(),
            slots: vec![EMPTY; capacity],
            mask: capacity - 1,
        };
        for id in 0..tokens.len() as u32 {
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

    /// Renders every token's bytes once, with `render(id, text, type, out)` appending them.
    pub(crate) fn render_pieces(&mut self, mut render: impl FnMut(&str, TokenType, &mut Vec<u8>)) {
        let mut pieces = Vec::with_capacity(self.text.len());
        let mut ends = Vec::with_capacity(self.len());
        for id in 0..self.len() as u32 {
            render(self.text_of(id), self.type_of(id), &mut pieces);
            ends.push(pieces.len());
        }
        self.pieces = pieces;
        self.piece_ends = ends;
    }

    /// The rendered bytes of token `id`, if it is in range.
    #[inline]
    pub(crate) fn piece(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        let end = *self.piece_ends.get(i)?;
        let start = if i == 0 { 0 } else { self.piece_ends[i - 1] };
        Some(&self.pieces[start..end])
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
        let v = vocab(&["a", "b", "ab", "", "héllo", "<|x|>"]);
        for (id, t) in ["a", "b", "ab", "", "héllo", "<|x|>"].iter().enumerate() {
            assert_eq!(v.lookup(t), Some(id as u32));
            assert_eq!(v.text_of(id as u32), *t);
        }
        assert_eq!(v.lookup("abc"), None);
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
