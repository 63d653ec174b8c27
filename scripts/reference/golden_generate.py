#!/usr/bin/env python3
"""Produce the greedy-generation golden file that the Rust engine is checked against.

llama.cpp (through llama-cpp-python's low-level ctypes API) is the reference. Every
prompt is tokenized by llama.cpp, evaluated, and then extended one token at a time by
taking the argmax of the logits ourselves (no llama.cpp sampler, so no hidden sampling
settings can leak into the reference). Alongside the tokens we keep the top-1/top-2
logit gap of every step, so a later mismatch on a near-tie can be told apart from a
real bug, and the top-5 logits of the first step.

Two extra runs per prompt make the reference's own sensitivity visible:
  * the prompt fed one token per llama_decode call instead of one batch;
  * flash attention forced off (the CPU default "auto" resolves to on).
Their agreement with the main run is recorded per prompt and summarised at the top.

The output contains no timestamps, so two runs on the same machine must produce
byte-identical files; `--check` regenerates and compares against an existing file.

Usage:
  python3 scripts/reference/golden_generate.py [--model PATH] [--out PATH] [--check]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

# Spin-waiting OpenMP workers crawl when the 2 cores are shared with other jobs; the
# wait policy changes scheduling only, never which thread computes which rows.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jinja2  # noqa: E402
import jinja2.ext
import jinja2.sandbox  # noqa: E402
import numpy as np  # noqa: E402

import llama_cpp as L  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = REPO_ROOT / "tests" / "golden" / "smollm2-135m-greedy.json"

N_THREADS = 2
N_CTX = 2048
N_BATCH = 2048
N_UBATCH = 512
MAX_NEW_TOKENS = 64
# The brief's stop set: <|endoftext|> (0) and <|im_end|> (2). llama.cpp additionally
# marks <reponame> (4) as end-of-generation; we record that and flag it if it shows up.
STOP_IDS = (0, 2)
TOP_K_FIRST_STEP = 5

# ---------------------------------------------------------------------------
# Prompts. Plain completions are tokenized as raw text; chat conversations are
# rendered with the model's own chat template first.
# ---------------------------------------------------------------------------

LONG_PLAIN = (
    "A distributed inference engine splits a language model across several small "
    "machines that are connected by an ordinary network. Each machine holds a "
    "contiguous range of transformer layers in memory, receives the hidden state "
    "from the machine before it, runs its layers, and forwards the result to the "
    "next one. The first machine also owns the token embedding table, and the last "
    "machine owns the final normalisation and the output projection that turns the "
    "hidden state into logits over the vocabulary. Because every token has to travel "
    "through the whole chain, the latency of a single generated token is the sum of "
    "the compute time on every machine plus the time spent on each network hop. "
    "Batching several independent requests together hides part of that cost, since "
    "the network messages grow only slightly while the amount of useful work per "
    "message grows linearly. The main difficulty, however, is"
)

MEDIUM_PLAIN = (
    "Photosynthesis is the process by which green plants, algae and some bacteria "
    "convert light energy into chemical energy. During this process, carbon dioxide "
    "and water are combined to form glucose, and oxygen is released as a by-product. "
    "The reaction takes place mainly in the leaves, inside small structures called"
)

LONG_CHAT_TEXT = (
    "The lighthouse on the northern cape was built in 1874 after a series of "
    "shipwrecks convinced the harbour authority that the rocky coastline needed a "
    "permanent light. For almost a century it was operated by a family of keepers "
    "who lived in a small stone cottage next to the tower, trimming the wicks every "
    "night and winding the clockwork that turned the lens. In 1968 the light was "
    "automated and the last keeper moved to the village, but the cottage was kept "
    "as a museum. Today visitors can climb the 112 steps to the lantern room, where "
    "the original glass lens is still in place, and on clear days they can see the "
    "islands more than forty kilometres away."
)

PLAIN_PROMPTS: list[tuple[str, str]] = [
    ("plain-capital-france", "The capital of France is"),
    ("plain-fibonacci", "def fibonacci(n):"),
    ("plain-planets-list", "Here is a list of the planets in our solar system:\n1."),
    (
        "plain-story-opening",
        "Once upon a time, in a small village at the edge of a dark forest, there lived",
    ),
    ("plain-counting", "1, 2, 3, 4, 5,"),
    (
        "plain-question-answer",
        "Question: What is the boiling point of water at sea level in degrees Celsius?\nAnswer:",
    ),
    ("plain-hello", "Hello"),
    (
        "plain-python-numpy",
        "import numpy as np\n\n\n# Compute the mean of each row of a matrix.\ndef row_means(matrix):\n    ",
    ),
    (
        "plain-unicode-prices",
        "Café au lait costs 3,50 € in Paris — about $3.80 in   New York 🗽.\n"
        "Translate to French: \"Good morning, my friend\" =>",
    ),
    ("plain-photosynthesis", MEDIUM_PLAIN),
    ("plain-long-distributed", LONG_PLAIN),
    (
        "plain-recipe",
        "Ingredients:\n- 2 cups flour\n- 1 cup sugar\n- 3 eggs\n- 1/2 cup butter\n\nInstructions:\n1.",
    ),
]

CHAT_PROMPTS: list[tuple[str, list[dict[str, str]]]] = [
    ("chat-capital-france", [{"role": "user", "content": "What is the capital of France?"}]),
    (
        "chat-system-sky",
        [
            {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
    ),
    (
        "chat-factorial-code",
        [
            {
                "role": "user",
                "content": "Write a Python function that returns the factorial of a number.",
            }
        ],
    ),
    (
        "chat-multiturn-name",
        [
            {"role": "user", "content": "Hi! My name is Alice."},
            {"role": "assistant", "content": "Hello Alice! How can I help you today?"},
            {"role": "user", "content": "What is my name?"},
        ],
    ),
    ("chat-primary-colors", [{"role": "user", "content": "List three primary colors."}]),
    (
        "chat-system-math",
        [
            {"role": "system", "content": "You are a patient math tutor for children."},
            {"role": "user", "content": "What is 12 times 13?"},
        ],
    ),
    (
        "chat-translate-spanish",
        [{"role": "user", "content": "Translate 'thank you very much' into Spanish."}],
    ),
    (
        "chat-system-multiturn-rome",
        [
            {"role": "system", "content": "You are a friendly travel guide."},
            {"role": "user", "content": "I am visiting Rome for two days."},
            {
                "role": "assistant",
                "content": "Great choice! Rome has a lot to offer, from ancient ruins to "
                "wonderful food. Do you prefer history, art or food?",
            },
            {"role": "user", "content": "History. What should I see first?"},
        ],
    ),
    (
        "chat-summarize-long",
        [
            {
                "role": "user",
                "content": "Summarize the following text in one sentence.\n\n" + LONG_CHAT_TEXT,
            }
        ],
    ),
    ("chat-haiku-ocean", [{"role": "user", "content": "Write a haiku about the ocean."}]),
    ("chat-hello", [{"role": "user", "content": "hello"}]),
    (
        "chat-multiturn-counting",
        [
            {"role": "user", "content": "Let's count together, one number each. 1"},
            {"role": "assistant", "content": "2"},
            {"role": "user", "content": "3"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "5"},
        ],
    ),
]

# ---------------------------------------------------------------------------
# llama.cpp plumbing
# ---------------------------------------------------------------------------

_LOG_LINES: list[str] = []


@L.llama_log_callback
def _log_sink(_level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # Kept (not printed) so that facts llama.cpp only reports in its log, such as
    # how "auto" flash attention resolved, can be recorded.
    _LOG_LINES.append(text.decode("utf-8", "replace"))


def _ggml_info() -> dict[str, str]:
    """ggml's version and commit are only exported by libggml-base, not by the bindings."""
    lib_dir = Path(L.__file__).resolve().parent / "lib"
    out: dict[str, str] = {}
    try:
        lib = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
        for name in ("ggml_version", "ggml_commit"):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_char_p
            out[name] = fn().decode()
    except (OSError, AttributeError):
        pass
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Reference:
    """One loaded model plus the helpers to tokenize, render and decode greedily."""

    def __init__(self, model_path: Path) -> None:
        L.llama_log_set(_log_sink, ctypes.c_void_p(0))
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        _LOG_LINES.clear()
        self.model = L.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {model_path}")
        # The default load mode is "auto"; only the log says what it resolved to.
        found = re.search(r"load_mode = (\w+)", "".join(_LOG_LINES))
        self.load_mode_resolved = found.group(1) if found else "unknown"
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.load_mode = L.llama_load_mode_name(mparams.load_mode)

    # -- metadata --------------------------------------------------------
    def meta(self, key: str) -> str | None:
        size = 1 << 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = L.llama_model_meta_val_str(self.model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8")
            size = n + 1

    def token_text(self, tok: int) -> str:
        return L.llama_vocab_get_text(self.vocab, tok).decode("utf-8")

    # -- tokenizer -------------------------------------------------------
    def tokenize(self, text: str, parse_special: bool) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, raw, len(raw), buf, cap, True, parse_special)
        if n < 0:
            raise RuntimeError(f"tokenize needed {-n} slots, had {cap}")
        return list(buf[:n])

    def detokenize(self, toks: list[int]) -> str:
        if not toks:
            return ""
        arr = (L.llama_token * len(toks))(*toks)
        cap = 64 * len(toks) + 64
        buf = ctypes.create_string_buffer(cap)
        n = L.llama_detokenize(self.vocab, arr, len(toks), buf, cap, False, False)
        if n < 0:
            raise RuntimeError("detokenize buffer too small")
        return buf.raw[:n].decode("utf-8", "replace")

    # -- context ---------------------------------------------------------
    def new_context(self, flash_attn: int) -> Any:
        cp = L.llama_context_default_params()
        cp.n_ctx = N_CTX
        cp.n_batch = N_BATCH
        cp.n_ubatch = N_UBATCH
        cp.n_seq_max = 1
        cp.n_threads = N_THREADS
        cp.n_threads_batch = N_THREADS
        cp.flash_attn_type = flash_attn
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise SystemExit("llama_init_from_model failed")
        return ctx

    def _decode(self, ctx: Any, toks: list[int], start_pos: int, want_last: bool) -> None:
        n = len(toks)
        batch = L.llama_batch_init(n, 0, 1)
        try:
            for i, t in enumerate(toks):
                batch.token[i] = t
                batch.pos[i] = start_pos + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if (want_last and i == n - 1) else 0
            batch.n_tokens = n
            rc = L.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
        finally:
            L.llama_batch_free(batch)

    def _last_logits(self, ctx: Any) -> np.ndarray:
        ptr = L.llama_get_logits_ith(ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def generate(self, ctx: Any, prompt: list[int], batched_prompt: bool) -> dict[str, Any]:
        """Greedy generation from a cleared KV cache; returns tokens, gaps, first logits."""
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        if batched_prompt:
            self._decode(ctx, prompt, 0, True)
        else:
            for i, t in enumerate(prompt):
                self._decode(ctx, [t], i, i == len(prompt) - 1)
        logits = self._last_logits(ctx)
        first_logits = logits
        out: list[int] = []
        gaps: list[float] = []
        pos = len(prompt)
        stop_reason = "max_new_tokens"
        for _ in range(MAX_NEW_TOKENS):
            # np.argmax breaks ties towards the lowest id.
            tok = int(np.argmax(logits))
            second = float(np.partition(logits, -2)[-2])
            gaps.append(float(logits[tok]) - second)
            out.append(tok)
            if tok in STOP_IDS:
                stop_reason = "eog"
                break
            if len(out) == MAX_NEW_TOKENS:
                break
            self._decode(ctx, [tok], pos, True)
            pos += 1
            logits = self._last_logits(ctx)
        return {
            "tokens": out,
            "gaps": gaps,
            "first_logits": first_logits,
            "stop_reason": stop_reason,
        }


# ---------------------------------------------------------------------------
# Chat template rendering the way Hugging Face transformers does it
# ---------------------------------------------------------------------------


def render_chat(template_src: str, messages: list[dict[str, str]], bos: str, eos: str) -> str:
    def raise_exception(msg: str) -> None:
        raise jinja2.exceptions.TemplateError(msg)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template_src).render(
        messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos
    )


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _top_k(logits: np.ndarray, k: int) -> list[list[float]]:
    # Stable sort on the negated values keeps the lowest id first among equal logits.
    order = np.argsort(-logits, kind="stable")[:k]
    return [[int(i), float(logits[i])] for i in order]


