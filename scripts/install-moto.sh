#!/usr/bin/env bash
# Installs moto's S3-compatible server (PyPI `moto[server]`, pinned) into a cache outside the
# checkout and prints the path of a `moto_server` launcher as the last line of stdout. Used by
# tests/service_broker_restart.rs, which keeps tansu's data in S3 so that it survives a broker
# restart (tansu's memory:// storage does not).
#
#   ${SEGMENTER_TOOLS:-$HOME/.cache/segmenter/tools}/moto-$MOTO_VERSION/moto_server
#
# Idempotent: when the launcher exists and imports moto's server, it only prints the path.
# Installs with `python3 -m pip install --target` (no virtualenv needed) and runs with the same
# python3.
set -euo pipefail

MOTO_VERSION=5.2.5
tools="${SEGMENTER_TOOLS:-$HOME/.cache/segmenter/tools}"
dest_dir="$tools/moto-$MOTO_VERSION"
launcher="$dest_dir/moto_server"

log() { printf 'install-moto: %s\n' "$*" >&2; }
die() { printf 'install-moto: ERROR: %s\n' "$*" >&2; exit 1; }

if [ -x "$launcher" ] && "$launcher" --help >/dev/null 2>&1; then
  echo "$launcher"
  exit 0
fi

command -v python3 >/dev/null 2>&1 || die "python3 is needed"
python="$(command -v python3)"
if ! "$python" -m pip --version >/dev/null 2>&1; then
  log "no pip for $python; installing Debian's python3-pip"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  "$python" -m pip --version >/dev/null 2>&1 || die "pip is still not available"
fi

tmp="$dest_dir.partial.$$"
rm -rf "$tmp"
mkdir -p "$tmp/lib"
trap 'rm -rf "$tmp"' EXIT
log "installing moto[server]==$MOTO_VERSION from PyPI into $dest_dir"
"$python" -m pip install --disable-pip-version-check -q --target "$tmp/lib" \
  "moto[server]==$MOTO_VERSION" >&2 || die "pip install moto[server]==$MOTO_VERSION failed (see above)"

cat > "$tmp/moto_server" <<LAUNCHER
#!/usr/bin/env bash
export PYTHONPATH="$dest_dir/lib\${PYTHONPATH:+:\$PYTHONPATH}"
exec "$python" -m moto.server "\$@"
LAUNCHER
chmod +x "$tmp/moto_server"
rm -rf "$dest_dir"
mv "$tmp" "$dest_dir"
trap - EXIT
"$launcher" --help >/dev/null 2>&1 || die "the installed moto_server does not start"
log "installed moto $MOTO_VERSION"
echo "$launcher"
