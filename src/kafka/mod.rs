//! The only place that names rdkafka: client configuration, the idempotent producer and its
//! delivery acknowledgements, topic checks and creation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use crate::metrics::Metrics;
use crate::outbox::Publish;
use crate::settings::KafkaSettings;

pub mod changelog;
pub mod consumer;
pub mod health;
pub mod sink;
pub mod txn;

pub use health::ClientHealth;

/// Kafka-side failures, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("kafka: {what}: {source}")]
    Client {
        what: String,
        #[source]
        source: KafkaError,
    },
    /// librdkafka refused a property (the value is left out: it may be a secret).
    #[error("kafka: {what}: configuration property {key:?}: {reason}")]
    Config {
        what: String,
        key: String,
        reason: String,
    },
    #[error("input topics are not co-partitioned: {0}")]
    NotCoPartitioned(String),
    #[error("input topic {0:?} does not exist")]
    MissingInput(String),
    #[error("creating topic {topic:?}: {reason}")]
    Create { topic: String, reason: String },
}

fn client(what: impl Into<String>) -> impl FnOnce(KafkaError) -> KafkaSetupError {
    let what = what.into();
    move |source| match source {
        // rdkafka's message for a refused property ends with the value, which may be a secret
        // (or a secret set under a misspelt key): keep the key and librdkafka's reason only.
        KafkaError::ClientConfig(_, reason, key, _) => {
            KafkaSetupError::Config { what, key, reason }
        }
        source => KafkaSetupError::Client { what, source },
    }
}

/// Brokers plus every `[kafka.client]` pass-through setting (security, SASL, TLS…) and the
/// `[kafka.secrets]` read from the environment or files.
pub fn base_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.brokers);
    for (key, value) in &settings.client {
        config.set(key, value);
    }
    for secret in &settings.secrets {
        config.set(&secret.key, secret.value.expose());
    }
    config
}

/// The base config, then the role's pass-through settings, then our defaults for whatever the
/// user did not set.
fn layered<'a>(
    settings: &KafkaSettings,
    overrides: impl IntoIterator<Item = (&'a String, &'a String)>,
    defaults: &[(&str, &str)],
) -> ClientConfig {
    let mut config = base_config(settings);
    for (key, value) in overrides {
        config.set(key, value);
    }
    for (key, value) in defaults {
        if config.get(key).is_none() {
            config.set(*key, *value);
        }
    }
    config
}

/// Consumer settings: no auto-commit (segmenter stores its own offsets with the state),
/// eager range assignment (partition p of every co-partitioned topic lands on one member),
/// bounded prefetch.
///
/// The prefetch bound is checked by librdkafka before each fetch; while a partition's queue is
/// over it, the next check waits `fetch.queue.backoff.ms`, 1 s by default — however soon the
/// worker empties the queue. One message larger than the bound (a 10 MB poison message, legal
/// where the topic allows it) fills the queue by itself, so with the default every such message
/// idled its partition for a second (BENCHMARKS.md, "Poison at rate"). Checking again after
/// 10 ms costs a timer wake-up per full partition, nothing when the queue is not full.
pub fn consumer_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = layered(
        settings,
        &settings.consumer,
        &[
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            ("partition.assignment.strategy", "range"),
            ("queued.max.messages.kbytes", "8192"),
            ("fetch.queue.backoff.ms", "10"),
            ("session.timeout.ms", "10000"),
            // Consumer lag per partition for the metrics comes from these statistics.
            ("statistics.interval.ms", "5000"),
        ],
    );
    config.set("group.id", &settings.group_id);
    // `processing.isolation` wins over a pass-through `isolation.level`: exactly-once rests on it.
    config.set(
        "isolation.level",
        if settings.read_committed {
            "read_committed"
        } else {
            "read_uncommitted"
        },
    );
    if let Some(instance) = &settings.instance_id {
        config.set("group.instance.id", instance);
    }
    config
}

/// Producer settings: idempotent (no duplicates or reordering from retries), acks from all
/// replicas, retried forever (`message.timeout.ms=0`: the outbox holds a record until Kafka takes
/// it), Java-compatible key partitioning.
pub fn producer_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = layered(
        settings,
        &settings.producer,
        &[
            ("linger.ms", "5"),
            ("compression.type", "lz4"),
            ("partitioner", "murmur2_random"),
            ("queue.buffering.max.messages", "200000"),
        ],
    );
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "0");
    config
}

