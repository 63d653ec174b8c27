#!/usr/bin/env bash
# Chaos harness: a coordinator and agents as processes on loopback serve streamed requests
# while agents are faulted on a schedule, and each comes back into service once its model is
# ready again. The faults (FAULTS):
#   kill    SIGKILL, then a restart;
#   freeze  SIGSTOP for FREEZE_SECS (alive, holding its connections, silent), then SIGCONT;
#   cut     a partition for CUT_SECS: the agent's data plane and its link to the coordinator
#           (heartbeats) carry no bytes, connections stay open; then healed;
#   slow    for SLOW_SECS, the agent's CPU capped at SLOW_CPU_PCT % of one core (a cgroup v1
#           cpu group under /sys/fs/cgroup/cpu; link delay and loss alone when cgroups cannot
#           be written) and its data-plane link delayed by SLOW_DELAY_MS each way with
#           SLOW_LOSS_PCT % loss; then restored. A slow node is not dead: nothing need move;
#   mix     each fault drawn among the four with SEED.
# For cut, slow and mix (or PROXIES=1), every agent runs behind two `shoal fault-proxy`
# processes, as the cluster tests do: one in front of its data-plane listener (the agent
# advertises the proxy's address) and one in front of the coordinator's gRPC port (the agent
# joins through it). The proxy adds a hop to every link.
#
#  1. a fault-free run records every request's full output (`shoal bench --record`);
#  2. the same requests again (same prompts, seed of request i = SEED + i) while, every
#     KILL_EVERY seconds, one agent serving the model (picked at random with SEED) is faulted;
#  3. `shoal chaos-report` compares the two: completed %, identical-output %, stall at
#     failover (longest silence of requests that moved, from the gateway's audit log),
#     detection time (fault -> the coordinator's "declared dead" log line; fault -> the
#     gateway's first "node lost in the middle of a generation" line for that node), and for
#     slowdowns the requests in flight on the slowed node: how many moved, their extra latency.
#
# Usage: bash scripts/bench/chaos.sh            (needs `shoal model fetch`; cut and slow use
#        nftables for real packet loss and cgroups when run as root)
# Settings (environment): REQUESTS=200 CONCURRENCY=6 MAX_TOKENS=48 TEMPERATURE=0.8 SEED=1
#   KILL_EVERY=10 FAULTS=kill (kill | freeze | cut | slow | mix) FREEZE_SECS=5 CUT_SECS=5
#   SLOW_SECS=10 SLOW_CPU_PCT=25 SLOW_DELAY_MS=50 SLOW_LOSS_PCT=1 PROXIES=auto (1: always)
#   AGENTS=3 REPLICAS=2 THREADS=1 KEEP=<dir to keep the files in> SHOAL=<binary>
#   CHECKPOINT_EVERY=0 (N: the coordinator's --checkpoint-every: KV checkpoints to the other
#   replica every N positions, so failovers resume from them) PROMPT_TOKENS= (N: 16 distinct
#   prompts of about N tokens each instead of the built-in short ones) TIMEOUT=120 (seconds per
#   request) FIRST_TOKEN_TIMEOUT_MS=60000 (the gateway's bound on a generation's first token)
#   MAX_FAILOVERS=3 (moves of one generation after a node lost work on it, at most)
#   MAX_MOVES=16 (moves of one generation at most)
#   HALVES=both (reference: the fault-free run only, its record kept in KEEP; chaos: the faulty
#   run only, its outputs compared with REFERENCE=<reference.jsonl of an earlier run with the
#   same settings>: a long run can be split over two sittings)
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
cut_secs=${CUT_SECS:-5}
slow_secs=${SLOW_SECS:-10}
slow_cpu_pct=${SLOW_CPU_PCT:-25}
slow_delay_ms=${SLOW_DELAY_MS:-50}
slow_loss_pct=${SLOW_LOSS_PCT:-1}
case $faults in kill | freeze | cut | slow | mix) ;; *)
  echo "FAULTS must be kill, freeze, cut, slow or mix" >&2; exit 2 ;; esac
# Agents behind fault proxies: needed to cut or slow their links.
case ${PROXIES:-auto} in
  1 | yes) proxies=yes ;;
  auto) [[ $faults == kill || $faults == freeze ]] && proxies=no || proxies=yes ;;
  *) proxies=no ;;