def _variant_report(main: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    div = _first_divergence(main["tokens"], other["tokens"])
    diff = np.abs(main["first_logits"] - other["first_logits"])
    top_ids = np.argsort(-main["first_logits"], kind="stable")[:TOP_K_FIRST_STEP]
    rep: dict[str, Any] = {
        "generated_token_ids_match": div is None,
        "first_divergent_step": div,
        "main_gap_at_divergence": None if div is None or div >= len(main["gaps"]) else round(main["gaps"][div], 6),
        "first_step_logits_max_abs_diff": round(float(np.max(diff)), 6),
        "first_step_top5_max_abs_diff": round(float(np.max(diff[top_ids])), 6),
    }
    if div is not None:
        rep["generated_token_ids"] = other["tokens"]
    return rep


def _variant_note(results: list[dict[str, Any]], key: str, label: str) -> str:
    reps = [(r["id"], r["variants"][key]) for r in results]
    diverged = [(pid, rep) for pid, rep in reps if not rep["generated_token_ids_match"]]
    max_logit = max(rep["first_step_logits_max_abs_diff"] for _, rep in reps)
    max_top5 = max(rep["first_step_top5_max_abs_diff"] for _, rep in reps)
    text = f"{label}: "
    if not diverged:
        text += f"identical generations for all {len(reps)} prompts"
    else:
        gaps = [rep["main_gap_at_divergence"] for _, rep in diverged if rep["main_gap_at_divergence"] is not None]
        text += (
            f"generations differ for {len(diverged)} of {len(reps)} prompts ({', '.join(pid for pid, _ in diverged)}); "
            f"the main run's top1-top2 gap at the first divergent step was at most {max(gaps):.4f}"
        )
    text += (
        f". First-step logits: max abs difference {max_logit:.4f} over the full vocabulary, "
        f"{max_top5:.4f} on the main run's top-5 ids."
    )
    return text


def build(model_path: Path) -> dict[str, Any]:
    ref = Reference(model_path)
    template = ref.meta("tokenizer.chat_template")
    if template is None:
        raise SystemExit("model has no tokenizer.chat_template")
    bos_id = L.llama_vocab_bos(ref.vocab)
    eos_id = L.llama_vocab_eos(ref.vocab)
    eot_id = L.llama_vocab_eot(ref.vocab)
    bos_text, eos_text = ref.token_text(bos_id), ref.token_text(eos_id)
    eog_ids = [i for i in range(ref.n_vocab) if L.llama_vocab_is_eog(ref.vocab, i)]

    _LOG_LINES.clear()
    ctx_main = ref.new_context(L.LLAMA_FLASH_ATTN_TYPE_AUTO)
    fa_log = "".join(_LOG_LINES)
    if "Flash Attention enabled" in fa_log:
        fa_resolved = "enabled"
    elif "Flash Attention disabled" in fa_log or "flash_attn = 0" in fa_log:
        fa_resolved = "disabled"
    else:
        fa_resolved = "unknown"
    ctx_nofa = ref.new_context(L.LLAMA_FLASH_ATTN_TYPE_DISABLED)

    cases: list[dict[str, Any]] = []
    for pid, text in PLAIN_PROMPTS:
        cases.append({"id": pid, "kind": "plain", "prompt": text, "rendered": text, "parse_special": False})
    for pid, messages in CHAT_PROMPTS:
        rendered = render_chat(template, messages, bos_text, eos_text)
        cases.append(
            {"id": pid, "kind": "chat", "messages": messages, "rendered": rendered, "parse_special": True}
        )

    results: list[dict[str, Any]] = []
    mismatch_seq: list[str] = []
    mismatch_nofa: list[str] = []
    other_eog_seen: list[str] = []
    for case in cases:
        prompt_ids = ref.tokenize(case["rendered"], case["parse_special"])
        main = ref.generate(ctx_main, prompt_ids, batched_prompt=True)
        seq = ref.generate(ctx_main, prompt_ids, batched_prompt=False)
        nofa = ref.generate(ctx_nofa, prompt_ids, batched_prompt=True)
        seq_rep = _variant_report(main, seq)
        nofa_rep = _variant_report(main, nofa)
        if not seq_rep["generated_token_ids_match"]:
            mismatch_seq.append(case["id"])
        if not nofa_rep["generated_token_ids_match"]:
            mismatch_nofa.append(case["id"])
        if any(t in eog_ids and t not in STOP_IDS for t in main["tokens"]):
            other_eog_seen.append(case["id"])
        gen_ids = main["tokens"]
        entry: dict[str, Any] = {"id": case["id"], "kind": case["kind"]}
        if case["kind"] == "plain":
            entry["prompt"] = case["prompt"]
        else:
            entry["messages"] = case["messages"]
        entry.update(
            {
                "rendered": case["rendered"],
                "parse_special": case["parse_special"],
                "prompt_token_ids": prompt_ids,
                "n_prompt_tokens": len(prompt_ids),
                "generated_token_ids": gen_ids,
                "n_generated": len(gen_ids),
                "stop_reason": main["stop_reason"],
                "generated_text": ref.detokenize(gen_ids),
                "top1_top2_gap": [round(g, 6) for g in main["gaps"]],
                "min_gap": round(min(main["gaps"]), 6),
                "min_gap_step": int(np.argmin(main["gaps"])),
                "first_step_top5": _top_k(main["first_logits"], TOP_K_FIRST_STEP),
                "variants": {
                    "prompt_one_token_per_decode": seq_rep,
                    "flash_attn_disabled": nofa_rep,
                },
            }
        )
        results.append(entry)
        print(
            f"{case['id']:32s} prompt={len(prompt_ids):4d} gen={len(gen_ids):3d} "
            f"min_gap={min(main['gaps']):.4f} seq_ok={seq_rep['generated_token_ids_match']} "
            f"nofa_ok={nofa_rep['generated_token_ids_match']}",
            file=sys.stderr,
        )

    L.llama_free(ctx_main)
    L.llama_free(ctx_nofa)

    notes = [_variant_note(results, "prompt_one_token_per_decode", "Prompt fed one token per llama_decode instead of one batch")]
    notes.append(
        _variant_note(
            results, "flash_attn_disabled", f"Flash attention forced off instead of auto (which resolved to {fa_resolved})"
        )
    )
    notes.append(
        "So llama.cpp does not agree with itself token-for-token across these settings: an engine with "
        "different (even more exact) arithmetic should be expected to diverge at steps whose top1_top2_gap is "
        "of the size quoted above, and a comparison should judge each divergence by the reference gap at "
        "that step (or accept any of the variants' generated_token_ids, recorded when they differ)."
    )
    if other_eog_seen:
        notes.append(f"llama.cpp end-of-generation ids other than {list(STOP_IDS)} were generated in {other_eog_seen}.")
    notes.append(
        "Greedy = argmax of the full-vocab float32 logits computed in Python; ties go to the lowest token id. "
        "generated_token_ids includes the stop token when stop_reason is 'eog'; generated_text is the "
        "llama_detokenize of generated_token_ids with special tokens not rendered."
    )
    notes.append(
        "Each prompt starts from a cleared KV cache (llama_memory_clear); prompt positions start at 0; "
        "no BOS is added (tokenizer.ggml.add_bos_token is false)."
    )

    sysinfo = L.llama_print_system_info().decode().strip()
    return {
        "schema_version": 1,
        "description": "Greedy generations of llama.cpp on SmolLM2-135M-Instruct Q4_1, the reference for shoal.",
        "generator": "scripts/reference/golden_generate.py",
        "model": {
            "file": model_path.name,
            "bytes": model_path.stat().st_size,
            "sha256": _sha256(model_path),
            "general.name": ref.meta("general.name"),
            "chat_template": template,
        },
        "reference": {
            "engine": "llama.cpp",
            "llama_cpp_python": L.__version__,
            "llama_version": L.llama_version().decode(),
            **_ggml_info(),
            "system_info": sysinfo,
        },
        "settings": {
            "n_threads": N_THREADS,
            "n_threads_batch": N_THREADS,
            "n_ctx": N_CTX,
            "n_batch": N_BATCH,
            "n_ubatch": N_UBATCH,
            "n_seq_max": 1,
            "type_k": "f16",
            "type_v": "f16",
            "flash_attn": "auto",
            "flash_attn_resolved": fa_resolved,
            "load_mode": ref.load_mode.decode() if ref.load_mode else None,
            "load_mode_resolved": ref.load_mode_resolved,
            "max_new_tokens": MAX_NEW_TOKENS,
            "sampling": "greedy argmax over logits, ties to lowest id",
            "stop_token_ids": list(STOP_IDS),
            "llama_cpp_eog_token_ids": eog_ids,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "eot_token_id": eot_id,
            "add_bos": bool(L.llama_vocab_get_add_bos(ref.vocab)),
            "tokenize_add_special": True,
            "tokenize_parse_special": {"plain": False, "chat": True},
            "chat_template_render": {
                "engine": "jinja2 ImmutableSandboxedEnvironment",
                "trim_blocks": True,
                "lstrip_blocks": True,
                "add_generation_prompt": True,
                "bos_token": bos_text,
                "eos_token": eos_text,
            },
            "prompt_eval": "whole prompt in one llama_batch, logits only for the last token",
        },
        "notes": notes,
        "deterministic_check": "no timestamps or random state; `golden_generate.py --check` regenerated this file byte for byte before it was committed",
        "prompts": results,
    }


def default_model() -> Path:
    base = os.environ.get("SHOAL_MODEL_DIR")
    if base:
        return Path(base) / MODEL_FILE
    return Path.home() / ".cache" / "shoal" / "models" / MODEL_FILE


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=default_model())
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument(
        "--check",
        action="store_true",
        help="regenerate and compare with --out instead of writing it (exit 1 on any difference)",
    )
    args = ap.parse_args()
    if not args.model.is_file():
        print(f"model not found: {args.model}", file=sys.stderr)
        return 2

    data = build(args.model)
    text = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    if args.check:
        old = args.out.read_text(encoding="utf-8")
        if old == text:
            print(f"OK: regenerated output is identical to {args.out}", file=sys.stderr)
            return 0
        old_data = json.loads(old)
        old_by_id = {p["id"]: p for p in old_data.get("prompts", [])}
        for p in data["prompts"]:
            o = old_by_id.get(p["id"])
            if o is None or o != p:
                print(f"DIFF: prompt {p['id']}", file=sys.stderr)
        for key in ("model", "reference", "settings", "notes"):
            if old_data.get(key) != data.get(key):
                print(f"DIFF: {key}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(data['prompts'])} prompts)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
