//! The config file as written: serde structs that reject unknown keys. Validation into
//! [`super::Settings`] happens in `mod.rs`.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// The whole file. `S` is the segment entry type: spanned when read straight from TOML (for
/// error positions), ignored when re-read through the `config` crate for environment overrides.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile<S> {
    #[serde(default = "Vec::new")]
    pub segment: Vec<S>,
    /// Another TOML file holding `[[segment]]` entries, relative to this one.
    pub segments_file: Option<String>,
    #[serde(default)]
    pub engine: RawEngine,
    #[serde(default)]
    pub input: RawInput,
    #[serde(default)]
    pub kafka: RawKafka,
    #[serde(default)]
    pub output: RawOutput,
    #[serde(default)]
    pub state: RawState,
    #[serde(default)]
    pub http: RawHttp,
    #[serde(default)]
    pub processing: RawProcessing,
}

/// `[processing]`: the delivery guarantee and the isolation level transactional records are
/// read with. An unknown value is a parse error with its position.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProcessing {
    pub guarantee: Option<super::Guarantee>,
    pub isolation: Option<super::Isolation>,
}

/// A file that holds only segments (`segments_file`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSegmentsFile {
    #[serde(default)]
    pub segment: Vec<RawSegment>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSegment {
    pub id: Spanned<String>,
    pub description: Option<String>,
    pub rule: Spanned<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEngine {
    pub clock: Option<String>,
    pub max_future_skew: Option<String>,
    pub lookahead_steps: Option<usize>,
    pub max_entries_per_series: Option<usize>,
    pub max_cached_customers: Option<usize>,
    /// Input messages handed to a partition worker at once.
    pub batch_size: Option<usize>,
    /// At most this many due timers fire between two input batches.
    pub timer_slice: Option<usize>,
    /// Unpublished outbox records per partition above which intake pauses.
    pub max_outbox_backlog: Option<usize>,
    /// How long SIGTERM waits for in-flight work to be published.
    pub shutdown_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInput {
    pub topics: Option<Vec<String>>,
    pub max_event_bytes: Option<usize>,
    pub dedup_window: Option<String>,
    pub max_dedup_ids: Option<usize>,
    /// How long to wait for a quiet input topic when ordering across topics (e.g. "50ms").
    pub max_merge_wait: Option<String>,
    #[serde(default)]
    pub mapping: RawMapping,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMapping {
    pub customer_id: Option<Vec<String>>,
    /// JSON pointer of the event type; `""` means the schema has none.
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    pub event: Option<String>,
    pub timestamp: Option<String>,
    pub message_id: Option<String>,
    pub properties: Option<String>,
    pub traits: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKafka {
    pub brokers: Option<String>,
    pub group_id: Option<String>,
    /// Static group membership (`group.instance.id`): a stable name per instance, e.g. the pod
    /// name, so a restart within the session timeout keeps its partitions without a rebalance.
    pub instance_id: Option<String>,
    /// Passed through to librdkafka unchanged for every client (security.protocol, sasl.*,
    /// ssl.* …).
    #[serde(default)]
    pub client: BTreeMap<String, String>,
    /// Passed through to the consumer only (session.timeout.ms, fetch.* …).
    #[serde(default)]
    pub consumer: BTreeMap<String, String>,
    /// Passed through to the producer only (linger.ms, compression.type …).
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
    /// librdkafka properties whose values come from the environment or a file
    /// (`"sasl.password" = { env = "KAFKA_SASL_PASSWORD" }`); checked in `secrets.rs`, which
    /// reports a malformed entry without echoing it.
    #[serde(default)]
    #[allow(dead_code)] // read (with positions) by secrets.rs, from the file text
    pub secrets: BTreeMap<String, serde::de::IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutput {
    pub changes_topic: Option<String>,
    pub membership_topic: Option<String>,
    pub dlq_topic: Option<String>,
    /// Partitions of created output topics (default: as many as the input topics).
    pub partitions: Option<i32>,
    pub replication_factor: Option<i32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub dir: Option<String>,
    pub block_cache_mb: Option<usize>,
    pub sync_writes: Option<bool>,
    /// The compacted topic each partition's state is mirrored to (see `crate::changelog`).
    pub changelog_topic: Option<String>,
    /// Warm copies kept of each partition by instances that do not own it (`pipeline::standby`).
    pub standby_replicas: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    pub listen: Option<String>,
    /// `"tokens"` (bearer tokens required) or `"none"` (no access control, even off loopback);
    /// unset: tokens when some are configured.
    pub auth: Option<String>,
    /// A file of `NAME:ROLE:sha256:HEX` lines, relative to the config file.
    pub tokens_file: Option<String>,
    /// Entries in the tokens-file format (`SEGMENTER__HTTP__TOKENS`, comma-separated).
    pub tokens: Option<Vec<String>>,
    pub max_body_bytes: Option<usize>,
    /// How long one request may take, from its first byte to the answer (e.g. "30s").
    pub request_timeout: Option<String>,
    /// Previews running at once; more are answered 429.
    pub preview_concurrency: Option<usize>,
    /// Stored customer states one preview reads at most.
    pub preview_max_scan: Option<u64>,
    /// PEM files of the certificate chain and its private key: HTTPS instead of HTTP.
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
}
