#!/usr/bin/env python3
"""Check that llama.cpp accepts synthetic GGUF models written by shoal-synth.

Each model is loaded with llama-cpp-python and extended greedily by 8 tokens from a short
prompt. Any load or decode failure exits non-zero with the reason; on success one JSON line
per model is printed (architecture, vocabulary size, prompt and generated token ids).

Usage:
  python3 scripts/reference/check_synth_loads.py MODEL.gguf [MODEL.gguf ...]
"""

from __future__ import annotations

import json
import os
import sys

# Spin-waiting OpenMP workers crawl when the 2 cores are shared with other jobs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import llama_cpp  # noqa: E402

PROMPT = b"The river and the town"
N_NEW = 8


def check(path: str) -> dict:
    llm = llama_cpp.Llama(
        model_path=path, n_ctx=64, n_threads=2, n_batch=64, seed=0, verbose=False
    )
    prompt = llm.tokenize(PROMPT, add_bos=False, special=False)
    if not prompt:
        raise RuntimeError("llama.cpp tokenized the prompt to nothing")
    generated: list[int] = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        generated.append(int(token))
        if len(generated) == N_NEW:
            break
    if len(generated) != N_NEW:
        raise RuntimeError(f"generated {len(generated)} tokens, wanted {N_NEW}")
    vocab = llm.n_vocab()
    if any(not 0 <= t < vocab for t in generated):
        raise RuntimeError(f"token id out of range in {generated}")
    meta = llm.metadata
    return {
        "model": os.path.basename(path),
        "arch": meta.get("general.architecture"),
        "n_vocab": vocab,
        "prompt_tokens": [int(t) for t in prompt],
        "generated": generated,
    }


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    failed = False
    for path in argv:
        try:
            print(json.dumps(check(path)))
        except Exception as e:  # noqa: BLE001 - report every model, then fail
            print(f"FAIL {path}: {type(e).__name__}: {e}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