esac
checkpoint_every=${CHECKPOINT_EVERY:-0}
prompt_tokens=${PROMPT_TOKENS:-}
timeout=${TIMEOUT:-120}
first_token_timeout_ms=${FIRST_TOKEN_TIMEOUT_MS:-60000}
max_failovers=${MAX_FAILOVERS:-3}
max_moves=${MAX_MOVES:-16}
halves=${HALVES:-both}
case $halves in
  both | reference) ;;
  chaos) [[ -f ${REFERENCE:-} ]] || { echo "HALVES=chaos needs REFERENCE=<reference.jsonl>" >&2; exit 2; } ;;
  *) echo "HALVES must be both, reference or chaos" >&2; exit 2 ;;
esac
[[ $halves != reference || -n ${KEEP:-} ]] || { echo "HALVES=reference needs KEEP=<dir>" >&2; exit 2; }
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
rm -f "$work"/*.in "$work"/*.out
pids=()
killer=
agent_pid() { cat "$work/agent-$1.pid"; }
cgroup_root=/sys/fs/cgroup/cpu
cpu_group() { echo "$cgroup_root/shoal-chaos-agent-$1"; }
cleanup() {
  [[ -n $killer ]] && kill "$killer" 2>/dev/null || true
  for f in "$work"/agent-*.pid; do
    [[ -f $f ]] && { kill -CONT "$(cat "$f")" 2>/dev/null; kill "$(cat "$f")" 2>/dev/null; } || true
  done
  # Proxies (SIGTERM: each removes its packet-loss rule) and the coordinator.
  for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for i in $(seq 1 "$agents"); do
    local g; g=$(cpu_group "$i")
    [[ -d $g ]] || continue
    while read -r p; do echo "$p" >"$cgroup_root/cgroup.procs"; done <"$g/cgroup.procs" 2>/dev/null || true
    rmdir "$g" 2>/dev/null || true
  done
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

# Fault proxies, by name (data-<i>, control-<i>): the shell's ends of their stdin and stdout.
declare -A proxy_in proxy_out
# Starts `shoal fault-proxy` named $1 listening on $2, forwarding to $3; waits until it listens.
start_proxy() {
  local name=$1 in_fd out_fd line
  mkfifo "$work/$name.in" "$work/$name.out"
  "$shoal" fault-proxy --listen "$2" --upstream "$3" <"$work/$name.in" >"$work/$name.out" \
    2>>"$work/$name.log" &
  pids+=($!)
  exec {in_fd}>"$work/$name.in" {out_fd}<"$work/$name.out"
  proxy_in[$name]=$in_fd
  proxy_out[$name]=$out_fd
  if ! read -r -t 30 -u "$out_fd" line || [[ $line != listening* ]]; then
    echo "fault proxy $name did not start: ${line:-no answer}" >&2
    exit 1
  fi
}
# Sends command $2 to proxy $1; fails unless it answers ok.
proxy_cmd() {
  local answer
  echo "$2" >&"${proxy_in[$1]}"
  if ! read -r -t 30 -u "${proxy_out[$1]}" answer; then
    echo "fault proxy $1: no answer to '$2'" >&2
    return 1
  fi
  [[ $answer == ok* ]] || { echo "fault proxy $1: '$2': $answer" >&2; return 1; }
}
# Agent i's ports behind proxies: its data-plane listener, the proxy in front of it (the
# address it advertises), the proxy in front of the coordinator (the address it joins).
agent_data_port() { echo $((grpc_port + 100 + $1)); }
data_proxy_port() { echo $((grpc_port + 200 + $1)); }
control_proxy_port() { echo $((grpc_port + 300 + $1)); }

start_agent() { # $1 = index
  local i=$1 net=(--join 127.0.0.1:$grpc_port)
  if [[ $proxies == yes ]]; then
    net=(--join "127.0.0.1:$(control_proxy_port "$i")" --listen "127.0.0.1:$(agent_data_port "$i")"
      --advertise "127.0.0.1:$(data_proxy_port "$i")")
  fi
  "$shoal" agent "${net[@]}" --name "agent-$i" --threads "$threads" \
    --http 127.0.0.1:$((http_port + 10 + i)) --cluster-dir "$work/cluster" \
    >>"$work/agent-$i.log" 2>&1 &
  echo $! >"$work/agent-$i.pid"
  # Out of the job table: the shell does not report each kill as a job that died.
  disown "$!" 2>/dev/null || true
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

# Cuts agent $1 off (data plane and coordinator link) for CUT_SECS, heals it, waits until it
# is ready again.
cut_and_heal() {
  local i=$1
  proxy_cmd "data-$i" cut && proxy_cmd "control-$i" cut || true
  fault cut "agent-$i" "$(now_ms)"
  sleep "$cut_secs"
  proxy_cmd "data-$i" heal && proxy_cmd "control-$i" heal || true
  fault heal "agent-$i" "$(now_ms)"
  wait_ready "$i"
}

# Whether this shell may cap a process's CPU with a cgroup v1 cpu group.
cgroups=no
if [[ $faults == slow || $faults == mix ]]; then
  probe="$cgroup_root/shoal-chaos-probe-$$"
  if mkdir "$probe" 2>/dev/null; then
    { echo 100000 >"$probe/cpu.cfs_period_us" && echo 25000 >"$probe/cpu.cfs_quota_us"; } \
      2>/dev/null && cgroups=yes
    rmdir "$probe" 2>/dev/null || true
  fi
fi
# Caps agent $1's CPU (every thread) at SLOW_CPU_PCT % of one core.
cpu_cap() {
  local g; g=$(cpu_group "$1")
  {
    mkdir -p "$g" && echo 100000 >"$g/cpu.cfs_period_us" &&
      echo $((slow_cpu_pct * 1000)) >"$g/cpu.cfs_quota_us" && agent_pid "$1" >"$g/cgroup.procs"
  } 2>/dev/null
}
cpu_uncap() {
  local g; g=$(cpu_group "$1")
  echo -1 >"$g/cpu.cfs_quota_us" 2>/dev/null || true
}

# Slows agent $1 for SLOW_SECS: CPU capped, data-plane link delayed and lossy; then restores.
slow_and_restore() {
  local i=$1 cpu="cpu not capped"
  if [[ $cgroups == yes ]] && cpu_cap "$i"; then cpu="cpu ${slow_cpu_pct}%"; fi
  proxy_cmd "data-$i" "delay $slow_delay_ms" && proxy_cmd "data-$i" "loss $slow_loss_pct" || true
  fault slow "agent-$i" "$(now_ms)"
  echo "  agent-$i: $cpu, link +${slow_delay_ms} ms, ${slow_loss_pct}% loss" >&2
  sleep "$slow_secs"
  cpu_uncap "$i"
  proxy_cmd "data-$i" clear || true
  fault restore "agent-$i" "$(now_ms)"
  # What the cap did: CPU periods throttled, time held back (cumulative for the group).
  if [[ $cpu != "cpu not capped" ]]; then
    awk -v n="agent-$i" '/^nr_throttled/ { p = $2 } /^throttled_time/ { t = $2 }
      END { printf "  %s restored: throttled in %d periods so far, %.1f s held back\n", n, p, t / 1e9 }' \
      "$(cpu_group "$i")/cpu.stat" >&2 || true
  fi
}

echo "== cluster: coordinator + $agents agents (replicas $replicas, $threads thread(s) each)"
SHOAL_LOG=warn "$shoal" coordinator --listen 127.0.0.1:$http_port --grpc-listen 127.0.0.1:$grpc_port \
  --cluster-dir "$work/cluster" --replicas "$replicas" --audit-log "$work/audit.jsonl" \
  --checkpoint-every "$checkpoint_every" --first-token-timeout-ms "$first_token_timeout_ms" \
  --max-failovers "$max_failovers" --max-moves "$max_moves" \
  >"$work/coordinator.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do curl -fs 127.0.0.1:$http_port/healthz >/dev/null 2>&1 && break; sleep 0.2; done
if [[ $proxies == yes ]]; then
  echo "   each agent behind two fault proxies (data plane, coordinator link)"
  for i in $(seq 1 "$agents"); do
    start_proxy "data-$i" "127.0.0.1:$(data_proxy_port "$i")" "127.0.0.1:$(agent_data_port "$i")"
    start_proxy "control-$i" "127.0.0.1:$(control_proxy_port "$i")" "127.0.0.1:$grpc_port"
  done
fi
if [[ $faults == slow || $faults == mix ]]; then
  if [[ $cgroups == yes ]]; then
    echo "   slowdowns: cpu ${slow_cpu_pct}% of a core (cgroup v1), link +${slow_delay_ms} ms, ${slow_loss_pct}% loss, ${slow_secs} s"
  else
    echo "   slowdowns: $cgroup_root cannot be written: link +${slow_delay_ms} ms and ${slow_loss_pct}% loss only, ${slow_secs} s"
  fi
fi
for i in $(seq 1 "$agents"); do start_agent "$i"; done
for _ in $(seq 600); do
  [[ $(ready_nodes | wc -l) -ge $agents && $(serving_nodes | wc -l) -ge $replicas ]] && break
  sleep 0.2
done
status

bench=("$shoal" bench --url http://127.0.0.1:$http_port/v1 --json --requests "$requests"
  --concurrency "$concurrency" --max-tokens "$max_tokens" --temperature "$temperature"
  --seed "$seed" --seed-per-request --timeout "$timeout")
if [[ -n $prompt_tokens ]]; then
  # About 13 tokens per sentence; each prompt starts differently so none shares a prefix.
  python3 - "$prompt_tokens" >"$work/prompts.jsonl" <<'PY'
import json, sys
n = int(sys.argv[1])
sentence = "The tide rises over the grey rocks of the northern shore. "
for i in range(16):
    text = f"Story {i}: " + sentence * max(1, n // 13) + "Summarize it."
    print(json.dumps({"messages": [{"role": "user", "content": text}]}))
PY
  bench+=(--prompts "$work/prompts.jsonl")
  echo "   prompts: 16 of about $prompt_tokens tokens"
fi
if [[ $checkpoint_every -gt 0 ]]; then
  echo "   KV checkpoints to the other replica every $checkpoint_every positions"
fi
if [[ $halves == chaos ]]; then
  echo "== fault-free run: from $REFERENCE"
  [[ $(realpath "$REFERENCE") == $(realpath -m "$work/reference.jsonl") ]] || cp "$REFERENCE" "$work/reference.jsonl"
else
  echo "== fault-free run: $requests streamed requests, concurrency $concurrency, max_tokens $max_tokens"
  "${bench[@]}" --record "$work/reference.jsonl" --request-id-prefix ref >"$work/reference.json"
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{r['wall_seconds']:.1f} s, {r['requests_ok']} ok, {r['output_tokens_per_second']:.0f} tok/s\")" "$work/reference.json"
  if [[ $halves == reference ]]; then
    echo "files in $work (the chaos half: HALVES=chaos REFERENCE=$work/reference.jsonl with the same settings)"
    exit 0
  fi
fi

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
      kinds=(kill freeze cut slow)
      kind=${kinds[$((RANDOM % 4))]}
    fi
    echo "$kind $victim at $(date +%T.%3N)" >&2
    case $kind in
      kill) kill_and_restart "${victim#agent-}" ;;
      freeze) freeze_and_thaw "${victim#agent-}" ;;
      cut) cut_and_heal "${victim#agent-}" ;;
      slow) slow_and_restore "${victim#agent-}" ;;
    esac
  done
) &
killer=$!
wait "$bench_pid" || true
kill "$killer" 2>/dev/null || true
wait "$killer" 2>/dev/null || true
killer=
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{r['wall_seconds']:.1f} s, {r['requests_ok']} ok, {r['requests_failed']} failed\")" "$work/chaos.json"

# Deaths declared by the coordinator and losses the gateway noticed in a generation, with the
# coordinator log's timestamps.
log_events() { # $1 = event, $2 = log text to match
  sed 's/\x1b\[[0-9;]*m//g' "$work/coordinator.log" | { grep "$2" || true; } |
    sed -E 's/^([^ ]+) .* node=([^ ]+).*$/\1 \2/' | while read -r ts node; do
      fault "$1" "$node" "$(date -d "$ts" +%s%3N)"
    done
}
log_events dead 'declared dead'
log_events lost 'node lost in the middle of a generation'

echo "== failovers counted by the gateway, and what they cost clients (seconds: sum and count)"
curl -fs 127.0.0.1:$http_port/metrics |
  grep -E '^shoal_(failover(s_total|_[a-z]+_seconds_(sum|count))|requests_rebalanced_total)' || true
if [[ $checkpoint_every -gt 0 ]]; then
  echo "== failovers resumed from a KV checkpoint, and the positions they did not prefill"
  curl -fs 127.0.0.1:$http_port/metrics | grep '^shoal_checkpoint_' || true
fi
echo "== report"
"$shoal" chaos-report --reference "$work/reference.jsonl" --run "$work/chaos.jsonl" \
  --audit "$work/audit.jsonl" --faults "$work/faults.jsonl" | tee "$work/report.txt"
"$shoal" chaos-report --reference "$work/reference.jsonl" --run "$work/chaos.jsonl" \
  --audit "$work/audit.jsonl" --faults "$work/faults.jsonl" --json >"$work/report.json"
echo "files in $work"
