//! Helpers for tests that run the real `segmenter run` binary against a tansu broker: a config
//! writer, an input producer, output-topic readers, the service as a child process (SIGKILL /
//! SIGTERM), `segmenter replay` as an oracle, and bounded waits with clear timeout messages.
//!
//! Include it next to the broker harness:
//!
//! ```ignore
//! #[path = "support/tansu.rs"]
//! mod tansu;
//! #[path = "support/service.rs"]
//! mod service;
//! ```

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{DeliveryResult, Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _, ProducerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use serde_json::Value;

/// The service binary under test.
pub const SEGMENTER: &str = env!("CARGO_BIN_EXE_segmenter");

/// Milliseconds since the epoch, from the system clock.
pub fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("system clock before 1970")
        .as_millis() as i64
}

/// RFC 3339 UTC with milliseconds, the format of the change topic's `at`.
pub fn rfc3339(ms: i64) -> String {
    segmenter::model::time::format_rfc3339(ms)
}

/// Polls `check` every 50 ms until it yields a value or `timeout` passes; then panics with
/// `what` and the last state `describe` reports.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
    describe: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}; {}",
                describe()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

// ------------------------------------------------------------------------------------------
// Configuration

/// A service configuration for one test; [`TestConfig::write`] renders it as TOML (segments
/// inline, so the same file also serves `segmenter replay`).
#[derive(Debug, Clone)]
pub struct TestConfig {
    pub brokers: String,
    pub group_id: String,
    pub input_topics: Vec<String>,
    /// `"event"` or `"wall"`.
    pub clock: &'static str,
    /// `[[segment]]` entries, as TOML.
    pub segments: String,
    pub max_event_bytes: usize,
    pub batch_size: usize,
    pub shutdown_timeout: &'static str,
    pub state_dir: PathBuf,
    pub changes_topic: String,
    pub membership_topic: String,
    pub dlq_topic: String,
    /// `[kafka.consumer]` settings; `session.timeout.ms` = 6000 by default (tansu's group join
    /// takes about half of it).
    pub consumer: BTreeMap<String, String>,
    /// Appended as is (e.g. `[kafka.client]` and `[kafka.secrets]` tables).
    pub extra_toml: String,
    /// Lines added to the `[state]` table as they are (e.g. `changelog_topic = "x"`): a table
    /// cannot be reopened further down, so `extra_toml` cannot add to it.
    pub state_extra: String,
}

impl TestConfig {
    pub fn new(brokers: &str, state_dir: &Path, input_topics: &[&str], segments: &str) -> Self {
        let consumer = BTreeMap::from([("session.timeout.ms".to_string(), "6000".to_string())]);
        TestConfig {
            brokers: brokers.to_string(),
            group_id: "segmenter-test".into(),
            input_topics: input_topics.iter().map(|t| t.to_string()).collect(),
            clock: "event",
            segments: segments.to_string(),
            max_event_bytes: 65_536,
            batch_size: 500,
            shutdown_timeout: "10s",
            state_dir: state_dir.to_path_buf(),
            changes_topic: "segment-changes".into(),
            membership_topic: "segment-membership".into(),
            dlq_topic: "segmenter-dlq".into(),
            consumer,
            extra_toml: String::new(),
            state_extra: String::new(),
        }
    }

    pub fn to_toml(&self) -> String {
        let quote = |s: &str| serde_json::to_string(s).expect("a string serializes");
        let topics: Vec<String> = self.input_topics.iter().map(|t| quote(t)).collect();
        let mut out = String::new();
        out.push_str(&self.segments);
        out.push_str(&format!(
            "\n[engine]\nclock = {}\nbatch_size = {}\nshutdown_timeout = {}\n",
            quote(self.clock),
            self.batch_size,
            quote(self.shutdown_timeout)
        ));
        out.push_str(&format!(
            "\n[input]\ntopics = [{}]\nmax_event_bytes = {}\n",
            topics.join(", "),
            self.max_event_bytes
        ));
        out.push_str(&format!(
            "\n[kafka]\nbrokers = {}\ngroup_id = {}\n\n[kafka.consumer]\n",
            quote(&self.brokers),
            quote(&self.group_id)
        ));
        for (key, value) in &self.consumer {
            out.push_str(&format!("{} = {}\n", quote(key), quote(value)));
        }
        out.push_str(&format!(
            "\n[output]\nchanges_topic = {}\nmembership_topic = {}\ndlq_topic = {}\n",
            quote(&self.changes_topic),
            quote(&self.membership_topic),
            quote(&self.dlq_topic)
        ));
        out.push_str(&format!(
            "\n[state]\ndir = {}\n",
            quote(&self.state_dir.display().to_string())
        ));
        if !self.state_extra.is_empty() {
            out.push_str(self.state_extra.trim_end());
            out.push('\n');
        }
        out.push_str("\n[http]\nlisten = \"127.0.0.1:0\"\n");
        out.push_str(&self.extra_toml);
        out
    }

    /// Writes the config to `path` and returns it.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.to_toml())
            .unwrap_or_else(|e| panic!("writing config {}: {e}", path.display()));
        path.to_path_buf()
    }
}

// ------------------------------------------------------------------------------------------
// The service process

