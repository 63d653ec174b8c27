#!/usr/bin/env bash
# Chaos harness: a coordinator and agents as processes on loopback serve streamed requests
# while agents are SIGKILLed (or frozen with SIGSTOP: alive, holding their connections, silent)
# on a schedule; every killed agent is restarted, every frozen one let go after FREEZE_SECS,
# and each comes back into service once its model is ready again.
#
#  1. a fault-free run records every request's full output (`shoal bench --record`);
#  2. the same requests again (same prompts, seed of request i = SEED + i) while, every
#     KILL_EVERY seconds, one agent serving the model (picked at random with SEED) is killed,
#     or frozen (FAULTS=kill | freeze | mix: each fault drawn at random with SEED);
#  3. `shoal chaos-report` compares the two: completed %, identical-output %, stall at
#     failover (longest silence of requests that moved, from the gateway's audit log) and
#     detection time (kill -> the coordinator's "declared dead" log line; kill -> the gateway's
#     first "node lost in the middle of a generation" line for that node).
#
# Usage: bash scripts/bench/chaos.sh            (needs `shoal model fetch`)
# Settings (environment): REQUESTS=200 CONCURRENCY=6 MAX_TOKENS=48 TEMPERATURE=0.8 SEED=1
#   KILL_EVERY=10 FAULTS=kill FREEZE_SECS=5 AGENTS=3 REPLICAS=2 THREADS=1
#   KEEP=<dir to keep the files in> SHOAL=<binary>
set -euo pipefail
cd "$(dirname "$0")/../.."
requests=${REQUESTS:-200}
concurrency=${CONCURRENCY:-6}
max_tokens=${MAX_TOKENS:-48}
temperature=${TEMPERATURE:-0.8}
seed=${SEED:-1}
kill_every=${KILL_EVERY:-10}
faults=${FAULTS:-kill}
freeze_secs=${FREEZE_SECS:-5}
case $faults in kill | freeze | mix) ;; *) echo "FAULTS must be kill, freeze or mix" >&2; exit 2 ;; esac
agents=${AGENTS:-3}
replicas=${REPLICAS:-2}
threads=${THREADS:-1}
http_port=18281
grpc_port=17271

