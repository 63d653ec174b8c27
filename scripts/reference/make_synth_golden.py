#!/usr/bin/env python3
"""Record llama.cpp's logits for the tiny synthetic models, so the Rust runtime can be checked
against llama.cpp on both architectures (llama and qwen2) without any downloaded model.

For each tiny preset, the model is written by shoal-synth (`cargo run --example synth`), then
llama.cpp (llama-cpp-python) evaluates a fixed prompt with logits for every position, and
extends it greedily (argmax taken here, one token per decode). The golden file records the
spec (which regenerates the identical model: generation is deterministic), the model's
SHA-256 and size, the prompt and its llama.cpp token ids, every position's full logit vector,
and the greedy continuation with each step's top-1/top-2 logit gap.

Outputs tests/golden/tiny_llama_logits.json and tests/golden/tiny_qwen2_logits.json. The files
contain no timestamps: `--check` regenerates into memory and fails if they differ.

Usage:
  python3 scripts/reference/make_synth_golden.py [--check] [--keep-models DIR | --models DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

import llama_cpp  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
GOLDEN_DIR = REPO_ROOT / "tests" / "golden"
PRESETS = ("tiny_llama", "tiny_qwen2")
PROMPT = "The river and the town were quiet in the winter"
N_GREEDY = 8
N_CTX = 64
DECIMALS = 5


def write_model(preset: str, out: Path) -> dict:
    env = dict(os.environ)
    env.setdefault("CARGO_TARGET_DIR", str(Path.home() / ".cache/shoal/target-shoal-synth"))
    subprocess.run(
        ["cargo", "run", "-q", "-p", "shoal-synth", "--example", "synth", "--", preset, str(out)],
        cwd=REPO_ROOT,
        env=env,
        check=True,
    )
    return json.loads(Path(str(out) + ".spec.json").read_text())


def run_llama(path: Path) -> dict:
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=N_CTX,
        n_batch=N_CTX,
        n_threads=2,
        logits_all=True,
        flash_attn=False,
        seed=0,
        verbose=False,
    )
    tokens = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    greedy: list[int] = []
    gaps: list[float] = []
    for _ in range(N_GREEDY):
        last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        order = np.argsort(-last, kind="stable")
        greedy.append(int(order[0]))
        gaps.append(round(float(last[order[0]] - last[order[1]]), DECIMALS))
        llm.eval([int(order[0])])
    return {
        "prompt_tokens": [int(t) for t in tokens],
        "logits": [[round(float(x), DECIMALS) for x in row] for row in logits],
        "greedy": greedy,
        "greedy_top2_gap": gaps,
    }


def golden_for(preset: str, model_dir: Path, prewritten: bool) -> dict:
    path = model_dir / f"{preset}.gguf"
    if prewritten:
        spec = json.loads(Path(str(path) + ".spec.json").read_text())
    else:
        spec = write_model(preset, path)
    data = path.read_bytes()
    result = run_llama(path)
    return {
        "generator": "scripts/reference/make_synth_golden.py",
        "reference": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}, flash attention off",
        "preset": preset,
        "spec": spec,
        "model_sha256": hashlib.sha256(data).hexdigest(),
        "model_bytes": len(data),
        "prompt": PROMPT,
        "add_bos": False,
        **result,
    }


def render(golden: dict) -> str:
    # One logit row per line keeps diffs readable.
    rows = golden.pop("logits")
    text = json.dumps(golden, indent=2)
    logit_lines = ",\n".join("    " + json.dumps(r) for r in rows)
    return text[:-2] + ',\n  "logits": [\n' + logit_lines + "\n  ]\n}\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the committed files")
    ap.add_argument("--keep-models", type=Path, help="write the models here instead of a temp dir")
    ap.add_argument(
        "--models",
        type=Path,
        help="use models already written here (PRESET.gguf + PRESET.gguf.spec.json by the synth example)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.models or args.keep_models or Path(tmp)
        model_dir.mkdir(parents=True, exist_ok=True)
        status = 0
        for preset in PRESETS:
            text = render(golden_for(preset, model_dir, args.models is not None))
            out = GOLDEN_DIR / f"{preset}_logits.json"
            if args.check:
                same = out.exists() and out.read_text() == text
                print(f"{out.relative_to(REPO_ROOT)}: {'identical' if same else 'DIFFERS'}")
                status |= 0 if same else 1
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(text)
                print(f"wrote {out.relative_to(REPO_ROOT)}")
        return status


if __name__ == "__main__":
    sys.exit(main())
