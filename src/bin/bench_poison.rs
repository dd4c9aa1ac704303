//! Poison-at-rate benchmark (issue 10, item 6): the `segmenter run` service (child process,
//! all segments of config/segments.toml, wall clock) over a preloaded backlog of generated
//! events, alternately clean and with 1 % poison messages mixed in — a 10 MB message,
//! 100,000-deep nesting, invalid UTF-8, timestamps in year 2100, NaN and 1e400 numbers, missing
//! customer ids, megabyte property strings. For every poison run it checks that
//! - every poison message reached the dead-letter topic, by source partition and offset, with a
//!   `reason` header (and, cut to the forwarding limit, a `truncated` header);
//! - no partition stalled: the group's committed offset of every input partition reaches its end;
//!
//! and it compares throughput (input messages per second, from the first consumed batch to the
//! last record acknowledged, by the service's own counters) with the clean runs, and the CPU
//! seconds the service (and the broker, when the bench started it) spent per 1,000 input
//! messages over the same window — a comparison that holds up on a shared machine where wall
//! time does not. Before the service starts, a bare consumer (no decoding, state or output)
//! reads the same input with the service's prefetch settings: what the broker and the fetch
//! path alone cost, clean and poisoned. Runs are interleaved (clean, poison, poison, clean, …)
//! on fresh topics, group and state each time, and the load average is printed per run: the
//! machine is shared.
//!
//! `--without-huge` is a variant for splitting the cost, not the benchmark: the 23 large poison
//! messages (10 MB and 1 MB) are replaced by cheap kinds, so the runs still carry 1 % poison
//! but ~33 MB of it (the 200 KB deep-nesting messages) instead of ~83 MB.
//!
//! ```text
//! cargo run --release --bin bench_poison -- [--events N] [--customers N] [--rounds R]
//!     [--poison-fraction F] [--brokers HOST:PORT] [--without-huge]
//! ```

#[path = "support/bench.rs"]
mod bench;
#[path = "../../tests/support/tansu.rs"]
mod tansu;

use bench::{cpu_seconds, free_port, key_of, metric_sum, scrape, start_service, stop};

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Child;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{DeliveryResult, Headers};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientContext, Message};
use segmenter::generate::{Generator, GeneratorConfig};
use segmenter::pipeline::wall_clock_ms;

const PARTITIONS: i32 = 4;

struct Args {
    events: u64,
    customers: u64,
    rounds: usize,
    poison_fraction: f64,
    brokers: Option<String>,
    /// `--without-huge`: no 10 MB or 1 MB poison (a variant to split the cost, see the top).
    without_huge: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        events: 200_000,
        customers: 20_000,
        rounds: 3,
        poison_fraction: 0.01,
        brokers: None,
        without_huge: false,
    };
    let mut iter = std::env::args().skip(1);
    while let Some(flag) = iter.next() {
        if flag == "--without-huge" {
            args.without_huge = true;
            continue;
        }
        let value = iter
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--events" => args.events = value.parse()?,
            "--customers" => args.customers = value.parse()?,
            "--rounds" => args.rounds = value.parse()?,
            "--poison-fraction" => args.poison_fraction = value.parse()?,
            "--brokers" => args.brokers = Some(value),
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

/// The kinds of poison, in the order they are cycled through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Poison {
    TenMegabytes,
    MegabyteString,
    DeepNesting,
    InvalidUtf8,
    Year2100,
    NotANumber,
    HugeNumber,
    MissingId,
}

impl Poison {
    /// The cheap kinds, cycled through for most poison messages.
    const CHEAP: [Poison; 6] = [
        Poison::DeepNesting,
        Poison::InvalidUtf8,
        Poison::Year2100,
        Poison::NotANumber,
        Poison::HugeNumber,
        Poison::MissingId,
    ];

