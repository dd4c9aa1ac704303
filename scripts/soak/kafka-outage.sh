#!/usr/bin/env bash
# Kafka unreachable for SOAK_OUTAGE_SECS (default 300) under SOAK_RATE events/s (default 200):
# the service must recover unattended with output equal to an uninterrupted run's.
# See docs/FAULTS.md. Takes about outage + 3 minutes.
source "$(dirname "$0")/common.sh"
log="$(soak_log kafka-outage)"
echo "log: $log"
cargo test --release --locked --test soak -- --ignored --nocapture --exact \
    kafka_unreachable_for_minutes_under_load_recovers_with_nothing_lost 2>&1 | tee "$log"
