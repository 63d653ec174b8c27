//! The [`Tokenizer`]: a vocabulary, its algorithm (byte-level BPE or SentencePiece) and its
//! special tokens, with encoding and decoding that follow llama.cpp token for token.

use std::fmt;

use crate::TokenizerError;
use crate::bpe::{Bpe, BpeScratch, MergeTable};
use crate::bytes::ByteMap;
use crate::pretokenize::PreTokenizer;
use crate::spec::{TokenType, TokenizerSpec};
use crate::special::{Fragment, SpecialMatcher};
use crate::spm::{SPACE_MARK, Spm, SpmScratch};
use crate::vocab::{Pieces, Vocab};

/// Texts llama.cpp treats as end of generation (and forces to control tokens) when present.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

/// Texts that name an end-of-turn token when the metadata names none, in preference order.
const END_OF_TURN_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "_<EOT>",
    "<end_of_utterance>",
];

/// Fill-in-the-middle padding / repository / file-separator markers: llama.cpp ends generation
/// on them too (and forces them to control tokens).
const FIM_END_TEXTS: &[&str] = &[
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];

#[derive(Debug)]
enum Algorithm {
    // Boxed: both carry kilobytes of per-byte tables.
    Bpe(Box<Bpe>),
    Spm(Box<Spm>),
}

/// A tokenizer built from a model's metadata.
///
/// Immutable after construction and `Send + Sync`: share one behind an `Arc`.
pub struct Tokenizer {
    vocab: Vocab,
    pieces: Pieces,
    algorithm: Algorithm,
    specials: SpecialMatcher,
    model: String,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    end_of_generation: Vec<u32>,
    chat_template: Option<String>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("model", &self.model)
            .field("pre", &self.pre_tokenizer())
            .field("vocab_size", &self.vocab.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eot", &self.eot)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish_non_exhaustive()
    }
}

impl AsRef<Tokenizer> for Tokenizer {
    fn as_ref(&self) -> &Tokenizer {
        self
    }
}

fn check_id(
    role: &'static str,
    id: Option<u32>,
    vocab_size: usize,
) -> Result<Option<u32>, TokenizerError> {
    match id {
        Some(id) if id as usize >= vocab_size => Err(TokenizerError::SpecialTokenOutOfRange {
            role,
            id,
            vocab_size,
        }),
        _ => Ok(id),
    }
}