/// `segmenter run` as a child process; stdout and stderr go to a log file shared by every start
/// of the same test (each start appends a marker line). Dropping it kills the process (SIGKILL);
/// if the test is panicking, the log's tail is printed.
pub struct Service {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    /// Where this start's output begins in the log.
    log_start: u64,
    started: Instant,
}

impl Service {
    /// Starts `segmenter run --config CONFIG`, appending its output to `log`.
    pub fn start(config: &Path, log: &Path) -> Service {
        Service::start_with_env(config, log, &[])
    }

    /// [`Service::start`] with extra environment (`RUST_LOG` may be overridden too).
    pub fn start_with_env(config: &Path, log: &Path, env: &[(&str, &str)]) -> Service {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("opening service log {}: {e}", log.display()));
        let log_start = file.metadata().map(|m| m.len()).unwrap_or(0);
        writeln!(
            file,
            "=== test: starting segmenter run --config {}",
            config.display()
        )
        .expect("writing the service log");
        let mut cmd = Command::new(SEGMENTER);
        cmd.args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("cloning the log file handle"))
            .stderr(file);
        for (key, _) in std::env::vars() {
            if key.starts_with("SEGMENTER__") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(env.iter().copied());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {SEGMENTER}: {e}"));
        Service {
            child: Some(child),
            config: config.to_path_buf(),
            log: log.to_path_buf(),
            log_start,
            started: Instant::now(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("service not running")
    }

    /// How long ago this process was started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Exit status if it has exited (without waiting).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("waiting for the service"))
    }

    /// Panics with the log tail if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_status() {
            panic!(
                "segmenter run exited unexpectedly ({status}); log:\n{}",
                self.log_tail()
            );
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal (`TERM`, `INT`…) with the `kill` command.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Waits for the process to exit; `None` on timeout (the process is left running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// This start's output so far.
    pub fn log_text(&self) -> String {
        read_from(&self.log, self.log_start)
    }

    /// The last few KiB of the whole log (every start).
    pub fn log_tail(&self) -> String {
        let len = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        read_from(&self.log, len.saturating_sub(6000))
    }

    /// Waits until this start's output contains `needle`; panics (with the log) on timeout or
    /// if the process exits first.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_text().contains(needle) {
                return;
            }
            if let Some(status) = self.try_status() {
                panic!(
                    "segmenter run exited ({status}) before logging {needle:?}; log:\n{}",
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for the service to log {needle:?}; log:\n{}",
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The address the HTTP API bound (the test configs ask for port 0), from the log.
    pub fn http_address(&mut self) -> String {
        self.wait_for_log("HTTP API listening", Duration::from_secs(30));
        let text = self.log_text();
        let line = text
            .lines()
            .find(|line| line.contains("HTTP API listening"))
            .expect("the line was just seen");
        let address = line
            .split_whitespace()
            .find_map(|word| word.strip_prefix("address="))
            .unwrap_or_else(|| panic!("no address= in {line:?}"));
        address.to_string()
    }

    /// Waits until the service has joined the group and has its partitions.
    pub fn wait_assigned(&mut self) {
        self.wait_for_log("partitions assigned", Duration::from_secs(60));
    }

    /// `GET /readyz`: status and body (503 with a `reason` while not ready).
    pub fn readyz(&mut self) -> (u16, String) {
        let address = self.http_address();
        readyz(&address)
    }

    /// How many lines of this start's output contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// The input partitions this start owns according to its log: the last `partitions
    /// assigned` list, less what `partitions revoked` took since.
    pub fn owned_partitions(&self) -> BTreeSet<i32> {
        let mut owned = BTreeSet::new();
        for line in self.log_text().lines() {
            if line.contains("partitions assigned") {
                owned = log_partitions(line);
            } else if line.contains("partitions revoked") {
                for partition in log_partitions(line) {
                    owned.remove(&partition);
                }
            }
        }
        owned
    }

    pub fn config(&self) -> &Path {
        &self.config
    }
}

/// The numbers of a `partitions=[0, 3, 6]` log field (the service's rebalance lines).
pub fn log_partitions(line: &str) -> BTreeSet<i32> {
    let Some((_, rest)) = line.split_once("partitions=[") else {
        return BTreeSet::new();
    };
    let list = rest.split(']').next().unwrap_or_default();
    list.split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// `GET /readyz` at `address`: status and body.
pub fn readyz(address: &str) -> (u16, String) {
    http(address, "GET", "/readyz", None)
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill9();
        if thread::panicking() {
            eprintln!(
                "--- segmenter log ({}), tail:\n{}",
                self.log.display(),
                self.log_tail()
            );
        }
    }
}

fn read_from(path: &Path, offset: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(path)?;
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    read().unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}

// ------------------------------------------------------------------------------------------
// Producing input

/// Counts delivery failures of the test producer.
#[derive(Default)]
pub struct DeliveryCounter {
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut last) = self.last_error.lock() {
                *last = Some(error.to_string());
            }
        }
    }
}

/// An idempotent producer for test input with explicit partitions and timestamps.
pub struct InputProducer {
    producer: BaseProducer<DeliveryCounter>,
    sent: u64,
}

impl InputProducer {
    pub fn new(brokers: &str) -> InputProducer {
        InputProducer::with_config(brokers, &[])
    }

