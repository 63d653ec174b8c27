//! Pre-tokenization of byte-level BPE vocabularies: splitting text into words before merging, by
//! the regular expressions of each `tokenizer.ggml.pre` type.
//!
//! The patterns and the way they combine follow llama.cpp, because token-for-token agreement
//! with it is the point: a type may chain several patterns, each one splitting every piece the
//! previous one produced, and text a pattern does not match stays a piece of its own. Pieces are
//! searched independently, so a lookahead such as `\s+(?!\S)` stops at a piece's end.

use std::ops::Range;

use fancy_regex::Regex;

use crate::TokenizerError;

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const DIGIT: &str = r"\p{N}";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const DEFAULT_PUNCT: &str = r"[\p{P}\$\+<=>\^~\|]+";
const DIGITS: &str = r"\p{N}+";
const ASCII_TRIPLE: &str = r"[0-9][0-9][0-9]";

/// Code points Unicode 16 added to the letter, number and punctuation categories. llama.cpp's
/// character tables are Unicode 15.1, so to it these are unassigned (neither letter, number nor
/// punctuation), while the regex engine's tables are Unicode 16; they are subtracted from the
/// classes so both split text alike. (Whitespace agrees.)
const NEW_LETTERS: &str = concat!(
    r"\x{1C89}-\x{1C8A}\x{A7CB}-\x{A7CD}\x{A7DA}-\x{A7DC}\x{105C0}-\x{105F3}\x{10D4A}-\x{10D65}",
    r"\x{10D6F}-\x{10D85}\x{10EC2}-\x{10EC4}\x{11380}-\x{11389}\x{1138B}\x{1138E}",
    r"\x{11390}-\x{113B5}\x{113B7}\x{113D1}\x{113D3}\x{11BC0}-\x{11BE0}\x{13460}-\x{143FA}",
    r"\x{16100}-\x{1611D}\x{16D40}-\x{16D6C}\x{18CFF}\x{1E5D0}-\x{1E5ED}\x{1E5F0}",
);
const NEW_NUMBERS: &str = concat!(
    r"\x{10D40}-\x{10D49}\x{116D0}-\x{116E3}\x{11BF0}-\x{11BF9}\x{16130}-\x{16139}",
    r"\x{16D70}-\x{16D79}\x{1CCF0}-\x{1CCF9}\x{1E5F1}-\x{1E5FA}",
);
const NEW_PUNCTUATION: &str = concat!(
    r"\x{1B4E}-\x{1B4F}\x{1B7F}\x{10D6E}\x{113D4}-\x{113D5}\x{113D7}-\x{113D8}\x{11BE1}",
    r"\x{16D6D}-\x{16D6F}\x{1E5FF}",
);

/// Rewrites the category classes of a llama.cpp pattern to llama.cpp's Unicode version.
/// Works inside brackets too: the replacement is a nested class.
fn with_llama_cpp_categories(pattern: &str) -> String {
    pattern
        .replace(r"\p{L}", &format!(r"[\p{{L}}--[{NEW_LETTERS}]]"))
        .replace(r"\p{N}", &format!(r"[\p{{N}}--[{NEW_NUMBERS}]]"))
        .replace(r"\p{P}", &format!(r"[\p{{P}}--[{NEW_PUNCTUATION}]]"))
}

/// The pre-tokenizer families llama.cpp distinguishes, by the patterns they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Default,
    Gpt2,
    Smollm,
    Llama3,
    Qwen2,
}

impl Family {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "default" => Self::Default,
            // "gpt2" is not a llama.cpp name, but it is what people write for "gpt-2".
            "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" => Self::Gpt2,
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" => {
                Self::Smollm
            }
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => Self::Llama3,
            "qwen2" | "deepseek-r1-qwen" => Self::Qwen2,
            _ => return None,
        })
    }

    fn patterns(self) -> &'static [&'static str] {
        match self {
            Self::Default => &[DEFAULT_PUNCT, GPT2, DIGITS, ASCII_TRIPLE],
            Self::Gpt2 => &[GPT2],
            Self::Smollm => &[DIGIT, GPT2],
            Self::Llama3 => &[LLAMA3],
            Self::Qwen2 => &[QWEN2],
        }
    }
}

/// Whether llama.cpp adds BOS for this pre-tokenizer when the metadata does not say (it does for
/// the Llama 3 family).
pub(crate) fn adds_bos_by_default(name: &str) -> bool {
    Family::from_name(name) == Some(Family::Llama3)
}

