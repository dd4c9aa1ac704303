//! Every Prometheus metric the service exports, declared in this one place (SPEC §9).
//!
//! Labels are bounded by configuration, never by data: input topic, partition number, segment
//! name, dead-letter reason, change kind, cause. A customer id never becomes a label.
//! [`Metrics`] is created once per process and shared (`Arc`) by the pipeline, the Kafka
//! callbacks and the HTTP server; gauges that describe state (members, timers, outbox, lag) are
//! set by whoever owns that state, and RocksDB figures are read at scrape time.

use std::sync::Arc;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds: 1 ms … 60 s, dense around the sub-second target.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Timer lateness buckets in seconds (wall-clock timers are checked every 20 ms).
const LATENESS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0,
];

/// Outcome of one consumed input message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied to the customer's state.
    Ok,
    /// Sent to the dead-letter topic.
    DeadLettered,
    /// A repeated `message_id`: ignored.
    Duplicate,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Duplicate => "duplicate",
        }
    }
}

/// One input topic's consumed counters, by outcome: resolved once so counting an event is an
/// atomic add, not a label lookup.
#[derive(Clone)]
pub struct TopicCounters {
    pub topic: String,
    ok: IntCounter,
    dead_lettered: IntCounter,
    duplicate: IntCounter,
}

impl TopicCounters {
    pub fn count(&self, outcome: Outcome) {
        match outcome {
            Outcome::Ok => self.ok.inc(),
            Outcome::DeadLettered => self.dead_lettered.inc(),
            Outcome::Duplicate => self.duplicate.inc(),
        }
    }
}

/// One segment's series, resolved once (see [`TopicCounters`]).
#[derive(Clone)]
pub struct SegmentSeries {
    pub members: IntGauge,
    pub entered: IntCounter,
    pub exited: IntCounter,
}

/// The service's metrics and the registry they are exported from.
pub struct Metrics {
    registry: Registry,
    pub build_info: IntGaugeVec,
    pub events_consumed: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub batch_seconds: Histogram,
    pub event_to_publish_seconds: HistogramVec,
    pub consumer_lag: IntGaugeVec,
    pub segment_members: IntGaugeVec,
    pub segment_changes: IntCounterVec,
    pub timers_pending: IntGaugeVec,
    pub timers_overdue: IntGaugeVec,
    pub timers_fired: IntCounter,
    pub timer_lateness_seconds: Histogram,
    pub outbox_pending: IntGaugeVec,
    pub published: IntCounterVec,
    pub publish_errors: IntCounterVec,
    /// Exactly-once mode: Kafka transactions by outcome.
    pub transactions: IntCounterVec,
    pub rebalances: IntCounterVec,
    pub restore_seconds: Histogram,
    pub restore_records: IntCounter,
    pub restore_remaining: IntGaugeVec,
    pub standby_lag: IntGaugeVec,
    pub assigned_partitions: IntGauge,
    pub ready: IntGauge,
    pub rocksdb: IntGaugeVec,
    pub state_write_errors: IntCounterVec,
}

/// RocksDB properties exported as `segmenter_rocksdb{property=…}`, read at scrape time.
pub const ROCKSDB_PROPERTIES: &[(&str, &str)] = &[
    ("live_sst_bytes", "rocksdb.live-sst-files-size"),
    ("total_sst_bytes", "rocksdb.total-sst-files-size"),
    ("memtable_bytes", "rocksdb.cur-size-all-mem-tables"),
    ("estimated_keys", "rocksdb.estimate-num-keys"),
    (
        "pending_compaction_bytes",
        "rocksdb.estimate-pending-compaction-bytes",
    ),
    ("running_compactions", "rocksdb.num-running-compactions"),
    ("running_flushes", "rocksdb.num-running-flushes"),
    ("compaction_pending", "rocksdb.compaction-pending"),
    ("background_errors", "rocksdb.background-errors"),
    ("block_cache_bytes", "rocksdb.block-cache-usage"),
];

