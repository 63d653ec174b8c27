#!/usr/bin/env python3
"""Record reference tokenizations from llama.cpp for the shoal-tokenizer tests.

Writes crates/shoal-tokenizer/tests/data/*.json:
  bpe_<pre>.json   token ids and detokenized text for the SmolLM2 vocabulary, once with its own
                   pre-tokenizer ("smollm") and once per other pre-tokenizer type (vocab-only GGUF
                   copies with tokenizer.ggml.pre rewritten)
  spm*.json        a small synthetic SentencePiece-style ("llama") vocabulary, committed with its
                   expected tokenizations (the vocabulary is generated deterministically here)
  chat_template.json  chat templates rendered by jinja2 the way Hugging Face transformers does

Needs llama-cpp-python, gguf and jinja2. Usage:
  python3 scripts/reference/tokenizer_golden.py [--model PATH] [--out DIR]
"""

import argparse
import ctypes
import json
import os
import random
import re
import sys
import tempfile

import gguf
import jinja2
import jinja2.ext
import jinja2.sandbox
import llama_cpp as L

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_MODEL = os.path.join(
    os.environ.get("SHOAL_MODEL_DIR", os.path.expanduser("~/.cache/shoal/models")),
    "SmolLM2-135M-Instruct.Q4_1.gguf",
)
DEFAULT_OUT = os.path.join(ROOT, "crates", "shoal-tokenizer", "tests", "data")

TEXTS = [
    "",
    " ",
    "  ",
    "\n",
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "trailing space ",
    "   multiple   spaces   between   words   ",
    "\ttabs\tand\t\ttwo tabs\t",
    "new\nline",
    "\n\n\n",
    "para one\n\n\npara two\r\nwindows\r\n \n",
    "1234567",
    "3.14 and 2.71828, 1,000,000 and the 42nd of 10000 x12345y",
    "don't I'LL we're they've she'd it's I'M YOU'RE 'Ve 'lL",
    "café naïve résumé Ångström straße",
    "日本語のテキストと中文字符，还有标点。",
    "emoji: 🎉🚀 👨‍👩‍👧 ❤️ 🇫🇷",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'fn main() { println!("{}", x.map(|v| v * 2)); }\n\t// done',
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more<|endoftext|>",
    "<|im_start|><|im_start|>",
    "<|im_start",
    "a <|im_end|> b",
    "Mixed   \t \n  whitespace\u00a0nbsp\u2003emspace\u3000ideographic",
    "$$$ 100% @user #tag ~~~ ^^ || <=> ... !!! ???",
    "URL: https://example.com/path?q=1&b=2#frag",
    "'s 's ' s '' 'S",
    "Ⅻ ½ ² ٣ numbers ١٢٣٤",
    "ǅungla ﬁne Ǆ",
    "\u0000\u0001 control chars \u007f\u0085next",
    "a\u0300 combining e\u0301",
    "x" * 50,
    "The quick brown fox jumps over the lazy dog. " * 3,
    "  \n  \n",
    "zqjx 1234567 12 123 zqjxzqjx",
    # Letters, digits and punctuation new in Unicode 16 (unassigned in llama.cpp's tables).
    "a\U00013F72'll \u1C89\u1C8A x\U00010D40\U00010D41 \u1B4E\u1B4F \U0001E5D0\U0001E5F1",
    "end with newline\n",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم",
]

