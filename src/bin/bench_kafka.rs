//! End-to-end Kafka benchmark: starts a tansu broker (or uses `--brokers`), preloads N
//! generated events, then measures
//! 1. a bare rdkafka consumer reading them (the issue's ceiling);
//! 2. the `segmenter run` service (child process, all segments of config/segments.toml, wall
//!    clock, timers and de-duplication on) from its first consumed batch to the last change
//!    acknowledged, by its own counters;
//! 3. a bare relay moving the same input and output volume through the broker with no processing
//!    (the I/O the service cannot avoid);
//! 4. event→publish latency under an open-loop load at a fraction of that throughput, on fresh
//!    topics with the state already built: as seen by a downstream reader of the change topic,
//!    and from the service's own histogram (`segmenter_event_to_publish_seconds`);
//! 5. the broker alone at the same rate (produce → readable), the floor under 4.
//!
//! Usage:
//!
//! ```text
//! cargo run --release --bin bench_kafka -- [--events N] [--customers N] [--load-fraction F]
//!     [--load-seconds S] [--brokers HOST:PORT] [--throughput-only] [--only-broker RATE]
//!     [--guarantee at_least_once|exactly_once]
//! ```
//!
//! `--guarantee` sets the service's `processing.guarantee` (through its environment override
//! `SEGMENTER__PROCESSING__GUARANTEE`); with `exactly_once` the run also reports how many
//! transactions committed and their mean interval.

#[path = "support/bench.rs"]
mod bench;
#[path = "../../tests/support/tansu.rs"]
mod tansu;

use bench::{cpu_seconds, free_port, key_of, metric_sum, scrape, scrape_path, start_service, stop};

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Message;
use segmenter::generate::{Generator, GeneratorConfig};
use segmenter::pipeline::wall_clock_ms;

const PARTITIONS: i32 = 4;
const INPUT: &str = "bench-events";

struct Args {
    events: u64,
    customers: u64,
    load_fraction: f64,
    load_seconds: u64,
    brokers: Option<String>,
    /// `--only-broker R`: skip everything but the broker-alone baseline, at R events/s.
    only_broker: Option<f64>,
    /// `--throughput-only`: stop after the service's throughput run.
    throughput_only: bool,
    /// `--guarantee`: the service's `processing.guarantee`.
    guarantee: String,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        events: 1_000_000,
        customers: 100_000,
        load_fraction: 0.5,
        load_seconds: 30,
        brokers: None,
        only_broker: None,
        throughput_only: false,
        guarantee: "at_least_once".into(),
    };
    let mut iter = std::env::args().skip(1);
    while let Some(flag) = iter.next() {
        if flag == "--throughput-only" {
            args.throughput_only = true;
            continue;
        }
        let value = iter
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--events" => args.events = value.parse()?,
            "--customers" => args.customers = value.parse()?,
            "--load-fraction" => args.load_fraction = value.parse()?,
            "--load-seconds" => args.load_seconds = value.parse()?,
            "--brokers" => args.brokers = Some(value),
            "--only-broker" => args.only_broker = Some(value.parse()?),
            "--guarantee" => match value.as_str() {
                "at_least_once" | "exactly_once" => args.guarantee = value,
                other => bail!("--guarantee {other:?}: use at_least_once or exactly_once"),
            },
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

fn producer(brokers: &str) -> anyhow::Result<ThreadedProducer<DefaultProducerContext>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "500000")
        .set("partitioner", "murmur2_random")
        .create()?)
}

fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    key: &str,
    payload: &str,
    timestamp: i64,
) {
    let mut record = BaseRecord::<str, str>::to(topic)
        .key(key)
        .payload(payload)
        .timestamp(timestamp);
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((_, returned)) => {
                record = returned;
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// Creates a benchmark topic with [`PARTITIONS`] partitions.
fn create_topic(
    runtime: &tokio::runtime::Runtime,
    admin: &AdminClient<DefaultClientContext>,
    name: &str,
) -> anyhow::Result<()> {
    runtime.block_on(admin.create_topics(
        &[NewTopic::new(name, PARTITIONS, TopicReplication::Fixed(1))],
        &AdminOptions::new(),
    ))?;
    Ok(())
}

fn assigned_consumer(brokers: &str, topic: &str, group: &str) -> anyhow::Result<BaseConsumer> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let mut list = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        list.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&list)?;
    Ok(consumer)
}