pub use crate::pipeline::relay::Ack;

/// Acknowledgements from the producer's delivery callback, per input partition, for the
/// partition workers to collect.
#[derive(Default)]
pub struct AckBoard {
    acked: Mutex<HashMap<i32, Vec<Ack>>>,
    failed: Mutex<Vec<String>>,
    /// One more than the highest producer generation that hit a fatal error (0: none).
    fatal: AtomicU64,
}

impl AckBoard {
    /// Records of `partition`'s outbox acknowledged since the last call.
    pub fn take(&self, partition: i32) -> Vec<Ack> {
        match self.acked.lock() {
            Ok(mut acked) => acked.remove(&partition).unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    /// The highest producer generation that hit a fatal error, if any.
    pub fn fatal_generation(&self) -> Option<u64> {
        self.fatal.load(Ordering::Acquire).checked_sub(1)
    }

    /// Producer `generation` hit a fatal error: it accepts nothing more and must be replaced.
    pub fn report_fatal(&self, generation: u64) {
        self.fatal
            .fetch_max(generation.saturating_add(1), Ordering::AcqRel);
    }

    /// The first permanent delivery failure, if any.
    pub fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .ok()
            .and_then(|failed| failed.first().cloned())
    }
}

/// Which record a delivery report is about: (input partition, outbox sequence number, part of
/// the entry).
type RecordRef = (i32, u64, u8);

/// The producer's context: routes each delivery report to the [`AckBoard`].
pub struct DeliveryContext {
    pub board: Arc<AckBoard>,
    pub metrics: Arc<Metrics>,
    /// Which producer of the [`Publisher`] this is.
    pub generation: u64,
    /// Where connection problems (TLS, SASL, unreachable brokers) are reported.
    pub health: Arc<ClientHealth>,
}

impl ClientContext for DeliveryContext {
    /// Client-level errors (a broker unreachable, a connection lost): librdkafka retries them
    /// itself; records wait in its queue and, beyond that, in the outbox. A fatal error of the
    /// idempotent producer is reported to the board: the producer is replaced.
    fn error(&self, error: KafkaError, reason: &str) {
        if is_fatal(&error) {
            tracing::error!(
                %error,
                reason,
                generation = self.generation,
                "producer fatal error; it will be replaced"
            );
            self.board.report_fatal(self.generation);
            return;
        }
        self.metrics
            .publish_errors
            .with_label_values(&["transport"])
            .inc();
        self.health.report("producer", &error, reason);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<RecordRef>;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Self::DeliveryOpaque) {
        let (partition, seq, part) = *opaque;
        match result {
            Ok(message) => {
                let offset = rdkafka::Message::offset(message);
                if let Ok(mut acked) = self.board.acked.lock() {
                    acked
                        .entry(partition)
                        .or_default()
                        .push(Ack { seq, part, offset });
                }
            }
            Err((
                KafkaError::MessageProduction(
                    RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight,
                ),
                _,
            )) => {
                // Purged at shutdown: the record stays in the outbox and is published next time.
                tracing::debug!(
                    partition,
                    seq,
                    part,
                    "unpublished record kept in the outbox"
                );
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::Fatal), _)) => {
                // The producer failed as a whole (see `Publisher`): the record stays in the
                // outbox and is published again by its replacement.
                tracing::debug!(
                    partition,
                    seq,
                    part,
                    "record of a failed producer kept in the outbox"
                );
                self.board.report_fatal(self.generation);
            }
            Err((error, _)) => {
                // Retried forever otherwise (message.timeout.ms=0), so this is permanent (e.g.
                // larger than the broker accepts). The record is NOT acknowledged: it stays in
                // the outbox and the service stops with the reason instead of dropping it.
                tracing::error!(partition, seq, part, %error, "delivery failed permanently");
                self.metrics
                    .publish_errors
                    .with_label_values(&["fatal"])
                    .inc();
                if let Ok(mut failed) = self.board.failed.lock() {
                    failed.push(format!(
                        "publishing part {part} of partition {partition} outbox entry {seq}: {error}"
                    ));
                }
            }
        }
    }
}

