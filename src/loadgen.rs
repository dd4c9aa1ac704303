//! `segmenter generate`: realistic customer events ([`crate::generate`]) produced to Kafka at a
//! steady rate, stamped with the wall clock, keyed by customer id and routed to the input topic of
//! their kind (web/app activity, email, orders). Feeds docker compose and `segmenter demo`.
//!
//! Blocking (librdkafka's threaded producer plus sleeps for pacing): run it on a thread of its own.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use crate::generate::{Generator, GeneratorConfig};
use crate::pipeline::wall_clock_ms;

/// Longest single sleep while pacing, so `stop` is noticed quickly.
const MAX_NAP: Duration = Duration::from_millis(200);
/// Wait before retrying a send when librdkafka's local queue is full.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(5);
/// Time given to in-flight records at the end.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Problems that stop the generator.
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error("--topics: {0}")]
    Topics(String),
    #[error("kafka: creating the producer: {0}")]
    Producer(#[source] KafkaError),
}

/// Which topic each kind of event goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    /// Page and screen views, product and checkout events, `identify`, and unusable lines.
    pub activity: String,
    /// `Email …` events (delivered, opened, link clicked).
    pub email: String,
    /// `Order Completed`.
    pub orders: String,
}

impl Routing {
    /// Every event to one topic.
    pub fn single(topic: &str) -> Routing {
        Routing {
            activity: topic.to_string(),
            email: topic.to_string(),
            orders: topic.to_string(),
        }
    }

    /// From `--topics`: one topic takes everything; otherwise activity, email and orders in that
    /// order (with two, orders go to the first).
    pub fn from_topics(topics: &[String]) -> Result<Routing, LoadgenError> {
        if let Some(blank) = topics.iter().position(|t| t.trim().is_empty()) {
            return Err(LoadgenError::Topics(format!(
                "topic {} is empty",
                blank + 1
            )));
        }
        match topics {
            [] => Err(LoadgenError::Topics("no topic given".to_string())),
            [one] => Ok(Routing::single(one)),
            [activity, email] => Ok(Routing {
                activity: activity.clone(),
                email: email.clone(),
                orders: activity.clone(),
            }),
            [activity, email, orders] => Ok(Routing {
                activity: activity.clone(),
                email: email.clone(),
                orders: orders.clone(),
            }),
            _ => Err(LoadgenError::Topics(format!(
                "at most three topics (activity, email, orders), got {}",
                topics.len()
            ))),
        }
    }

    /// The topic for one generated line and its key (the customer id; none for a line without
    /// one, which Kafka then spreads over the partitions).
    pub fn route<'a>(&self, line: &'a str) -> (&str, Option<Cow<'a, str>>) {
        let Ok(head) = serde_json::from_str::<Head<'a>>(line) else {
            return (&self.activity, None);
        };
        let key = head.user_id.or(head.anonymous_id);
        let is_track = head.kind.as_deref() == Some("track");
        let topic = match head.event.as_deref() {
            Some(event) if is_track && event.starts_with("Email ") => &self.email,
            Some("Order Completed") if is_track => &self.orders,
            _ => &self.activity,
        };
        (topic, key)
    }
}

/// The fields of a Segment-Spec event that decide its topic and key.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    event: Option<Cow<'a, str>>,
    #[serde(rename = "userId", borrow, default)]
    user_id: Option<Cow<'a, str>>,
    #[serde(rename = "anonymousId", borrow, default)]
    anonymous_id: Option<Cow<'a, str>>,
}

/// What to produce.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub brokers: String,
    /// Events per second (on average; gaps are exponentially distributed).
    pub rate: f64,
    /// Size of the customer base (`c-0` … `c-{customers-1}`).
    pub customers: u64,
    pub routing: Routing,
    /// Stop after this long (`None`: until `stop` is set).
    pub duration: Option<Duration>,
    /// Same seed ⇒ same customers and sequence of events.
    pub seed: u64,
    /// Fractions of lines that are late, repeated (same `messageId`) and unusable.
    pub late_fraction: f64,
    pub duplicate_fraction: f64,
    pub malformed_fraction: f64,
    /// Log a progress line this often (`None`: quiet).
    pub report_every: Option<Duration>,
}

impl LoadOptions {
    /// Realistic defaults: a trickle of late, duplicate and malformed lines (0.2 %, 0.2 %,
    /// 0.1 %) so dead-letter and de-duplication paths see traffic; seeded from the clock.
    pub fn new(brokers: &str, rate: f64, customers: u64, routing: Routing) -> LoadOptions {
        LoadOptions {
            brokers: brokers.to_string(),
            rate,
            customers,
            routing,
            duration: None,
            seed: wall_clock_ms().unsigned_abs(),
            late_fraction: 0.002,
            duplicate_fraction: 0.002,
            malformed_fraction: 0.001,
            report_every: None,
        }
    }
}

