//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`): pre-tokenize, spell each word's bytes with
//! the GPT-2 byte characters, then merge adjacent symbols, lowest merge rank first.
//!
//! Merge rules are resolved to pairs of symbol ids once at construction, so encoding compares
//! integers instead of strings. A symbol id is the token id of the symbol's text, or an id above
//! the vocabulary for texts that only occur inside merge rules: llama.cpp merges by text, and a
//! rule may produce (or consume) a string that is not itself a token. Such symbols fall back to
//! single-character tokens on output, again as llama.cpp does.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::ops::Range;

use crate::TokenizerError;
use crate::bytes::ByteMap;
use crate::hash::FastBuild;
use crate::pretokenize::PreTokenizer;
use crate::vocab::Vocab;

const NONE: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Merge {
    rank: u32,
    result: u32,
}

/// A compiled byte-level BPE model.
#[derive(Debug)]
pub(crate) struct Bpe {
    pre: PreTokenizer,
    bytes: ByteMap,
    table: MergeTable,
}

/// The merge rules resolved to symbol ids, and the symbols of single bytes. Built apart from the
/// pre-tokenizer so the two can be built at the same time.
#[derive(Debug)]
pub(crate) struct MergeTable {
    merges: HashMap<u64, Merge, FastBuild>,
    /// Symbol id of each byte's character.
    byte_symbol: [u32; 256],
    /// Token of each single ASCII character, for symbols that are not tokens.
    ascii_token: [u32; 128],
    vocab_size: u32,
}

/// Reusable working memory of one `encode` call.
#[derive(Debug, Default)]
pub(crate) struct BpeScratch {
    words: Vec<Range<usize>>,
    split_scratch: Vec<Range<usize>>,
    symbols: Vec<Symbol>,
    queue: Queue,
    spelled: String,
}

/// Candidate merges as (rank, left, right, result, merged length); the lowest rank pops first,
/// then the leftmost.
type Queue = BinaryHeap<Reverse<(u32, usize, usize, u32, usize)>>;

#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    id: u32,
    prev: usize,
    next: usize,
}

const END: usize = usize::MAX;

fn pair_key(left: u32, right: u32) -> u64 {
    (u64::from(left) << 32) | u64::from(right)
}

impl MergeTable {
    /// Resolves `merges` ("left right" rules, highest priority first) against `vocab`.
    pub(crate) fn new(vocab: &Vocab, merges: &[String]) -> Result<Self, TokenizerError> {
        if merges.is_empty() {
            return Err(TokenizerError::MissingMerges);
        }
        let vocab_size = vocab.len() as u32;
        let mut extra: HashMap<String, u32, FastBuild> = HashMap::default();
        let mut next_extra = vocab_size;
        let mut symbol_of = |text: &str| -> Result<u32, TokenizerError> {
            if let Some(id) = vocab.lookup(text) {
                return Ok(id);
            }
            if let Some(&id) = extra.get(text) {
                return Ok(id);
            }
            let id = next_extra;
            if id == NONE {
                return Err(TokenizerError::VocabularyTooLarge {
                    size: vocab.len() + extra.len(),
                });
            }
            next_extra += 1;
            extra.insert(text.to_owned(), id);
            Ok(id)
        };

        let mut table: HashMap<u64, Merge, FastBuild> =
            HashMap::with_capacity_and_hasher(merges.len(), FastBuild::default());
        // Rules are resolved a chunk at a time: the three lookups of every rule in the chunk go
        // to the vocabulary as one batch (see `Vocab::lookup_batch`).
        const CHUNK: usize = 64;
        let mut splits = Vec::with_capacity(CHUNK);
        let mut joined = String::new();
        let mut found = Vec::with_capacity(3 * CHUNK);
        for (chunk_index, chunk) in merges.chunks(CHUNK).enumerate() {
            splits.clear();
            joined.clear();
            for (offset, line) in chunk.iter().enumerate() {
                let index = chunk_index * CHUNK + offset;
                // The separator is the first space after the first byte (a rule may start with
                // a literal space).
                let split = line
                    .as_bytes()
                    .get(1..)
                    .and_then(|rest| rest.iter().position(|&b| b == b' '))
                    .map(|p| p + 1);
                let Some(pos) = split.filter(|_| u32::try_from(index).is_ok()) else {
                    return Err(TokenizerError::BadMerge {
                        index,
                        line: line.clone(),
                    });
                };
                let start = joined.len();
                joined.push_str(&line[..pos]);
                joined.push_str(&line[pos + 1..]);
                splits.push((pos, start..joined.len()));
            }
            let mut keys: Vec<&str> = Vec::with_capacity(3 * chunk.len());
            for (line, (pos, range)) in chunk.iter().zip(&splits) {
                keys.extend([&line[..*pos], &line[*pos + 1..], &joined[range.clone()]]);
            }
            found.clear();
            vocab.lookup_batch(&keys, &mut found);
            for (offset, ids) in found.chunks_exact(3).enumerate() {
                let key = &keys[3 * offset..3 * offset + 3];
                let mut id = |i: usize| match ids[i] {
                    Some(id) => Ok(id),
                    None => symbol_of(key[i]),
                };
                let (left, right, result) = (id(0)?, id(1)?, id(2)?);
                // Fits: checked while splitting.
                let rank = (chunk_index * CHUNK + offset) as u32;
                // The first rule for a pair wins, as with llama.cpp's map insertion.
                table
                    .entry(pair_key(left, right))
                    .or_insert(Merge { rank, result });
            }
        }

        let bytes = ByteMap::new();
        let mut byte_symbol = [NONE; 256];
        let mut buf = [0u8; 4];
        for (b, slot) in byte_symbol.iter_mut().enumerate() {
            let c: &str = bytes.char_of(b as u8).encode_utf8(&mut buf);
            *slot = vocab
                .lookup(c)
                .or_else(|| extra.get(c).copied())
                .unwrap_or(NONE);
        }
        let mut ascii_token = [NONE; 128];
        for (c, slot) in ascii_token.iter_mut().enumerate() {
            let s: &str = char::from(c as u8).encode_utf8(&mut buf);
            *slot = vocab.lookup(s).unwrap_or(NONE);
        }
        Ok(Self {
            merges: table,
            byte_symbol,
            ascii_token,
            vocab_size,
        })
    }
}

