//! The parts of `bench_restore` beyond the restore itself: changelog bytes per input event of a real
//! `segmenter run`, the time from killing an owner to the survivor's first change, and the
//! pause a planned handover (SIGTERM) adds.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Message;
use segmenter::generate::{Generator, GeneratorConfig};
use segmenter::pipeline::wall_clock_ms;

use super::bench::{free_port, key_of, metric_sum, scrape, start_service_as, stop, Service};

/// Input partitions of the service runs.
const PARTITIONS: i32 = 4;

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

fn producer(brokers: &str) -> anyhow::Result<ThreadedProducer<DefaultProducerContext>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "500000")
        .create()?)
}

/// The input partition of a customer: chosen here (FNV-1a), so the benchmark knows it.
fn partition_of(customer: &str) -> i32 {
    let hash = customer.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % PARTITIONS as u64) as i32
}

fn send(producer: &ThreadedProducer<DefaultProducerContext>, topic: &str, line: &str) {
    let key = key_of(line);
    let mut record = BaseRecord::<str, str>::to(topic)
        .partition(partition_of(&key))
        .key(&key)
        .payload(line)
        .timestamp(wall_clock_ms());
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

/// Scrapes the service until it has consumed `total` events and its outbox is empty.
fn wait_consumed(port: u16, total: u64, limit: Duration) -> anyhow::Result<f64> {
    let deadline = Instant::now() + limit;
    let mut consumed = 0.0;
    while Instant::now() < deadline {
        if let Ok(text) = scrape(port) {
            consumed = metric_sum(&text, "segmenter_events_consumed_total{");
            let pending = metric_sum(&text, "segmenter_outbox_pending{");
            if consumed >= total as f64 && pending == 0.0 {
                return Ok(consumed);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the service did not finish ({consumed} of {total} consumed)")
}

fn reader(brokers: &str, group: &str) -> anyhow::Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "10")
        .create()?)
}

/// Changelog records of one kind: count and key + value bytes.
#[derive(Default, Clone, Copy)]
struct Tally {
    records: u64,
    bytes: u64,
}

/// Runs `segmenter run` (event clock) over `events` generated events and sums what it wrote
/// to its changelog topic.
pub fn changelog_per_event(
    brokers: &str,
    work: &std::path::Path,
    events: u64,
    runtime: &tokio::runtime::Runtime,
    admin: &AdminClient<DefaultClientContext>,
) -> anyhow::Result<()> {
    let input = "rb-events";
    create_topic(runtime, admin, input)?;
    let producer = producer(brokers)?;
    let mut input_bytes = 0u64;
    for line in Generator::new(GeneratorConfig {
        events,
        ..GeneratorConfig::default()
    }) {
        input_bytes += line.len() as u64;
        send(&producer, input, &line);
    }
    producer.flush(Duration::from_secs(60))?;
    let port = free_port()?;
    let group = "rb-changelog";
    let child = start_service_as(&Service {
        brokers,
        work,
        group,
        instance: "",
        input,
        outputs: "rb",
        http_port: port,
        clock: "event",
        standby_replicas: 0,
    })?;
    let consumed = wait_consumed(port, events, Duration::from_secs(900));
    let published = scrape(port).map(|t| metric_sum(&t, "segmenter_published_total{"));
    stop(child);
    let consumed = consumed?;
    let topic = format!("{group}-changelog");
    let consumer = reader(brokers, "rb-changelog-reader")?;
    let mut list = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        list.add_partition_offset(&topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&list)?;
    let mut tallies: HashMap<u8, Tally> = HashMap::new();
    let mut tombstones = 0u64;
    let mut at_end = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while at_end.len() < PARTITIONS as usize && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                let key = message.key().unwrap_or_default();
                let value = message.payload().unwrap_or_default();
                let tally = tallies
                    .entry(key.first().copied().unwrap_or(0))
                    .or_default();
                tally.records += 1;
                tally.bytes += (key.len() + value.len()) as u64;
                tombstones += u64::from(message.payload().is_none());
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                at_end.insert(partition);
            }
            _ => {}
        }
    }
    let total = tallies.values().fold(Tally::default(), |sum, t| Tally {
        records: sum.records + t.records,
        bytes: sum.bytes + t.bytes,
    });
    let kind = |k: u8| tallies.get(&k).copied().unwrap_or_default();
    println!(
        "segmenter run (event clock) over {consumed:.0} events ({:.0} input bytes/event): changelog {} records, {:.1} MB; {:.1} changelog bytes per input event, {:.3} records per event (customer {:.3} at {:.0} B, checkpoint {:.4}, layout {}; {} tombstones); {} output records published in all",
        input_bytes as f64 / events as f64,
        total.records,
        total.bytes as f64 / 1e6,
        total.bytes as f64 / consumed,
        total.records as f64 / consumed,
        kind(b'c').records as f64 / consumed,
        kind(b'c').bytes as f64 / kind(b'c').records.max(1) as f64,
        kind(b'm').records as f64 / consumed,
        kind(b'l').records,
        tombstones,
        published.map_or("?".into(), |p| format!("{p:.0}")),
    );
    Ok(())
}

