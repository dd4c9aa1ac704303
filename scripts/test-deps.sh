#!/usr/bin/env bash
# Proves the detection in scripts/deps.sh on fake roots: each check must say "missing" on a root
# that lacks the thing (including the look-alikes a bare Debian image has) and "present" on a
# root laid out as the Debian package installs it. Run by scripts/test.sh before it installs.
set -euo pipefail
cd "$(dirname "$0")/.."

fails=0
passes=0
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# expect NAME present|missing CHECK ROOT
expect() {
  local name="$1" want="$2" check="$3" root="$4" got
  if (DEPS_ROOT="$root" LIBCLANG_PATH="" && source scripts/deps.sh && DEPS_ROOT="$root" "$check"); then
    got=present
  else
    got=missing
  fi
  if [ "$got" = "$want" ]; then
    passes=$((passes + 1))
  else
    fails=$((fails + 1))
    printf 'test-deps: FAIL %s: %s says %s, expected %s\n' "$name" "$check" "$got" "$want" >&2
  fi
}

# touch PATH... below a fresh root; prints the root
root_with() {
  local root
  root="$(mktemp -d "$tmp/root.XXXX")"
  for path in "$@"; do
    mkdir -p "$root/$(dirname "$path")"
    : >"$root/$path"
    case "$path" in */bin/*) chmod +x "$root/$path" ;; esac
  done
  echo "$root"
}

empty="$(root_with)"
# What a bare Debian 12 image of this kind has: the C++ library only (package libclang-cpp14).
bare="$(root_with usr/lib/llvm-14/lib/libclang-cpp.so.14 usr/lib/x86_64-linux-gnu/libclang-cpp.so.14)"
# libclang-dev 14 on Debian 12 (via libclang1-14).
with_dev="$(root_with usr/lib/llvm-14/lib/libclang-cpp.so.14 usr/lib/llvm-14/lib/libclang.so.1 \
  usr/lib/llvm-14/lib/libclang.so usr/lib/x86_64-linux-gnu/libclang-14.so.1)"
# Only the runtime package libclang1-14, which clang-sys can load as well.
runtime_only="$(root_with usr/lib/x86_64-linux-gnu/libclang-14.so.14.0.6)"

expect "empty root" missing have_libclang "$empty"
expect "bare image (libclang-cpp only)" missing have_libclang "$bare"
expect "libclang-dev" present have_libclang "$with_dev"
expect "libclang1 only" present have_libclang "$runtime_only"

ssl_runtime="$(root_with usr/lib/x86_64-linux-gnu/libssl.so.3)"
ssl_dev="$(root_with usr/lib/x86_64-linux-gnu/libssl.so.3 usr/lib/x86_64-linux-gnu/libssl.so \
  usr/include/openssl/ssl.h usr/lib/x86_64-linux-gnu/pkgconfig/openssl.pc)"
expect "empty root" missing have_openssl_dev "$empty"
expect "libssl3 only" missing have_openssl_dev "$ssl_runtime"
expect "libssl-dev" present have_openssl_dev "$ssl_dev"

expect "empty root" missing have_pkg_config "$empty"
expect "pkgconf" present have_pkg_config "$(root_with usr/bin/pkgconf)"

expect "empty root" missing have_stunnel "$empty"
expect "stunnel4" present have_stunnel "$(root_with usr/bin/stunnel4)"

# The package list a bare image gets: everything it lacks, nothing it has.
got="$(DEPS_ROOT="$bare" LIBCLANG_PATH="" bash -c 'source scripts/deps.sh; missing_packages' | tr '\n' ' ')"
if [ "$got" = "libclang-dev libssl-dev pkg-config stunnel4 " ]; then
  passes=$((passes + 1))
else
  fails=$((fails + 1))
  printf 'test-deps: FAIL missing_packages on the bare root: got "%s"\n' "$got" >&2
fi
got="$(DEPS_ROOT="$with_dev" LIBCLANG_PATH="" bash -c 'source scripts/deps.sh; have_libclang && echo yes')"
[ "$got" = yes ] && passes=$((passes + 1)) || { fails=$((fails + 1)); echo "test-deps: FAIL sourced check" >&2; }

echo "test-deps: $passes passed, $fails failed"
[ "$fails" = 0 ]
