#!/usr/bin/env bash
# Cluster benchmarks (figures for the cluster's closing notes), on loopback with the default model:
#  1. aggregate output tokens/s under 8 concurrent streams: one agent vs two replicas, each
#     agent pinned to its own core (taskset) with one compute thread;
#  2. gateway overhead: the same 1-token request sent to an agent's own HTTP API and through
#     the coordinator's gateway (HTTP + routing + one mTLS gRPC hop), p50 of end-to-end latency.
# Usage: bash scripts/bench/cluster_bench.sh [requests-per-run]   (needs `shoal model fetch`)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/bench/lib.sh
requests=${1:-48}

echo "== 8 concurrent streams, 64 tokens each, $requests requests, greedy"
for n in ${ONLY:-1 2}; do
  start_cluster "$n"
  bench http://127.0.0.1:18181/v1 --concurrency 8 --requests "$requests" --max-tokens 64 --warmup 8 >"$work/agg$n.json"
  printf '%d agent(s): %s output tok/s, %s req/s, TTFT p50 %s ms, ITL p50 %s ms, errors %s\n' "$n" \
    "$(field "$work/agg$n.json" "round(r['output_tokens_per_second'],1)")" \
    "$(field "$work/agg$n.json" "round(r['requests_per_second'],2)")" \
    "$(field "$work/agg$n.json" "round(r['ttft_ms']['p50'],1)")" \
    "$(field "$work/agg$n.json" "round(r['itl_ms']['p50'],1)")" \
    "$(field "$work/agg$n.json" "r['requests_failed']")"
  if [[ $n == 1 ]]; then
    echo "== gateway overhead: 1-token completions of a 1-token prompt, non-streamed, one at a time"
    echo '{"prompt": "Hi"}' >"$work/tiny.jsonl"
    small=(--concurrency 1 --requests 300 --max-tokens 1 --no-stream --warmup 30 --completions --prompts "$work/tiny.jsonl")
    bench http://127.0.0.1:18191/v1 "${small[@]}" >"$work/direct.json"
    bench http://127.0.0.1:18181/v1 "${small[@]}" >"$work/gateway.json"
    bench http://127.0.0.1:18191/v1 "${small[@]}" >"$work/direct2.json"
    d=$(python3 -c "import json,sys; print(min(json.load(open(f))['e2e_ms']['p50'] for f in sys.argv[1:]))" "$work/direct.json" "$work/direct2.json")
    g=$(field "$work/gateway.json" "r['e2e_ms']['p50']")
    d99=$(field "$work/direct.json" "r['e2e_ms']['p99']"); g99=$(field "$work/gateway.json" "r['e2e_ms']['p99']")
    printf 'agent direct: p50 %.2f ms p99 %.2f ms · through the gateway: p50 %.2f ms p99 %.2f ms · overhead p50 %.2f ms\n' \
      "$d" "$d99" "$g" "$g99" "$(python3 -c "print($g-$d)")"
  fi
  stop_cluster
done
a1=$(field "$work/agg1.json" "r['output_tokens_per_second']"); a2=$(field "$work/agg2.json" "r['output_tokens_per_second']")
printf 'two replicas / one agent: %.2fx (target >= 1.8x)\n' "$(python3 -c "print($a2/$a1)")"