    /// A producer with extra client settings (`security.protocol`, `ssl.ca.location` …).
    pub fn with_config(brokers: &str, extra: &[(&str, &str)]) -> InputProducer {
        let mut config = ClientConfig::new();
        for (key, value) in extra {
            config.set(*key, *value);
        }
        let producer = config
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "60000")
            // tansu on S3 storage was seen to take pipelined produce requests out of order
            // under load ("sequence desynchronization", a fatal error for an idempotent
            // producer). The service recovers from that (kafka::Publisher); the test input
            // need not depend on it: one request in flight.
            .set("max.in.flight.requests.per.connection", "1")
            .create_with_context(DeliveryCounter::default())
            .expect("creating the test producer");
        InputProducer { producer, sent: 0 }
    }

    /// Enqueues one message (waits while the local queue is full).
    pub fn send(
        &mut self,
        topic: &str,
        partition: i32,
        key: Option<&[u8]>,
        payload: &[u8],
        timestamp_ms: i64,
    ) {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic)
            .partition(partition)
            .payload(payload)
            .timestamp(timestamp_ms);
        if let Some(key) = key {
            record = record.key(key);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    returned,
                )) => {
                    record = returned;
                    self.producer.poll(Duration::from_millis(20));
                }
                Err((error, _)) => panic!("producing to {topic}/{partition}: {error}"),
            }
        }
        self.sent += 1;
        if self.sent.is_multiple_of(256) {
            self.producer.poll(Duration::ZERO);
        }
    }

    /// Enqueues one generated input line, with its topic, partition, key and timestamp.
    pub fn send_line(&mut self, line: &InputLine) {
        self.send(
            &line.topic,
            line.partition,
            line.key.as_deref(),
            &line.payload,
            line.timestamp_ms,
        );
    }

    /// Waits until everything sent is acknowledged; panics on any delivery failure.
    pub fn flush(&self) {
        self.producer
            .flush(Duration::from_secs(60))
            .expect("test producer: flush did not finish within 60 s");
        let failed = self.producer.context().failed.load(Ordering::Relaxed);
        let last = self
            .producer
            .context()
            .last_error
            .lock()
            .ok()
            .and_then(|l| l.clone());
        assert_eq!(
            failed, 0,
            "test producer: {failed} deliveries failed, last: {last:?}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Reading output

/// One record read from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Record {
    pub fn key_str(&self) -> String {
        String::from_utf8_lossy(self.key.as_deref().unwrap_or_default()).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The payload as JSON (panics with the bytes if it is not).
    pub fn json(&self) -> Value {
        let payload = self.payload.as_deref().unwrap_or_default();
        serde_json::from_slice(payload).unwrap_or_else(|e| {
            panic!(
                "{}/{}@{}: payload is not JSON ({e}): {}",
                self.topic,
                self.partition,
                self.offset,
                String::from_utf8_lossy(payload)
            )
        })
    }
}

/// A consumer assigned to every partition of one topic from the beginning (no group), which
/// reads incrementally.
pub struct TopicReader {
    brokers: String,
    topic: String,
    consumer: BaseConsumer,
    partitions: i32,
    /// Next offset to read, per partition.
    positions: HashMap<i32, i64>,
    pub records: Vec<Record>,
}

impl TopicReader {
    /// Assigns all partitions of `topic` (which must exist: a metadata request could otherwise
    /// create it with tansu's defaults).
    pub fn new(brokers: &str, topic: &str) -> TopicReader {
        TopicReader::with_config(brokers, topic, &[])
    }

    /// A reader with extra client settings (`security.protocol`, `ssl.ca.location` …).
    pub fn with_config(brokers: &str, topic: &str, extra: &[(&str, &str)]) -> TopicReader {
        let mut config = ClientConfig::new();
        for (key, value) in extra {
            config.set(*key, *value);
        }
        let consumer: BaseConsumer = config
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("test-reader-{topic}"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("allow.auto.create.topics", "false")
            .set("isolation.level", "read_uncommitted")
            .set("fetch.wait.max.ms", "50")
            .create()
            .expect("creating a test reader");
        let partitions = wait_until(
            &format!("metadata of topic {topic}"),
            Duration::from_secs(30),
            || {
                let metadata = consumer
                    .fetch_metadata(Some(topic), Duration::from_secs(5))
                    .ok()?;
                let t = metadata.topics().first()?;
                (t.error().is_none() && !t.partitions().is_empty())
                    .then(|| t.partitions().len() as i32)
            },
            || format!("topic {topic} has no partitions on {brokers}"),
        );
        let mut list = TopicPartitionList::new();
        for p in 0..partitions {
            list.add_partition_offset(topic, p, Offset::Beginning)
                .expect("adding a partition to the assignment");
        }
        consumer.assign(&list).expect("assigning the test reader");
        TopicReader {
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            consumer,
            partitions,
            positions: (0..partitions).map(|p| (p, 0)).collect(),
            records: Vec::new(),
        }
    }

    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// Polls for up to `duration`, then takes what is already fetched (for at most 2 s more);
    /// returns how many new records arrived.
    pub fn poll_for(&mut self, duration: Duration) -> usize {
        let before = self.records.len();
        let deadline = Instant::now() + duration;
        let hard_deadline = deadline + Duration::from_secs(2);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.consumer.poll(left.min(Duration::from_millis(50))) {
                Some(Ok(message)) => {
                    let headers = message
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                                .collect()
                        })
                        .unwrap_or_default();
                    self.positions
                        .insert(message.partition(), message.offset() + 1);
                    self.records.push(Record {
                        topic: message.topic().to_string(),
                        partition: message.partition(),
                        offset: message.offset(),
                        timestamp: message.timestamp().to_millis(),
                        key: message.key().map(<[u8]>::to_vec),
                        payload: message.payload().map(<[u8]>::to_vec),
                        headers,
                    });
                }
                Some(Err(error)) => eprintln!("test reader {}: {error}", self.topic),
                None if Instant::now() >= deadline => return self.records.len() - before,
                None => {}
            }
            if Instant::now() >= hard_deadline {
                return self.records.len() - before;
            }
        }
    }

    /// Total of the partitions' high watermarks now.
    pub fn high_watermarks(&self) -> HashMap<i32, i64> {
        (0..self.partitions)
            .map(|p| {
                let (_, high) = self
                    .consumer
                    .fetch_watermarks(&self.topic, p, Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("watermarks of {}/{p}: {e}", self.topic));
                (p, high)
            })
            .collect()
    }

    /// Reads until every partition reaches the high watermark it had when called.
    pub fn read_to_end(&mut self) -> &[Record] {
        let highs = self.high_watermarks();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // Transaction markers take offsets but are never delivered: the consumer's fetch
            // position passes them, the last record's offset + 1 does not.
            if let Ok(list) = self.consumer.position() {
                for element in list.elements() {
                    if let Offset::Offset(at) = element.offset() {
                        let known = self.positions.entry(element.partition()).or_insert(0);
                        *known = (*known).max(at);
                    }
                }
            }
            let behind: Vec<(i32, i64, i64)> = highs
                .iter()
                .filter(|(p, high)| self.positions.get(p).copied().unwrap_or(0) < **high)
                .map(|(p, high)| (*p, self.positions.get(p).copied().unwrap_or(0), *high))
                .collect();
            if behind.is_empty() {
                return &self.records;
            }
            assert!(
                Instant::now() < deadline,
                "test reader of {} on {}: still behind after 60 s (partition, at, high): {behind:?}",
                self.topic,
                self.brokers
            );
            self.poll_for(Duration::from_millis(100));
        }
    }
}

