# Shared by the soak scripts: the cargo target dir, the tansu binary, a log file per run.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/segmenter/target}"
if [ -z "${TANSU_BIN:-}" ]; then
    TANSU_BIN="$(./scripts/install-tansu.sh | tail -1)"
    export TANSU_BIN
fi
soak_log() {
    mkdir -p "$CARGO_TARGET_DIR/soak"
    echo "$CARGO_TARGET_DIR/soak/$1-$(date -u +%Y%m%dT%H%M%SZ).log"
}