pub type Producer = ThreadedProducer<DeliveryContext>;

/// What [`send`] did with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Handed to the producer; its acknowledgement will arrive on the [`AckBoard`].
    Queued,
    /// The producer's queue stayed full until `give_up` said stop (shutdown or revocation with
    /// Kafka unreachable): the record was not handed over and stays in the outbox.
    GaveUp,
}

/// How long [`send`] sleeps between attempts while the producer's queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(5);

/// Enqueues part `part` of outbox entry `seq` for delivery; its acknowledgement arrives on the
/// [`AckBoard`] under `partition`. A full local queue means wait, never drop — until `give_up`
/// returns true (checked between attempts), so a stop with Kafka gone is not held up forever.
pub fn send(
    producer: &Producer,
    partition: i32,
    seq: u64,
    part: u8,
    record: Publish<'_>,
    give_up: &dyn Fn() -> bool,
) -> Result<Enqueued, KafkaError> {
    let mut base: BaseRecord<'_, [u8], [u8], Box<RecordRef>> =
        BaseRecord::with_opaque_to(record.topic, Box::new((partition, seq, part)));
    // Only dead letters carry headers; an empty list would still be allocated by librdkafka
    // for every change.
    if !record.headers.is_empty() {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (name, value) in record.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
        base = base.headers(headers);
    }
    if let Some(key) = record.key {
        base = base.key(key);
    }
    if let Some(to) = record.partition {
        base = base.partition(to);
    }
    if let Some(payload) = record.payload {
        base = base.payload(payload);
    }
    loop {
        match producer.send(base) {
            Ok(()) => return Ok(Enqueued::Queued),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                if give_up() {
                    return Ok(Enqueued::GaveUp);
                }
                base = returned;
                std::thread::sleep(QUEUE_FULL_PAUSE);
            }
            Err((error, _)) => return Err(error),
        }
    }
}

/// Whether a `send` failed because the producer as a whole did (see [`Publisher`]).
pub fn is_fatal(error: &KafkaError) -> bool {
    error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal)
}

/// Creates an idempotent producer (generation `generation` of a [`Publisher`]).
pub fn producer(
    settings: &KafkaSettings,
    board: Arc<AckBoard>,
    metrics: Arc<Metrics>,
    generation: u64,
    health: Arc<ClientHealth>,
) -> Result<Producer, KafkaSetupError> {
    producer_config(settings)
        .create_with_context(DeliveryContext {
            board,
            metrics,
            generation,
            health,
        })
        .map_err(client("creating the producer"))
}

/// The service's idempotent producer, replaceable. librdkafka turns some broker misbehaviour — a
/// sequence desynchronisation, as after a broker lost records it had acknowledged — into a fatal
/// error after which the producer accepts nothing. The publisher then creates a fresh one (a new
/// producer id, generation + 1) and every partition worker hands its unacknowledged outbox
/// entries to it again: duplicates at worst, with the same change ids, never a loss.
pub struct Publisher {
    settings: KafkaSettings,
    board: Arc<AckBoard>,
    metrics: Arc<Metrics>,
    generation: AtomicU64,
    current: RwLock<Arc<Producer>>,
    health: Arc<ClientHealth>,
}

impl Publisher {
    pub fn new(
        settings: &KafkaSettings,
        board: Arc<AckBoard>,
        metrics: Arc<Metrics>,
    ) -> Result<Publisher, KafkaSetupError> {
        let health = ClientHealth::new(settings);
        let first = producer(settings, board.clone(), metrics.clone(), 0, health.clone())?;
        Ok(Publisher {
            settings: settings.clone(),
            board,
            metrics,
            generation: AtomicU64::new(0),
            current: RwLock::new(Arc::new(first)),
            health,
        })
    }

    /// Connection problems reported by the service's Kafka clients (shared with the consumer).
    pub fn health(&self) -> Arc<ClientHealth> {
        self.health.clone()
    }