impl Tokenizer {
    /// Builds a tokenizer. Fails on an unknown model or pre-tokenizer type, arrays whose length
    /// does not match the vocabulary, malformed merge rules and special ids out of range.
    pub fn new(spec: TokenizerSpec) -> Result<Self, TokenizerError> {
        let is_bpe = match spec.model.as_str() {
            "gpt2" => true,
            "llama" => false,
            other => {
                return Err(TokenizerError::UnknownModel {
                    model: other.to_owned(),
                });
            }
        };

        let n = spec.tokens.len();
        let types: Vec<TokenType> = match &spec.token_types {
            Some(t) if t.len() != n => {
                return Err(TokenizerError::LengthMismatch {
                    field: "token_types",
                    expected: n,
                    actual: t.len(),
                });
            }
            Some(t) => t.iter().map(|&v| TokenType::from_gguf(v)).collect(),
            None => vec![TokenType::Normal; n],
        };
        if let Some(s) = &spec.scores
            && s.len() != n
        {
            return Err(TokenizerError::LengthMismatch {
                field: "scores",
                expected: n,
                actual: s.len(),
            });
        }
        let mut vocab = Vocab::new(&spec.tokens, types)?;
        let bos = check_id("bos", spec.bos, n)?;
        let eos = check_id("eos", spec.eos, n)?;
        let unk = check_id("unk", spec.unk, n)?;
        let pad = check_id("pad", spec.pad, n)?;
        let mut eot = check_id("eot", spec.eot, n)?;
        if spec.add_bos && bos.is_none() {
            return Err(TokenizerError::MissingSpecialToken { role: "bos" });
        }
        if spec.add_eos && eos.is_none() {
            return Err(TokenizerError::MissingSpecialToken { role: "eos" });
        }

        // Well-known end markers stop generation and are control tokens whatever the file says.
        let mut end_of_generation: Vec<u32> = eos.into_iter().collect();
        for text in END_OF_GENERATION_TEXTS.iter().chain(FIM_END_TEXTS) {
            if let Some(id) = vocab.lookup(text) {
                vocab.set_type(id, TokenType::Control);
                end_of_generation.push(id);
            }
        }
        if eot.is_none() {
            eot = END_OF_TURN_TEXTS.iter().find_map(|t| vocab.lookup(t));
        }
        end_of_generation.extend(eot);
        end_of_generation.sort_unstable();
        end_of_generation.dedup();

        // The merge table (the bulk of the work) is built here while a helper thread compiles
        // the pre-tokenizer and renders the token pieces: model load time is what this saves.
        let vocab_ref = &vocab;
        let pre_name = spec.pre.as_deref();
        let merges = &spec.merges;
        let ((pre, pieces), main) = concurrently(
            || {
                let pre = is_bpe.then(|| PreTokenizer::new(pre_name)).transpose();
                (pre, render_pieces(vocab_ref, is_bpe))
            },
            || {
                if is_bpe {
                    MergeTable::new(vocab_ref, merges).map(|t| Built::Merges(Box::new(t)))
                } else {
                    let spm = Spm::new(vocab_ref, spec.scores, unk, spec.add_space_prefix);
                    Ok(Built::Spm(Box::new(spm)))
                }
            },
        );
        let algorithm = match (pre?, main?) {
            (Some(pre), Built::Merges(table)) => Algorithm::Bpe(Box::new(Bpe::new(pre, *table))),
            (_, Built::Spm(spm)) => Algorithm::Spm(spm),
            // A merge table is only built for byte-level BPE, which always has a pre-tokenizer.
            (None, Built::Merges(_)) => {
                return Err(TokenizerError::UnknownPreTokenizer {
                    pre: pre_name.unwrap_or("default").to_owned(),
                });
            }
        };
        let specials = SpecialMatcher::new(&vocab);

        Ok(Self {
            vocab,
            pieces,
            algorithm,
            specials,
            model: spec.model,
            bos,
            eos,
            eot,
            unk,
            pad,
            add_bos: spec.add_bos,
            add_eos: spec.add_eos,
            end_of_generation,
            chat_template: spec.chat_template,
        })
    }

    /// Encodes `text`. With `add_special`, BOS/EOS are added as the vocabulary's add flags say.
    /// With `parse_special`, control tokens written in the text (e.g. `<|im_start|>`) become
    /// those tokens; without it they are tokenized as plain text. User-defined tokens are
    /// always matched.
    pub fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        let (mut fragments, mut scratch) = (Vec::new(), Vec::new());
        self.specials.partition(
            &self.vocab,
            text,
            parse_special,
            &mut fragments,
            &mut scratch,
        );
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        match &self.algorithm {
            Algorithm::Bpe(bpe) => {
                let mut work = BpeScratch::default();
                for fragment in &fragments {
                    match fragment {
                        Fragment::Text(r) => {
                            bpe.encode(&self.vocab, &text[r.clone()], &mut work, &mut out)?;
                        }
                        Fragment::Token(id) => out.push(*id),
                    }
                }
            }
            Algorithm::Spm(spm) => {
                let mut work = SpmScratch::default();
                // Text at the start or right after a special token gets the space prefix.
                let mut after_special = true;
                for fragment in &fragments {
                    match fragment {
                        Fragment::Text(r) => {
                            let prefix = spm.add_space_prefix() && after_special;
                            spm.encode(&self.vocab, &text[r.clone()], prefix, &mut work, &mut out)?;
                            after_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(*id);
                            after_special = true;
                        }
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }

    /// The bytes token `id` stands for, special tokens rendered as their text. Unused and
    /// undefined tokens are empty. A piece may be part of a UTF-8 sequence.
    pub fn token_bytes(&self, id: u32) -> Result<&[u8], TokenizerError> {
        self.pieces.get(id).ok_or(TokenizerError::TokenOutOfRange {
            id,
            vocab_size: self.vocab.len(),
        })
    }

    /// Decodes `ids` into text: the concatenated bytes of their pieces (what llama.cpp's server
    /// streams), with invalid UTF-8 replaced only at the end. With `skip_special`, control and
    /// unknown tokens are left out. No space clean-up is done, and for SentencePiece
    /// vocabularies the space added by `add_space_prefix` is kept.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let piece = self.token_bytes(id)?;
            if !(skip_special && self.is_special(id)) {
                bytes.extend_from_slice(piece);
            }
        }
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// End-of-turn token: from the metadata, else the first well-known end-of-turn marker
    /// (`<|eot_id|>`, `<|im_end|>`, ...) present in the vocabulary.
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    /// Unknown token.
    pub fn unk(&self) -> Option<u32> {
        self.unk
    }

    /// Padding token.
    pub fn pad(&self) -> Option<u32> {
        self.pad
    }

    /// Whether `encode` with `add_special` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether `encode` with `add_special` appends EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// True for control and unknown tokens (the ones `skip_special` hides); false for ids out
    /// of range.
    pub fn is_special(&self, id: u32) -> bool {
        self.token_type(id).is_some_and(TokenType::is_special)
    }

    /// The type of token `id` (after llama.cpp's promotion of well-known end markers to
    /// control), or `None` out of range.
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        ((id as usize) < self.vocab.len()).then(|| self.vocab.type_of(id))
    }

    /// The stored text of token `id` (GPT-2 byte spelling for byte-level BPE, `▁` for spaces
    /// in SentencePiece), or `None` out of range.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        ((id as usize) < self.vocab.len()).then(|| self.vocab.text_of(id))
    }