    fn name(self) -> &'static str {
        match self {
            Poison::TenMegabytes => "10 MB message",
            Poison::MegabyteString => "1 MB property string",
            Poison::DeepNesting => "100,000-deep nesting",
            Poison::InvalidUtf8 => "invalid UTF-8",
            Poison::Year2100 => "timestamp in 2100",
            Poison::NotANumber => "NaN number",
            Poison::HugeNumber => "1e400 number",
            Poison::MissingId => "no customer id",
        }
    }

    fn payload(self, index: usize, now: i64) -> Vec<u8> {
        let head = |id: &str| {
            format!(
                r#"{{"type":"track","event":"Order Completed","userId":"{id}","messageId":"poison-{index}","timestamp":{now},"properties":"#
            )
        };
        let id = format!("poison-{}", index % 50);
        match self {
            Poison::TenMegabytes => {
                let mut out = head(&id).into_bytes();
                out.extend_from_slice(br#"{"blob":""#);
                out.extend(std::iter::repeat_n(b'x', 10 << 20));
                out.extend_from_slice(br#""}}"#);
                out
            }
            Poison::MegabyteString => {
                let mut out = head(&id).into_bytes();
                out.extend_from_slice(br#"{"note":""#);
                out.extend(std::iter::repeat_n(b'y', 1 << 20));
                out.extend_from_slice(br#""}}"#);
                out
            }
            Poison::DeepNesting => {
                let mut out = head(&id).into_bytes();
                out.extend(std::iter::repeat_n(b'[', 100_000));
                out.extend(std::iter::repeat_n(b']', 100_000));
                out.push(b'}');
                out
            }
            Poison::InvalidUtf8 => {
                let mut out = head(&id).into_bytes();
                out.extend_from_slice(b"{\"currency\":\"\xff\xfe\xc3\x28\"}}");
                out
            }
            Poison::Year2100 => format!(
                r#"{{"type":"track","event":"Order Completed","userId":"{id}","messageId":"poison-{index}","timestamp":"2100-01-01T00:00:00Z","properties":{{"revenue":10}}}}"#
            )
            .into_bytes(),
            Poison::NotANumber => format!("{}{{\"revenue\":NaN}}}}", head(&id)).into_bytes(),
            Poison::HugeNumber => format!("{}{{\"revenue\":1e400}}}}", head(&id)).into_bytes(),
            Poison::MissingId => format!(
                r#"{{"type":"track","event":"Order Completed","messageId":"poison-{index}","timestamp":{now},"properties":{{"revenue":10}}}}"#
            )
            .into_bytes(),
        }
    }
}

/// Which poison message `i` of `count` is: three 10 MB messages and twenty 1 MB strings per run
/// (at 1 % of 100,000 that is 0.3 % and 2 % of the poison, ~50 MB), the rest cycling through
/// the cheap kinds — only those with `without_huge`.
fn poison_kind(i: usize, count: usize, without_huge: bool) -> Poison {
    let (huge, megabyte) = if without_huge {
        (0, 0)
    } else {
        (3.min(count / 8), 20.min(count / 8))
    };
    if i < huge {
        Poison::TenMegabytes
    } else if i < huge + megabyte {
        Poison::MegabyteString
    } else {
        Poison::CHEAP[(i - huge - megabyte) % Poison::CHEAP.len()]
    }
}

/// Records where each poison message landed (its delivery report).
#[derive(Default)]
struct Deliveries {
    positions: Mutex<HashMap<usize, (i32, i64)>>,
    failures: Mutex<Vec<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<Option<usize>>;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Box<Option<usize>>) {
        match result {
            Ok(message) => {
                if let Some(index) = *opaque {
                    if let Ok(mut positions) = self.positions.lock() {
                        positions.insert(index, (message.partition(), message.offset()));
                    }
                }
            }
            Err((error, _)) => {
                if let Ok(mut failures) = self.failures.lock() {
                    failures.push(error.to_string());
                }
            }
        }
    }
}

fn producer(brokers: &str) -> anyhow::Result<BaseProducer<Deliveries>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "500000")
        .set("queue.buffering.max.kbytes", "1048576")
        // The 10 MB poison must reach the input topic at all.
        .set("message.max.bytes", "16777216")
        .set("partitioner", "murmur2_random")
        .create_with_context(Deliveries::default())?)
}

fn send(
    producer: &BaseProducer<Deliveries>,
    topic: &str,
    key: &str,
    payload: &[u8],
    poison: Option<usize>,
) {
    let mut record =
        BaseRecord::<str, [u8], Box<Option<usize>>>::with_opaque_to(topic, Box::new(poison))
            .key(key)
            .payload(payload)
            .timestamp(wall_clock_ms());
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((_, returned)) => {
                record = returned;
                producer.poll(Duration::from_millis(5));
            }
        }
    }
}

/// A preloaded poison message: its kind, partition, offset and size.
type Placed = (Poison, i32, i64, usize);

