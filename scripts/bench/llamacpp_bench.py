#!/usr/bin/env python3
"""Measure llama.cpp on a GGUF model with the same workload as shoal's own benchmark.

Everything goes through llama-cpp-python's low-level ctypes bindings (llama_batch,
llama_decode, ...), so no high-level wrapper overhead or sampler is involved.
Prints exactly one JSON object on stdout; progress and warnings go to stderr.

Workload (must stay identical to the Rust benchmark):
  * prompt token i = 100 + (i * 7919) % 30000; the b8 run gives sequence s the tokens
    with global indices s*16 .. s*16+15, so each sequence has its own prompt;
  * load_ms: llama_model_load_from_file with default (mmap) settings, after an untimed
    load has put the file in the page cache;
  * prefill_N_tps: N prompt tokens in one llama_decode on a fresh context
    (n_batch = n_ubatch = 512, logits for the last token only), N / wall time of the call;
  * prefill_2k_tps: a long context: 2048 prompt tokens on a fresh context in 16 llama_decode
    calls of 128 tokens (as a serving engine schedules a long prompt beside other work),
    logits for the last token only; 2048 / wall time of the 16 calls;
  * decode_b1_tps: 16-token prompt (untimed), then 128 single-token decode steps feeding
    back the argmax; 128 / wall time of the steps (argmax in numpy included);
  * decode_b8_tps: 8 sequences (seq ids 0..7) with their 16-token prompts decoded in one
    batch (untimed), then 64 steps each decoding one batch of 8 tokens, one per sequence;
    8*64 / wall time;
  * peak_rss_mib: ru_maxrss of this process at the end (includes the Python interpreter).
Each figure is measured --repeats times and the best (default) or median is reported.
A fresh model load is not timed inside the throughput figures; one untimed warm-up
decode runs first so page faults on the mapped weights do not land in a timing.

Usage:
  python3 scripts/bench/llamacpp_bench.py --model PATH --threads N [--repeats R] [--stat best|median]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import llama_cpp as L

N_CTX = 2048
N_BATCH = 512
N_UBATCH = 512
B1_PROMPT = 16
B1_STEPS = 128
B8_SEQS = 8
B8_PROMPT = 16
B8_STEPS = 64
PREFILL_SIZES = (128, 512)
LONG_PROMPT = 2048
LONG_CHUNK = 128


def prompt_token(i: int) -> int:
    """Token at global index i of the deterministic benchmark prompt stream."""
    return 100 + (i * 7919) % 30000


@L.llama_log_callback
def _quiet(_level: int, _text: bytes, _user_data: ctypes.c_void_p) -> None:
    return None


def _ggml_commit() -> str | None:
    lib = Path(L.__file__).resolve().parent / "lib" / "libggml-base.so"
    try:
        fn = ctypes.CDLL(str(lib)).ggml_commit
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode()


class Bench:
    """Holds the model, a reusable batch, and the per-figure measurement routines."""

    def __init__(self, model_path: Path, threads: int) -> None:
        self.path = model_path
        self.threads = threads
        self.model: Any = None
        self.n_vocab = 0
        # One batch big enough for every decode call; each call rewrites what it uses.
        self.batch = L.llama_batch_init(max(PREFILL_SIZES), 0, 1)

    def load(self) -> float:
        """Load the model (freeing any previous one) and return the load time in ms."""
        if self.model:
            L.llama_model_free(self.model)
            self.model = None
        params = L.llama_model_default_params()
        t0 = time.perf_counter()
        model = L.llama_model_load_from_file(str(self.path).encode(), params)
        dt = time.perf_counter() - t0
        if not model:
            raise SystemExit(f"llama.cpp could not load {self.path}")
        self.model = model
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        return dt * 1000.0

    def context(self, n_seq: int) -> Any:
        cp = L.llama_context_default_params()
        cp.n_ctx = N_CTX
        cp.n_batch = N_BATCH
        cp.n_ubatch = N_UBATCH
        cp.n_seq_max = n_seq
        cp.n_threads = self.threads
        cp.n_threads_batch = self.threads
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise SystemExit("llama_init_from_model failed")
        return ctx

    def _fill(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, pos, seq_id, want_logits)."""
        b = self.batch
        for i, (tok, pos, seq, want) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if want else 0
        b.n_tokens = len(entries)

    def _decode(self, ctx: Any) -> None:
        rc = L.llama_decode(ctx, self.batch)
        if rc != 0:
            raise SystemExit(f"llama_decode returned {rc}")

    def _argmax(self, ctx: Any, batch_index: int) -> int:
        ptr = L.llama_get_logits_ith(ctx, batch_index)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    # -- figures ---------------------------------------------------------
    def prefill(self, n: int, chunk: int | None = None) -> float:
        """n prompt tokens on a fresh context in llama_decode calls of `chunk` (default: one
        call); n / wall time of the calls."""
        chunk = chunk or n
        ctx = self.context(1)
        try:
            dt = 0.0
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                self._fill([(prompt_token(i), i, 0, i == n - 1) for i in range(start, end)])
                t0 = time.perf_counter()
                self._decode(ctx)
                dt += time.perf_counter() - t0
        finally:
            L.llama_free(ctx)
        return n / dt

    def decode_b1(self) -> float:
        ctx = self.context(1)
        try:
            self._fill([(prompt_token(i), i, 0, i == B1_PROMPT - 1) for i in range(B1_PROMPT)])
            self._decode(ctx)
            tok = self._argmax(ctx, B1_PROMPT - 1)
            t0 = time.perf_counter()
            for step in range(B1_STEPS):
                self._fill([(tok, B1_PROMPT + step, 0, True)])
                self._decode(ctx)
                tok = self._argmax(ctx, 0)
            dt = time.perf_counter() - t0
        finally:
            L.llama_free(ctx)
        return B1_STEPS / dt

    def decode_b8(self) -> float:
        ctx = self.context(B8_SEQS)
        try:
            entries = []
            for s in range(B8_SEQS):
                for i in range(B8_PROMPT):
                    entries.append((prompt_token(s * B8_PROMPT + i), i, s, i == B8_PROMPT - 1))
            self._fill(entries)
            self._decode(ctx)
            toks = [self._argmax(ctx, s * B8_PROMPT + B8_PROMPT - 1) for s in range(B8_SEQS)]
            t0 = time.perf_counter()
            for step in range(B8_STEPS):
                self._fill([(toks[s], B8_PROMPT + step, s, True) for s in range(B8_SEQS)])
                self._decode(ctx)
                toks = [self._argmax(ctx, s) for s in range(B8_SEQS)]
            dt = time.perf_counter() - t0
        finally:
            L.llama_free(ctx)
        return B8_SEQS * B8_STEPS / dt

    def warm_up(self) -> None:
        ctx = self.context(1)
        try:
            self._fill([(prompt_token(i), i, 0, i == B1_PROMPT - 1) for i in range(B1_PROMPT)])
            self._decode(ctx)
        finally:
            L.llama_free(ctx)

    def close(self) -> None:
        L.llama_batch_free(self.batch)
        if self.model:
            L.llama_model_free(self.model)
            self.model = None


