#!/usr/bin/env bash
# A short coverage-guided fuzzing pass (cargo-fuzz / libFuzzer) over every target in fuzz/:
# each runs its committed corpus (fuzz/corpus/TARGET) and then mutates it for a few seconds;
# any crash, panic, timeout or out-of-memory fails the script. docs/FUZZING.md has the long runs.
#
#   scripts/fuzz-smoke.sh [TARGET...]      (default: every target)
#
# Environment:
#   FUZZ_SECONDS          seconds of mutation per target (default 15)
#   SEGMENTER_TOOLS       cache of installed tools (default ~/.cache/segmenter/tools); cargo-fuzz
#                         is installed under it once and reused
#   SEGMENTER_FUZZ_TARGET cargo target dir of the fuzz build (default ~/.cache/segmenter/fuzz-target):
#                         nightly and sanitizer flags cannot share the stable build's artifacts
#
# The fuzz crate builds the library without its default `service` feature: no RocksDB, no
# librdkafka, no C++. It needs a nightly toolchain (libFuzzer's sanitizer flags); without one it
# falls back to the stable toolchain with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-15}"
tools="${SEGMENTER_TOOLS:-$HOME/.cache/segmenter/tools}"
export CARGO_TARGET_DIR="${SEGMENTER_FUZZ_TARGET:-$HOME/.cache/segmenter/fuzz-target}"
mkdir -p "$CARGO_TARGET_DIR"

if [ ! -x "$tools/cargo-fuzz/bin/cargo-fuzz" ]; then
  echo "installing cargo-fuzz into $tools/cargo-fuzz"
  cargo install --locked --quiet --root "$tools/cargo-fuzz" cargo-fuzz
fi
export PATH="$tools/cargo-fuzz/bin:$PATH"

toolchain=()
if rustup run nightly rustc --version >/dev/null 2>&1; then
  toolchain=(+nightly)
elif rustc --version >/dev/null 2>&1; then
  echo "no nightly toolchain: building with stable and RUSTC_BOOTSTRAP=1" >&2
  export RUSTC_BOOTSTRAP=1
else
  echo "fuzz-smoke: no Rust toolchain found (need nightly, or stable with RUSTC_BOOTSTRAP=1)" >&2
  exit 1
fi

mapfile -t all < <(cd fuzz && cargo "${toolchain[@]}" fuzz list)
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=("${all[@]}")

echo "building ${#all[@]} fuzz targets into $CARGO_TARGET_DIR"
(cd fuzz && cargo "${toolchain[@]}" fuzz build -O --debug-assertions)

dict_of() {
  case "$1" in
    rules) echo "-dict=dicts/rules.dict" ;;
    settings) echo "-dict=dicts/toml.dict" ;;
    decode_event) echo "-dict=dicts/json.dict" ;;
  esac
}

# New inputs go to a scratch dir, never into the checkout.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
failed=()
for target in "${targets[@]}"; do
  mkdir -p "$scratch/$target" "fuzz/corpus/$target"
  started=$(date +%s)
  dict="$(dict_of "$target")"
  log="$scratch/$target.log"
  # Bounded: inputs up to 4 KiB, 10 s per input, 2 GiB RSS, 1 GiB per allocation.
  if (cd fuzz && cargo "${toolchain[@]}" fuzz run -O --debug-assertions "$target" \
        "$scratch/$target" "corpus/$target" -- \
        ${dict:+"$dict"} -max_len=4096 -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
        -max_total_time="$seconds" -print_final_stats=1 \
        -artifact_prefix="$scratch/$target-") >"$log" 2>&1; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 || true)
    echo "fuzz $target: ok (${runs:-?} runs, ${cov:-cov: ?}, $(($(date +%s) - started)) s)"
  else
    echo "fuzz $target: FAILED — last lines of its log:" >&2
    tail -n 40 "$log" >&2
    for artifact in "$scratch/$target"-*; do
      [ -e "$artifact" ] || continue
      keep="$CARGO_TARGET_DIR/fuzz-artifacts/$(basename "$artifact")"
      mkdir -p "$(dirname "$keep")"
      cp "$artifact" "$keep"
      echo "  reproducer kept at $keep (cargo +nightly fuzz run $target $keep)" >&2
    done
    failed+=("$target")
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz-smoke: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz-smoke: ${#targets[@]} target(s) ok"
