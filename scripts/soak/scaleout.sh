#!/usr/bin/env bash
# SOAK_MOVES (default 100) randomised moves of segmenter instances in one consumer group over 12
# partitions (start on an empty state dir, restart on an old one, SIGTERM, kill -9, kill -9 and
# delete the state dir) while input flows at SOAK_RATE events/s (default 300); afterwards the
# change topic, de-duplicated by id, must equal `segmenter replay` of the same input, with seq
# continuous. Also: SOAK_SEED (printed; repeats a run), SOAK_EVENTS, SOAK_CUSTOMERS,
# SOAK_MAX_INSTANCES (default 3), SOAK_BALLAST (identify-only customers to restore). Takes
# about 4 s per move plus a minute. A failure lists what is missing, extra or different per
# partition with its owners, and keeps the logs and state dirs.
source "$(dirname "$0")/common.sh"
log="$(soak_log scaleout)"
echo "log: $log"
cargo test --release --locked --test soak -- --ignored --nocapture --exact \
    scale_out_randomised_moves_lose_no_transition 2>&1 | tee "$log"