/// Every record of `topic` up to its current end.
pub fn read_all(brokers: &str, topic: &str) -> Vec<Record> {
    let mut reader = TopicReader::new(brokers, topic);
    reader.read_to_end();
    reader.records
}

// ------------------------------------------------------------------------------------------
// Changes and the replay oracle

/// A change event's JSON, with accessors.
pub trait ChangeJson {
    fn s(&self, field: &str) -> &str;
    fn seq(&self) -> u64;
}

impl ChangeJson for Value {
    fn s(&self, field: &str) -> &str {
        self.get(field)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("change without string field {field:?}: {self}"))
    }

    fn seq(&self) -> u64 {
        self.get("seq")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("change without seq: {self}"))
    }
}

/// Runs `segmenter replay --config CONFIG --input FILE` over `lines` (written to a file in
/// `dir` named `name`); returns the change events it prints.
pub fn replay(config: &Path, dir: &Path, name: &str, lines: &[Vec<u8>]) -> Vec<Value> {
    let input = dir.join(name);
    let mut text = Vec::new();
    for line in lines {
        assert!(
            !line.contains(&b'\n'),
            "replay input line contains a newline"
        );
        text.extend_from_slice(line);
        text.push(b'\n');
    }
    std::fs::write(&input, text).expect("writing replay input");
    let out = Command::new(SEGMENTER)
        .args(["replay", "--config"])
        .arg(config)
        .arg("--input")
        .arg(&input)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("running segmenter replay");
    assert!(
        out.status.success(),
        "segmenter replay failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("replay output is UTF-8")
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("replay line {line:?}: {e}"))
        })
        .collect()
}

/// Groups change events by customer, keeping their order.
pub fn by_customer(changes: &[Value]) -> BTreeMap<String, Vec<Value>> {
    let mut map: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for change in changes {
        map.entry(change.s("customer_id").to_string())
            .or_default()
            .push(change.clone());
    }
    map
}

/// Asserts that per (customer, segment) the seqs are exactly 1..n and the changes alternate,
/// starting with `entered`. `changes` must hold each change once.
pub fn assert_seq_alternation(changes: &[Value]) {
    let mut per: BTreeMap<(String, String), Vec<(u64, String)>> = BTreeMap::new();
    for change in changes {
        per.entry((
            change.s("customer_id").to_string(),
            change.s("segment").to_string(),
        ))
        .or_default()
        .push((change.seq(), change.s("change").to_string()));
    }
    for ((customer, segment), mut list) in per {
        list.sort();
        for (i, (seq, kind)) in list.iter().enumerate() {
            let expected_kind = if i % 2 == 0 { "entered" } else { "exited" };
            assert!(
                *seq == i as u64 + 1 && kind == expected_kind,
                "{customer}/{segment}: transitions are not 1..n alternating from entered: {list:?}"
            );
        }
    }
}

/// A small shared flag/counter for background threads.
pub type Shared<T> = Arc<Mutex<T>>;

// ------------------------------------------------------------------------------------------
// Input from the generator

