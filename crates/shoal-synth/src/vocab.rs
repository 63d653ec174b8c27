//! A small GPT-2-style byte-level BPE vocabulary, learned deterministically from a fixed English
//! sample so that common words become single tokens: tokenizers and chat templates can then be
//! exercised end to end on a model that takes milliseconds to write.

use std::collections::{BTreeMap, HashSet};

use shoal_gguf::StringArray;

use crate::VocabSpec;

/// `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`.
pub const N_SPECIAL: usize = 3;
/// The special tokens, at ids 0, 1 and 2.
pub const SPECIAL_TOKENS: [&str; N_SPECIAL] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// Id of `<|endoftext|>`, used as both BOS and EOS.
pub const ENDOFTEXT_ID: u32 = 0;

/// llama.cpp token types (`tokenizer.ggml.token_type`).
pub mod token_type {
    /// An ordinary token.
    pub const NORMAL: i32 = 1;
    /// A control token, never produced by splitting text.
    pub const CONTROL: i32 = 3;
    /// Padding that no text maps to.
    pub const UNUSED: i32 = 5;
}

/// A ChatML template (`<|im_start|>role\ncontent<|im_end|>\n` per message).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The text merges are learned from. Changing it changes every synthetic vocabulary.
pub const SAMPLE_TEXT: &str = "\
The town sits where the river bends to the east, and in the morning the water is the colour \
of slate. People who live there say that the river has a mind of its own. In the spring it \
rises over the low fields, and in the summer it falls so far that the children can walk \
across it to the island in the middle. There is a bridge, but it is old and narrow, and the \
farmers with their carts still prefer the ford when the water is low.\n\
The first house on the hill was built by a man who came from the north with his wife and \
their three sons. He was a carpenter, and he built the house from the wood of the forest \
that once covered the hill. The house is still there. It has been a school, a shop, an inn \
and a post office, and now it is a small museum where you can see the tools he used and the \
letters his wife wrote to her sister. In one of the letters she says that the winters are \
long, that the people are kind, and that she has never seen a sky as wide as the one over \
the valley.\n\
Every year, at the end of the harvest, the town holds a market on the square. Farmers bring \
apples, cheese, bread and honey, and the people from the villages around come to buy what \
they need for the winter. There is music in the evening, and the older people tell stories \
about the years when the river froze and the whole town walked on the ice. It is a good \
place to live, they say, if you do not mind the water, the wind and the long nights. \
What do you think? Would you like to live there, or would you rather stay in the city?\n";

/// The vocabulary written into a model's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    /// Token texts in id order (byte-level encoded).
    pub tokens: StringArray,
    /// llama.cpp token type of each token.
    pub token_types: Vec<i32>,
    /// Merges in rank order, each `"left right"`.
    pub merges: StringArray,
}

/// GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes map to
/// themselves, the rest to U+0100 onwards in byte order (so a space is `Ġ`, a newline `Ċ`).
pub fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut extra = 0u32;
    for (b, slot) in out.iter_mut().enumerate() {
        let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        *slot = if printable {
            char::from(b as u8)
        } else {
            extra += 1;
            // 256..=323 are all valid scalar values.
            char::from_u32(255 + extra).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
    }
    out
}

/// Splits text GPT-2 style: an optional leading space joined to a run of letters, of digits,
/// or of other symbols; runs of whitespace on their own.
fn pre_split(text: &str) -> Vec<&str> {
    #[derive(PartialEq, Clone, Copy)]
    enum Class {
        Letter,
        Digit,
        Space,
        Other,
    }
    let class = |c: char| {
        if c.is_alphabetic() {
            Class::Letter
        } else if c.is_numeric() {
            Class::Digit
        } else if c.is_whitespace() {
            Class::Space
        } else {
            Class::Other
        }
    };
    let mut pieces = Vec::new();
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut i = 0;
    while let Some(&(start, c)) = chars.get(i) {
        let mut j = i + 1;
        let run_class = match (c, chars.get(j)) {
            (' ', Some(&(_, next))) if class(next) != Class::Space => {
                j += 1;
                class(next)
            }
            _ => class(c),
        };
        while let Some(&(_, n)) = chars.get(j) {
            // A space followed by a non-space starts the next piece.
            let next_starts_word = n == ' '
                && chars
                    .get(j + 1)
                    .is_some_and(|&(_, m)| class(m) != Class::Space);
            if class(n) != run_class || (run_class == Class::Space && next_starts_word) {
                break;
            }
            j += 1;
        }
        let end = chars.get(j).map_or(text.len(), |&(e, _)| e);
        pieces.push(&text[start..end]);
        i = j;
    }
    pieces
}