# Random strings drawn from pieces that stress pre-tokenizers (whitespace runs, digits,
# contractions, scripts, special-token fragments) and from all of Unicode; seeded, so the golden
# files are reproducible.
FUZZ_ATOMS = [
    " ", "  ", "\t", "\n", "\r\n", "\n\n", " \n", "\u00a0", "\u3000", "\u2003", "'s", "'S", "'ll",
    "'LL", "'re", "'", "''", "1", "12", "123", "1234", "3.14", "٣", "½", "²", "Ⅻ", "a", "abc", "Hello",
    " world", "É", "é", "e\u0301", "日本", "中文", "🎉", "👨‍👩‍👧", "\u200d", "!", "?!", "...", "$", "+",
    "<", "=", ">", "^", "~", "|", "`", "#", "@", "%", "&", "*", "(", ")", "<|im_start|>", "<|im_end|>",
    "<|im_", "<s>", "</s>", "<|user|>", "<|end|>", "\x00", "\x7f", "\x85", "\x1c", "ǅ", "ﬁ", "ß",
    "İ", "K", "Ω", "ſ", "\u0300", "\ufeff", "\u2581", "_", "-", "x", "the", " the", "zqjx",
]


def fuzz_texts(count, seed=20240229):
    rng = random.Random(seed)

    def code_point(lo, hi):
        while True:
            c = rng.randint(lo, hi)
            if not 0xD800 <= c <= 0xDFFF:
                return chr(c)

    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 16)):
            r = rng.random()
            if r < 0.7:
                parts.append(rng.choice(FUZZ_ATOMS))
            elif r < 0.85:
                parts.append(code_point(0x20, 0x2FF))
            elif r < 0.95:
                parts.append(code_point(0x300, 0xFFFD))
            else:
                parts.append(code_point(0x10000, 0x10FFFF))
        texts.append("".join(parts))
    return texts


# Appended to the SmolLM2 vocabulary in the rewritten-pre copies, so that the pre-tokenizers that
# differ only in how they group digits (llama-bpe: up to three, qwen2: one) and in whether a word
# that is a token skips merging (llama-bpe) produce different tokens.
EXTRA_TOKENS = ["12", "123", "zqjx"]
EXTRA_MERGES = ["1 2", "12 3"]

# Strings that exercise the special-token matcher of the synthetic SentencePiece vocabulary.
SPM_EXTRA_TEXTS = [
    "<s>hello</s>",
    "hi<|user|>there<|end|>",
    " <|user|> spaced <|end|> ",
    "hello world",
    "the thing in the string",
    "Unknown: 日本 and € and é",
]


# --------------------------------------------------------------------------------------------
# llama.cpp access (low-level API, vocabulary only)
# --------------------------------------------------------------------------------------------

L.llama_backend_init()
_LOG_CB = L.llama_log_callback(lambda level, text, user: None)
L.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