/// One input message: where it goes and what it is.
#[derive(Debug, Clone)]
pub struct InputLine {
    pub topic: String,
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// The Kafka timestamp to produce with.
    pub timestamp_ms: i64,
    /// Whether the service must dead-letter it.
    pub malformed: bool,
}

/// `fnv1a_64(utf8(customer))`, the partitioner of the tests (any stable hash would do).
pub fn fnv1a(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The customer id of a Segment-Spec line (`userId`, else `anonymousId`), if it has one.
pub fn customer_of(line: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(line).ok()?;
    ["userId", "anonymousId"]
        .iter()
        .find_map(|key| value.get(*key).and_then(Value::as_str).map(str::to_string))
        .filter(|id| !id.is_empty())
}

/// `events` lines of [`segmenter::generate::Generator`] traffic for one topic, each placed on
/// partition `fnv1a(customer) % partitions` (lines without a customer by their index), keyed by
/// the customer and stamped with the generator's stream time.
pub fn generated_input(
    topic: &str,
    partitions: i32,
    config: segmenter::generate::GeneratorConfig,
) -> Vec<InputLine> {
    use segmenter::generate::{Generator, LineKind};
    let mut generator = Generator::new(config);
    let mut lines = Vec::new();
    let mut index = 0u64;
    while let Some(generated) = generator.next_line() {
        let payload = generated.line.into_bytes();
        let customer = customer_of(&payload);
        let partition = match &customer {
            Some(id) => fnv1a(id) % partitions as u64,
            None => index % partitions as u64,
        } as i32;
        lines.push(InputLine {
            topic: topic.to_string(),
            partition,
            key: customer.map(String::into_bytes),
            payload,
            timestamp_ms: generated.stream_time_ms,
            malformed: matches!(generated.kind, LineKind::Malformed(_)),
        });
        index += 1;
    }
    lines
}

/// Produces `lines` in order and waits for all acknowledgements.
pub fn produce_all(brokers: &str, lines: &[InputLine]) {
    let mut producer = InputProducer::new(brokers);
    for line in lines {
        producer.send_line(line);
    }
    producer.flush();
}

/// The oracle: for every partition, `segmenter replay` over that partition's lines in Kafka
/// timestamp order (stable, so one topic's lines keep their order); all their changes.
pub fn expected_changes(config: &Path, dir: &Path, lines: &[InputLine]) -> Vec<Value> {
    let mut per_partition: BTreeMap<i32, Vec<&InputLine>> = BTreeMap::new();
    for line in lines {
        per_partition.entry(line.partition).or_default().push(line);
    }
    let mut all = Vec::new();
    for (partition, mut list) in per_partition {
        list.sort_by_key(|l| l.timestamp_ms);
        let payloads: Vec<Vec<u8>> = list.iter().map(|l| l.payload.clone()).collect();
        all.extend(replay(
            config,
            dir,
            &format!("replay-partition-{partition}.ndjson"),
            &payloads,
        ));
    }
    all
}

/// Change events keyed by `id`; panics if two records with one id differ.
pub fn distinct_by_id(records: &[Record]) -> (BTreeMap<String, Value>, usize) {
    let mut map: BTreeMap<String, Value> = BTreeMap::new();
    let mut duplicates = 0;
    for record in records {
        let change = record.json();
        let id = change.s("id").to_string();
        match map.get(&id) {
            Some(previous) => {
                assert_eq!(
                    previous, &change,
                    "two change records with id {id} differ (at {}/{})",
                    record.partition, record.offset
                );
                duplicates += 1;
            }
            None => {
                map.insert(id, change);
            }
        }
    }
    (map, duplicates)
}

/// Asserts that the distinct changes `got` (by id) are exactly `expected`, reporting how many
/// are missing or unexpected and a few examples of each.
pub fn assert_same_changes(got: &BTreeMap<String, Value>, expected: &[Value], context: &str) {
    let want: BTreeMap<String, Value> = expected
        .iter()
        .map(|c| (c.s("id").to_string(), c.clone()))
        .collect();
    let missing: Vec<String> = want
        .iter()
        .filter(|(id, _)| !got.contains_key(*id))
        .map(|(_, c)| c.to_string())
        .collect();
    let extra: Vec<String> = got
        .iter()
        .filter(|(id, _)| !want.contains_key(*id))
        .map(|(_, c)| c.to_string())
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{context}: {} of {} expected changes missing, {} unexpected\nfirst missing:\n  {}\nfirst unexpected:\n  {}",
        missing.len(),
        want.len(),
        extra.len(),
        missing.iter().take(5).cloned().collect::<Vec<_>>().join("\n  "),
        extra.iter().take(5).cloned().collect::<Vec<_>>().join("\n  ")
    );
    for (id, change) in &want {
        assert_eq!(&got[id], change, "{context}: payload of change {id}");
    }
}