    /// The current producer's generation (cheap: workers check it every loop).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current producer and its generation.
    pub fn current(&self) -> (u64, Arc<Producer>) {
        let current = match self.current.read() {
            Ok(current) => current,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Both under the lock, which a renewal holds while it changes them.
        (self.generation(), current.clone())
    }

    /// Replaces the producer if it hit a fatal error and has not been replaced yet (several
    /// workers may notice the same failure; one replacement serves them all).
    pub fn renew_if_failed(&self) -> Result<(), KafkaSetupError> {
        let Some(failed) = self.board.fatal_generation() else {
            return Ok(());
        };
        if failed < self.generation() {
            return Ok(());
        }
        let mut current = match self.current.write() {
            Ok(current) => current,
            Err(poisoned) => poisoned.into_inner(),
        };
        let generation = self.generation();
        if failed < generation {
            return Ok(());
        }
        let next = generation + 1;
        let fresh = producer(
            &self.settings,
            self.board.clone(),
            self.metrics.clone(),
            next,
            self.health.clone(),
        )?;
        // The failed producer is dropped by whoever holds it last; what it still had queued is
        // purged (the entries stay in the outbox).
        *current = Arc::new(fresh);
        self.generation.store(next, Ordering::Release);
        self.metrics
            .publish_errors
            .with_label_values(&["producer_reset"])
            .inc();
        tracing::warn!(
            generation = next,
            "replaced the producer after a fatal error; unacknowledged records are published again"
        );
        Ok(())
    }

    /// Waits up to `timeout` for the current producer's queue to drain.
    pub fn flush(&self, timeout: Duration) {
        let (_, producer) = self.current();
        rdkafka::producer::Producer::flush(&*producer, timeout).ok();
    }
}

/// Partition count of every input topic; they must all be equal (co-partitioned).
pub fn input_partitions<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topics: &[String],
    timeout: Duration,
) -> Result<i32, KafkaSetupError> {
    let mut counts = Vec::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(client(format!("reading metadata of {topic}")))?;
        let partitions = metadata
            .topics()
            .first()
            .filter(|t| t.error().is_none())
            .map_or(0, |t| t.partitions().len());
        if partitions == 0 {
            return Err(KafkaSetupError::MissingInput(topic.clone()));
        }
        counts.push((topic.clone(), partitions as i32));
    }
    let first = counts.first().map_or(0, |(_, n)| *n);
    if counts.iter().any(|(_, n)| *n != first) {
        let listing: Vec<String> = counts.iter().map(|(t, n)| format!("{t}: {n}")).collect();
        return Err(KafkaSetupError::NotCoPartitioned(format!(
            "{} (every input topic needs the same partition count, keyed by customer id)",
            listing.join(", ")
        )));
    }
    Ok(first)
}

/// An output topic to make sure of.
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub compact: bool,
}