class Vocab:
    def __init__(self, path):
        params = L.llama_model_default_params()
        params.vocab_only = True
        self.model = L.llama_model_load_from_file(path.encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_tokens = L.llama_vocab_n_tokens(self.vocab)

    def tokenize(self, text, add_special, parse_special):
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise RuntimeError(f"tokenize failed for {text!r}: {n}")
        return list(buf[:n])

    def piece(self, token, special):
        buf = ctypes.create_string_buffer(512)
        n = L.llama_token_to_piece(self.vocab, token, buf, 512, 0, special)
        if n < 0:
            raise RuntimeError(f"piece of {token} needs {-n} bytes")
        return buf.raw[:n]

    def is_eog(self, token):
        return bool(L.llama_vocab_is_eog(self.vocab, token))


def detok(vocab, ids, special):
    """Concatenated pieces, the way llama-server streams generated text (bytes the vocabulary
    has no token for are dropped by llama.cpp, which can leave invalid UTF-8: replaced)."""
    raw = b"".join(vocab.piece(t, special) for t in ids)
    return raw.decode("utf-8", errors="replace")


def cases_for(vocab, texts):
    cases = []
    for text in texts:
        for add_special, parse_special in ((True, True), (False, False)):
            ids = vocab.tokenize(text, add_special, parse_special)
            cases.append(
                {
                    "text": text,
                    "add_special": add_special,
                    "parse_special": parse_special,
                    "ids": ids,
                    "decoded": detok(vocab, ids, True),
                    "decoded_skip_special": detok(vocab, ids, False),
                }
            )
    return cases


def piece_samples(vocab, ids):
    return [[t, vocab.piece(t, True).hex()] for t in ids]


# --------------------------------------------------------------------------------------------
# GGUF helpers
# --------------------------------------------------------------------------------------------


def read_fields(path):
    reader = gguf.GGUFReader(path)
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = (field.types, field.contents())
    return out


def write_vocab_only(path, fields, overrides):
    """Write a tensor-free GGUF holding `fields` with `overrides` ({key: (types, value)} or None)."""
    merged = dict(fields)
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    arch = merged["general.architecture"][1]
    writer = gguf.GGUFWriter(path, arch)
    for key, (types, value) in merged.items():
        if key == "general.architecture":
            continue
        if types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, types[0], sub_type=types[-1])
        else:
            writer.add_key_value(key, value, types[0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --------------------------------------------------------------------------------------------
# Synthetic SentencePiece vocabulary
# --------------------------------------------------------------------------------------------

SPM_CORPUS = (
    "the quick brown fox jumps over the lazy dog. the thing in the string is interesting. "
    "hello world, hello there! tokenizers split text into pieces; pieces merge by score. "
    "Unknown characters fall back to bytes. The end is near: 0123456789 and café."
)


def build_spm_vocab(n_merges=160):
    """A deterministic BPE-trained piece list in SentencePiece clothing (▁ for spaces, scores
    decreasing with merge order, 256 byte tokens, a few special tokens)."""
    tokens, scores, types = [], [], []

    def add(text, score, ttype):
        tokens.append(text)
        scores.append(float(score))
        types.append(ttype)

    add("<unk>", 0.0, 2)
    add("<s>", 0.0, 3)
    add("</s>", 0.0, 3)
    for b in range(256):
        add(f"<0x{b:02X}>", 0.0, 6)
    add("<|user|>", 0.0, 4)
    add("<|end|>", 0.0, 3)
    add("<unused0>", 0.0, 5)

    words = ["▁" + w for w in SPM_CORPUS.split(" ")]
    alphabet = sorted({c for w in words for c in w})
    for i, c in enumerate(alphabet):
        add(c, -1000.0 - i, 1)
    seqs = [list(w) for w in words]
    for rank in range(n_merges):
        counts = {}
        for seq in seqs:
            for a, b in zip(seq, seq[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        if not counts:
            break
        best = max(sorted(counts), key=lambda p: counts[p])
        merged = best[0] + best[1]
        add(merged, -float(rank), 1)
        for seq in seqs:
            i = 0
            while i < len(seq) - 1:
                if seq[i] == best[0] and seq[i + 1] == best[1]:
                    seq[i : i + 2] = [merged]
                i += 1
    return tokens, scores, types


def spm_fields(base_fields, tokens, scores, types, add_space_prefix):
    keep = {k: v for k, v in base_fields.items() if not k.startswith("tokenizer.")}
    T = gguf.GGUFValueType
    keep["llama.vocab_size"] = ([T.UINT32], len(tokens))
    keep["tokenizer.ggml.model"] = ([T.STRING], "llama")
    keep["tokenizer.ggml.tokens"] = ([T.ARRAY, T.STRING], tokens)
    keep["tokenizer.ggml.scores"] = ([T.ARRAY, T.FLOAT32], scores)
    keep["tokenizer.ggml.token_type"] = ([T.ARRAY, T.INT32], types)
    keep["tokenizer.ggml.bos_token_id"] = ([T.UINT32], 1)
    keep["tokenizer.ggml.eos_token_id"] = ([T.UINT32], 2)
    keep["tokenizer.ggml.unknown_token_id"] = ([T.UINT32], 0)
    keep["tokenizer.ggml.add_bos_token"] = ([T.BOOL], True)
    keep["tokenizer.ggml.add_eos_token"] = ([T.BOOL], False)
    keep["tokenizer.ggml.add_space_prefix"] = ([T.BOOL], add_space_prefix)
    return keep


# --------------------------------------------------------------------------------------------
# Chat templates (rendered the way transformers' apply_chat_template does)
# --------------------------------------------------------------------------------------------

LLAMA3_STYLE = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- if system_message %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role not in ['user', 'assistant'] %}{{- raise_exception('Unsupported role: ' + message.role) }}{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Block-style template relying on trim_blocks/lstrip_blocks, Python string methods and namespace().
PYCOMPAT_STYLE = """{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message.role == 'system' %}
<<SYS>>{{ message.content.strip() }}<</SYS>>
    {% elif message.content.startswith('/') %}
[command {{ message.content[1:].upper() }}]
    {% else %}
        {% set ns.turns = ns.turns + 1 %}
[{{ ns.turns }}] {{ message.role | capitalize }}: {{ message.content.replace('  ', ' ') }}{{ eos_token if message.role == 'assistant' }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
[{{ ns.turns + 1 }}] Assistant:
{%- endif %}
"""

# Python-style tojson (as transformers installs it) and loop controls.
TOJSON_STYLE = (
    "{% for message in messages %}{% if loop.index > 3 %}{% break %}{% endif %}"
    "{% if message.role == 'system' %}{% continue %}{% endif %}"
    "{{ message | tojson }}\n{{ message | tojson(indent=2) }}\n{{ message.content | tojson }}\n"
    "{% endfor %}"
    "{{ {'n': 1.5, 'big': 1e20, 'z': none, 'b': true, 'l': [1, 'two', []], 'e': {}} | tojson(sort_keys=true) }}"
)

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "What is the capital of France?"}],
    "with_system": [
        {"role": "system", "content": "  You are terse.  "},
        {"role": "user", "content": "Hi there!"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two, three."},
        {"role": "user", "content": "/reset"},
        {"role": "user", "content": "Now  backwards,  please.\n"},
    ],
    "unicode": [
        {"role": "system", "content": "Réponds en français 🇫🇷"},
        {"role": "user", "content": "日本語で？ \"quotes\" and {{ braces }}"},
    ],
}


def hf_render(source, messages, add_generation_prompt, bos_token, eos_token):
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    template = env.from_string(source)
    return template.render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
    )


def chat_golden(smollm_template):
    templates = {
        "smollm2": smollm_template,
        "llama3_style": LLAMA3_STYLE,
        "pycompat_style": PYCOMPAT_STYLE,
        "tojson_style": TOJSON_STYLE,
    }
    cases = []
    for tname, source in templates.items():
        for cname, messages in CONVERSATIONS.items():
            for agp in (False, True):
                try:
                    expected = hf_render(source, messages, agp, "<s>", "</s>")
                    error = None
                except jinja2.exceptions.TemplateError as exc:
                    expected, error = None, str(exc)
                cases.append(
                    {
                        "template": tname,
                        "conversation": cname,
                        "add_generation_prompt": agp,
                        "bos_token": "<s>",
                        "eos_token": "</s>",
                        "expected": expected,
                        "error": error,
                    }
                )
    # One conversation that the llama3-style template rejects through raise_exception.
    bad = [{"role": "tool", "content": "42"}]
    try:
        hf_render(LLAMA3_STYLE, bad, False, "<s>", "</s>")
        raise RuntimeError("expected raise_exception to fire")
    except jinja2.exceptions.TemplateError as exc:
        cases.append(
            {
                "template": "llama3_style",
                "conversation": "bad_role",
                "add_generation_prompt": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "expected": None,
                "error": str(exc),
            }
        )
    return {
        "templates": templates,
        "conversations": {**CONVERSATIONS, "bad_role": bad},
        "cases": cases,
    }


# --------------------------------------------------------------------------------------------


def dump(path, obj):
    text = json.dumps(obj, ensure_ascii=False, indent=1)
    # Keep arrays of numbers on one line: the files stay reviewable and small.
    text = re.sub(
        r"\[\s*(-?[\d.e+-]+(?:,\s*-?[\d.e+-]+)*)\s*\]",
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
        text,
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"wrote {os.path.relpath(path, ROOT)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    if not os.path.exists(args.model):
        sys.exit(f"model not found at {args.model}: run `shoal model fetch` first")
    os.makedirs(args.out, exist_ok=True)

    fields = read_fields(args.model)
    model_name = os.path.basename(args.model)
    n_vocab = len(fields["tokenizer.ggml.tokens"][1])
    sample_ids = sorted(set(list(range(0, 40)) + list(range(40, n_vocab, 311)) + [n_vocab - 1]))

    with tempfile.TemporaryDirectory() as tmp:
        T = gguf.GGUFValueType
        for pre in ("smollm", "gpt-2", "default", "llama-bpe", "qwen2"):
            if pre == "smollm":
                path = args.model
                extra_tokens, extra_merges = [], []
            else:
                path = os.path.join(tmp, f"vocab-{pre}.gguf")
                extra_tokens, extra_merges = EXTRA_TOKENS, EXTRA_MERGES
                tokens = fields["tokenizer.ggml.tokens"][1] + extra_tokens
                types = fields["tokenizer.ggml.token_type"][1] + [1] * len(extra_tokens)
                merges = fields["tokenizer.ggml.merges"][1] + extra_merges
                write_vocab_only(
                    path,
                    fields,
                    {
                        "tokenizer.ggml.pre": ([T.STRING], pre),
                        "tokenizer.ggml.tokens": ([T.ARRAY, T.STRING], tokens),
                        "tokenizer.ggml.token_type": ([T.ARRAY, T.INT32], types),
                        "tokenizer.ggml.merges": ([T.ARRAY, T.STRING], merges),
                        "llama.vocab_size": ([T.UINT32], len(tokens)),
                    },
                )
            vocab = Vocab(path)
            assert vocab.n_tokens == n_vocab + len(extra_tokens), (pre, vocab.n_tokens)
            dump(
                os.path.join(args.out, f"bpe_{pre.replace('-', '_')}.json"),
                {
                    "source": f"llama.cpp (llama-cpp-python {L.__version__}) on {model_name}, "
                    f"tokenizer.ggml.pre = {pre!r}",
                    "model_file": model_name,
                    "pre": pre,
                    "extra_tokens": extra_tokens,
                    "extra_merges": extra_merges,
                    "eog_ids": [t for t in range(n_vocab) if vocab.is_eog(t)],
                    "cases": cases_for(vocab, TEXTS + fuzz_texts(100 if pre == "smollm" else 40)),
                    "pieces": piece_samples(vocab, sample_ids + list(range(n_vocab, vocab.n_tokens))),
                },
            )

        tokens, scores, types = build_spm_vocab()
        for name, prefix in (("spm", True), ("spm_noprefix", False)):
            path = os.path.join(tmp, f"{name}.gguf")
            write_vocab_only(path, spm_fields(fields, tokens, scores, types, prefix), {})
            vocab = Vocab(path)
            assert vocab.n_tokens == len(tokens)
            dump(
                os.path.join(args.out, f"{name}.json"),
                {
                    "source": f"llama.cpp (llama-cpp-python {L.__version__}) on a synthetic "
                    "SentencePiece vocabulary built by scripts/reference/tokenizer_golden.py",
                    "vocab": {
                        "tokens": tokens,
                        "scores": scores,
                        "token_types": types,
                        "bos": 1,
                        "eos": 2,
                        "unk": 0,
                        "add_bos": True,
                        "add_eos": False,
                        "add_space_prefix": prefix,
                    },
                    "eog_ids": [t for t in range(len(tokens)) if vocab.is_eog(t)],
                    "cases": cases_for(vocab, TEXTS + SPM_EXTRA_TEXTS + fuzz_texts(60)),
                    "pieces": piece_samples(vocab, list(range(len(tokens)))),
                },
            )

    dump(os.path.join(args.out, "chat_template.json"), chat_golden(fields["tokenizer.chat_template"][1]))


if __name__ == "__main__":
    main()
