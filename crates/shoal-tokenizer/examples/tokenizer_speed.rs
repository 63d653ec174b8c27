//! Prints how long the SmolLM2 tokenizer takes to build, to encode a ~2k-token prompt and to
//! decode it again. Budgets: construction a few ms (model load is 50 ms in total), encoding
//! well under 10 ms.
//!
//! Times are the best of several runs.
//!
//! `cargo run --release -p shoal-tokenizer --example tokenizer_speed [path/to/model.gguf]`

#![allow(clippy::unwrap_used, clippy::expect_used)] // a measuring tool, not library code

use std::path::PathBuf;
use std::time::{Duration, Instant};

use shoal_gguf::GgufFile;
use shoal_tokenizer::{StreamDecoder, Tokenizer, TokenizerSpec};

fn spec(path: &PathBuf) -> TokenizerSpec {
    let file = GgufFile::open(path).unwrap();
    let m = file.metadata();
    let strings = |key: &str| -> Vec<String> {
        m.require_str_array(key)
            .unwrap()
            .iter()
            .map(str::to_owned)
            .collect()
    };
    TokenizerSpec {
        model: m.require_str("tokenizer.ggml.model").unwrap().to_owned(),
        pre: m.get_str("tokenizer.ggml.pre").unwrap().map(str::to_owned),
        tokens: strings("tokenizer.ggml.tokens"),
        token_types: m
            .get_i32_array("tokenizer.ggml.token_type")
            .unwrap()
            .map(<[i32]>::to_vec),
        merges: strings("tokenizer.ggml.merges"),
        bos: m.get_u32("tokenizer.ggml.bos_token_id").unwrap(),
        eos: m.get_u32("tokenizer.ggml.eos_token_id").unwrap(),
        ..TokenizerSpec::default()
    }
}

/// The fastest run: on a shared machine the minimum is the least noisy estimate of the cost.
fn best(v: Vec<Duration>) -> Duration {
    v.into_iter().min().unwrap_or_default()
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let start = Instant::now();
        let out = f();
        times.push(start.elapsed());
        last = Some(out);
    }
    (best(times), last.unwrap())
}

const PARAGRAPH: &str = "<|im_start|>user\nThe quick brown fox, aged 12345 days, jumps over \
the lazy dog's 3.14159 kennels; don't YOU'LL believe it?  Ünïcödé façade — naïve café 日本語 🎉\n\
def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\
    Indented   text\twith\ttabs   and  runs of   spaces.<|im_end|>\n";

fn main() {
    let path = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache/shoal/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    let (t_spec, spec) = time(5, || spec(&path));
    println!("metadata -> spec (GGUF open + 98k strings):  {t_spec:>10.2?}");
    let (t_new, tokenizer) = time(20, || Tokenizer::new(spec.clone()).unwrap());
    let (t_clone, _) = time(20, || spec.clone());
    println!(
        "Tokenizer::new (excluding the {t_clone:.2?} spec clone):   {:>10.2?}",
        t_new.saturating_sub(t_clone)
    );

    let mut prompt = String::new();
    while tokenizer.encode(&prompt, false, true).unwrap().len() < 2048 {
        prompt.push_str(PARAGRAPH);
    }
    let (t_enc, ids) = time(50, || tokenizer.encode(&prompt, true, true).unwrap());
    println!(
        "encode {} bytes -> {} tokens:                {t_enc:>10.2?}",
        prompt.len(),
        ids.len()
    );
    let (t_plain, plain) = time(50, || tokenizer.encode(&prompt, true, false).unwrap());
    println!(
        "encode, specials as text -> {} tokens:         {t_plain:>10.2?}",
        plain.len()
    );
    let (t_dec, text) = time(50, || tokenizer.decode(&ids, false).unwrap());
    assert_eq!(text, prompt);
    println!(
        "decode {} tokens:                             {t_dec:>10.2?}",
        ids.len()
    );
    let (t_stream, _) = time(50, || {
        let mut d = StreamDecoder::new(&tokenizer, false);
        let mut n = 0;
        for &id in &ids {
            n += d.push(id).unwrap().len();
        }
        n + d.finish().len()
    });
    println!(
        "stream-decode {} tokens:                      {t_stream:>10.2?}",
        ids.len()
    );
}