/// Creates the topics that do not exist yet (existing ones are left as they are).
pub async fn ensure_topics(
    settings: &KafkaSettings,
    specs: &[TopicSpec],
    replication: i32,
    timeout: Duration,
) -> Result<(), KafkaSetupError> {
    let probe: BaseConsumer = base_config(settings)
        .create()
        .map_err(client("creating a metadata client"))?;
    let mut missing = Vec::new();
    for spec in specs {
        let metadata = probe
            .fetch_metadata(Some(&spec.name), timeout)
            .map_err(client(format!("reading metadata of {}", spec.name)))?;
        let exists = metadata
            .topics()
            .first()
            .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty());
        if !exists {
            missing.push(spec);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = base_config(settings)
        .create()
        .map_err(client("creating the admin client"))?;
    let topics: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|spec| {
            let topic = NewTopic::new(
                &spec.name,
                spec.partitions,
                TopicReplication::Fixed(replication),
            );
            if spec.compact {
                topic.set("cleanup.policy", "compact")
            } else {
                topic
            }
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(timeout));
    let results = admin
        .create_topics(&topics, &options)
        .await
        .map_err(client("creating topics"))?;
    for result in results {
        match result {
            Ok(name) => tracing::info!(topic = %name, "created topic"),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::info!(topic = %name, "topic already exists");
            }
            Err((name, code)) => {
                return Err(KafkaSetupError::Create {
                    topic: name,
                    reason: code.to_string(),
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn settings(consumer: &[(&str, &str)], producer: &[(&str, &str)]) -> KafkaSettings {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        KafkaSettings {
            brokers: "b:9092".into(),
            group_id: "g".into(),
            instance_id: Some("pod-1".into()),
            client: map(&[("security.protocol", "SASL_SSL")]),
            consumer: map(consumer),
            producer: map(producer),
            secrets: Vec::new(),
            guarantee: Default::default(),
            read_committed: false,
        }
    }

    #[test]
    fn pass_through_settings_win_over_defaults_but_not_over_guarantees() {
        let config = consumer_config(&settings(
            &[("session.timeout.ms", "6000"), ("group.id", "other")],
            &[],
        ));
        assert_eq!(config.get("bootstrap.servers"), Some("b:9092"));
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.get("session.timeout.ms"), Some("6000"));
        assert_eq!(config.get("enable.auto.commit"), Some("false"));
        assert_eq!(
            config.get("fetch.queue.backoff.ms"),
            Some("10"),
            "a full prefetch queue is checked again soon, not after librdkafka's 1 s"
        );
        assert_eq!(config.get("group.id"), Some("g"), "kafka.group_id decides");
        assert_eq!(config.get("isolation.level"), Some("read_uncommitted"));
        assert_eq!(config.get("group.instance.id"), Some("pod-1"));

        let config = producer_config(&settings(&[], &[("linger.ms", "0"), ("acks", "1")]));
        assert_eq!(config.get("linger.ms"), Some("0"));
        assert_eq!(config.get("compression.type"), Some("lz4"));
        assert_eq!(
            config.get("acks"),
            Some("all"),
            "no-loss settings are not negotiable"
        );
        assert_eq!(config.get("enable.idempotence"), Some("true"));
    }

    /// A full producer queue used to be retried with no end, so a stop with Kafka gone hung;
    /// `send` now waits only while `give_up` says go on.
    #[test]
    fn a_full_queue_waits_until_give_up_says_stop() {
        let mut kafka = settings(&[], &[("queue.buffering.max.messages", "1")]);
        // Nothing listens on port 1: the one record the queue holds is never delivered.
        kafka.brokers = "127.0.0.1:1".into();
        kafka.client.clear();
        let metrics = Metrics::new("v", &[]);
        let health = ClientHealth::new(&kafka);
        let producer = producer(&kafka, Arc::new(AckBoard::default()), metrics, 0, health)
            .expect("creating a producer");
        let record = Publish {
            topic: "t",
            partition: None,
            key: Some(b"k"),
            payload: Some(b"v"),
            headers: &[],
        };
        let first = send(&producer, 0, 0, 0, record, &|| false).expect("first send");
        assert_eq!(first, Enqueued::Queued);

        let (done, result) = std::sync::mpsc::sync_channel(1);
        let producer = Arc::new(producer);
        let sender = producer.clone();
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let give_up = || started.elapsed() >= Duration::from_millis(300);
            let record = Publish {
                topic: "t",
                partition: None,
                key: Some(b"k"),
                payload: Some(b"v"),
                headers: &[],
            };
            let outcome = send(&sender, 0, 1, 0, record, &give_up);
            let _ = done.send((outcome.map_err(|e| e.to_string()), started.elapsed()));
        });
        let (outcome, waited) = result
            .recv_timeout(Duration::from_secs(10))
            .expect("send returned within 10 s");
        assert_eq!(outcome, Ok(Enqueued::GaveUp));
        assert!(
            waited >= Duration::from_millis(300),
            "it waited for room until told to stop ({waited:?})"
        );
    }

    /// TLS and SASL are compiled in (rdkafka's `ssl` feature, system OpenSSL): a build that
    /// loses them fails here instead of at a customer's `security.protocol = "SASL_SSL"`.
    /// GSSAPI (Kerberos) and OIDC token fetching are deliberately not built (README).
    #[test]
    fn librdkafka_is_built_with_tls_and_sasl() {
        let native = ClientConfig::new()
            .create_native_config()
            .expect("a native config");
        let features = native
            .get("builtin.features")
            .expect("librdkafka reports its features");
        let built: Vec<&str> = features.split(',').collect();
        for needed in [
            "ssl",
            "sasl",
            "sasl_plain",
            "sasl_scram",
            "sasl_oauthbearer",
        ] {
            assert!(built.contains(&needed), "{needed} missing from {features}");
        }
    }
}
