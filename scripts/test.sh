#!/usr/bin/env bash
# The test suite, as CI runs it: format and lint checks, then every test of the workspace.
# Installs what the tests need first (the default model, the Python reference packages).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never
# Release optimisation without LTO (see [profile.ci] in Cargo.toml); the Compose test's image
# uses the same build.
export SHOAL_PROFILE=ci
step() { printf '\n== %s\n' "$*"; }

step "python reference packages"
bash scripts/setup-python.sh

step "default model"
cargo build --profile ci -p shoal-cli
./target/ci/shoal model fetch

step "format"
cargo fmt --all -- --check

step "lint"
cargo clippy --workspace --all-targets --profile ci -- -D warnings

step "tests"
cargo test --workspace --profile ci

step "containers (Compose: a coordinator and three resource-limited agents)"
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 \
  && { docker compose version || command -v docker-compose; } >/dev/null 2>&1; then
  bash scripts/compose-test.sh
else
  echo "docker is not available here: the Compose test did not run" >&2
  if [[ -n "${CI:-}" ]]; then exit 1; fi
fi
