//! End-to-end Kafka benchmark: starts a tansu broker (or uses `--brokers`), preloads N
//! generated events, measures a bare rdkafka consumer reading them (the ceiling), then the
//! `segmenter run` service (child process, all segments of config/segments.toml, wall clock,
//! timers and de-duplication on) from its first committed batch to the last change acknowledged,
//! and finally event→publish latency under an open-loop load at a fraction of that throughput:
//! as seen by a downstream reader of the change topic, and from the service's own histogram
//! (`segmenter_event_to_publish_seconds`, scraped before and after the load).
//!
//!     cargo run --release --bin bench_kafka -- [--events N] [--customers N] [--load-fraction F]
//!         [--load-seconds S] [--brokers HOST:PORT]

#[path = "../../tests/support/tansu.rs"]
mod tansu;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
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
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        events: 1_000_000,
        customers: 100_000,
        load_fraction: 0.5,
        load_seconds: 30,
        brokers: None,
    };
    let mut iter = std::env::args().skip(1);
    while let Some(flag) = iter.next() {
        let value = iter
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--events" => args.events = value.parse()?,
            "--customers" => args.customers = value.parse()?,
            "--load-fraction" => args.load_fraction = value.parse()?,
            "--load-seconds" => args.load_seconds = value.parse()?,
            "--brokers" => args.brokers = Some(value),
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

fn key_of(line: &str) -> String {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| {
            ["userId", "anonymousId"]
                .iter()
                .find_map(|f| v.get(f).and_then(|x| x.as_str()).map(str::to_string))
        })
        .unwrap_or_default()
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

/// Sum of the committed offsets of `group` on the input topic.
fn committed(brokers: &str, group: &str) -> anyhow::Result<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()?;
    let mut list = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        list.add_partition(INPUT, partition);
    }
    let offsets = consumer.committed_offsets(list, Duration::from_secs(5))?;
    Ok(offsets
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum())
}

/// A free local TCP port for the service's HTTP API.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `GET /metrics` from the service.
fn scrape(port: u16) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
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