/// A compiled pre-tokenizer.
#[derive(Debug)]
pub(crate) struct PreTokenizer {
    name: String,
    patterns: Vec<(&'static str, Regex)>,
    ignore_merges: bool,
}

impl PreTokenizer {
    /// Compiles the pre-tokenizer named by `tokenizer.ggml.pre` (`None` is `"default"`).
    pub(crate) fn new(name: Option<&str>) -> Result<Self, TokenizerError> {
        let name = name.unwrap_or("default");
        let family =
            Family::from_name(name).ok_or_else(|| TokenizerError::UnknownPreTokenizer {
                pre: name.to_owned(),
            })?;
        let patterns = family
            .patterns()
            .iter()
            .map(|&pattern| {
                Regex::new(&with_llama_cpp_categories(pattern))
                    .map(|re| (pattern, re))
                    .map_err(|e| TokenizerError::PatternCompile {
                        pattern,
                        source: Box::new(e),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name: name.to_owned(),
            patterns,
            // Llama 3 style vocabularies emit a whole word when it is a token, merges or not.
            ignore_merges: family == Family::Llama3,
        })
    }

    /// The `tokenizer.ggml.pre` name this was built from.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Whether a word that is itself a token skips merging.
    pub(crate) fn ignore_merges(&self) -> bool {
        self.ignore_merges
    }

    /// Splits `text` into word ranges (byte offsets into `text`), in order, covering all of it.
    /// `scratch` is reused working space.
    pub(crate) fn split(
        &self,
        text: &str,
        words: &mut Vec<Range<usize>>,
        scratch: &mut Vec<Range<usize>>,
    ) -> Result<(), TokenizerError> {
        words.clear();
        if text.is_empty() {
            return Ok(());
        }
        words.push(0..text.len());
        for (pattern, re) in &self.patterns {
            std::mem::swap(words, scratch);
            words.clear();
            for piece in scratch.iter() {
                let base = piece.start;
                let mut last = 0;
                let slice = &text[piece.clone()];
                for m in re.find_iter(slice) {
                    let m = m.map_err(|e| TokenizerError::PreTokenize {
                        pattern,
                        source: Box::new(e),
                    })?;
                    if m.start() == m.end() {
                        continue;
                    }
                    if m.start() > last {
                        words.push(base + last..base + m.start());
                    }
                    words.push(base + m.start()..base + m.end());
                    last = m.end();
                }
                if last < slice.len() {
                    words.push(base + last..piece.end);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    fn split(pre: &str, text: &str) -> Vec<String> {
        let p = PreTokenizer::new(Some(pre)).unwrap();
        let (mut words, mut scratch) = (Vec::new(), Vec::new());
        p.split(text, &mut words, &mut scratch).unwrap();
        words.into_iter().map(|r| text[r].to_string()).collect()
    }

    #[test]
    fn gpt2_keeps_one_space_before_words_and_leaves_the_last_space_of_a_run() {
        assert_eq!(
            split("gpt-2", "Hello  world's 42\n"),
            ["Hello", " ", " world", "'s", " 42", "\n"]
        );
    }

    #[test]
    fn smollm_splits_digits_first_so_the_space_before_a_number_stands_alone() {
        assert_eq!(split("smollm", "a 123"), ["a", " ", "1", "2", "3"]);
        assert_eq!(split("smollm", "x  12"), ["x", "  ", "1", "2"]);
    }

    #[test]
    fn llama3_groups_digits_by_three_and_contractions_ignore_case() {
        assert_eq!(
            split("llama-bpe", "1234567 I'LL"),
            ["123", "456", "7", " I", "'LL"]
        );
        assert_eq!(split("llama-bpe", "a\n\n b"), ["a", "\n\n", " b"]);
    }

    #[test]
    fn qwen2_splits_single_digits() {
        assert_eq!(split("qwen2", "x12"), ["x", "1", "2"]);
    }

    #[test]
    fn characters_new_in_unicode_16_are_not_letters_or_digits() {
        // U+13F72 (an Egyptian hieroglyph from Unicode 16) is unassigned for llama.cpp, so it
        // groups with the following apostrophe as "other" instead of starting a word.
        assert_eq!(split("gpt-2", "a\u{13F72}'ll"), ["a", "\u{13F72}'", "ll"]);
        assert_eq!(split("smollm", "1\u{10D40}"), ["1", "\u{10D40}"]);
        // Unicode 15 letters and digits are unaffected.
        assert_eq!(split("smollm", "é٣"), ["é", "٣"]);
    }

    #[test]
    fn empty_text_has_no_words() {
        assert!(split("default", "").is_empty());
    }

    #[test]
    fn unknown_name_is_reported() {
        let err = PreTokenizer::new(Some("klingon")).unwrap_err();
        assert!(matches!(err, TokenizerError::UnknownPreTokenizer { ref pre } if pre == "klingon"));
        assert!(err.to_string().contains("klingon"));
    }

    #[test]
    fn long_whitespace_runs_do_not_exhaust_backtracking() {
        let text = format!("{}x{}", " ".repeat(200_000), "\t".repeat(200_000));
        for pre in ["gpt-2", "llama-bpe", "qwen2", "smollm", "default"] {
            let words = split(pre, &text);
            assert_eq!(words.concat(), text, "{pre}");
        }
    }
}