impl Metrics {
    /// Creates and registers every metric. `segments` pre-creates the per-segment series (at
    /// zero) so dashboards show every segment from the start.
    pub fn new(segments_version: &str, segments: &[String]) -> Arc<Metrics> {
        let registry = Registry::new();
        let metrics = Metrics {
            build_info: gauge_vec(
                "segmenter_build_info",
                "Always 1; labels carry the binary version and the segment definitions' version.",
                &["version", "segments_version"],
            ),
            events_consumed: counter_vec(
                "segmenter_events_consumed_total",
                "Input messages consumed, by topic and outcome (ok, dead_lettered, duplicate).",
                &["topic", "outcome"],
            ),
            dead_letters: counter_vec(
                "segmenter_dead_letters_total",
                "Input messages sent to the dead-letter topic, by reason.",
                &["reason"],
            ),
            batch_seconds: histogram(
                "segmenter_batch_processing_seconds",
                "Time to decode, apply and durably commit one micro-batch of input.",
                LATENCY_BUCKETS,
            ),
            event_to_publish_seconds: histogram_vec(
                "segmenter_event_to_publish_seconds",
                "From the triggering event's Kafka timestamp (cause=event), the timer's due \
                 time (cause=timer) or the erasure request (cause=deleted) to Kafka \
                 acknowledging the change event.",
                &["cause"],
                LATENCY_BUCKETS,
            ),
            consumer_lag: gauge_vec(
                "segmenter_consumer_lag",
                "Messages between the consumer's position and the partition's high watermark \
                 (librdkafka statistics).",
                &["topic", "partition"],
            ),
            segment_members: gauge_vec(
                "segmenter_segment_members",
                "Current members per segment in the partitions this instance owns.",
                &["segment"],
            ),
            segment_changes: counter_vec(
                "segmenter_segment_changes_total",
                "Segment transitions decided, by segment and change (entered, exited).",
                &["segment", "change"],
            ),
            timers_pending: gauge_vec(
                "segmenter_timers_pending",
                "Durable timers scheduled, per owned partition.",
                &["partition"],
            ),
            timers_overdue: gauge_vec(
                "segmenter_timers_overdue",
                "Timers already due but not yet fired (a backlog being worked off in slices), \
                 per owned partition; counted up to 100000.",
                &["partition"],
            ),
            timers_fired: counter(
                "segmenter_timers_fired_total",
                "Timers fired in either clock (a customer re-evaluated because time passed), including a \
                 customer's own timer fired just before its event.",
            ),
            timer_lateness_seconds: histogram(
                "segmenter_timer_lateness_seconds",
                "Wall clock minus due time when a timer fired.",
                LATENESS_BUCKETS,
            ),
            outbox_pending: gauge_vec(
                "segmenter_outbox_pending",
                "Output records durable in the outbox and not yet acknowledged by Kafka.",
                &["partition"],
            ),
            published: counter_vec(
                "segmenter_published_total",
                "Output records acknowledged by Kafka, by output (changes, membership, dlq).",
                &["output"],
            ),
            transactions: counter_vec(
                "segmenter_transactions_total",
                "Exactly-once mode: Kafka transactions by outcome: committed, aborted (the \
                 broker asked for an abort; the same records were sent again in a new one), \
                 unknown (the producer failed during a commit and was re-created; the group's \
                 committed offsets decided whether to send the batch again), fenced (another \
                 instance owns the partition; its worker stopped).",
                &["outcome"],
            ),
            publish_errors: counter_vec(
                "segmenter_publish_errors_total",
                "Producer errors: transport (a broker unreachable or a connection lost; \
                 retried, nothing is dropped), producer_reset (the idempotent producer failed \
                 as a whole, e.g. out of sequence with a broker that lost records; it was \
                 replaced and unacknowledged records were published again) and fatal (Kafka \
                 refused a record for good; it stays in the outbox and the service stops).",
                &["kind"],
            ),
            rebalances: counter_vec(
                "segmenter_rebalances_total",
                "Consumer group rebalances, by kind (assigned, revoked).",
                &["kind"],
            ),
            restore_seconds: histogram(
                "segmenter_restore_seconds",
                "Time from an assignment until the partition consumes: restoring its state from \
                 the changelog (if its local copy lacks some) and opening it.",
                LATENCY_BUCKETS,
            ),
            restore_records: counter(
                "segmenter_restore_records_total",
                "Changelog records applied by restores.",
            ),
            restore_remaining: gauge_vec(
                "segmenter_restore_remaining_records",
                "Changelog offsets a partition's restore still has to read, by partition.",
                &["partition"],
            ),
            standby_lag: gauge_vec(
                "segmenter_standby_lag_records",
                "Changelog offsets a standby copy of a partition this instance does not own was \
                 behind the changelog's end when last looked at, by partition.",
                &["partition"],
            ),
            assigned_partitions: gauge(
                "segmenter_assigned_partitions",
                "Input partitions currently owned by this instance.",
            ),
            ready: gauge(
                "segmenter_ready",
                "1 when every assigned partition is restored and consuming (as /readyz).",
            ),
            rocksdb: gauge_vec(
                "segmenter_rocksdb",
                "RocksDB properties summed over column families, by property.",
                &["property"],
            ),
            state_write_errors: counter_vec(
                "segmenter_state_write_errors_total",
                "Failed attempts to write a batch's state, outbox and offsets to RocksDB, by kind \
                 (no_space, read_only, io). The partition's intake stops and the same write is \
                 retried about once a second until it succeeds; nothing of the batch is \
                 published or committed before.",
                &["kind"],
            ),
            registry,
        };
        for collector in metrics.collectors() {
            // Names are unique by construction (see `exported_names` test).
            let _ = metrics.registry.register(collector);
        }
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), segments_version])
            .set(1);
        for segment in segments {
            metrics.segment_members.with_label_values(&[segment]).set(0);
            for change in ["entered", "exited"] {
                metrics
                    .segment_changes
                    .with_label_values(&[segment.as_str(), change]);
            }
        }
        for kind in ["assigned", "revoked"] {
            metrics.rebalances.with_label_values(&[kind]);
        }
        for output in ["changes", "membership", "dlq"] {
            metrics.published.with_label_values(&[output]);
        }
        for kind in ["transport", "producer_reset", "fatal"] {
            metrics.publish_errors.with_label_values(&[kind]);
        }
        for outcome in ["committed", "aborted", "unknown", "fenced"] {
            metrics.transactions.with_label_values(&[outcome]);
        }
        for kind in ["no_space", "read_only", "io"] {
            metrics.state_write_errors.with_label_values(&[kind]);
        }
        Arc::new(metrics)
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.build_info.clone()),
            Box::new(self.events_consumed.clone()),
            Box::new(self.dead_letters.clone()),
            Box::new(self.batch_seconds.clone()),
            Box::new(self.event_to_publish_seconds.clone()),
            Box::new(self.consumer_lag.clone()),
            Box::new(self.segment_members.clone()),
            Box::new(self.segment_changes.clone()),
            Box::new(self.timers_pending.clone()),
            Box::new(self.timers_overdue.clone()),
            Box::new(self.timers_fired.clone()),
            Box::new(self.timer_lateness_seconds.clone()),
            Box::new(self.outbox_pending.clone()),
            Box::new(self.published.clone()),
            Box::new(self.publish_errors.clone()),
            Box::new(self.transactions.clone()),
            Box::new(self.rebalances.clone()),
            Box::new(self.restore_seconds.clone()),
            Box::new(self.restore_records.clone()),
            Box::new(self.restore_remaining.clone()),
            Box::new(self.standby_lag.clone()),
            Box::new(self.assigned_partitions.clone()),
            Box::new(self.ready.clone()),
            Box::new(self.rocksdb.clone()),
            Box::new(self.state_write_errors.clone()),
        ]
    }

    /// Every metric family name this service can export (histograms add `_bucket`, `_sum` and
    /// `_count` series). Used to check that dashboards and alerts refer to real metrics.
    pub fn exported_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .collectors()
            .iter()
            .flat_map(|c| c.desc().into_iter().map(|d| d.fq_name.clone()))
            .collect();
        names.sort();
        names
    }

    /// The Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(error) = encoder.encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(%error, "encoding metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }

    /// Counts one consumed input message.
    pub fn consumed(&self, topic: &str, outcome: Outcome) {
        self.events_consumed
            .with_label_values(&[topic, outcome.label()])
            .inc();
    }

    /// An input topic's consumed counters, for counting on the hot path.
    pub fn topic_counters(&self, topic: &str) -> TopicCounters {
        let counter = |outcome: Outcome| {
            self.events_consumed
                .with_label_values(&[topic, outcome.label()])
        };
        TopicCounters {
            topic: topic.to_string(),
            ok: counter(Outcome::Ok),
            dead_lettered: counter(Outcome::DeadLettered),
            duplicate: counter(Outcome::Duplicate),
        }
    }

    /// A segment's member gauge and change counters, for updating on the hot path.
    pub fn segment_series(&self, segment: &str) -> SegmentSeries {
        SegmentSeries {
            members: self.segment_members.with_label_values(&[segment]),
            entered: self
                .segment_changes
                .with_label_values(&[segment, "entered"]),
            exited: self.segment_changes.with_label_values(&[segment, "exited"]),
        }
    }
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::with_opts(Opts::new(name, help)).expect("static metric definition")
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::with_opts(Opts::new(name, help)).expect("static metric definition")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition")
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("static metric definition")
}