/// Learns up to `n_new` new tokens by repeatedly merging the most frequent adjacent pair (ties
/// go to the lexicographically smallest pair, so the result never depends on hash order).
fn learn_merges(
    text: &str,
    n_new: usize,
    known: &mut HashSet<String>,
) -> (Vec<String>, Vec<String>) {
    let map = byte_chars();
    let mut word_counts: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    for piece in pre_split(text) {
        let symbols = piece.bytes().map(|b| map[b as usize].to_string()).collect();
        *word_counts.entry(symbols).or_default() += 1;
    }
    let mut words: Vec<(Vec<String>, usize)> = word_counts.into_iter().collect();
    let mut merges = Vec::new();
    let mut new_tokens = Vec::new();
    while new_tokens.len() < n_new {
        let mut pairs: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for (symbols, count) in &words {
            for w in symbols.windows(2) {
                if let [a, b] = w {
                    *pairs.entry((a.as_str(), b.as_str())).or_default() += count;
                }
            }
        }
        let mut best: Option<((&str, &str), usize)> = None;
        for (pair, count) in pairs {
            if best.is_none_or(|(_, c)| count > c) {
                best = Some((pair, count));
            }
        }
        let Some(((a, b), _)) = best else {
            break;
        };
        let (a, b) = (a.to_owned(), b.to_owned());
        let joined = format!("{a}{b}");
        merges.push(format!("{a} {b}"));
        if known.insert(joined.clone()) {
            new_tokens.push(joined.clone());
        }
        for (symbols, _) in &mut words {
            let mut out = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if symbols.get(i) == Some(&a) && symbols.get(i + 1) == Some(&b) {
                    out.push(joined.clone());
                    i += 2;
                } else {
                    out.extend(symbols.get(i).cloned());
                    i += 1;
                }
            }
            *symbols = out;
        }
    }
    (merges, new_tokens)
}

/// Builds the vocabulary a [`VocabSpec`] describes.
pub fn build_vocab(spec: &VocabSpec) -> Vocab {
    let VocabSpec::Bytes { merges, size } = *spec;
    let mut tokens = StringArray::new();
    let mut token_types = Vec::with_capacity(size);
    for s in SPECIAL_TOKENS {
        tokens.push(s);
        token_types.push(token_type::CONTROL);
    }
    let mut known: HashSet<String> = SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect();
    for c in byte_chars() {
        let s = c.to_string();
        tokens.push(&s);
        token_types.push(token_type::NORMAL);
        known.insert(s);
    }
    let room = size.saturating_sub(tokens.len());
    let (merge_list, new_tokens) = learn_merges(SAMPLE_TEXT, merges.min(room), &mut known);
    for t in &new_tokens {
        tokens.push(t);
        token_types.push(token_type::NORMAL);
    }
    let mut filler = 0usize;
    while tokens.len() < size {
        tokens.push(&format!("<|extra_{filler}|>"));
        token_types.push(token_type::UNUSED);
        filler += 1;
    }
    Vocab {
        tokens,
        token_types,
        merges: merge_list.iter().collect(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_gpt2s() {
        let m = byte_chars();
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
        assert_eq!(m[b'a' as usize], 'a');
        assert_eq!(m[0], 'Ā');
        assert_eq!(m[0xAD], 'Ń');
        let distinct: HashSet<char> = m.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn pre_split_keeps_leading_spaces_with_words() {
        assert_eq!(
            pre_split("The town, 42 cats.\n  Go"),
            ["The", " town", ",", " 42", " cats", ".", "\n ", " Go"]
        );
    }

    #[test]
    fn vocab_has_requested_size_and_common_words() {
        let v = build_vocab(&VocabSpec::Bytes {
            merges: 250,
            size: 512,
        });
        assert_eq!(v.tokens.len(), 512);
        assert_eq!(v.token_types.len(), 512);
        assert_eq!(v.tokens.get(0), Some("<|endoftext|>"));
        assert_eq!(v.tokens.get(3), Some("Ā"));
        let all: HashSet<&str> = v.tokens.iter().collect();
        assert_eq!(all.len(), 512, "token texts are unique");
        for word in ["Ġthe", "Ġand", "Ġriver", "Ġtown"] {
            assert!(all.contains(word), "{word} is a single token");
        }
        assert!(v.merges.len() >= 250);
        // Every merge joins two existing tokens into an existing token.
        for m in v.merges.iter() {
            let (a, b) = m.split_once(' ').unwrap();
            assert!(all.contains(a) && all.contains(b), "{m}");
            assert!(all.contains(format!("{a}{b}").as_str()), "{m}");
        }
        assert_eq!(v.tokens.get(511), Some("<|extra_2|>"));
        assert_eq!(v.token_types[511], token_type::UNUSED);
    }

    #[test]
    fn vocab_is_deterministic() {
        let spec = VocabSpec::Bytes {
            merges: 100,
            size: 400,
        };
        assert_eq!(build_vocab(&spec), build_vocab(&spec));
    }
}
