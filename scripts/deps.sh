# shellcheck shell=bash
# What the build and the tests need from the system, as detection functions that look below a
# root directory (`$DEPS_ROOT`, default `/`), so scripts/test-deps.sh can prove each one on fake
# roots that lack the thing (or hold only a look-alike). Sourced by scripts/test.sh.
#
# Each `have_X` answers for exactly what the consumer loads, not for a similar file name:
#   libclang   bindgen (clang-sys) dlopens `libclang.so`, `libclang.so.N`, `libclang-N.so` or
#              `libclang-N.so.M`. The bare Debian image has `libclang-cpp.so.14` (the C++ API,
#              package libclang-cpp14), which clang-sys cannot use: it must not count.
#   openssl    rdkafka's `ssl` feature builds librdkafka against the system OpenSSL through
#              pkg-config: it needs `openssl.pc` *and* the headers and the link library.
#   stunnel    the TLS terminator the Kafka TLS tests put in front of tansu (`stunnel4`).

DEPS_ROOT="${DEPS_ROOT:-}"

# The directories clang-sys searches on Linux, below the root.
_libclang_dirs() {
  local root="$DEPS_ROOT"
  if [ -n "${LIBCLANG_PATH:-}" ]; then printf '%s\n' "$LIBCLANG_PATH"; fi
  printf '%s\n' "$root"/usr/lib/llvm-*/lib "$root"/usr/lib/x86_64-linux-gnu "$root"/usr/lib64 \
    "$root"/usr/lib "$root"/usr/local/lib "$root"/usr/local/lib64
}

have_libclang() {
  local dir file name
  while IFS= read -r dir; do
    [ -d "$dir" ] || continue
    for file in "$dir"/libclang*.so*; do
      [ -e "$file" ] || continue
      name="${file##*/}"
      case "$name" in
        libclang.so | libclang.so.* | libclang-[0-9]*.so | libclang-[0-9]*.so.*) return 0 ;;
      esac
    done
  done < <(_libclang_dirs)
  return 1
}

have_openssl_dev() {
  local root="$DEPS_ROOT" pc header lib found_pc="" found_header="" found_lib=""
  for pc in "$root"/usr/lib/x86_64-linux-gnu/pkgconfig/openssl.pc "$root"/usr/lib/pkgconfig/openssl.pc \
    "$root"/usr/lib64/pkgconfig/openssl.pc "$root"/usr/share/pkgconfig/openssl.pc; do
    [ -e "$pc" ] && found_pc=1
  done
  for header in "$root"/usr/include/openssl/ssl.h "$root"/usr/local/include/openssl/ssl.h; do
    [ -e "$header" ] && found_header=1
  done
  for lib in "$root"/usr/lib/x86_64-linux-gnu/libssl.so "$root"/usr/lib/libssl.so "$root"/usr/lib64/libssl.so; do
    [ -e "$lib" ] && found_lib=1
  done
  [ -n "$found_pc" ] && [ -n "$found_header" ] && [ -n "$found_lib" ]
}

have_pkg_config() {
  local root="$DEPS_ROOT"
  [ -x "$root/usr/bin/pkg-config" ] || [ -x "$root/usr/bin/pkgconf" ]
}

have_stunnel() {
  local root="$DEPS_ROOT"
  [ -x "$root/usr/bin/stunnel4" ] || [ -x "$root/usr/bin/stunnel" ]
}

# The Debian packages that provide what is missing, one per line (nothing when all is there).
missing_packages() {
  have_libclang || echo libclang-dev
  have_openssl_dev || echo libssl-dev
  have_pkg_config || echo pkg-config
  have_stunnel || echo stunnel4
}