/// Preloads one run's input; returns the poison messages and the payload bytes of the others.
fn preload(
    brokers: &str,
    topic: &str,
    args: &Args,
    poisoned: bool,
) -> anyhow::Result<(Vec<Placed>, usize)> {
    let producer = producer(brokers)?;
    let total = args.events as usize;
    let poison_count = if poisoned {
        ((total as f64) * args.poison_fraction).round() as usize
    } else {
        0
    };
    // Poison message j replaces input line j * every + every / 2.
    let every = total.checked_div(poison_count).unwrap_or(usize::MAX);
    let now = wall_clock_ms();
    let span_ms = (args.events as f64 / 50.0 * 1000.0) as i64;
    let mut kinds = Vec::with_capacity(poison_count);
    let mut normal_bytes = 0;
    let generator = Generator::new(GeneratorConfig {
        customers: args.customers,
        events: args.events,
        start_ms: now - span_ms,
        malformed_fraction: 0.0,
        ..GeneratorConfig::default()
    });
    for (i, line) in generator.enumerate() {
        let poison = every != usize::MAX && i % every == every / 2 && kinds.len() < poison_count;
        if poison {
            let index = kinds.len();
            let kind = poison_kind(index, poison_count, args.without_huge);
            let payload = kind.payload(index, now);
            send(
                &producer,
                topic,
                &format!("poison-{index}"),
                &payload,
                Some(index),
            );
            kinds.push((kind, payload.len()));
        } else {
            send(&producer, topic, &key_of(&line), line.as_bytes(), None);
            normal_bytes += line.len();
        }
    }
    producer.flush(Duration::from_secs(120))?;
    let context = producer.context();
    if let Some(error) = context
        .failures
        .lock()
        .ok()
        .and_then(|f| f.first().cloned())
    {
        bail!("preloading {topic}: a delivery failed: {error}");
    }
    let positions = context
        .positions
        .lock()
        .map_err(|_| anyhow::anyhow!("lock"))?;
    let mut out = Vec::with_capacity(kinds.len());
    for (index, (kind, size)) in kinds.into_iter().enumerate() {
        let (partition, offset) = positions
            .get(&index)
            .copied()
            .with_context(|| format!("no delivery report for poison {index}"))?;
        out.push((kind, partition, offset, size));
    }
    Ok((out, normal_bytes))
}