/// Waits until the service's consumer group has committed, for every partition of `topics`, the
/// current end offset (it commits what is processed and published about once a second).
pub fn wait_committed(brokers: &str, group: &str, topics: &[&str], service: &mut Service) {
    let offsets = GroupOffsets::new(brokers, group);
    let ends = offsets.ends(topics);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lagging = offsets.behind(&ends);
        if lagging.is_empty() {
            return;
        }
        service.assert_running();
        assert!(
            Instant::now() < deadline,
            "group {group} has not committed the input within 60 s: {lagging:?}; log:\n{}",
            service.log_tail()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Reads a consumer group's committed offsets from outside the group, and topics' end offsets.
pub struct GroupOffsets {
    consumer: BaseConsumer,
}

impl GroupOffsets {
    pub fn new(brokers: &str, group: &str) -> GroupOffsets {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("allow.auto.create.topics", "false")
            .create()
            .expect("creating an offsets reader");
        GroupOffsets { consumer }
    }

    /// Every partition of `topics` (which must exist) with its current end offset.
    pub fn ends(&self, topics: &[&str]) -> TopicPartitionList {
        let mut ends = TopicPartitionList::new();
        for topic in topics {
            let metadata = self
                .consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("metadata of {topic}: {e}"));
            let partitions = metadata
                .topics()
                .first()
                .map_or(0, |t| t.partitions().len());
            for p in 0..partitions as i32 {
                let (_, high) = self
                    .consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("watermarks of {topic}/{p}: {e}"));
                ends.add_partition_offset(topic, p, Offset::Offset(high))
                    .expect("adding a partition");
            }
        }
        ends
    }

    /// `topic/partition: committed of end` for every partition of `ends` whose committed offset
    /// is below it (no commit counts as 0).
    pub fn behind(&self, ends: &TopicPartitionList) -> Vec<String> {
        let committed = self
            .consumer
            .committed_offsets(ends.clone(), Duration::from_secs(10))
            .expect("reading committed offsets");
        ends.elements()
            .iter()
            .filter_map(|end| {
                let Offset::Offset(high) = end.offset() else {
                    return None;
                };
                let at = committed
                    .find_partition(end.topic(), end.partition())
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    })
                    .unwrap_or(0);
                (at < high).then(|| format!("{}/{}: {at} of {high}", end.topic(), end.partition()))
            })
            .collect()
    }
}

/// Partition count and total records (sum of high watermarks) of `topic`, or `None` if it does
/// not exist. Never creates it (no auto-creation is asked for).
pub fn topic_size(brokers: &str, topic: &str) -> Option<(i32, i64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-size-{topic}"))
        .set("enable.auto.commit", "false")
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("creating a metadata reader");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .ok()?;
    let found = metadata.topics().first()?;
    if found.error().is_some() || found.partitions().is_empty() {
        return None;
    }
    let partitions = found.partitions().len() as i32;
    let mut records = 0;
    for p in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .ok()?;
        records += high - low;
    }
    Some((partitions, records))
}

// ------------------------------------------------------------------------------------------
// HTTP

