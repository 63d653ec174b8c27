# Shared by the cluster benchmark scripts (sourced, not run): a release build of `shoal` (or the
# build of profile $SHOAL_PROFILE), a scratch directory removed on exit, and a loopback cluster
# of a coordinator and N agents, each agent pinned to its own core with one compute thread.
# Set TLS=(--insecure-plaintext) before start_cluster for a cluster without TLS; by default every
# process issues its certificate from the scratch cluster directory (mutual TLS on every link).
profile=${SHOAL_PROFILE:-release}
cargo build --profile "$profile" -p shoal-cli >/dev/null
shoal=$PWD/target/$profile/shoal
work=$(mktemp -d)
pids=()
TLS=(--cluster-dir "$work/cluster")
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

start_cluster() { # $1 = number of agents
  local n=$1
  "$shoal" coordinator --listen 127.0.0.1:18181 --grpc-listen 127.0.0.1:17171 \
    "${TLS[@]}" >"$work/coordinator.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do curl -fs 127.0.0.1:18181/healthz >/dev/null 2>&1 && break; sleep 0.2; done
  for i in $(seq 1 "$n"); do
    taskset -c $(((i - 1) % $(nproc))) "$shoal" agent --join 127.0.0.1:17171 --name "agent-$i" --threads 1 \
      --http 127.0.0.1:$((18190 + i)) "${TLS[@]}" >"$work/agent-$i.log" 2>&1 &
    pids+=($!)
  done
  for _ in $(seq 300); do
    ready=$("$shoal" status --coordinator 127.0.0.1:17171 "${TLS[@]}" 2>/dev/null | grep -c "=ready" || true)
    [[ "$ready" -ge "$n" ]] && return 0
    sleep 0.2
  done
  echo "cluster of $n did not become ready" >&2; exit 1
}
stop_cluster() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); rm -rf "$work/cluster"; }

bench() { # $1 = url, rest = flags; prints the JSON report
  "$shoal" bench --url "$1" --json "${@:2}"
}
field() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }
