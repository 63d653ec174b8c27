//! Behaviour of the public API on small hand-made vocabularies: construction errors, special
//! token handling, BOS/EOS, end-of-generation detection.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use shoal_tokenizer::{TokenType, Tokenizer, TokenizerError, TokenizerSpec};

/// A byte-level BPE vocabulary: the printable ASCII characters, a few merges, and specials.
fn bpe_spec() -> TokenizerSpec {
    let mut tokens: Vec<String> = (b'!'..=b'~').map(|b| char::from(b).to_string()).collect();
    tokens.push("Ġ".into()); // space
    let merges: Vec<String> = ["h i", "Ġ hi"].iter().map(|m| m.to_string()).collect();
    tokens.extend(["hi".to_string(), "Ġhi".to_string()]);
    let specials = ["<s>", "</s>", "<|im_end|>", "<tool>"];
    tokens.extend(specials.iter().map(|s| s.to_string()));
    let mut types = vec![1; tokens.len()];
    let n = types.len();
    types[n - 4] = 3; // <s>
    types[n - 3] = 3; // </s>
    types[n - 2] = 1; // <|im_end|> marked normal on purpose: llama.cpp promotes it
    types[n - 1] = 4; // <tool> user-defined
    TokenizerSpec {
        model: "gpt2".into(),
        pre: Some("gpt-2".into()),
        bos: Some(n as u32 - 4),
        eos: Some(n as u32 - 3),
        tokens,
        token_types: Some(types),
        merges,
        ..TokenizerSpec::default()
    }
}

fn id(t: &Tokenizer, text: &str) -> u32 {
    t.token_id(text).unwrap()
}

#[test]
fn tokenizer_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<shoal_tokenizer::ChatTemplate>();
}

#[test]
fn bos_and_eos_are_added_only_when_asked_and_enabled() {
    let mut spec = bpe_spec();
    spec.add_bos = true;
    spec.add_eos = true;
    let t = Tokenizer::new(spec).unwrap();
    let (bos, eos) = (t.bos().unwrap(), t.eos().unwrap());
    assert_eq!(
        t.encode("hi hi", true, false).unwrap(),
        [bos, id(&t, "hi"), id(&t, "Ġhi"), eos]
    );
    assert_eq!(
        t.encode("hi hi", false, false).unwrap(),
        [id(&t, "hi"), id(&t, "Ġhi")]
    );
    assert_eq!(t.encode("", true, false).unwrap(), [bos, eos]);
    let t = Tokenizer::new(bpe_spec()).unwrap();
    assert_eq!(t.encode("hi", true, false).unwrap(), [id(&t, "hi")]);
}

#[test]
fn control_tokens_need_parse_special_but_user_defined_ones_do_not() {
    let t = Tokenizer::new(bpe_spec()).unwrap();
    let (s, tool) = (id(&t, "<s>"), id(&t, "<tool>"));
    assert_eq!(t.encode("<s>", false, true).unwrap(), [s]);
    let plain = t.encode("<s>", false, false).unwrap();
    assert_eq!(plain, [id(&t, "<"), id(&t, "s"), id(&t, ">")]);
    assert_eq!(t.encode("<tool>", false, false).unwrap(), [tool]);
    assert!(t.is_special(s));
    assert!(!t.is_special(tool));
    assert_eq!(t.token_type(tool), Some(TokenType::UserDefined));
    // skip_special hides control tokens, not user-defined ones.
    assert_eq!(
        t.decode(&[s, tool, id(&t, "hi")], true).unwrap(),
        "<tool>hi"
    );
    assert_eq!(
        t.decode(&[s, tool, id(&t, "hi")], false).unwrap(),
        "<s><tool>hi"
    );
}

#[test]
fn well_known_end_markers_become_control_and_end_generation() {
    let t = Tokenizer::new(bpe_spec()).unwrap();
    let im_end = id(&t, "<|im_end|>");
    assert_eq!(t.token_type(im_end), Some(TokenType::Control));
    assert_eq!(
        t.encode("a<|im_end|>", false, true).unwrap(),
        [id(&t, "a"), im_end]
    );
    assert_eq!(t.eot(), Some(im_end));
    let eos = t.eos().unwrap();
    assert_eq!(t.end_of_generation_tokens(), {
        let mut v = vec![eos, im_end];
        v.sort();
        v
    });
    assert!(t.is_end_of_generation(im_end) && t.is_end_of_generation(eos));
    assert!(!t.is_end_of_generation(id(&t, "hi")));
}

#[test]
fn construction_errors_name_the_problem() {
    let mut spec = bpe_spec();
    spec.model = "wordpiece".into();
    assert!(
        matches!(Tokenizer::new(spec), Err(TokenizerError::UnknownModel { model }) if model == "wordpiece")
    );

    let mut spec = bpe_spec();
    spec.pre = Some("mystery".into());
    let err = Tokenizer::new(spec).unwrap_err();
    assert!(err.to_string().contains("mystery"), "{err}");

    let mut spec = bpe_spec();
    spec.token_types.as_mut().unwrap().pop();
    assert!(matches!(
        Tokenizer::new(spec),
        Err(TokenizerError::LengthMismatch {
            field: "token_types",
            ..
        })
    ));

    let mut spec = bpe_spec();
    spec.eos = Some(1_000_000);
    assert!(matches!(
        Tokenizer::new(spec),
        Err(TokenizerError::SpecialTokenOutOfRange {
            role: "eos",
            id: 1_000_000,
            ..
        })
    ));

    let mut spec = bpe_spec();
    spec.bos = None;
    spec.add_bos = true;
    assert!(matches!(
        Tokenizer::new(spec),
        Err(TokenizerError::MissingSpecialToken { role: "bos" })
    ));

    let mut spec = bpe_spec();
    spec.merges.push("nospace".into());
    assert!(matches!(
        Tokenizer::new(spec),
        Err(TokenizerError::BadMerge { index: 2, .. })
    ));

    let mut spec = bpe_spec();
    spec.merges.clear();
    assert!(matches!(
        Tokenizer::new(spec),
        Err(TokenizerError::MissingMerges)
    ));

    let spec = TokenizerSpec {
        model: "llama".into(),
        ..TokenizerSpec::default()
    };
    assert!(matches!(
        Tokenizer::new(spec),
        Err(TokenizerError::EmptyVocabulary)
    ));
}

#[test]
fn out_of_range_ids_are_errors() {
    let t = Tokenizer::new(bpe_spec()).unwrap();
    let n = t.vocab_size() as u32;
    assert!(matches!(t.token_bytes(n), Err(TokenizerError::TokenOutOfRange { id, .. }) if id == n));
    assert!(t.decode(&[0, n], false).is_err());
    assert_eq!(t.token_type(n), None);
    assert_eq!(t.token_text(n), None);
    assert!(!t.is_special(n));
}

#[test]
fn metadata_accessors_report_the_spec() {
    let mut spec = bpe_spec();
    spec.chat_template = Some("{{ messages }}".into());
    spec.pre = None;
    let t = Tokenizer::new(spec).unwrap();
    assert_eq!(t.model(), "gpt2");
    assert_eq!(t.pre_tokenizer(), Some("default"));
    assert_eq!(t.chat_template(), Some("{{ messages }}"));
    assert_eq!(t.token_text(id(&t, "Ġhi")), Some("Ġhi"));
    assert_eq!(t.token_bytes(id(&t, "Ġhi")).unwrap(), b" hi");
}
