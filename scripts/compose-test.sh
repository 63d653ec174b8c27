#!/usr/bin/env bash
# Brings up deploy/compose.yaml (a coordinator and three resource-limited agents on a private
# network), asks for a chat completion through the gateway, checks the cluster status, and
# tears everything down, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

export SHOAL_MODELS="${SHOAL_MODELS:-${SHOAL_MODEL_DIR:-$HOME/.cache/shoal/models}}"
export SHOAL_API_PORT="${SHOAL_API_PORT:-18080}"
project="shoal-test-$$"
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose -p "$project" -f deploy/compose.yaml)
else
  compose=(docker-compose -p "$project" -f deploy/compose.yaml)
fi

test -f "$SHOAL_MODELS/SmolLM2-135M-Instruct.Q4_1.gguf" || {
  echo "compose-test: the default model is not in $SHOAL_MODELS (run: shoal model fetch)" >&2
  exit 1
}
bash scripts/docker-image.sh

cleanup() {
  if [[ "${ok:-0}" != 1 ]]; then "${compose[@]}" logs --no-color --tail 40 || true; fi
  "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
}
trap cleanup EXIT

"${compose[@]}" up -d
api="http://127.0.0.1:${SHOAL_API_PORT}"
for i in $(seq 1 120); do
  if curl -fsS "$api/readyz" >/dev/null 2>&1; then break; fi
  sleep 1
  if [[ $i == 120 ]]; then echo "compose-test: the cluster did not become ready" >&2; exit 1; fi
done
echo "compose-test: ready after ${i} s"

reply=$(curl -fsS "$api/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model":"smollm2-135m-instruct","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16,"temperature":0}')
echo "compose-test: reply: $reply"
python3 - "$reply" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
assert r["object"] == "chat.completion", r
assert r["choices"][0]["message"]["content"], r
assert r["usage"]["completion_tokens"] > 0, r
PY

# The agents measured their limits: each reports its own cgroup memory and CPU quota.
status=$("${compose[@]}" exec -T coordinator /usr/local/bin/shoal status \
  --coordinator=127.0.0.1:7070 --cluster-dir=/cluster)
echo "$status"
grep -q "agent-3" <<<"$status"
ok=1
echo "compose-test: passed"
