#!/usr/bin/env python3
"""Checks shoal's OpenAI-compatible gateway with the official `openai` Python client.

Usage: openai_client_check.py BASE_URL [--model ID] [--api-key KEY]

BASE_URL is the API root including /v1, e.g. http://127.0.0.1:8080/v1. The script lists the
models, runs a non-streamed and a streamed chat completion (with usage), a text completion and
two error cases, and asserts on the shapes the client parsed. It exits non-zero on the first
failed check and prints "N passed, 0 failed" when all pass.
"""

import argparse
import os
import sys

import openai
from openai import OpenAI

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


@check
def models_are_listed(client, model):
    models = client.models.list().data
    expect(len(models) >= 1, "at least one model is listed")
    for m in models:
        expect(m.object == "model", f"model object type, got {m.object!r}")
        expect(isinstance(m.id, str) and m.id, "model id is a non-empty string")
        expect(isinstance(m.owned_by, str), "owned_by is a string")
    expect(any(m.id == model for m in models), f"{model!r} is listed")
    one = client.models.retrieve(model)
    expect(one.id == model, "retrieve returns the same id")


@check
def non_streamed_chat(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Say hello."}],
        max_tokens=16,
        temperature=0,
        seed=1,
    )
    expect(r.object == "chat.completion", f"object, got {r.object!r}")
    expect(r.id, "non-empty id")
    expect(isinstance(r.created, int) and r.created > 0, "created is a timestamp")
    expect(r.model == model, f"model echoed, got {r.model!r}")
    expect(len(r.choices) == 1, "exactly one choice")
    c = r.choices[0]
    expect(c.index == 0, "choice index 0")
    expect(c.message.role == "assistant", f"role, got {c.message.role!r}")
    expect(isinstance(c.message.content, str), "content is a string")
    expect(c.finish_reason in ("stop", "length"), f"finish_reason, got {c.finish_reason!r}")
    u = r.usage
    expect(u is not None, "usage present")
    expect(u.prompt_tokens > 0, "prompt tokens counted")
    expect(1 <= u.completion_tokens <= 16 or (u.completion_tokens == 0 and c.finish_reason == "stop"),
           f"completion tokens within max_tokens, got {u.completion_tokens}")
    expect(u.total_tokens == u.prompt_tokens + u.completion_tokens, "total = prompt + completion")
    if c.finish_reason == "length":
        expect(u.completion_tokens == 16, "length finish means max_tokens were generated")


@check
def streamed_chat_with_usage(client, model):
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    expect(len(chunks) >= 3, f"role, finish and usage chunks at least, got {len(chunks)}")
    ids = {ch.id for ch in chunks}
    expect(len(ids) == 1, f"one id across chunks, got {ids}")
    for ch in chunks:
        expect(ch.object == "chat.completion.chunk", f"chunk object, got {ch.object!r}")
    expect(chunks[0].choices[0].delta.role == "assistant", "first chunk carries the role")
    finishing = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason is not None]
    expect(len(finishing) == 1, f"exactly one chunk with finish_reason, got {len(finishing)}")
    expect(finishing[0].choices[0].finish_reason in ("stop", "length"), "finish reason value")
    last = chunks[-1]
    expect(last.choices == [], "usage chunk has empty choices")
    expect(last.usage is not None, "usage chunk carries usage")
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    expect(isinstance(text, str), "content deltas join to a string")
    expect(last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens,
           "stream usage totals add up")
    expect(last.usage.completion_tokens <= 12, "stream respects max_tokens")


@check
def text_completion(client, model):
    r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
    expect(r.object == "text_completion", f"object, got {r.object!r}")
    expect(len(r.choices) == 1 and isinstance(r.choices[0].text, str), "one text choice")
    expect(r.choices[0].finish_reason in ("stop", "length"), "finish reason value")
    expect(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "usage adds up")


@check
def unknown_model_is_not_found(client, model):
    try:
        client.chat.completions.create(model=model + "-does-not-exist",
                                       messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    except openai.NotFoundError as e:
        expect(e.status_code == 404, "status 404")
        expect(e.code == "model_not_found", f"code, got {e.code!r}")
        return
    raise AssertionError("an unknown model was accepted")


@check
def unknown_parameter_is_rejected(client, model):
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=1, extra_body={"definitely_not_a_param": 1})
    except openai.BadRequestError as e:
        expect(e.status_code == 400, "status 400")
        expect(e.param == "definitely_not_a_param", f"param names the field, got {e.param!r}")
        expect(e.type == "invalid_request_error", f"type, got {e.type!r}")
        return
    raise AssertionError("an unknown parameter was accepted")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base_url", help="API root including /v1, e.g. http://127.0.0.1:8080/v1")
    ap.add_argument("--model", help="model id (default: the first listed)")
    ap.add_argument("--api-key", default=os.environ.get("SHOAL_API_KEY", "unused"))
    args = ap.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120)
    model = args.model or client.models.list().data[0].id
    passed = 0
    for fn in CHECKS:
        try:
            fn(client, model)
        except Exception as e:  # report which check failed, then stop
            print(f"FAIL {fn.__name__}: {type(e).__name__}: {e}")
            print(f"{passed} passed, 1 failed")
            return 1
        print(f"ok   {fn.__name__}")
        passed += 1
    print(f"{passed} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