/// Cumulative bucket counts `(le, count)` of `segmenter_event_to_publish_seconds{cause="event"}`.
fn publish_buckets(metrics: &str) -> Vec<(f64, f64)> {
    metrics
        .lines()
        .filter(|l| l.starts_with("segmenter_event_to_publish_seconds_bucket{cause=\"event\""))
        .filter_map(|line| {
            let le = line.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = line.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect()
}

/// A quantile from histogram buckets (`after - before`), interpolated within the bucket as
/// Prometheus' `histogram_quantile` does; in milliseconds.
fn histogram_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let deltas: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let old = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, n)| *n);
            (*le, n - old)
        })
        .collect();
    let total = deltas.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (le, count) in deltas {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0 * 1000.0);
            }
            let within = (rank - lower.1) / (count - lower.1).max(1.0);
            return Some((lower.0 + (le - lower.0) * within) * 1000.0);
        }
        lower = (le, count);
    }
    None
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    // Read by every `segmenter run` child (environment overrides of the config file).
    std::env::set_var("SEGMENTER__PROCESSING__GUARANTEE", &args.guarantee);
    println!("processing.guarantee = {}", args.guarantee);
    let broker = match &args.brokers {
        Some(_) => None,
        None => Some(tansu::Tansu::start().context("starting tansu (scripts/install-tansu.sh)")?),
    };
    let brokers = args
        .brokers
        .clone()
        .or_else(|| broker.as_ref().map(|b| b.bootstrap()))
        .context("no broker")?;
    let work = tempfile::tempdir()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    create_topic(&runtime, &admin, INPUT)?;

    let producer = producer(&brokers)?;
    if let Some(rate) = args.only_broker {
        broker_alone(&runtime, &admin, &producer, &brokers, rate, &args)?;
        drop(broker);
        return Ok(());
    }

    // 1. preload
    let span_ms = (args.events as f64 / 50.0 * 1000.0) as i64;
    let generator_start = wall_clock_ms() - span_ms;
    let started = Instant::now();
    for line in Generator::new(GeneratorConfig {
        customers: args.customers,
        events: args.events,
        start_ms: generator_start,
        ..GeneratorConfig::default()
    }) {
        send(&producer, INPUT, &key_of(&line), &line, wall_clock_ms());
    }
    producer.flush(Duration::from_secs(60))?;
    println!(
        "preloaded {} events in {:.1} s",
        args.events,
        started.elapsed().as_secs_f64()
    );

    // 2. the ceiling: a bare consumer
    let consumer = assigned_consumer(&brokers, INPUT, "bench-bare")?;
    let started = Instant::now();
    let mut read = 0u64;
    while read < args.events && started.elapsed() < Duration::from_secs(300) {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            read += 1;
        }
    }
    let bare = read as f64 / started.elapsed().as_secs_f64();
    println!("bare rdkafka consumer: {read} messages, {bare:.0} msg/s");
    drop(consumer);

    // 3. the service, from its first consumed batch to the last change acknowledged (its own
    // counters, scraped every 50 ms)
    let port = free_port()?;
    let child = start_service(&brokers, work.path(), "bench-a", INPUT, "bench-a", port)?;
    let run = wait_for_service(port, args.events, Duration::from_secs(900));
    let transactions = scrape(port)
        .map(|text| {
            text.lines()
                .filter_map(|line| {
                    line.strip_prefix("segmenter_transactions_total{outcome=\"committed\"}")?
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
                .sum::<f64>()
        })
        .unwrap_or(0.0);
    let cpu = cpu_seconds(child.id());
    let peak_rss = peak_rss_bytes(child.id());
    stop(child);
    let run = run?;
    let service = run.rate();
    println!(
        "segmenter run: {:.0} events/s end to end ({:.0} events after the first batch in {:.2} s), {:.0} % of the bare consumer; {:.2} output records per event; {} per event (the whole process, start-up included)",
        service,
        run.events,
        run.seconds,
        100.0 * service / bare,
        run.records_per_event,
        cpu.map_or("n/a".into(), |(seconds, faults)| format!(
            "{:.1} µs CPU and {:.2} page faults",
            seconds * 1e6 / args.events as f64,
            faults / args.events as f64
        )),
    );
    if transactions > 0.0 {
        println!(
            "transactions: {transactions:.0} ({:.1} ms apart on average over the run)",
            run.seconds * 1000.0 / transactions
        );
    }
    if let Some(bytes) = peak_rss {
        println!(
            "service peak RSS {:.0} MiB for {} customers (all cached: engine.max_cached_customers is 200,000; RocksDB block cache 128 MiB)",
            bytes as f64 / (1 << 20) as f64,
            args.customers
        );
    }

    if args.throughput_only {
        return Ok(());
    }

    // 3b. the same input and output volume through the broker with no processing: a bare
    // consumer that produces `records_per_event` change-sized records per event it reads.
    let relay = bare_relay(
        &runtime,
        &admin,
        &brokers,
        args.events,
        run.records_per_event,
    )?;
    println!(
        "bare relay (consume + produce the same records, no processing): {:.0} events/s; the service runs at {:.0} % of it",
        relay,
        100.0 * service / relay
    );

    // 4. latency under open-loop load at a fraction of the measured throughput. A second
    // instance first builds its state from the preloaded events, then is restarted on fresh
    // input and output topics (same state, same partitioning), so the load does not queue behind
    // the millions of records already in tansu's in-memory logs, whose reads slow down as a
    // partition grows — the broker-alone baseline below also uses a fresh topic.
    let rate = (service * args.load_fraction).max(1.0);
    let port = free_port()?;
    let child = start_service(&brokers, work.path(), "bench-b", INPUT, "bench-b", port)?;
    let caught_up = wait_for_service(port, args.events, Duration::from_secs(900));
    stop(child);
    caught_up?;
    let load_topic = "bench-load";
    create_topic(&runtime, &admin, load_topic)?;
    let http_port = free_port()?;
    let child = start_service(
        &brokers,
        work.path(),
        "bench-b",
        load_topic,
        "bench-load",
        http_port,
    )?;
    let ready = Instant::now() + Duration::from_secs(120);
    while !scrape_path(http_port, "/readyz").is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
        if Instant::now() > ready {
            bail!("the service did not become ready on {load_topic}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let changes = assigned_consumer(&brokers, "bench-load-changes", "bench-latency")?;
    warm_up(&changes);
    let buckets_before = publish_buckets(&scrape(http_port)?);
    let (sent, mut latencies) =
        open_loop(&producer, load_topic, changes, "message_id", rate, &args, 7)?;
    let buckets_after = publish_buckets(&scrape(http_port)?);
    stop(child);
    latencies.sort_unstable();
    println!(
        "latency at {:.0} events/s open loop ({} sent, {} event-caused changes): p50 {} ms, p99 {} ms, p99.9 {} ms, max {} ms",
        rate,
        sent,
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999),
        latencies.last().copied().unwrap_or(0)
    );
    let quantile = |q| {
        histogram_quantile(&buckets_before, &buckets_after, q)
            .map_or("n/a".to_string(), |ms| format!("{ms:.0} ms"))
    };
    println!(
        "service's own event→publish histogram over the load (Kafka timestamp of the event to Kafka acknowledging the change): p50 {}, p99 {}, p99.9 {}",
        quantile(0.5),
        quantile(0.99),
        quantile(0.999)
    );

    // 5. the floor under both: the broker alone at the same rate
    broker_alone(&runtime, &admin, &producer, &brokers, rate, &args)?;
    drop(broker);
    Ok(())
}

/// A service run measured by its own counters.
struct ServiceRun {
    /// Events consumed after the first observation.
    events: f64,
    seconds: f64,
    records_per_event: f64,
}

impl ServiceRun {
    fn rate(&self) -> f64 {
        self.events / self.seconds
    }
}

/// Scrapes the service every 50 ms until it has consumed `total` events and Kafka acknowledged
/// every record it decided (outbox empty). Measured from the first scrape that saw consumption.
fn wait_for_service(port: u16, total: u64, limit: Duration) -> anyhow::Result<ServiceRun> {
    let deadline = Instant::now() + limit;
    let mut first: Option<(Instant, f64)> = None;
    let mut last = 0.0;
    loop {
        if Instant::now() > deadline {
            bail!("the service did not finish ({last} of {total} consumed)");
        }
        if let Ok(text) = scrape(port) {
            let consumed = metric_sum(&text, "segmenter_events_consumed_total{");
            let pending = metric_sum(&text, "segmenter_outbox_pending{");
            let now = Instant::now();
            last = consumed;
            if first.is_none() && consumed > 0.0 {
                first = Some((now, consumed));
            }
            if consumed >= total as f64 && pending == 0.0 {
                let (t0, c0) = first.unwrap_or((now, consumed));
                let published = metric_sum(&text, "segmenter_published_total{");
                return Ok(ServiceRun {
                    events: consumed - c0,
                    seconds: (now - t0).as_secs_f64().max(1e-3),
                    records_per_event: published / consumed,
                });
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process's peak resident set (`VmHWM`), from `/proc` (Linux).
fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Reads `events` input events and produces `records_per_event` records of a change event's
/// size per event read (an accumulator spreads the fraction evenly) to a fresh topic; events/s
/// from the first message read to the last record acknowledged.
fn bare_relay(
    runtime: &tokio::runtime::Runtime,
    admin: &AdminClient<DefaultClientContext>,
    brokers: &str,
    events: u64,
    records_per_event: f64,
) -> anyhow::Result<f64> {
    let topic = "bench-relay";
    create_topic(runtime, admin, topic)?;
    let consumer = assigned_consumer(brokers, INPUT, "bench-relay")?;
    let producer = producer(brokers)?;
    let payload = "x".repeat(260);
    let mut owed = 0.0;
    let mut read = 0u64;
    let mut started = None;
    let limit = Instant::now() + Duration::from_secs(300);
    while read < events && Instant::now() < limit {
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        started.get_or_insert_with(Instant::now);
        read += 1;
        owed += records_per_event;
        while owed >= 1.0 {
            owed -= 1.0;
            let key = message.key().unwrap_or_default();
            let mut record = BaseRecord::<[u8], str>::to(topic)
                .key(key)
                .payload(&payload);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, returned)) => {
                        record = returned;
                        producer.poll(Duration::from_millis(1));
                    }
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    let started = started.context("the relay read nothing")?;
    Ok(read as f64 / started.elapsed().as_secs_f64())
}

/// Lets a freshly assigned reader find its start offsets and begin fetching before a clock
/// starts: its first fetch otherwise adds ~0.5 s to the first records (start-up, not load).
fn warm_up(reader: &BaseConsumer) {
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        reader.poll(Duration::from_millis(100));
    }
}

/// The broker alone at `rate`: produce → readable by a consumer, no service. The floor under the
/// service's latency on this machine and broker.
fn broker_alone(
    runtime: &tokio::runtime::Runtime,
    admin: &AdminClient<DefaultClientContext>,
    producer: &ThreadedProducer<DefaultProducerContext>,
    brokers: &str,
    rate: f64,
    args: &Args,
) -> anyhow::Result<()> {
    let baseline_topic = "bench-roundtrip";
    create_topic(runtime, admin, baseline_topic)?;
    let reader = assigned_consumer(brokers, baseline_topic, "bench-roundtrip")?;
    warm_up(&reader);
    let (sent, mut round_trips) = open_loop(
        producer,
        baseline_topic,
        reader,
        "messageId",
        rate,
        args,
        11,
    )?;
    round_trips.sort_unstable();
    println!(
        "broker alone at {:.0} events/s ({} sent, produce → readable, no service): p50 {} ms, p99 {} ms, p99.9 {} ms",
        rate,
        sent,
        percentile(&round_trips, 0.5),
        percentile(&round_trips, 0.99),
        percentile(&round_trips, 0.999)
    );
    Ok(())
}

/// Produces generated events to `topic` at `rate` for `--load-seconds` (open loop: on schedule,
/// whatever happens downstream) while `reader` is polled continuously on its own thread; each
/// record it reads whose JSON field `id_field` names a produced event's `messageId` yields one
/// latency sample (read time − produce time, ms). Returns (events sent, samples).
///
/// The events are generated (and their keys and ids extracted) before the clock starts and the
/// reader finds ids by a plain text search, so the load generator takes as little as possible of
/// the CPU it shares with the service and the broker.
fn open_loop(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    reader: BaseConsumer,
    id_field: &'static str,
    rate: f64,
    args: &Args,
    seed: u64,
) -> anyhow::Result<(u64, Vec<i64>)> {
    let count = (rate * args.load_seconds as f64).ceil() as usize;
    // Event times follow the schedule; the load starts when the first one is due.
    let lead_ms = 5_000 + count as i64 / 500;
    let start_ms = wall_clock_ms() + lead_ms;
    let mut generator = Generator::new(GeneratorConfig {
        customers: args.customers,
        events: count as u64,
        seed,
        start_ms,
        events_per_second: rate,
        late_fraction: 0.0,
        duplicate_fraction: 0.0,
        malformed_fraction: 0.0,
    });
    let mut planned: Vec<(String, String)> = Vec::with_capacity(count);
    let mut index_of: HashMap<String, usize> = HashMap::with_capacity(count);
    while let Some(generated) = generator.next_line() {
        let line = generated.line;
        if let Some(id) = text_field(line.as_bytes(), "messageId") {
            index_of.insert(id.to_string(), planned.len());
        }
        planned.push((key_of(&line), line));
    }
    let reading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let thread = {
        let reading = reading.clone();
        std::thread::spawn(move || {
            let mut seen: Vec<(String, i64)> = Vec::new();
            while reading.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(Ok(message)) = reader.poll(Duration::from_millis(20)) {
                    let at = wall_clock_ms();
                    if let Some(id) = message.payload().and_then(|p| text_field(p, id_field)) {
                        seen.push((id.to_string(), at));
                    }
                }
            }
            seen
        })
    };
    while wall_clock_ms() < start_ms {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut sent_at: Vec<i64> = vec![0; planned.len()];
    let start = Instant::now();
    for (i, (key, line)) in planned.iter().enumerate() {
        let due = Duration::from_secs_f64(i as f64 / rate);
        while start.elapsed() < due {
            std::thread::sleep(Duration::from_micros(200));
        }
        let now = wall_clock_ms();
        sent_at[i] = now;
        send(producer, topic, key, line, now);
    }
    std::thread::sleep(Duration::from_secs(5));
    reading.store(false, std::sync::atomic::Ordering::Relaxed);
    let seen = thread
        .join()
        .map_err(|_| anyhow::anyhow!("the reader thread panicked"))?;
    let samples = seen
        .iter()
        .filter_map(|(id, at)| index_of.get(id).map(|&i| at - sent_at[i]))
        .collect();
    Ok((planned.len() as u64, samples))
}

/// The string value of a top-level `"field":"…"` in compact JSON (no escapes in the value),
/// found by text search — what the generator and the service write.
fn text_field<'a>(json: &'a [u8], field: &str) -> Option<&'a str> {
    let needle = format!("\"{field}\":\"");
    let at = json
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())?
        + needle.len();
    let len = json[at..].iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&json[at..at + len]).ok()
}
