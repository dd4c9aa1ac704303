#!/usr/bin/env bash
# The whole test suite, from a fresh machine or a warm one:
#   installs what is missing (libclang for RocksDB's bindgen), then runs
#   cargo fmt --check, cargo clippy -D warnings and every test, all in the release profile so
#   RocksDB's C++ is compiled once (~18 min cold on 2 cores) and reused from the cache dir.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/segmenter/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"

step() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

if ! ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 && ! ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1; then
  step "installing libclang-dev (RocksDB bindgen)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends libclang-dev >/dev/null
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

step "all tests passed"