    /// The id of the token whose stored text is exactly `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.lookup(text)
    }

    /// Tokens that end generation, sorted: EOS, the end-of-turn token, and the well-known end
    /// markers llama.cpp also stops on (`<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`,
    /// fill-in-the-middle separators, ...) when present.
    pub fn end_of_generation_tokens(&self) -> Vec<u32> {
        self.end_of_generation.clone()
    }

    /// Whether generating `id` ends generation.
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }

    /// `tokenizer.ggml.model` this was built from.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// `tokenizer.ggml.pre` in effect for byte-level BPE (`"default"` when the metadata had
    /// none); `None` for SentencePiece.
    pub fn pre_tokenizer(&self) -> Option<&str> {
        match &self.algorithm {
            Algorithm::Bpe(bpe) => Some(bpe.pre_name()),
            Algorithm::Spm(_) => None,
        }
    }

    /// The chat template from the metadata, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
}

/// What the main thread of construction builds.
enum Built {
    Merges(Box<MergeTable>),
    Spm(Box<Spm>),
}

/// Runs `side` on a scoped helper thread while `main` runs on this one; if no thread can be
/// started, runs `side` here afterwards.
fn concurrently<A: Send, B>(side: impl Fn() -> A + Sync, main: impl FnOnce() -> B) -> (A, B) {
    std::thread::scope(|scope| {
        let helper = std::thread::Builder::new()
            .name("tokenizer-build".into())
            .spawn_scoped(scope, &side);
        let b = main();
        let a = match helper {
            Ok(handle) => handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            Err(_) => side(),
        };
        (a, b)
    })
}

/// The bytes each token stands for, as llama.cpp renders them.
fn render_pieces(vocab: &Vocab, is_bpe: bool) -> Pieces {
    if is_bpe {
        let bytes = ByteMap::new();
        Pieces::render(vocab, |text, ty, out| match ty {
            TokenType::Normal => bytes.decode_into(text, out),
            TokenType::Control | TokenType::Unknown | TokenType::UserDefined => {
                out.extend_from_slice(text.as_bytes());
            }
            // llama.cpp renders nothing for these in byte-level vocabularies.
            TokenType::Byte | TokenType::Unused | TokenType::Undefined => {}
        })
    } else {
        Pieces::render(vocab, |text, ty, out| match ty {
            TokenType::Normal => {
                for c in text.chars() {
                    let c = if c == SPACE_MARK { ' ' } else { c };
                    out.extend_from_slice(c.encode_utf8(&mut [0u8; 4]).as_bytes());
                }
            }
            TokenType::Control | TokenType::Unknown | TokenType::UserDefined => {
                out.extend_from_slice(text.as_bytes());
            }
            TokenType::Byte => match parse_byte_token(text) {
                Some(b) => out.push(b),
                None => out.extend_from_slice(text.as_bytes()),
            },
            TokenType::Unused | TokenType::Undefined => {}
        })
    }
}

/// The byte of a `<0xXX>` token text.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn byte_token_texts_parse() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(10));
        assert_eq!(parse_byte_token("<0xff>"), Some(255));
        assert_eq!(parse_byte_token("<0x1>"), None);
        assert_eq!(parse_byte_token("<0xZZ>"), None);
        assert_eq!(parse_byte_token("0x0A"), None);
    }
}
