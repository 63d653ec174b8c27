#!/usr/bin/env bash
# What mutual TLS on the cluster's links costs, in one run on loopback with the default model:
#  1. per-hop latency: a unary gRPC call over one link, with mTLS and the authorization layer,
#     mTLS alone, and plaintext (the shoal-net `latency` example);
#  2. gateway requests/s: 1-token completions of a 1-token prompt through the coordinator's
#     gateway and one gRPC hop to an agent, 8 at a time, and p50/p99 latency one at a time, on a
#     cluster with mTLS and on the same cluster started with --insecure-plaintext. The mTLS
#     cluster runs twice (before and after) so drift on a shared machine shows.
# Usage: bash scripts/bench/mtls_bench.sh [requests-per-run]   (needs `shoal model fetch`)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/bench/lib.sh
requests=${1:-600}

echo "== per-hop latency of one gRPC call (2000 calls each)"
cargo run -q --release -p shoal-net --example latency -- 2000

echo "== gateway: 1-token completions through one gRPC hop, $requests requests per run"
echo '{"prompt": "Hi"}' >"$work/tiny.jsonl"
small=(--requests "$requests" --max-tokens 1 --no-stream --warmup 40 --completions --prompts "$work/tiny.jsonl")
run() { # $1 = label; the cluster is up
  bench http://127.0.0.1:18181/v1 --concurrency 8 "${small[@]}" >"$work/$1-c8.json"
  bench http://127.0.0.1:18181/v1 --concurrency 1 "${small[@]}" >"$work/$1-c1.json"
  printf '%-10s %8.1f req/s (8 at a time) · one at a time: p50 %6.2f ms p99 %6.2f ms · failed %s\n' "$1" \
    "$(field "$work/$1-c8.json" "r['requests_per_second']")" \
    "$(field "$work/$1-c1.json" "r['e2e_ms']['p50']")" \
    "$(field "$work/$1-c1.json" "r['e2e_ms']['p99']")" \
    "$(field "$work/$1-c8.json" "r['requests_failed'] + 0")"
}
for mode in mtls plaintext mtls-again; do
  if [[ $mode == plaintext ]]; then TLS=(--insecure-plaintext); else TLS=(--cluster-dir "$work/cluster"); fi
  start_cluster 1
  run "$mode"
  stop_cluster
done
python3 - "$work" <<'PY'
import json, sys
w = sys.argv[1]
r = lambda m, c: json.load(open(f"{w}/{m}-{c}.json"))
tls = (r("mtls", "c8")["requests_per_second"] + r("mtls-again", "c8")["requests_per_second"]) / 2
plain = r("plaintext", "c8")["requests_per_second"]
p50 = (r("mtls", "c1")["e2e_ms"]["p50"] + r("mtls-again", "c1")["e2e_ms"]["p50"]) / 2
print(f"mTLS / plaintext: {tls / plain:.3f}x requests/s; p50 latency {p50:.2f} ms vs "
      f"{r('plaintext', 'c1')['e2e_ms']['p50']:.2f} ms")
PY
