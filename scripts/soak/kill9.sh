#!/usr/bin/env bash
# SOAK_KILLS (default 50) kill -9s in a row under load: the de-duplicated change output must equal
# an uninterrupted run's. See docs/FAULTS.md. Takes about 5 minutes.
source "$(dirname "$0")/common.sh"
log="$(soak_log kill9)"
echo "log: $log"
cargo test --release --locked --test soak -- --ignored --nocapture --exact \
    kill_9_fifty_times_in_a_row_loses_nothing 2>&1 | tee "$log"