impl Bpe {
    pub(crate) fn new(pre: PreTokenizer, table: MergeTable) -> Self {
        Self {
            pre,
            bytes: ByteMap::new(),
            table,
        }
    }

    /// The pre-tokenizer name.
    pub(crate) fn pre_name(&self) -> &str {
        self.pre.name()
    }

    /// Appends the tokens of `text` (which holds no special tokens) to `out`.
    pub(crate) fn encode(
        &self,
        vocab: &Vocab,
        text: &str,
        scratch: &mut BpeScratch,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        let mut words = std::mem::take(&mut scratch.words);
        let result = self
            .pre
            .split(text, &mut words, &mut scratch.split_scratch)
            .map(|()| {
                for word in &words {
                    self.encode_word(vocab, &text.as_bytes()[word.clone()], scratch, out);
                }
            });
        scratch.words = words;
        result
    }

    fn encode_word(
        &self,
        vocab: &Vocab,
        word: &[u8],
        scratch: &mut BpeScratch,
        out: &mut Vec<u32>,
    ) {
        if self.pre.ignore_merges() {
            scratch.spelled.clear();
            self.bytes.encode_into(word, &mut scratch.spelled);
            if let Some(id) = vocab.lookup(&scratch.spelled) {
                out.push(id);
                return;
            }
        }
        if let [b] = word {
            self.emit(word, self.table.byte_symbol[usize::from(*b)], out);
            return;
        }
        let symbols = &mut scratch.symbols;
        let queue = &mut scratch.queue;
        symbols.clear();
        queue.clear();
        let n = word.len();
        symbols.extend(word.iter().enumerate().map(|(i, &b)| Symbol {
            start: i,
            len: 1,
            id: self.table.byte_symbol[usize::from(b)],
            prev: if i == 0 { END } else { i - 1 },
            next: if i + 1 == n { END } else { i + 1 },
        }));
        for i in 1..n {
            self.queue_pair(symbols, queue, i - 1, i);
        }
        while let Some(Reverse((_, left, right, result, size))) = queue.pop() {
            let (l, r) = (symbols[left], symbols[right]);
            // Stale entries: one side was merged away or grew since the pair was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != size {
                continue;
            }
            symbols[left].len = size;
            symbols[left].id = result;
            symbols[left].next = r.next;
            symbols[right].len = 0;
            if r.next != END {
                symbols[r.next].prev = left;
            }
            if l.prev != END {
                self.queue_pair(symbols, queue, l.prev, left);
            }
            if r.next != END {
                self.queue_pair(symbols, queue, left, r.next);
            }
        }
        let mut i = 0;
        while i != END {
            let s = symbols[i];
            self.emit(&word[s.start..s.start + s.len], s.id, out);
            i = s.next;
        }
    }

    fn queue_pair(&self, symbols: &[Symbol], queue: &mut Queue, left: usize, right: usize) {
        let (l, r) = (symbols[left], symbols[right]);
        if l.id == NONE || r.id == NONE {
            return;
        }
        if let Some(m) = self.table.merges.get(&pair_key(l.id, r.id)) {
            queue.push(Reverse((m.rank, left, right, m.result, l.len + r.len)));
        }
    }

    fn emit(&self, bytes: &[u8], id: u32, out: &mut Vec<u32>) {
        if id < self.table.vocab_size {
            out.push(id);
            return;
        }
        // Not a token: fall back to single-character tokens where they exist.
        for &b in bytes {
            let c = self.bytes.char_of(b);
            if c.is_ascii() {
                let t = self.table.ascii_token[c as usize];
                if t != NONE {
                    out.push(t);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::spec::TokenType;

    fn model(tokens: &[&str], merges: &[&str], pre: &str) -> (Vocab, Bpe) {
        let texts: Vec<String> = tokens.iter().map(|s| s.to_string()).collect();
        let vocab = Vocab::new(&texts, vec![TokenType::Normal; texts.len()]).unwrap();
        let merges: Vec<String> = merges.iter().map(|s| s.to_string()).collect();
        let table = MergeTable::new(&vocab, &merges).unwrap();
        let bpe = Bpe::new(PreTokenizer::new(Some(pre)).unwrap(), table);
        (vocab, bpe)
    }

    fn encode(v: &Vocab, b: &Bpe, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        b.encode(v, text, &mut BpeScratch::default(), &mut out)
            .unwrap();
        out
    }

    #[test]
    fn merges_apply_by_rank_not_by_position() {
        // ids:              0    1    2    3     4     5
        let (v, b) = model(
            &["a", "b", "c", "bc", "ab", "abc"],
            &["b c", "a b", "a bc"],
            "gpt-2",
        );
        // "b c" outranks "a b", so "abc" becomes a + bc, then "a bc" -> abc.
        assert_eq!(encode(&v, &b, "abc"), [5]);
        assert_eq!(encode(&v, &b, "ab"), [4]);
        assert_eq!(encode(&v, &b, "cab"), [2, 4]);
    }

    #[test]
    fn rule_producing_a_non_token_falls_back_to_characters() {
        // "x y" yields "xy", which is not a token: emitted as x, y.
        let (v, b) = model(&["x", "y", "z"], &["x y"], "gpt-2");
        assert_eq!(encode(&v, &b, "xyz"), [0, 1, 2]);
    }

    #[test]
    fn space_is_spelled_as_g_dot() {
        let (v, b) = model(&["a", "Ġ", "Ġa"], &["Ġ a"], "gpt-2");
        assert_eq!(encode(&v, &b, "a a"), [0, 2]);
    }

    #[test]
    fn ignore_merges_emits_whole_words_that_are_tokens() {
        let (v, b) = model(&["a", "b", "c", "abc"], &["a b"], "llama-bpe");
        assert_eq!(encode(&v, &b, "abc"), [3]);
        let (v, b) = model(&["a", "b", "c", "abc"], &["a b"], "gpt-2");
        // "ab" is not a token, so the merge result falls back to its characters.
        assert_eq!(encode(&v, &b, "abc"), [0, 1, 2]);
    }

    #[test]
    fn bad_merge_line_is_reported_with_its_index() {
        let texts = vec!["a".to_string()];
        let vocab = Vocab::new(&texts, vec![TokenType::Normal]).unwrap();
        let merges = vec!["a a".to_string(), "aa".to_string()];
        let err = MergeTable::new(&vocab, &merges).unwrap_err();
        assert!(matches!(err, TokenizerError::BadMerge { index: 1, ref line } if line == "aa"));
    }
}