fn create_topics(
    runtime: &tokio::runtime::Runtime,
    admin: &AdminClient<DefaultClientContext>,
    names: &[String],
) -> anyhow::Result<()> {
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| NewTopic::new(name, PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    for result in runtime.block_on(admin.create_topics(&topics, &AdminOptions::new()))? {
        if let Err((topic, error)) = result {
            bail!("creating {topic}: {error}");
        }
    }
    Ok(())
}

/// What one run's measured window (first consumption to everything published) took.
struct Measured {
    /// Input messages per second.
    rate: f64,
    /// CPU seconds (user + system) of the service over the window.
    service_cpu: Option<f64>,
    /// CPU seconds of the broker over the window (when the bench started it).
    broker_cpu: Option<f64>,
}

/// CPU seconds of both processes at one moment.
#[derive(Clone, Copy)]
struct CpuSample {
    service: Option<f64>,
    broker: Option<f64>,
}

impl CpuSample {
    fn take(service: u32, broker: Option<u32>) -> CpuSample {
        CpuSample {
            service: cpu_seconds(service).map(|(seconds, _)| seconds),
            broker: broker.and_then(cpu_seconds).map(|(seconds, _)| seconds),
        }
    }
}

/// Scrapes every 50 ms until `total` messages are consumed and the outbox is empty; messages per
/// second and CPU seconds of the service and the broker (`broker`'s pid, if known) from the
/// first scrape that saw consumption.
fn wait_for_service(
    port: u16,
    child: &mut Child,
    broker: Option<u32>,
    total: u64,
) -> anyhow::Result<Measured> {
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut first: Option<(Instant, f64, CpuSample)> = None;
    let mut last = 0.0;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the service exited ({status}) after {last} of {total} messages");
        }
        if Instant::now() > deadline {
            bail!("the service did not finish ({last} of {total} consumed): a stalled partition?");
        }
        if let Ok(text) = scrape(port) {
            let consumed = metric_sum(&text, "segmenter_events_consumed_total{");
            let pending = metric_sum(&text, "segmenter_outbox_pending{");
            let now = Instant::now();
            last = consumed;
            if first.is_none() && consumed > 0.0 {
                first = Some((now, consumed, CpuSample::take(child.id(), broker)));
            }
            if consumed >= total as f64 && pending == 0.0 {
                let end = CpuSample::take(child.id(), broker);
                let (t0, c0, start) = first.unwrap_or((now, consumed, end));
                let spent = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
                return Ok(Measured {
                    rate: (consumed - c0) / (now - t0).as_secs_f64().max(1e-3),
                    service_cpu: spent(start.service, end.service),
                    broker_cpu: spent(start.broker, end.broker),
                });
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The broker-side floor of a run: a bare consumer (no decoding, no state, no output, payloads
/// only touched) reads the whole preloaded input with the service's prefetch settings. Returns
/// messages per second from its first message to its last, and the broker's CPU seconds over
/// the same window.
fn bare_read(
    brokers: &str,
    broker_pid: Option<u32>,
    topic: &str,
    total: u64,
) -> anyhow::Result<(f64, Option<f64>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}-bare"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "20")
        .set("queued.max.messages.kbytes", "8192")
        .set("fetch.queue.backoff.ms", "10")
        .create()?;
    let mut list = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        list.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&list)?;
    let broker_cpu = || broker_pid.and_then(cpu_seconds).map(|(seconds, _)| seconds);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut first: Option<(Instant, Option<f64>)> = None;
    let mut read = 0u64;
    let mut touched = 0u64;
    while read < total {
        if Instant::now() > deadline {
            bail!("bare read of {topic}: {read} of {total} messages in 300 s");
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        if first.is_none() {
            first = Some((Instant::now(), broker_cpu()));
        }
        let payload = message.payload().unwrap_or_default();
        touched += payload.get(payload.len() / 2).map_or(0, |&b| u64::from(b));
        read += 1;
    }
    let (t0, cpu0) = first.context("nothing read")?;
    std::hint::black_box(touched);
    let seconds = t0.elapsed().as_secs_f64().max(1e-3);
    let cpu = cpu0.zip(broker_cpu()).map(|(a, b)| b - a);
    Ok(((read - 1) as f64 / seconds, cpu))
}

/// Waits until the group's committed offset of every input partition is its end offset.
fn wait_committed(brokers: &str, group: &str, topic: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut ends = HashMap::new();
    let mut list = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        ends.insert(p, high);
        list.add_partition(topic, p);
    }
    loop {
        let committed = consumer.committed_offsets(list.clone(), Duration::from_secs(10))?;
        let behind: Vec<String> = (0..PARTITIONS)
            .filter_map(|p| {
                let at = match committed.find_partition(topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => 0,
                };
                (at < ends[&p]).then(|| format!("{p}: {at} of {}", ends[&p]))
            })
            .collect();
        if behind.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("partitions stalled (committed offset below the end 60 s after the run): {behind:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A dead letter as read back: reason, truncation, payload size.
struct Letter {
    reason: String,
    truncated: Option<String>,
    original_bytes: Option<usize>,
    payload_bytes: usize,
}

/// Reads the whole DLQ topic; dead letters by source (partition, offset).
fn read_dlq(
    brokers: &str,
    topic: &str,
    expect: usize,
) -> anyhow::Result<HashMap<(i32, i64), Letter>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}-reader"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "20")
        .create()?;
    let mut list = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        list.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&list)?;
    let mut letters = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while letters.len() < expect && Instant::now() < deadline {
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let header = |name: &str| -> Option<String> {
            message.headers().and_then(|headers| {
                headers
                    .iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
        };
        let (Some(partition), Some(offset)) = (
            header("source_partition").and_then(|p| p.parse().ok()),
            header("source_offset").and_then(|o| o.parse().ok()),
        ) else {
            bail!("a dead letter without its source position");
        };
        let letter = Letter {
            reason: header("reason").unwrap_or_default(),
            truncated: header("truncated"),
            original_bytes: header("original_payload_bytes").and_then(|b| b.parse().ok()),
            payload_bytes: message.payload().map_or(0, <[u8]>::len),
        };
        letters.insert((partition, offset), letter);
    }
    Ok(letters)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// One measured run.
struct Run {
    poisoned: bool,
    rate: f64,
    /// CPU milliseconds per 1,000 input messages, of the service and of the broker.
    service_ms_per_k: Option<f64>,
    broker_ms_per_k: Option<f64>,
    /// The bare consumer's msg/s over the same input, and the broker's CPU per 1,000 for it.
    bare_rate: f64,
    bare_broker_ms_per_k: Option<f64>,
    load_before: String,
    load_after: String,
}

#[allow(clippy::too_many_arguments)]
fn one_run(
    brokers: &str,
    broker_pid: Option<u32>,
    runtime: &tokio::runtime::Runtime,
    admin: &AdminClient<DefaultClientContext>,
    work: &Path,
    args: &Args,
    name: &str,
    poisoned: bool,
) -> anyhow::Result<Run> {
    let topics: Vec<String> = ["in", "changes", "membership", "dlq"]
        .iter()
        .map(|t| format!("{name}-{t}"))
        .collect();
    create_topics(runtime, admin, &topics)?;
    let input = &topics[0];
    let (poison, normal_bytes) = preload(brokers, input, args, poisoned)?;
    let (bare_rate, bare_broker_cpu) = bare_read(brokers, broker_pid, input, args.events)?;
    let load_before = load_average();
    let port = free_port()?;
    let mut child = start_service(brokers, work, name, &format!("{name}-in"), name, port)?;
    let measured = wait_for_service(port, &mut child, broker_pid, args.events);
    let committed = measured
        .as_ref()
        .ok()
        .map(|_| wait_committed(brokers, name, input));
    stop(child);
    let measured = measured?;
    if let Some(committed) = committed {
        committed?;
    }
    let load_after = load_average();
    if poisoned {
        let letters = read_dlq(brokers, &topics[3], poison.len())?;
        let mut by_kind: BTreeMap<Poison, BTreeMap<String, usize>> = BTreeMap::new();
        let mut missing = Vec::new();
        for (kind, partition, offset, size) in &poison {
            let Some(letter) = letters.get(&(*partition, *offset)) else {
                missing.push(format!("{} at {partition}/{offset}", kind.name()));
                continue;
            };
            if letter.reason.is_empty() {
                bail!(
                    "{} at {partition}/{offset}: dead letter without a reason",
                    kind.name()
                );
            }
            let whole = letter.payload_bytes == *size;
            let cut = letter.truncated.as_deref() == Some("payload")
                && letter.original_bytes == Some(*size)
                && letter.payload_bytes < *size;
            if !whole && !cut {
                bail!(
                    "{} at {partition}/{offset}: dead letter of {} bytes for {size} (truncated: {:?})",
                    kind.name(),
                    letter.payload_bytes,
                    letter.truncated
                );
            }
            let label = if cut {
                format!("{} (truncated)", letter.reason)
            } else {
                letter.reason.clone()
            };
            *by_kind.entry(*kind).or_default().entry(label).or_default() += 1;
        }
        if !missing.is_empty() {
            bail!(
                "{} of {} poison messages not dead-lettered, e.g. {:?}",
                missing.len(),
                poison.len(),
                &missing[..missing.len().min(5)]
            );
        }
        let summary: Vec<String> = by_kind
            .iter()
            .map(|(kind, reasons)| format!("{}: {reasons:?}", kind.name()))
            .collect();
        let poison_bytes: usize = poison.iter().map(|(_, _, _, size)| size).sum();
        println!(
            "  {name}: all {} poison messages ({:.1} MB, against {:.1} MB in the other messages) dead-lettered with a reason; every partition committed to its end; {}",
            poison.len(),
            poison_bytes as f64 / 1e6,
            normal_bytes as f64 / 1e6,
            summary.join("; ")
        );
    }
    let per_k = |cpu: Option<f64>| cpu.map(|seconds| seconds * 1e6 / args.events as f64);
    Ok(Run {
        poisoned,
        rate: measured.rate,
        service_ms_per_k: per_k(measured.service_cpu),
        broker_ms_per_k: per_k(measured.broker_cpu),
        bare_rate,
        bare_broker_ms_per_k: per_k(bare_broker_cpu),
        load_before,
        load_after,
    })
}

fn milliseconds(value: Option<f64>) -> String {
    value.map_or("n/a".into(), |ms| format!("{ms:.1} ms"))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let broker = match &args.brokers {
        Some(_) => None,
        None => Some(tansu::Tansu::start().context("starting tansu (scripts/install-tansu.sh)")?),
    };
    let brokers = args
        .brokers
        .clone()
        .or_else(|| broker.as_ref().map(|b| b.bootstrap()))
        .context("no broker")?;
    let broker_pid = broker.as_ref().and_then(|b| b.pid());
    let work = tempfile::tempdir()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    println!(
        "poison benchmark: {} messages per run over {PARTITIONS} partitions, {} customers, {:.1} % poison in poisoned runs{}, {} rounds",
        args.events,
        args.customers,
        args.poison_fraction * 100.0,
        if args.without_huge {
            " (VARIANT --without-huge: no 10 MB or 1 MB poison)"
        } else {
            ""
        },
        args.rounds
    );
    let mut runs = Vec::new();
    for round in 0..args.rounds {
        // Alternate the order so that drift in the machine's load hits both alike.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for poisoned in order {
            let name = format!(
                "poison-r{round}-{}",
                if poisoned { "poisoned" } else { "clean" }
            );
            let run = one_run(
                &brokers,
                broker_pid,
                &runtime,
                &admin,
                work.path(),
                &args,
                &name,
                poisoned,
            )?;
            println!(
                "  {name}: {:.0} msg/s; CPU per 1,000 messages: service {}, broker {} (load average {} → {}); bare consumer {:.0} msg/s, broker {}",
                run.rate,
                milliseconds(run.service_ms_per_k),
                milliseconds(run.broker_ms_per_k),
                run.load_before,
                run.load_after,
                run.bare_rate,
                milliseconds(run.bare_broker_ms_per_k),
            );
            runs.push(run);
        }
    }
    let mut clean: Vec<f64> = runs
        .iter()
        .filter(|r| !r.poisoned)
        .map(|r| r.rate)
        .collect();
    let mut poisoned: Vec<f64> = runs.iter().filter(|r| r.poisoned).map(|r| r.rate).collect();
    let spread = |values: &[f64]| {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(0.0, f64::max);
        (min, max)
    };
    let (clean_min, clean_max) = spread(&clean);
    let (poison_min, poison_max) = spread(&poisoned);
    let clean_median = median(&mut clean);
    let poison_median = median(&mut poisoned);
    println!(
        "clean: median {clean_median:.0} msg/s (min {clean_min:.0}, max {clean_max:.0}); poisoned: median {poison_median:.0} msg/s (min {poison_min:.0}, max {poison_max:.0}); poisoned/clean {:.1} %; run-to-run spread of clean runs {:.1} %",
        100.0 * poison_median / clean_median.max(1e-9),
        100.0 * (clean_max - clean_min) / clean_median.max(1e-9)
    );
    let mut bare_clean: Vec<f64> = runs
        .iter()
        .filter(|r| !r.poisoned)
        .map(|r| r.bare_rate)
        .collect();
    let mut bare_poisoned: Vec<f64> = runs
        .iter()
        .filter(|r| r.poisoned)
        .map(|r| r.bare_rate)
        .collect();
    let bare_clean_median = median(&mut bare_clean);
    let bare_poison_median = median(&mut bare_poisoned);
    println!(
        "bare consumer (broker and fetch only): clean median {bare_clean_median:.0} msg/s, poisoned median {bare_poison_median:.0} msg/s; poisoned/clean {:.1} %",
        100.0 * bare_poison_median / bare_clean_median.max(1e-9)
    );
    for (who, of) in [
        (
            "service",
            (|r: &Run| r.service_ms_per_k) as fn(&Run) -> Option<f64>,
        ),
        ("broker", |r: &Run| r.broker_ms_per_k),
        ("broker (bare consumer)", |r: &Run| r.bare_broker_ms_per_k),
    ] {
        let mut clean: Vec<f64> = runs.iter().filter(|r| !r.poisoned).filter_map(of).collect();
        let mut poisoned: Vec<f64> = runs.iter().filter(|r| r.poisoned).filter_map(of).collect();
        if clean.is_empty() || poisoned.is_empty() {
            continue;
        }
        let clean_median = median(&mut clean);
        let poison_median = median(&mut poisoned);
        println!(
            "{who} CPU per 1,000 messages: clean median {clean_median:.1} ms, poisoned median {poison_median:.1} ms; poisoned/clean {:.1} %",
            100.0 * poison_median / clean_median.max(1e-9)
        );
    }
    drop(broker);
    Ok(())
}
