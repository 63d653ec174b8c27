//! Incremental detokenization for streaming generation. A token may end in the middle of a
//! multi-byte character (byte-level BPE and SentencePiece byte tokens split characters freely),
//! so bytes are held back until they complete a character and only whole UTF-8 text leaves.

use std::borrow::Borrow;

use crate::{Tokenizer, TokenizerError};

/// Turns a stream of token ids into a stream of valid UTF-8 text chunks.
///
/// `T` is `&Tokenizer`, `Arc<Tokenizer>` or an owned `Tokenizer`. The concatenation of every
/// chunk from [`StreamDecoder::push`] and [`StreamDecoder::finish`] equals
/// [`Tokenizer::decode`] of the same ids: bytes that can never become valid UTF-8 are replaced
/// with U+FFFD as soon as that is certain, exactly as the one-shot decode replaces them.
#[derive(Debug)]
pub struct StreamDecoder<T: Borrow<Tokenizer>> {
    tokenizer: T,
    skip_special: bool,
    pending: Vec<u8>,
}

impl<T: Borrow<Tokenizer>> StreamDecoder<T> {
    /// A decoder that leaves out control and unknown tokens when `skip_special`.
    pub fn new(tokenizer: T, skip_special: bool) -> Self {
        Self {
            tokenizer,
            skip_special,
            pending: Vec::new(),
        }
    }

    /// Adds one token and returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        let tokenizer = self.tokenizer.borrow();
        let piece = tokenizer.token_bytes(id)?;
        if self.skip_special && tokenizer.is_special(id) {
            return Ok(String::new());
        }
        self.pending.extend_from_slice(piece);
        Ok(self.drain_complete())
    }

    /// Returns whatever is still held back (an incomplete character becomes U+FFFD) and resets
    /// the decoder for a new stream.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }

    /// Bytes held back because they may still become a character.
    pub fn pending_bytes(&self) -> &[u8] {
        &self.pending
    }

    fn drain_complete(&mut self) -> String {
        let mut out = String::new();
        let mut consumed = 0;
        while consumed < self.pending.len() {
            let rest = &self.pending[consumed..];
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    out.push_str(text);
                    consumed = self.pending.len();
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    if let Ok(text) = std::str::from_utf8(&rest[..valid]) {
                        out.push_str(text);
                    }
                    match e.error_len() {
                        // A truncated character at the very end: wait for more bytes.
                        None => {
                            consumed += valid;
                            break;
                        }
                        // Bytes no continuation can repair: replace them now, as lossy
                        // decoding of the whole stream would.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            consumed += valid + bad;
                        }
                    }
                }
            }
        }
        self.pending.drain(..consumed);
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::TokenizerSpec;

    /// A SentencePiece vocabulary of byte tokens only, so any byte sequence can be pushed.
    fn byte_tokenizer() -> Tokenizer {
        let mut tokens: Vec<String> = (0..=255u8).map(|b| format!("<0x{b:02X}>")).collect();
        tokens.push("<s>".into());
        let mut types = vec![6; 256];
        types.push(3);
        Tokenizer::new(TokenizerSpec {
            model: "llama".into(),
            tokens,
            token_types: Some(types),
            bos: Some(256),
            ..TokenizerSpec::default()
        })
        .unwrap()
    }

    fn stream(t: &Tokenizer, bytes: &[u8]) -> Vec<String> {
        let mut d = StreamDecoder::new(t, false);
        let mut chunks: Vec<String> = bytes
            .iter()
            .map(|&b| d.push(u32::from(b)).unwrap())
            .collect();
        chunks.push(d.finish());
        chunks
    }

    #[test]
    fn split_characters_are_held_until_complete() {
        let t = byte_tokenizer();
        let chunks = stream(&t, "a€b".as_bytes());
        assert_eq!(chunks, ["a", "", "", "€", "b", ""]);
    }

    #[test]
    fn hopeless_bytes_are_replaced_at_once_and_truncation_at_the_end() {
        let t = byte_tokenizer();
        assert_eq!(stream(&t, &[0xFF, b'x']), ["\u{FFFD}", "x", ""]);
        // E2 82 then 'A': the truncated sequence is one replacement, like lossy decoding.
        assert_eq!(stream(&t, &[0xE2, 0x82, b'A']), ["", "", "\u{FFFD}A", ""]);
        assert_eq!(stream(&t, &[b'o', 0xF0, 0x9F]), ["o", "", "", "\u{FFFD}"]);
        let all = [0xE2, 0x82, b'A', 0xF0, 0x9F];
        let ids: Vec<u32> = all.iter().map(|&b| u32::from(b)).collect();
        assert_eq!(stream(&t, &all).concat(), t.decode(&ids, false).unwrap());
    }

    #[test]
    fn skip_special_hides_control_tokens_and_bad_ids_are_errors() {
        let t = std::sync::Arc::new(byte_tokenizer());
        let mut d = StreamDecoder::new(t.clone(), true);
        assert_eq!(d.push(256).unwrap(), "");
        assert_eq!(d.push(u32::from(b'k')).unwrap(), "k");
        assert!(matches!(
            d.push(9999),
            Err(TokenizerError::TokenOutOfRange { id: 9999, .. })
        ));
        let mut d = StreamDecoder::new(t, false);
        assert_eq!(d.push(256).unwrap(), "<s>");
    }
}