fn start_service(
    brokers: &str,
    work: &std::path::Path,
    group: &str,
    http_port: u16,
) -> anyhow::Result<Child> {
    let segments =
        std::fs::canonicalize("config/segments.toml").context("run from the repository root")?;
    let config = work.join(format!("{group}.toml"));
    std::fs::write(
        &config,
        format!(
            "segments_file = {segments:?}\n[engine]\nclock = \"wall\"\n[input]\ntopics = [\"{INPUT}\"]\n[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"{group}\"\n[kafka.consumer]\n\"session.timeout.ms\" = \"6000\"\n\"fetch.wait.max.ms\" = \"20\"\n[output]\nchanges_topic = \"{group}-changes\"\nmembership_topic = \"{group}-membership\"\ndlq_topic = \"{group}-dlq\"\n[state]\ndir = {:?}\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n",
            work.join(format!("{group}-state"))
        ),
    )?;
    let binary: PathBuf = std::env::current_exe()?
        .parent()
        .context("no parent")?
        .join("segmenter");
    Ok(Command::new(binary)
        .args(["run", "--config"])
        .arg(&config)
        .env(
            "RUST_LOG",
            std::env::var("BENCH_SERVICE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?)
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
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
    runtime.block_on(admin.create_topics(
        &[NewTopic::new(INPUT, PARTITIONS, TopicReplication::Fixed(1))],
        &AdminOptions::new(),
    ))?;

    // 1. preload
    let span_ms = (args.events as f64 / 50.0 * 1000.0) as i64;
    let generator_start = wall_clock_ms() - span_ms;
    let producer = producer(&brokers)?;
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

    // 3. the service, from its first committed batch to the last acknowledged change
    let child = start_service(&brokers, work.path(), "bench-a", free_port()?)?;
    let total = args.events as i64;
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut first: Option<(Instant, i64)> = None;
    let mut last_progress = 0;
    let finished = loop {
        if Instant::now() > deadline {
            break None;
        }
        let done = committed(&brokers, "bench-a").unwrap_or(0);
        let now = Instant::now();
        if first.is_none() && done > 0 {
            first = Some((now, done));
        }
        if done >= total {
            break Some(now);
        }
        if done != last_progress {
            last_progress = done;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    stop(child);
    let (Some((t0, offset0)), Some(t1)) = (first, finished) else {
        bail!("the service did not finish ({last_progress} of {total} committed)");
    };
    let service = (total - offset0) as f64 / (t1 - t0).as_secs_f64();
    println!(
        "segmenter run: {:.0} events/s end to end ({} events after the first commit in {:.2} s), {:.0} % of the bare consumer",
        service,
        total - offset0,
        (t1 - t0).as_secs_f64(),
        100.0 * service / bare
    );

    // 4. latency under open-loop load at a fraction of the measured throughput
    let rate = (service * args.load_fraction).max(1.0);
    let http_port = free_port()?;
    let child = start_service(&brokers, work.path(), "bench-b", http_port)?;
    std::thread::sleep(Duration::from_secs(8));
    let changes = assigned_consumer(&brokers, "bench-b-changes", "bench-latency")?;
    // Drain what the catch-up of the preloaded events produced.
    let caught_up = Instant::now() + Duration::from_secs(600);
    while committed(&brokers, "bench-b").unwrap_or(0) < total && Instant::now() < caught_up {
        while changes.poll(Duration::from_millis(0)).is_some() {}
        std::thread::sleep(Duration::from_millis(200));
    }
    while changes.poll(Duration::from_millis(200)).is_some() {}
    let buckets_before = publish_buckets(&scrape(http_port)?);
    let (sent, mut latencies) = open_loop(&producer, INPUT, changes, "message_id", rate, &args, 7)?;
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

    // 5. the broker alone at the same rate: produce → readable by a consumer, no service. The
    // floor under the numbers above on this machine and broker.
    let baseline_topic = "bench-roundtrip";
    runtime.block_on(admin.create_topics(
        &[NewTopic::new(
            baseline_topic,
            PARTITIONS,
            TopicReplication::Fixed(1),
        )],
        &AdminOptions::new(),
    ))?;
    let reader = assigned_consumer(&brokers, baseline_topic, "bench-roundtrip")?;
    let (sent, mut round_trips) = open_loop(
        &producer,
        baseline_topic,
        reader,
        "messageId",
        rate,
        &args,
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
    drop(broker);
    Ok(())
}

/// Produces generated events to `topic` at `rate` for `--load-seconds` (open loop: on schedule,
/// whatever happens downstream) while `reader` is polled continuously on its own thread; each
/// record it reads whose JSON field `id_field` names a produced event's `messageId` yields one
/// latency sample (read time − produce time, ms). Returns (events sent, samples).
fn open_loop(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    reader: BaseConsumer,
    id_field: &'static str,
    rate: f64,
    args: &Args,
    seed: u64,
) -> anyhow::Result<(u64, Vec<i64>)> {
    let reading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let thread = {
        let reading = reading.clone();
        std::thread::spawn(move || {
            let mut seen: Vec<(String, i64)> = Vec::new();
            while reading.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(Ok(message)) = reader.poll(Duration::from_millis(20)) {
                    let id = message
                        .payload()
                        .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                        .and_then(|v| v.get(id_field).and_then(|m| m.as_str()).map(str::to_string));
                    if let Some(id) = id {
                        seen.push((id, wall_clock_ms()));
                    }
                }
            }
            seen
        })
    };
    let mut generator = Generator::new(GeneratorConfig {
        customers: args.customers,
        events: u64::MAX / 2,
        seed,
        start_ms: wall_clock_ms(),
        events_per_second: rate,
        late_fraction: 0.0,
        duplicate_fraction: 0.0,
        malformed_fraction: 0.0,
    });
    let mut sent_at: HashMap<String, i64> = HashMap::new();
    let start = Instant::now();
    let duration = Duration::from_secs(args.load_seconds);
    let mut sent = 0u64;
    while start.elapsed() < duration {
        let due = Duration::from_secs_f64(sent as f64 / rate);
        if start.elapsed() < due {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let Some(generated) = generator.next_line() else {
            break;
        };
        let now = wall_clock_ms();
        let line = generated.line;
        if let Some(id) = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| {
                v.get("messageId")
                    .and_then(|m| m.as_str())
                    .map(str::to_string)
            })
        {
            sent_at.insert(id, now);
        }
        send(producer, topic, &key_of(&line), &line, now);
        sent += 1;
    }
    std::thread::sleep(Duration::from_secs(5));
    reading.store(false, std::sync::atomic::Ordering::Relaxed);
    let seen = thread
        .join()
        .map_err(|_| anyhow::anyhow!("the reader thread panicked"))?;
    let samples = seen
        .iter()
        .filter_map(|(id, at)| sent_at.get(id).map(|sent| at - sent))
        .collect();
    Ok((sent, samples))
}
