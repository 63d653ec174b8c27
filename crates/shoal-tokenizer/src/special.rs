//! Splitting input text around special tokens before it reaches the tokenizer proper.
//!
//! Like llama.cpp, the special tokens are tried longest text first, each one carving every
//! occurrence out of the text fragments that remain; shorter tokens only see what longer ones
//! left. Control and unknown tokens are only recognised when the caller asks to parse special
//! tokens; user-defined tokens always are (they are part of the vocabulary's text, as in
//! Hugging Face tokenizers).

use std::ops::Range;

use crate::spec::TokenType;
use crate::vocab::Vocab;

/// A piece of the input: either text still to be tokenized or an already-identified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fragment {
    /// Byte range of the input text.
    Text(Range<usize>),
    /// A special token found verbatim in the text.
    Token(u32),
}

/// The special tokens of a vocabulary in matching order.
#[derive(Debug)]
pub(crate) struct SpecialMatcher {
    order: Vec<u32>,
    has_user_defined: bool,
}

impl SpecialMatcher {
    pub(crate) fn new(vocab: &Vocab) -> Self {
        let mut order: Vec<u32> = (0..vocab.len() as u32)
            .filter(|&id| vocab.type_of(id).is_matched_verbatim() && !vocab.text_of(id).is_empty())
            .collect();
        order.sort_by(|&a, &b| {
            let (la, lb) = (vocab.text_of(a).len(), vocab.text_of(b).len());
            lb.cmp(&la).then(a.cmp(&b))
        });
        let has_user_defined = order
            .iter()
            .any(|&id| vocab.type_of(id) == TokenType::UserDefined);
        Self {
            order,
            has_user_defined,
        }
    }

    /// Splits `text` into fragments, in order. `scratch` is reused working space.
    pub(crate) fn partition(
        &self,
        vocab: &Vocab,
        text: &str,
        parse_special: bool,
        out: &mut Vec<Fragment>,
        scratch: &mut Vec<Fragment>,
    ) {
        out.clear();
        if text.is_empty() {
            return;
        }
        out.push(Fragment::Text(0..text.len()));
        if !parse_special && !self.has_user_defined {
            return;
        }
        for &id in &self.order {
            if !parse_special && vocab.type_of(id) != TokenType::UserDefined {
                continue;
            }
            let pattern = vocab.text_of(id);
            let found = out.iter().any(|f| match f {
                Fragment::Text(r) => text[r.clone()].contains(pattern),
                Fragment::Token(_) => false,
            });
            if !found {
                continue;
            }
            scratch.clear();
            for fragment in out.drain(..) {
                let Fragment::Text(range) = fragment else {
                    scratch.push(fragment);
                    continue;
                };
                let mut start = range.start;
                while let Some(pos) = text[start..range.end].find(pattern) {
                    let at = start + pos;
                    if at > start {
                        scratch.push(Fragment::Text(start..at));
                    }
                    scratch.push(Fragment::Token(id));
                    start = at + pattern.len();
                }
                if start < range.end {
                    scratch.push(Fragment::Text(start..range.end));
                }
            }
            std::mem::swap(out, scratch);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    fn setup(tokens: &[(&str, TokenType)]) -> (Vocab, SpecialMatcher) {
        let texts: Vec<String> = tokens.iter().map(|(t, _)| t.to_string()).collect();
        let types = tokens.iter().map(|(_, ty)| *ty).collect();
        let vocab = Vocab::new(&texts, types).unwrap();
        let matcher = SpecialMatcher::new(&vocab);
        (vocab, matcher)
    }

    fn run(v: &Vocab, m: &SpecialMatcher, text: &str, parse: bool) -> Vec<Fragment> {
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        m.partition(v, text, parse, &mut out, &mut scratch);
        out
    }

    #[test]
    fn longer_tokens_win_even_when_a_shorter_one_starts_earlier() {
        use Fragment::*;
        let (v, m) = setup(&[
            ("a", TokenType::Normal),
            ("<ab>", TokenType::Control),
            ("b>c", TokenType::Control),
            ("b>cd<", TokenType::Control),
        ]);
        // "b>cd<" is longest and is carved out first, breaking both "<ab>".
        assert_eq!(
            run(&v, &m, "<ab>cd<ab>", true),
            [Text(0..2), Token(3), Text(7..10)]
        );
        assert_eq!(run(&v, &m, "<ab><ab>", true), [Token(1), Token(1)]);
        assert_eq!(run(&v, &m, "<ab>cd", false), [Text(0..6)]);
    }

    #[test]
    fn user_defined_tokens_are_matched_even_without_parse_special() {
        use Fragment::*;
        let (v, m) = setup(&[
            ("x", TokenType::Normal),
            ("<u>", TokenType::UserDefined),
            ("<c>", TokenType::Control),
        ]);
        assert_eq!(
            run(&v, &m, "a<u>b<c>", false),
            [Text(0..1), Token(1), Text(4..8)]
        );
        assert_eq!(
            run(&v, &m, "a<u>b<c>", true),
            [Text(0..1), Token(1), Text(4..5), Token(2)]
        );
        assert_eq!(run(&v, &m, "", true), []);
    }
}
