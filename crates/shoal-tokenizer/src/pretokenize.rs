//! Pre-tokenization of byte-level BPE vocabularies: splitting text into words before merging, by
//! the regular expressions of each `tokenizer.ggml.pre` type.
//!
//! The patterns and the way they combine follow llama.cpp, because token-for-token agreement
//! with it is the point: a type may chain several patterns, each one splitting every piece the
//! previous one produced, and text a pattern does not match stays a piece of its own. Pieces are
//! searched independently, so a lookahead such as `\s+(?!\S)` stops at a piece's end.
//!
//! The lookahead `\s+(?!\S)` ("a whitespace run, minus its last character when a non-space
//! follows") is not left to a backtracking engine: that needs stack in proportion to a run's
//! length and gives up on long inputs. Each pattern is run as a plain regular expression with
//! `\s+` in its place (linear time, leftmost-first like a backtracking engine), and a
//! whitespace match that the lookahead would have shortened is shortened by one character here.

use std::ops::Range;

use fancy_regex::Regex;

use crate::TokenizerError;

/// A pre-tokenizer pattern: as llama.cpp writes it, as it is run here, and which whitespace
/// matches stand for the `\s+(?!\S)` alternative.
#[derive(Debug, Clone, Copy)]
struct Pattern {
    llama_cpp: &'static str,
    engine: &'static str,
    trim: Trim,
}

/// Which whitespace-only matches came from `\s+(?!\S)` (and so lose their last character when
/// something follows them in the piece).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trim {
    /// The pattern has no lookahead.
    Never,
    /// Every whitespace-only match.
    WhitespaceRuns,
    /// Whitespace-only matches without `\r`/`\n` (those came from `\s*[\r\n]+`).
    WhitespaceRunsWithoutNewlines,
}

const fn plain(pattern: &'static str) -> Pattern {
    Pattern {
        llama_cpp: pattern,
        engine: pattern,
        trim: Trim::Never,
    }
}

const GPT2: Pattern = Pattern {
    llama_cpp: r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    engine: r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+",
    trim: Trim::WhitespaceRuns,
};
const LLAMA3: Pattern = Pattern {
    llama_cpp: r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    engine: r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+",
    trim: Trim::WhitespaceRunsWithoutNewlines,
};
const QWEN2: Pattern = Pattern {
    llama_cpp: r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    engine: r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+",
    trim: Trim::WhitespaceRunsWithoutNewlines,
};
const DIGIT: Pattern = plain(r"\p{N}");
const DEFAULT_PUNCT: Pattern = plain(r"[\p{P}\$\+<=>\^~\|]+");
const DIGITS: Pattern = plain(r"\p{N}+");
const ASCII_TRIPLE: Pattern = plain(r"[0-9][0-9][0-9]");

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

    fn patterns(self) -> &'static [Pattern] {
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
    patterns: Vec<(Pattern, Regex)>,
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
                Regex::new(&with_llama_cpp_categories(pattern.engine))
                    .map(|re| (pattern, re))
                    .map_err(|e| TokenizerError::PatternCompile {
                        pattern: pattern.llama_cpp,
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
                split_piece(text, piece.clone(), pattern, re, words)?;
            }
        }
        Ok(())
    }
}

/// Splits `text[piece]` by one pattern, appending matches and the gaps between them to `words`.
fn split_piece(
    text: &str,
    piece: Range<usize>,
    pattern: &Pattern,
    re: &Regex,
    words: &mut Vec<Range<usize>>,
) -> Result<(), TokenizerError> {
    let base = piece.start;
    let slice = &text[piece];
    let (mut last, mut pos) = (0, 0);
    while pos < slice.len() {
        let found = re
            .find_from_pos(slice, pos)
            .map_err(|e| TokenizerError::PreTokenize {
                pattern: pattern.llama_cpp,
                source: Box::new(e),
            })?;
        let Some(m) = found else { break };
        let (start, mut end) = (m.start(), m.end());
        if end < slice.len() && shortened_by_lookahead(&slice[start..end], pattern.trim) {
            // `\s+(?!\S)`: the run's last character stays for what follows.
            end = start
                + slice[start..end]
                    .char_indices()
                    .last()
                    .map_or(0, |(i, _)| i);
        }
        if end == start {
            // No pattern here matches empty text; step over a character if one ever did.
            pos = start + slice[start..].chars().next().map_or(1, char::len_utf8);
            continue;
        }
        if start > last {
            words.push(base + last..base + start);
        }
        words.push(base + start..base + end);
        last = end;
        pos = end;
    }
    if last < slice.len() {
        words.push(base + last..base + slice.len());
    }
    Ok(())
}

/// Whether a match, followed by more text, is one `\s+(?!\S)` would have stopped a character
/// short of: a whitespace run of two or more characters from that alternative.
fn shortened_by_lookahead(matched: &str, trim: Trim) -> bool {
    let mut chars = matched.chars();
    let two_or_more = chars.next().is_some() && chars.next().is_some();
    two_or_more
        && match trim {
            Trim::Never => false,
            Trim::WhitespaceRuns => matched.chars().all(char::is_whitespace),
            Trim::WhitespaceRunsWithoutNewlines => matched
                .chars()
                .all(|c| c.is_whitespace() && c != '\r' && c != '\n'),
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
    fn whitespace_runs_keep_their_last_character_for_what_follows() {
        assert_eq!(split("gpt-2", "a   b"), ["a", "  ", " b"]);
        assert_eq!(split("gpt-2", "a \t\nb"), ["a", " \t", "\n", "b"]);
        assert_eq!(split("gpt-2", "a   "), ["a", "   "]);
        // Newline runs belong to `\s*[\r\n]+` in the Llama 3 pattern and are not shortened.
        assert_eq!(split("llama-bpe", "a  \n\nb"), ["a", "  \n\n", "b"]);
        assert_eq!(split("llama-bpe", "a \u{3000} b"), ["a", " \u{3000}", " b"]);
    }

    #[test]
    fn megabyte_runs_split_without_running_out_of_stack() {
        let runs = [
            "a".repeat(1 << 20),
            " ".repeat(1 << 20),
            "7".repeat(1 << 20),
            "!?".repeat(1 << 19),
            " \n".repeat(1 << 19),
            format!("{}x{}", " ".repeat(1 << 19), "\t".repeat(1 << 19)),
        ];
        for pre in ["gpt-2", "llama-bpe", "qwen2", "smollm", "default"] {
            for text in &runs {
                let words = split(pre, text);
                assert_eq!(words.concat(), *text, "{pre}");
            }
        }
    }
}