/// One HTTP/1.1 request (`Connection: close`) with std only; returns status and body.
pub fn http(address: &str, method: &str, path: &str, body: Option<(&str, &str)>) -> (u16, String) {
    use std::net::TcpStream;
    let mut stream = TcpStream::connect(address)
        .unwrap_or_else(|e| panic!("connecting to the HTTP API at {address}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("setting a read timeout");
    let (content_type, content) = body.unwrap_or(("text/plain", ""));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{content}",
        content.len()
    );
    stream
        .write_all(request.as_bytes())
        .expect("writing the HTTP request");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("reading the HTTP response");
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("malformed HTTP response: {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// An HTTP answer: status, headers (names lowercased) and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The body as JSON; panics (with the answer) if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("answer body is not JSON ({e}): {self:?}"))
    }
}

/// One HTTP/1.1 request (`Connection: close`) with extra `headers`, over plain TCP.
pub fn request(
    address: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, &str)>,
) -> Answer {
    use std::net::TcpStream;
    let mut stream = TcpStream::connect(address)
        .unwrap_or_else(|e| panic!("connecting to the HTTP API at {address}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("setting a read timeout");
    exchange(&mut stream, address, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// The same request over TLS, trusting only the CA certificate `ca_pem` and checking the
/// server's certificate for `server_name`. `Err` when the TLS handshake or the exchange fails.
pub fn request_tls(
    address: &str,
    server_name: &str,
    ca_pem: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use std::net::TcpStream;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| format!("CA PEM: {e}"))?)
            .map_err(|e| format!("CA: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(server_name.to_string()).map_err(|e| e.to_string())?;
    let connection =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(address).map_err(|e| format!("connecting to {address}: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut stream = rustls::StreamOwned::new(connection, tcp);
    exchange(&mut stream, address, method, path, headers, None)
}

fn exchange(
    stream: &mut impl ReadWrite,
    address: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, &str)>,
) -> Result<Answer, String> {
    let (content_type, content) = body.unwrap_or(("text/plain", ""));
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n",
        content.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(content.as_bytes()))
        .and_then(|()| stream.flush())
        .map_err(|e| format!("writing the request: {e}"))?;
    let mut response = Vec::new();
    if let Err(error) = stream.read_to_end(&mut response) {
        // rustls reports a peer that closed without close_notify; keep what arrived.
        if response.is_empty() {
            return Err(format!("reading the response: {error}"));
        }
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("malformed HTTP response: {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(name, value)| name == "transfer-encoding" && value.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// A byte stream both ways (a TCP or TLS stream).
pub trait ReadWrite: Read + Write {}

impl<T: Read + Write> ReadWrite for T {}

/// `GET` returning JSON; panics unless the status is `expect`.
pub fn get_json(address: &str, path: &str, expect: u16) -> Value {
    let (status, body) = http(address, "GET", path, None);
    assert_eq!(status, expect, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
}

/// The value of one sample in Prometheus text: `name` with exactly these labels (order free).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    wanted.sort();
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric_name, label_text) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric_name != name {
                return None;
            }
            let mut have: Vec<String> = if label_text.is_empty() {
                Vec::new()
            } else {
                label_text.split(',').map(str::to_string).collect()
            };
            have.sort();
            (have == wanted).then(|| value.parse().ok())?
        })
}

/// The sum of every sample of `name` (all label sets) in Prometheus text; 0 if there is none.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let metric_name = series.split('{').next()?;
            (metric_name == name).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// `segmenter check --config PATH`: `Ok` with its output when it accepts the config, `Err`
/// with its output (stdout and stderr) when it refuses it.
pub fn check_config(path: &Path) -> Result<String, String> {
    let out = Command::new(SEGMENTER)
        .args(["check", "--config"])
        .arg(path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("running segmenter check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

// ------------------------------------------------------------------------------------------
// Comparing a change topic with the oracle, with a report a person can act on

/// How the distinct changes of a change topic (by `id`) differ from the oracle's.
#[derive(Debug, Default)]
pub struct ChangeDiff {
    /// Changes the oracle has.
    pub expected: usize,
    /// Records read from the change topic.
    pub records: usize,
    /// Distinct ids among them.
    pub distinct: usize,
    /// Re-publications identical to the first copy of their id (dropped).
    pub duplicates: usize,
    /// Later copies of an id whose payload differs from the first copy: (first, other).
    pub conflicting: Vec<(Value, Value)>,
    /// In the oracle, not in the topic.
    pub missing: Vec<Value>,
    /// In the topic, not in the oracle.
    pub extra: Vec<Value>,
    /// Same id in both, other payload: (expected, got).
    pub different: Vec<(Value, Value)>,
    /// (customer, segment) pairs whose distinct changes are not `seq` 1..n alternating from
    /// `entered`, with their (seq, change) list.
    pub seq_breaks: Vec<String>,
}

impl ChangeDiff {
    pub fn is_clean(&self) -> bool {
        self.conflicting.is_empty()
            && self.missing.is_empty()
            && self.extra.is_empty()
            && self.different.is_empty()
            && self.seq_breaks.is_empty()
    }

    /// Every count on one line.
    pub fn summary_line(&self) -> String {
        format!(
            "expected {} changes; change topic {} records, {} distinct ids ({} identical duplicates \
             dropped); missing {}, extra {}, different {}, conflicting copies {}, broken seq/alternation {}",
            self.expected,
            self.records,
            self.distinct,
            self.duplicates,
            self.missing.len(),
            self.extra.len(),
            self.different.len(),
            self.conflicting.len(),
            self.seq_breaks.len()
        )
    }

    /// A report: the summary line, counts per input partition (`partition_of` maps a customer to
    /// its partition; `partition_note` adds e.g. the partition's owners), and the first `limit`
    /// changes of each kind in `at` order, each with customer, segment, seq, change and at.
    pub fn report(
        &self,
        limit: usize,
        partition_of: impl Fn(&str) -> i32,
        partition_note: impl Fn(i32) -> String,
    ) -> String {
        let mut out = self.summary_line();
        // Per partition: missing, extra, different, conflicting, earliest `at` among them.
        let mut per: BTreeMap<i32, ([usize; 4], String)> = BTreeMap::new();
        let mut note = |change: &Value, kind: usize| {
            let entry = per
                .entry(partition_of(change.s("customer_id")))
                .or_insert(([0; 4], String::new()));
            entry.0[kind] += 1;
            let at = change.s("at");
            if entry.1.is_empty() || at < entry.1.as_str() {
                entry.1 = at.to_string();
            }
        };
        for change in &self.missing {
            note(change, 0);
        }
        for change in &self.extra {
            note(change, 1);
        }
        for (want, _) in &self.different {
            note(want, 2);
        }
        for (first, _) in &self.conflicting {
            note(first, 3);
        }
        if !per.is_empty() {
            out.push_str(
                "\nper input partition (missing / extra / different / conflicting, earliest at):",
            );
            for (partition, (counts, earliest)) in &per {
                out.push_str(&format!(
                    "\n  p{partition}: {} / {} / {} / {}, from {earliest}{}",
                    counts[0],
                    counts[1],
                    counts[2],
                    counts[3],
                    partition_note(*partition)
                ));
            }
        }
        let sorted = |list: Vec<&Value>| -> Vec<String> {
            let mut list = list;
            list.sort_by(|a, b| {
                (a.s("at"), a.s("customer_id")).cmp(&(b.s("at"), b.s("customer_id")))
            });
            list.iter()
                .take(limit)
                .map(|c| describe_change(c))
                .collect()
        };
        let section = |out: &mut String, title: &str, total: usize, lines: Vec<String>| {
            if total > 0 {
                out.push_str(&format!("\nfirst {} of {total} {title}:", lines.len()));
                for line in lines {
                    out.push_str(&format!("\n  {line}"));
                }
            }
        };
        section(
            &mut out,
            "missing (the oracle has them, the topic does not)",
            self.missing.len(),
            sorted(self.missing.iter().collect()),
        );
        section(
            &mut out,
            "extra (in the topic, not in the oracle)",
            self.extra.len(),
            sorted(self.extra.iter().collect()),
        );
        let mut different: Vec<&(Value, Value)> = self.different.iter().collect();
        different.sort_by(|a, b| {
            (a.0.s("at"), a.0.s("customer_id")).cmp(&(b.0.s("at"), b.0.s("customer_id")))
        });
        let lines = different
            .iter()
            .take(limit)
            .map(|(want, got)| {
                format!(
                    "{}; got {}",
                    describe_change(want),
                    differing_fields(want, got)
                )
            })
            .collect();
        section(
            &mut out,
            "different (same id, other payload; expected, then what the topic has)",
            self.different.len(),
            lines,
        );
        let lines = self
            .conflicting
            .iter()
            .take(limit)
            .map(|(first, other)| {
                format!(
                    "{}; another copy has {}",
                    describe_change(first),
                    differing_fields(first, other)
                )
            })
            .collect();
        section(
            &mut out,
            "conflicting copies (one id published with different payloads)",
            self.conflicting.len(),
            lines,
        );
        section(
            &mut out,
            "customer/segment pairs whose seq is not 1..n alternating from entered",
            self.seq_breaks.len(),
            self.seq_breaks.iter().take(limit).cloned().collect(),
        );
        out
    }
}

/// `c-42 idle seq 3 entered at 2026-… (timer)`.
pub fn describe_change(change: &Value) -> String {
    let cause = change.get("cause").and_then(Value::as_str).unwrap_or("?");
    let message = change
        .get("message_id")
        .and_then(Value::as_str)
        .map(|m| format!(" {m}"))
        .unwrap_or_default();
    format!(
        "{} {} seq {} {} at {} ({cause}{message})",
        change.s("customer_id"),
        change.s("segment"),
        change.get("seq").map_or("?".to_string(), Value::to_string),
        change.s("change"),
        change.s("at")
    )
}

/// The fields of `other` that differ from `base`, as `field=value`.
fn differing_fields(base: &Value, other: &Value) -> String {
    let (Some(base), Some(other)) = (base.as_object(), other.as_object()) else {
        return other.to_string();
    };
    let mut keys: BTreeSet<&String> = base.keys().collect();
    keys.extend(other.keys());
    let fields: Vec<String> = keys
        .into_iter()
        .filter(|key| base.get(*key) != other.get(*key))
        .map(|key| {
            format!(
                "{key}={}",
                other
                    .get(key)
                    .map_or("(absent)".to_string(), Value::to_string)
            )
        })
        .collect();
    fields.join(" ")
}

/// Compares the change records read from a topic with the oracle's changes: de-duplicated by
/// `id` (the first copy counts; differing copies are reported, not a panic), then missing, extra
/// and different by id, and `seq`/alternation over the distinct changes.
pub fn diff_changes(records: &[Record], expected: &[Value]) -> ChangeDiff {
    let mut got: BTreeMap<String, Value> = BTreeMap::new();
    let mut diff = ChangeDiff {
        expected: expected.len(),
        records: records.len(),
        ..ChangeDiff::default()
    };
    for record in records {
        let change = record.json();
        let id = change.s("id").to_string();
        match got.get(&id) {
            Some(first) if *first == change => diff.duplicates += 1,
            Some(first) => diff.conflicting.push((first.clone(), change)),
            None => {
                got.insert(id, change);
            }
        }
    }
    diff.distinct = got.len();
    let want: BTreeMap<&str, &Value> = expected.iter().map(|c| (c.s("id"), c)).collect();
    for (id, change) in &want {
        match got.get(*id) {
            None => diff.missing.push((*change).clone()),
            Some(found) if found != *change => {
                diff.different.push(((*change).clone(), found.clone()));
            }
            Some(_) => {}
        }
    }
    diff.extra = got
        .iter()
        .filter(|(id, _)| !want.contains_key(id.as_str()))
        .map(|(_, c)| c.clone())
        .collect();
    let distinct: Vec<Value> = got.into_values().collect();
    diff.seq_breaks = seq_breaks(&distinct);
    diff
}

/// The (customer, segment) pairs of `changes` (each change once) whose seqs are not exactly
/// 1..n alternating from `entered`, each as `customer/segment: [(seq, change) …]`.
pub fn seq_breaks(changes: &[Value]) -> Vec<String> {
    let mut per: BTreeMap<(String, String), Vec<(u64, String)>> = BTreeMap::new();
    for change in changes {
        per.entry((
            change.s("customer_id").to_string(),
            change.s("segment").to_string(),
        ))
        .or_default()
        .push((change.seq(), change.s("change").to_string()));
    }
    let mut broken = Vec::new();
    for ((customer, segment), mut list) in per {
        list.sort();
        let fine = list.iter().enumerate().all(|(i, (seq, kind))| {
            let expected_kind = if i % 2 == 0 { "entered" } else { "exited" };
            *seq == i as u64 + 1 && kind == expected_kind
        });
        if !fine {
            let shown: Vec<String> = list
                .iter()
                .take(8)
                .map(|(s, k)| format!("{s} {k}"))
                .collect();
            let more = if list.len() > 8 { ", …" } else { "" };
            broken.push(format!(
                "{customer}/{segment}: [{}{more}]",
                shown.join(", ")
            ));
        }
    }
    broken
}