def _cpu_busy_fraction(window_s: float = 0.5) -> float | None:
    """Share of all CPUs busy during a short idle window of ours, i.e. other work."""

    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    a = sample()
    time.sleep(window_s)
    b = sample()
    if a is None or b is None or b[0] == a[0]:
        return None
    return 1.0 - (b[1] - a[1]) / (b[0] - a[0])


def _pick(values: list[float], stat: str, higher_is_better: bool) -> float:
    if stat == "median":
        return statistics.median(values)
    return max(values) if higher_is_better else min(values)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stat", choices=("best", "median"), default="best")
    args = ap.parse_args()
    if args.threads < 1 or args.repeats < 1:
        ap.error("--threads and --repeats must be at least 1")
    if not args.model.is_file():
        print(f"model not found: {args.model}", file=sys.stderr)
        return 2

    busy = _cpu_busy_fraction()
    if busy is not None and busy > 0.1:
        print(
            f"warning: {busy:.0%} of the CPUs were busy with other work just before the run; "
            "the figures will be skewed",
            file=sys.stderr,
        )

    L.llama_log_set(_quiet, ctypes.c_void_p(0))
    L.llama_backend_init()
    bench = Bench(args.model, args.threads)
    try:
        bench.load()  # warms the page cache and llama.cpp's one-time initialisation
        load_times = [bench.load() for _ in range(args.repeats)]
        bench.warm_up()
        figures: dict[str, Callable[[], float]] = {
            "prefill_128_tps": lambda: bench.prefill(128),
            "prefill_512_tps": lambda: bench.prefill(512),
            "prefill_2k_tps": lambda: bench.prefill(LONG_PROMPT, LONG_CHUNK),
            "decode_b1_tps": bench.decode_b1,
            "decode_b8_tps": bench.decode_b8,
        }
        results: dict[str, float] = {}
        for name, fn in figures.items():
            runs = []
            for r in range(args.repeats):
                runs.append(fn())
                print(f"{name} run {r + 1}/{args.repeats}: {runs[-1]:.1f}", file=sys.stderr)
            results[name] = round(_pick(runs, args.stat, True), 2)
    finally:
        bench.close()

    peak_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {
        "engine": "llama.cpp",
        "version": f"llama-cpp-python {L.__version__} / libllama {L.llama_version().decode()} / ggml {_ggml_commit()}",
        "threads": args.threads,
        "load_ms": round(_pick(load_times, args.stat, False), 3),
        **results,
        "peak_rss_mib": round(peak_rss_kib / 1024.0, 1),
        "model_bytes": args.model.stat().st_size,
        "stat": args.stat,
        "repeats": args.repeats,
        "n_ctx": N_CTX,
        "n_batch": N_BATCH,
        "n_ubatch": N_UBATCH,
        "kv_type": "f16",
        "flash_attn": "auto",
        "other_cpu_busy_at_start": None if busy is None else round(busy, 3),
        "cpu_features": L.llama_print_system_info().decode().strip(),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
