#!/usr/bin/env bash
# Makes `promtool` (Prometheus' rule and config checker, used by tests/deploy_assets.rs) available
# and prints its path as the last line of stdout.
#
#   1. `promtool` already on PATH (e.g. Debian's `prometheus` package installed): that one.
#   2. Otherwise Debian's `prometheus` package is downloaded with `apt-get download` (apt checks it
#      against the archive's signed index) and only its promtool binary is unpacked into a cache
#      outside the checkout:
#
#        ${SEGMENTER_TOOLS:-$HOME/.cache/segmenter/tools}/promtool-<debian version>/promtool
#
#      Nothing is installed system-wide: a full `apt-get install prometheus` would pull a dozen
#      web-UI packages and try to start a Prometheus server, neither of which the tests need.
#
# Idempotent: a cached promtool that runs is reused without touching apt.
# (Prometheus' own release tarballs are not reachable from these machines; Debian's package is.)
set -euo pipefail

PACKAGE=prometheus
tools="${SEGMENTER_TOOLS:-$HOME/.cache/segmenter/tools}"

log() { printf 'install-promtool: %s\n' "$*" >&2; }
die() { printf 'install-promtool: ERROR: %s\n' "$*" >&2; exit 1; }

works() { [ -x "$1" ] && "$1" --version >/dev/null 2>&1; }

if on_path="$(command -v promtool 2>/dev/null)" && works "$on_path"; then
  echo "$on_path"
  exit 0
fi

for cached in "$tools"/promtool-*/promtool; do
  if works "$cached"; then
    echo "$cached"
    exit 0
  fi
done

command -v apt-get >/dev/null 2>&1 || die "no promtool on PATH and no apt-get to fetch Debian's '$PACKAGE' package; install promtool and put it on PATH (or set PROMTOOL)"
command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb is needed to unpack the '$PACKAGE' package"

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

# An empty or stale package index knows no candidate: refresh it once.
candidate() { apt-cache policy "$PACKAGE" 2>/dev/null | awk '/Candidate:/ { print $2 }'; }
version="$(candidate)"
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
  log "refreshing the apt package index"
  $SUDO apt-get update -qq >&2 || die "apt-get update failed"
  version="$(candidate)"
fi
[ -n "$version" ] && [ "$version" != "(none)" ] || die "apt knows no '$PACKAGE' package (Debian/Ubuntu main); install promtool by hand and set PROMTOOL"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# apt downloads as the unprivileged _apt user where it can: let it write here.
if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$tmp"; fi

log "downloading Debian's $PACKAGE $version (apt-get download)"
(cd "$tmp" && apt-get download -qq "$PACKAGE=$version" >&2) || {
  log "download failed; refreshing the apt package index and retrying"
  $SUDO apt-get update -qq >&2 || die "apt-get update failed"
  version="$(candidate)"
  (cd "$tmp" && apt-get download -qq "$PACKAGE=$version" >&2) || die "apt-get download $PACKAGE=$version failed"
}

deb="$(ls "$tmp"/"$PACKAGE"_*.deb 2>/dev/null | head -n1)"
[ -n "$deb" ] || die "apt-get download produced no .deb for $PACKAGE"
dpkg-deb -x "$deb" "$tmp/unpacked" || die "could not unpack $(basename "$deb")"
[ -x "$tmp/unpacked/usr/bin/promtool" ] || die "$(basename "$deb") has no usr/bin/promtool"
works "$tmp/unpacked/usr/bin/promtool" || die "the unpacked promtool does not run on this machine"

# Debian versions may hold ':' (epoch) and '+'; keep the directory name plain.
dest_dir="$tools/promtool-$(printf '%s' "$version" | tr -c 'A-Za-z0-9.+-' '_')"
dest="$dest_dir/promtool"
mkdir -p "$dest_dir"
# Move into place atomically so a concurrent or interrupted run never leaves a partial binary.
cp "$tmp/unpacked/usr/bin/promtool" "$dest.partial.$$"
mv -f "$dest.partial.$$" "$dest"
log "installed $("$dest" --version 2>&1 | head -n1)"
echo "$dest"