# SHOAL=<binary> uses a binary already built.
if [[ -z ${SHOAL:-} ]]; then cargo build --release -p shoal-cli >/dev/null; fi
shoal=${SHOAL:-${CARGO_TARGET_DIR:-$PWD/target}/release/shoal}
work=${KEEP:-$(mktemp -d)}
mkdir -p "$work"
rm -rf "$work"/faults.jsonl "$work"/audit.jsonl "$work"/*.log "$work"/*.pid "$work"/cluster
pids=()
agent_pid() { cat "$work/agent-$1.pid"; }
cleanup() {
  for f in "$work"/agent-*.pid; do
    [[ -f $f ]] && { kill -CONT "$(cat "$f")" 2>/dev/null; kill "$(cat "$f")" 2>/dev/null; } || true
  done
  for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [[ -n ${KEEP:-} ]] || rm -rf "$work"
}
trap cleanup EXIT

now_ms() { date +%s%3N; }
fault() { printf '{"event":"%s","node":"%s","unix_ms":%s}\n' "$1" "$2" "$3" >>"$work/faults.jsonl"; }
status() { "$shoal" status --coordinator 127.0.0.1:$grpc_port --cluster-dir "$work/cluster" 2>/dev/null || true; }
# Nodes alive with every shard ready (or none assigned), one name per line.
ready_nodes() { status | awk '$2 == "alive" && $0 !~ /=(loading|failed)/ { print $1 }'; }
# Nodes alive serving the model (a shard ready).
serving_nodes() { status | awk '$2 == "alive" && /=ready/ { print $1 }'; }

start_agent() { # $1 = index
  local i=$1
  "$shoal" agent --join 127.0.0.1:$grpc_port --name "agent-$i" --threads "$threads" \
    --http 127.0.0.1:$((http_port + 10 + i)) --cluster-dir "$work/cluster" \
    >>"$work/agent-$i.log" 2>&1 &
  echo $! >"$work/agent-$i.pid"
}

# Waits until agent $1 is alive and ready; records when.
wait_ready() {
  for _ in $(seq 600); do
    if ready_nodes | grep -qx "agent-$1"; then fault ready "agent-$1" "$(now_ms)"; return 0; fi
    sleep 0.1
  done
  echo "agent-$1 did not come back" >&2
}

# Kills agent $1, waits for the coordinator to declare it dead, restarts it, waits until ready.
kill_and_restart() {
  local i=$1
  kill -KILL "$(agent_pid "$i")"
  fault kill "agent-$i" "$(now_ms)"
  for _ in $(seq 300); do
    status | awk -v n="agent-$i" '$1 == n && $2 == "dead" { found = 1 } END { exit !found }' && break
    sleep 0.1
  done
  start_agent "$i"
  wait_ready "$i"
}

# Freezes agent $1 for FREEZE_SECS (SIGSTOP, then SIGCONT), waits until it is ready again.
freeze_and_thaw() {
  local i=$1
  kill -STOP "$(agent_pid "$i")"
  fault freeze "agent-$i" "$(now_ms)"
  sleep "$freeze_secs"
  kill -CONT "$(agent_pid "$i")"
  wait_ready "$i"
}

echo "== cluster: coordinator + $agents agents (replicas $replicas, $threads thread(s) each)"
SHOAL_LOG=warn "$shoal" coordinator --listen 127.0.0.1:$http_port --grpc-listen 127.0.0.1:$grpc_port \
  --cluster-dir "$work/cluster" --replicas "$replicas" --audit-log "$work/audit.jsonl" \
  >"$work/coordinator.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do curl -fs 127.0.0.1:$http_port/healthz >/dev/null 2>&1 && break; sleep 0.2; done
for i in $(seq 1 "$agents"); do start_agent "$i"; done
for _ in $(seq 600); do
  [[ $(ready_nodes | wc -l) -ge $agents && $(serving_nodes | wc -l) -ge $replicas ]] && break
  sleep 0.2
done
status

bench=("$shoal" bench --url http://127.0.0.1:$http_port/v1 --json --requests "$requests"
  --concurrency "$concurrency" --max-tokens "$max_tokens" --temperature "$temperature"
  --seed "$seed" --seed-per-request --timeout 120)
echo "== fault-free run: $requests streamed requests, concurrency $concurrency, max_tokens $max_tokens"
"${bench[@]}" --record "$work/reference.jsonl" --request-id-prefix ref >"$work/reference.json"
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{r['wall_seconds']:.1f} s, {r['requests_ok']} ok, {r['output_tokens_per_second']:.0f} tok/s\")" "$work/reference.json"

echo "== chaos run: the same requests, an agent serving the model faulted ($faults) every ${kill_every} s (seed $seed)"
"${bench[@]}" --record "$work/chaos.jsonl" --request-id-prefix chaos >"$work/chaos.json" &
bench_pid=$!
RANDOM=$seed
(
  # Kills on a fixed grid (every KILL_EVERY s from the start), whatever a restart takes.
  next=$(($(now_ms) + kill_every * 1000))
  while true; do
    wait_ms=$((next - $(now_ms)))
    ((wait_ms > 0)) && sleep "$(printf '%d.%03d' $((wait_ms / 1000)) $((wait_ms % 1000)))"
    next=$((next + kill_every * 1000))
    mapfile -t serving < <(serving_nodes)
    if [[ ${#serving[@]} -eq 0 ]]; then echo "no agent serving the model" >&2; continue; fi
    victim=${serving[$((RANDOM % ${#serving[@]}))]}
    kind=$faults
    if [[ $kind == mix ]]; then
      if ((RANDOM % 2 == 0)); then kind=kill; else kind=freeze; fi
    fi
    echo "$kind $victim at $(date +%T.%3N)" >&2
    if [[ $kind == kill ]]; then kill_and_restart "${victim#agent-}"; else freeze_and_thaw "${victim#agent-}"; fi
  done
) &
killer=$!
wait "$bench_pid" || true
kill "$killer" 2>/dev/null || true
wait "$killer" 2>/dev/null || true
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{r['wall_seconds']:.1f} s, {r['requests_ok']} ok, {r['requests_failed']} failed\")" "$work/chaos.json"

# Deaths declared by the coordinator and losses the gateway noticed in a generation, with the
# coordinator log's timestamps.
log_events() { # $1 = event, $2 = log text to match
  sed 's/\x1b\[[0-9;]*m//g' "$work/coordinator.log" | grep "$2" |
    sed -E 's/^([^ ]+) .* node=([^ ]+).*$/\1 \2/' | while read -r ts node; do
      fault "$1" "$node" "$(date -d "$ts" +%s%3N)"
    done
}
log_events dead 'declared dead'
log_events lost 'node lost in the middle of a generation'

echo "== failovers counted by the gateway"
curl -fs 127.0.0.1:$http_port/metrics | grep '^shoal_failovers_total' || true
echo "== report"
"$shoal" chaos-report --reference "$work/reference.jsonl" --run "$work/chaos.jsonl" \
  --audit "$work/audit.jsonl" --faults "$work/faults.jsonl" | tee "$work/report.txt"
"$shoal" chaos-report --reference "$work/reference.jsonl" --run "$work/chaos.jsonl" \
  --audit "$work/audit.jsonl" --faults "$work/faults.jsonl" --json >"$work/report.json"
echo "files in $work"
