//! SentencePiece-style tokenization (`tokenizer.ggml.model = "llama"`): spaces become `▁`, the
//! text starts as one symbol per character, and the adjacent pair whose concatenation is the
//! highest-scoring token is merged until no pair is a token. Characters that never became a
//! token fall back to `<0xXX>` byte tokens (or the unknown token).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::TokenizerError;
use crate::vocab::Vocab;

const NONE: u32 = u32::MAX;
const END: usize = usize::MAX;

/// The SentencePiece word-boundary marker that stands for a space.
pub(crate) const SPACE_MARK: char = '\u{2581}';

/// A compiled SentencePiece-style model.
#[derive(Debug)]
pub(crate) struct Spm {
    scores: Vec<f32>,
    /// Token for each byte when a character is not a token: `<0xXX>`, else the byte as a
    /// one-character token, else the unknown token, else `NONE`.
    byte_token: [u32; 256],
    add_space_prefix: bool,
}

/// Reusable working memory of one `encode` call.
#[derive(Debug, Default)]
pub(crate) struct SpmScratch {
    text: String,
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Pair>,
}

#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
}

#[derive(Debug, Clone, Copy)]
struct Pair {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Pair {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Pair {}
impl PartialOrd for Pair {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pair {
    /// Highest score pops first; among equal scores the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        match self.score.partial_cmp(&other.score) {
            Some(Ordering::Less) => Ordering::Less,
            Some(Ordering::Greater) => Ordering::Greater,
            _ => other.left.cmp(&self.left),
        }
    }
}

impl Spm {
    pub(crate) fn new(
        vocab: &Vocab,
        scores: Option<Vec<f32>>,
        unk: Option<u32>,
        add_space_prefix: bool,
    ) -> Self {
        let scores = scores.unwrap_or_else(|| vec![0.0; vocab.len()]);
        let mut byte_token = [NONE; 256];
        for (b, slot) in byte_token.iter_mut().enumerate() {
            let hex = format!("<0x{b:02X}>");
            let single = u8::try_from(b)
                .ok()
                .filter(u8::is_ascii)
                .and_then(|c| vocab.lookup(char::from(c).encode_utf8(&mut [0u8; 4])));
            *slot = vocab.lookup(&hex).or(single).or(unk).unwrap_or(NONE);
        }
        Self {
            scores,
            byte_token,
            add_space_prefix,
        }
    }

    /// Whether text after a special token (or at the start) gets a leading space.
    pub(crate) fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    /// Appends the tokens of `text` (which holds no special tokens) to `out`, with a leading
    /// space when `prefix_space`.
    pub(crate) fn encode(
        &self,
        vocab: &Vocab,
        text: &str,
        prefix_space: bool,
        scratch: &mut SpmScratch,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        let buf = &mut scratch.text;
        buf.clear();
        if prefix_space {
            buf.push(SPACE_MARK);
        }
        buf.extend(text.chars().map(|c| if c == ' ' { SPACE_MARK } else { c }));
        let buf = buf.as_str();
        let symbols = &mut scratch.symbols;
        let queue = &mut scratch.queue;
        symbols.clear();
        queue.clear();
        for (start, c) in buf.char_indices() {
            let index = symbols.len();
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: if index == 0 { END } else { index - 1 },
                next: index + 1,
            });
        }
        let Some(last) = symbols.last_mut() else {
            return Ok(());
        };
        last.next = END;
        for i in 1..symbols.len() {
            self.queue_pair(vocab, buf, symbols, queue, i - 1, i);
        }
        while let Some(pair) = queue.pop() {
            let (l, r) = (symbols[pair.left], symbols[pair.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != pair.size {
                continue;
            }
            symbols[pair.left].len = pair.size;
            symbols[pair.left].next = r.next;
            symbols[pair.right].len = 0;
            if r.next != END {
                symbols[r.next].prev = pair.left;
            }
            if l.prev != END {
                self.queue_pair(vocab, buf, symbols, queue, l.prev, pair.left);
            }
            if r.next != END {
                self.queue_pair(vocab, buf, symbols, queue, pair.left, r.next);
            }
        }
        let mut i = 0;
        while i != END {
            let s = symbols[i];
            let piece = &buf[s.start..s.start + s.len];
            match vocab.lookup(piece) {
                Some(id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        let t = self.byte_token[usize::from(b)];
                        if t == NONE {
                            return Err(TokenizerError::NoTokenForByte { byte: b });
                        }
                        out.push(t);
                    }
                }
            }
            i = s.next;
        }
        Ok(())
    }

    fn queue_pair(
        &self,
        vocab: &Vocab,
        text: &str,
        symbols: &[Symbol],
        queue: &mut BinaryHeap<Pair>,
        left: usize,
        right: usize,
    ) {
        let (l, r) = (symbols[left], symbols[right]);
        let size = l.len + r.len;
        if let Some(id) = vocab.lookup(&text[l.start..l.start + size]) {
            queue.push(Pair {
                score: self.scores.get(id as usize).copied().unwrap_or(0.0),
                left,
                right,
                size,
            });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::spec::TokenType;

    fn model(tokens: &[(&str, f32)], unk: Option<u32>) -> (Vocab, Spm) {
        let texts: Vec<String> = tokens.iter().map(|(t, _)| t.to_string()).collect();
        let vocab = Vocab::new(&texts, vec![TokenType::Normal; texts.len()]).unwrap();
        let scores = tokens.iter().map(|(_, s)| *s).collect();
        let spm = Spm::new(&vocab, Some(scores), unk, true);
        (vocab, spm)
    }

    fn encode(v: &Vocab, m: &Spm, text: &str, prefix: bool) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::new();
        m.encode(v, text, prefix, &mut SpmScratch::default(), &mut out)?;
        Ok(out)
    }

    #[test]
    fn highest_score_merges_first() {
        let (v, m) = model(
            &[
                ("a", -10.0),
                ("b", -10.0),
                ("c", -10.0),
                ("ab", -3.0),
                ("bc", -1.0),
            ],
            None,
        );
        // "bc" scores higher than "ab", so "abc" is a + bc.
        assert_eq!(encode(&v, &m, "abc", false).unwrap(), [0, 4]);
    }

    #[test]
    fn spaces_become_marks_and_prefix_is_added_on_request() {
        let (v, m) = model(&[("▁", -5.0), ("a", -5.0), ("▁a", -1.0)], None);
        assert_eq!(encode(&v, &m, "a a", true).unwrap(), [2, 2]);
        assert_eq!(encode(&v, &m, "a a", false).unwrap(), [1, 2]);
        assert_eq!(encode(&v, &m, "", false).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn unknown_characters_use_byte_tokens_then_unk_then_fail() {
        let mut tokens = vec![("<unk>", 0.0), ("x", -1.0)];
        let hex: Vec<String> = (0..=255u8).map(|b| format!("<0x{b:02X}>")).collect();
        tokens.extend(hex.iter().map(|h| (h.as_str(), 0.0)));
        let (v, m) = model(&tokens, Some(0));
        // "é" is C3 A9.
        assert_eq!(
            encode(&v, &m, "xé", false).unwrap(),
            [1, 2 + 0xC3, 2 + 0xA9]
        );

        let (v, m) = model(&[("<unk>", 0.0), ("x", -1.0)], Some(0));
        assert_eq!(encode(&v, &m, "é", false).unwrap(), [0, 0]);

        let (v, m) = model(&[("x", -1.0)], None);
        assert!(matches!(
            encode(&v, &m, "xé", false),
            Err(TokenizerError::NoTokenForByte { byte: 0xC3 })
        ));
    }
}