/// Counts at the end of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Handed to the producer.
    pub sent: u64,
    /// Acknowledged by Kafka.
    pub delivered: u64,
    /// Refused by the producer or reported failed by Kafka.
    pub failed: u64,
}

/// Delivery reports, counted.
#[derive(Default)]
struct Deliveries {
    delivered: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _opaque: ()) {
        match result {
            Ok(_) => self.delivered.fetch_add(1, Ordering::Relaxed),
            Err((error, _)) => {
                tracing::debug!(%error, "generate: delivery failed");
                self.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// Produces generated events until `stop` is set or `options.duration` has passed, then waits
/// (bounded) for in-flight records.
pub fn run(options: &LoadOptions, stop: &AtomicBool) -> Result<LoadStats, LoadgenError> {
    let producer: ThreadedProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", &options.brokers)
        .set("client.id", "segmenter-generate")
        .set("linger.ms", "5")
        // Java-compatible key hashing: a customer lands on the same partition number in every
        // co-partitioned input topic.
        .set("partitioner", "murmur2_random")
        .create_with_context(Deliveries::default())
        .map_err(LoadgenError::Producer)?;
    let start_ms = wall_clock_ms();
    let started = Instant::now();
    let deadline = options.duration.map(|d| started + d);
    let mut generator = Generator::new(GeneratorConfig {
        customers: options.customers,
        events: u64::MAX / 2,
        seed: options.seed,
        start_ms,
        events_per_second: options.rate,
        late_fraction: options.late_fraction,
        duplicate_fraction: options.duplicate_fraction,
        malformed_fraction: options.malformed_fraction,
    });
    let mut stats = LoadStats::default();
    let mut refused = 0;
    let mut next_report = options.report_every.map(|every| started + every);
    let finished =
        |now: Instant| stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| now >= d);
    'lines: while let Some(generated) = generator.next_line() {
        // Pace by the generator's stream time: line n goes out at its offset from the start.
        let due =
            Duration::from_millis(generated.stream_time_ms.saturating_sub(start_ms).max(0) as u64);
        loop {
            let now = Instant::now();
            if finished(now) {
                break 'lines;
            }
            let elapsed = now - started;
            if elapsed >= due {
                break;
            }
            std::thread::sleep((due - elapsed).min(MAX_NAP));
        }
        let (topic, key) = options.routing.route(&generated.line);
        let mut record = BaseRecord::<str, str>::to(topic).payload(&generated.line);
        if let Some(key) = key.as_deref() {
            record = record.key(key);
        }
        // A full local queue waits (Kafka slow or away); anything else is counted and skipped.
        loop {
            match producer.send(record) {
                Ok(()) => {
                    stats.sent += 1;
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    if finished(Instant::now()) {
                        break 'lines;
                    }
                    record = returned;
                    std::thread::sleep(QUEUE_FULL_BACKOFF);
                }
                Err((error, _)) => {
                    tracing::debug!(%error, topic, "generate: send refused");
                    refused += 1;
                    break;
                }
            }
        }
        if let (Some(at), Some(every)) = (next_report, options.report_every) {
            if Instant::now() >= at {
                let context = producer.context();
                tracing::info!(
                    sent = stats.sent,
                    delivered = context.delivered.load(Ordering::Relaxed),
                    failed = context.failed.load(Ordering::Relaxed) + refused,
                    "generate: progress"
                );
                next_report = Some(at + every);
            }
        }
    }
    if let Err(error) = producer.flush(FLUSH_TIMEOUT) {
        tracing::warn!(%error, "generate: records still in flight at exit");
    }
    let context = producer.context();
    stats.delivered = context.delivered.load(Ordering::Relaxed);
    stats.failed = context.failed.load(Ordering::Relaxed) + refused;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    use rdkafka::Message;

    fn three() -> Routing {
        Routing::from_topics(&["clicks".into(), "email".into(), "orders".into()]).expect("valid")
    }

    #[test]
    fn topics_map_to_activity_email_orders() {
        assert_eq!(
            three(),
            Routing {
                activity: "clicks".into(),
                email: "email".into(),
                orders: "orders".into()
            }
        );
        assert_eq!(
            Routing::from_topics(&["events".into()]).expect("valid"),
            Routing::single("events")
        );
        let two = Routing::from_topics(&["web".into(), "mail".into()]).expect("valid");
        assert_eq!((two.orders.as_str(), two.email.as_str()), ("web", "mail"));
        assert!(Routing::from_topics(&[]).is_err());
        assert!(Routing::from_topics(&["a".into(), " ".into()]).is_err());
        assert!(Routing::from_topics(&["a".into(), "b".into(), "c".into(), "d".into()]).is_err());
    }

    #[test]
    fn routes_by_event_kind_and_keys_by_customer() {
        let routing = three();
        let cases = [
            (
                r#"{"type":"track","event":"Order Completed","userId":"c-1"}"#,
                "orders",
                Some("c-1"),
            ),
            (
                r#"{"type":"track","event":"Email Opened","userId":"c-2"}"#,
                "email",
                Some("c-2"),
            ),
            (
                r#"{"type":"track","event":"Product Added","anonymousId":"a-9"}"#,
                "clicks",
                Some("a-9"),
            ),
            (
                r#"{"type":"page","name":"Home","userId":"c-3","anonymousId":"a-3"}"#,
                "clicks",
                Some("c-3"),
            ),
            (
                r#"{"type":"identify","userId":"c-4","traits":{}}"#,
                "clicks",
                Some("c-4"),
            ),
            (
                r#"{"type":"page","event":"Order Completed","userId":"c-5"}"#,
                "clicks",
                Some("c-5"),
            ),
            (
                r#"{"type":"track","event":"Email\u0020Delivered","userId":"c-\u0036"}"#,
                "email",
                Some("c-6"),
            ),
            (
                r#"{"type":"track","event":"Product Viewed"}"#,
                "clicks",
                None,
            ),
            (
                r#"[{"type":"track","event":"Order Completed","userId":"c-7"}]"#,
                "clicks",
                None,
            ),
            ("event=Order+Completed&userId=c-8", "clicks", None),
        ];
        for (line, topic, key) in cases {
            let (got_topic, got_key) = routing.route(line);
            assert_eq!((got_topic, got_key.as_deref()), (topic, key), "{line}");
        }
    }

    /// Produces for a moment into an in-process broker and reads everything back: every line
    /// lands on its kind's topic, keyed by customer, and a customer's events share one partition
    /// number across the three topics.
    #[test]
    fn produces_routed_keyed_co_partitioned_events_at_the_rate() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        for topic in ["clicks", "email", "orders"] {
            cluster.create_topic(topic, 4, 1).expect("topic");
        }
        let mut options = LoadOptions::new(&cluster.bootstrap_servers(), 2000.0, 50, three());
        options.duration = Some(Duration::from_secs(2));
        options.seed = 7;
        let started = Instant::now();
        let stats = run(&options, &AtomicBool::new(false)).expect("runs");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(12),
            "{took:?}"
        );
        // 2 s at 2000/s: about 4000 lines (exponential gaps; generous bounds).
        assert!((2500..=5500).contains(&stats.sent), "{stats:?}");
        assert_eq!(stats.failed, 0, "{stats:?}");
        assert_eq!(stats.delivered, stats.sent, "{stats:?}");

        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "loadgen-test")
            .create()
            .expect("consumer");
        let mut assignment = TopicPartitionList::new();
        for topic in ["clicks", "email", "orders"] {
            for partition in 0..4 {
                assignment
                    .add_partition_offset(topic, partition, Offset::Beginning)
                    .expect("add");
            }
        }
        consumer.assign(&assignment).expect("assign");
        let mut read = 0;
        let mut events_by_topic: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut partition_of: BTreeMap<String, BTreeSet<i32>> = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while read < stats.sent && Instant::now() < deadline {
            let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            read += 1;
            let payload = std::str::from_utf8(message.payload().expect("payload")).expect("utf8");
            let Ok(value) = serde_json::from_str::<serde_json::Value>(payload) else {
                assert_eq!(
                    message.topic(),
                    "clicks",
                    "unusable line elsewhere: {payload}"
                );
                continue;
            };
            let name = value["event"]
                .as_str()
                .or(value["type"].as_str())
                .unwrap_or("?")
                .to_string();
            events_by_topic
                .entry(message.topic().to_string())
                .or_default()
                .insert(name);
            let customer = value["userId"].as_str().or(value["anonymousId"].as_str());
            if let Some(customer) = customer {
                let key = message.key().map(|k| std::str::from_utf8(k).expect("utf8"));
                assert_eq!(key, Some(customer), "{payload}");
                partition_of
                    .entry(customer.to_string())
                    .or_default()
                    .insert(message.partition());
            }
        }
        assert_eq!(read, stats.sent, "every produced line is read back");
        // Two seconds of stream time is the start of sessions (orders come tens of seconds into
        // one, campaigns after 5,000 lines): whatever reached orders and email must be theirs.
        let orders = events_by_topic.get("orders").cloned().unwrap_or_default();
        assert!(orders.iter().all(|e| e == "Order Completed"), "{orders:?}");
        let email = events_by_topic.get("email").cloned().unwrap_or_default();
        assert!(email.iter().all(|e| e.starts_with("Email ")), "{email:?}");
        let clicks = &events_by_topic["clicks"];
        assert!(
            clicks.contains("Product Viewed") && clicks.contains("identify"),
            "{clicks:?}"
        );
        assert!(
            clicks
                .iter()
                .all(|e| !e.starts_with("Email ") && e != "Order Completed"),
            "{clicks:?}"
        );
        for (customer, partitions) in &partition_of {
            assert_eq!(
                partitions.len(),
                1,
                "{customer} on partitions {partitions:?}"
            );
        }
    }
}