fn histogram_vec(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("static metric definition")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_registered_once_with_the_prefix() {
        let metrics = Metrics::new("v1", &["cart_abandoner".to_string()]);
        let names = metrics.exported_names();
        let mut unique = names.clone();
        unique.dedup();
        assert_eq!(names, unique, "duplicate metric names");
        assert!(names.iter().all(|n| n.starts_with("segmenter_")));
        for family in metrics.registry.gather() {
            assert!(
                names.iter().any(|n| n == family.name()),
                "{}",
                family.name()
            );
        }
        let text = metrics.render();
        assert!(text.contains("segmenter_segment_members{segment=\"cart_abandoner\"} 0"));
        assert!(text.contains("segmenter_build_info{segments_version=\"v1\""));
    }

    #[test]
    fn counts_outcomes_by_topic() {
        let metrics = Metrics::new("v1", &[]);
        metrics.consumed("clicks", Outcome::Ok);
        metrics.consumed("clicks", Outcome::Ok);
        metrics.consumed("orders", Outcome::DeadLettered);
        let text = metrics.render();
        assert!(text.contains("segmenter_events_consumed_total{outcome=\"ok\",topic=\"clicks\"} 2"));
        assert!(text.contains(
            "segmenter_events_consumed_total{outcome=\"dead_lettered\",topic=\"orders\"} 1"
        ));
    }
}