/// Input partitions an instance owns: those with a `segmenter_timers_pending` series (removed
/// when a partition is revoked).
fn owned_partitions(port: u16) -> anyhow::Result<HashSet<i32>> {
    let text = scrape(port)?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("segmenter_timers_pending{"))
        .filter_map(|l| {
            l.split("partition=\"")
                .nth(1)?
                .split('"')
                .next()?
                .parse()
                .ok()
        })
        .collect())
}

/// Two `segmenter run` instances of one group sharing the input, and a steady load on them.
struct Pair {
    survivor: std::process::Child,
    victim: std::process::Child,
    ports: [u16; 2],
    rate: f64,
    loading: Arc<AtomicBool>,
    load: std::thread::JoinHandle<()>,
}

impl Pair {
    /// Starts both on fresh topics named after `name`, waits until they share the partitions,
    /// then starts the load (2,000 events/s, wall clock).
    fn start(
        brokers: &str,
        work: &std::path::Path,
        runtime: &tokio::runtime::Runtime,
        admin: &AdminClient<DefaultClientContext>,
        name: &str,
        standby_replicas: u32,
    ) -> anyhow::Result<Pair> {
        let input = format!("{name}-events");
        create_topic(runtime, admin, &input)?;
        let ports = [free_port()?, free_port()?];
        let service = |instance, http_port| Service {
            brokers,
            work,
            group: name,
            instance,
            input: &input,
            outputs: name,
            http_port,
            clock: "wall",
            standby_replicas,
        };
        let survivor = start_service_as(&service("-a", ports[0]))?;
        let victim = start_service_as(&service("-b", ports[1]))?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let a = owned_partitions(ports[0]).unwrap_or_default();
            let b = owned_partitions(ports[1]).unwrap_or_default();
            if !a.is_empty() && !b.is_empty() && a.len() + b.len() == PARTITIONS as usize {
                break;
            }
            if Instant::now() > deadline {
                bail!("the two instances did not share the partitions ({a:?}, {b:?})");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let rate = 2_000.0;
        let loading = Arc::new(AtomicBool::new(true));
        let load = {
            let loading = loading.clone();
            let producer = producer(brokers)?;
            std::thread::spawn(move || {
                let start = Instant::now();
                let generator = Generator::new(GeneratorConfig {
                    events: 100_000_000,
                    start_ms: wall_clock_ms(),
                    events_per_second: rate,
                    late_fraction: 0.0,
                    duplicate_fraction: 0.0,
                    ..GeneratorConfig::default()
                });
                for (i, line) in generator.enumerate() {
                    if !loading.load(Ordering::Relaxed) {
                        break;
                    }
                    let due = Duration::from_secs_f64(i as f64 / rate);
                    while start.elapsed() < due {
                        std::thread::sleep(Duration::from_micros(500));
                    }
                    send(&producer, &input, &line);
                }
                let _ = producer.flush(Duration::from_secs(10));
            })
        };
        Ok(Pair {
            survivor,
            victim,
            ports,
            rate,
            loading,
            load,
        })
    }

    fn end(self) {
        self.loading.store(false, Ordering::Relaxed);
        let _ = self.load.join();
        stop(self.survivor);
        stop(self.victim);
    }
}

/// Two instances in one group under a steady load; SIGKILL one; time until the change topic
/// shows a change produced after the kill for a customer of a partition the killed one owned.
pub fn failover(
    brokers: &str,
    work: &std::path::Path,
    runtime: &tokio::runtime::Runtime,
    admin: &AdminClient<DefaultClientContext>,
    standby_replicas: u32,
) -> anyhow::Result<()> {
    let name = if standby_replicas == 0 { "fo" } else { "fos" };
    let mut pair = Pair::start(brokers, work, runtime, admin, name, standby_replicas)?;
    let changes = reader(brokers, &format!("{name}-watch"))?;
    changes.subscribe(&[&format!("{name}-changes")])?;
    let warm = Instant::now() + Duration::from_secs(15);
    while Instant::now() < warm {
        changes.poll(Duration::from_millis(50));
    }
    let owned = owned_partitions(pair.ports[1])?;
    let kill_ms = wall_clock_ms();
    let killed = Instant::now();
    pair.victim.kill()?;
    let _ = pair.victim.wait();
    let mut first: Option<(Duration, i64)> = None;
    let deadline = killed + Duration::from_secs(120);
    while first.is_none() && Instant::now() < deadline {
        let Some(Ok(message)) = changes.poll(Duration::from_millis(20)) else {
            continue;
        };
        let produced_ms = message.timestamp().to_millis().unwrap_or(0);
        let customer = std::str::from_utf8(message.key().unwrap_or_default()).unwrap_or("");
        if produced_ms > kill_ms && owned.contains(&partition_of(customer)) {
            first = Some((killed.elapsed(), produced_ms - kill_ms));
        }
    }
    let restore = restore_summary(pair.ports[0]);
    let rate = pair.rate;
    pair.end();
    let (seen, produced) = first
        .context("no change from the survivor for the killed owner's partitions within 120 s")?;
    println!(
        "failover ({}; session.timeout.ms 6000; {rate:.0} events/s over {PARTITIONS} partitions, the killed owner had {owned:?}): kill -9 → first change of its partitions produced by the survivor {:.2} s, read downstream {:.2} s ({restore})",
        standby_label(standby_replicas),
        produced as f64 / 1000.0,
        seen.as_secs_f64()
    );
    Ok(())
}

/// A planned handover: two instances under a steady load, SIGTERM one (it flushes, publishes
/// its changelog tail and commits before leaving). Changes are frequent on every partition
/// under this load, so a partition's pause shows as the longest gap between consecutive
/// changes of it read downstream (by arrival): over the 30 s after the SIGTERM,
/// against the longest gap in the 10 s before it. Reported for the partitions that moved and
/// for those that stayed (an eager rebalance stops those too).
pub fn handover(
    brokers: &str,
    work: &std::path::Path,
    runtime: &tokio::runtime::Runtime,
    admin: &AdminClient<DefaultClientContext>,
    standby_replicas: u32,
) -> anyhow::Result<()> {
    let name = if standby_replicas == 0 { "ho" } else { "hos" };
    let pair = Pair::start(brokers, work, runtime, admin, name, standby_replicas)?;
    let changes = reader(brokers, &format!("{name}-watch"))?;
    // Assigned, not subscribed: read live from now on, without waiting for a group join.
    let topic = format!("{name}-changes");
    let metadata = changes.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let count = metadata
        .topics()
        .first()
        .map_or(0, |t| t.partitions().len() as i32);
    if count == 0 {
        bail!("{topic} has no partitions");
    }
    let mut live = TopicPartitionList::new();
    for partition in 0..count {
        live.add_partition_offset(&topic, partition, Offset::End)?;
    }
    changes.assign(&live)?;
    // Arrival times (ms) of the changes, per partition.
    let mut published: HashMap<i32, Vec<i64>> = HashMap::new();
    let mut collect = |until: Instant| {
        while Instant::now() < until {
            let Some(Ok(message)) = changes.poll(Duration::from_millis(20)) else {
                continue;
            };
            // When it arrives here (fetch.wait.max.ms 10): the record timestamp is the
            // change's cause time, not its publish time.
            let at = wall_clock_ms();
            let customer = std::str::from_utf8(message.key().unwrap_or_default()).unwrap_or("");
            published
                .entry(partition_of(customer))
                .or_default()
                .push(at);
        }
    };
    collect(Instant::now() + Duration::from_secs(15));
    let moved = owned_partitions(pair.ports[1])?;
    let term_ms = wall_clock_ms();
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pair.victim.id().to_string())
        .status();
    collect(Instant::now() + Duration::from_secs(30));
    let restore = restore_summary(pair.ports[0]);
    let rate = pair.rate;
    pair.end();
    // The longest gap between consecutive arrivals within [from, to), per partition.
    let gaps = |from: i64, to: i64| {
        let mut out = std::collections::BTreeMap::new();
        for (partition, times) in &published {
            let mut times: Vec<i64> = times
                .iter()
                .copied()
                .filter(|t| (from..to).contains(t))
                .collect();
            times.sort_unstable();
            let longest = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
            out.insert(*partition, longest);
        }
        out
    };
    let before = gaps(term_ms - 10_000, term_ms);
    let after = gaps(term_ms, term_ms + 30_000);
    let worst = |moved_ones: bool, of: &std::collections::BTreeMap<i32, i64>| {
        of.iter()
            .filter(|(p, _)| moved.contains(p) == moved_ones)
            .map(|(_, gap)| *gap)
            .max()
            .unwrap_or(0)
    };
    if worst(true, &after) == 0 {
        bail!("no changes of the moved partitions after the SIGTERM");
    }
    println!(
        "planned handover ({}; {rate:.0} events/s over {PARTITIONS} partitions; SIGTERM to the owner of {moved:?}): longest gap between changes per partition, 10 s before {before:?} ms, 30 s after {after:?} ms; pause (longest gap after) {:.2} s on the moved partitions, {:.2} s on those that stayed, against {:.2} s before ({restore})",
        standby_label(standby_replicas),
        worst(true, &after) as f64 / 1000.0,
        worst(false, &after) as f64 / 1000.0,
        before.values().copied().max().unwrap_or(0) as f64 / 1000.0,
    );
    Ok(())
}

fn standby_label(standby_replicas: u32) -> String {
    if standby_replicas == 0 {
        "no standby".to_string()
    } else {
        format!("state.standby_replicas = {standby_replicas}")
    }
}

/// The survivor's restores, from its metrics.
fn restore_summary(port: u16) -> String {
    scrape(port)
        .map(|t| {
            let sum = metric_sum(&t, "segmenter_restore_seconds_sum");
            let count = metric_sum(&t, "segmenter_restore_seconds_count");
            let records = metric_sum(&t, "segmenter_restore_records_total");
            format!("{count:.0} partition restores on the survivor, {records:.0} changelog records, {sum:.2} s in all")
        })
        .unwrap_or_default()
}
