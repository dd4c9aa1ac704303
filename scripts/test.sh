#!/usr/bin/env bash
# The whole test suite, from a fresh machine or a warm one:
#   installs what is missing (scripts/deps.sh: libclang for RocksDB's bindgen, OpenSSL headers
#   for librdkafka's TLS, stunnel for the TLS tests), then runs
#   cargo fmt --check, cargo clippy -D warnings and every test, all in the release profile so
#   RocksDB's C++ is compiled once (~18 min cold on 2 cores) and reused from the cache dir.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/segmenter/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"

step() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "system packages (detection proved on fake roots first)"
./scripts/test-deps.sh
# shellcheck source=scripts/deps.sh
source scripts/deps.sh
mapfile -t missing < <(missing_packages)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Each install must prove itself with the same check that asked for it.
  mapfile -t still < <(missing_packages)
  if [ "${#still[@]}" -gt 0 ]; then
    echo "still missing after apt-get install: ${still[*]}" >&2
    exit 1
  fi
fi

step "tansu broker for the Kafka tests (pinned, hash-checked, cached)"
TANSU_BIN="$(./scripts/install-tansu.sh | tail -n 1)"
export TANSU_BIN

step "promtool for the alert-rule and dashboard tests (Debian's prometheus package, cached)"
PROMTOOL="$(./scripts/install-promtool.sh | tail -n 1)"
export PROMTOOL

step "cargo fmt --check"
cargo fmt --all -- --check

step "build (release profile, cached in $CARGO_TARGET_DIR)"
cargo build --release --all-targets --locked

step "cargo clippy -D warnings"
cargo clippy --release --all-targets --locked -- -D warnings

step "reference implementation self-test (tools/segref)"
python3 tools/segref/test_segref.py

step "tests"
cargo test --release --locked -- --test-threads=2

step "fuzz smoke (each cargo-fuzz target briefly over its corpus; no RocksDB/librdkafka build)"
./scripts/fuzz-smoke.sh

step "all tests passed"
