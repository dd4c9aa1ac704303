//! The kill -9 loop shared by tests/service_crash.rs (a handful of kills, in CI) and
//! tests/soak.rs (50 in a row, run by scripts/soak/kill9.sh): while generated events are being
//! produced, the real service is killed with SIGKILL again and again in the middle of its work
//! and restarted each time. Afterwards the change topic must hold exactly the changes of an
//! uninterrupted run (`segmenter replay` per partition, the same engine offline): nothing lost,
//! duplicates only as byte-identical re-publications with the same `id`, per customer and
//! segment `seq` 1..n alternating entered/exited, per customer first publications in order,
//! every malformed input dead-lettered, and the membership topic ending at the final state.
//!
//! Include it after `tansu.rs` and `service.rs` (it names them as `super::tansu`, `super::service`):
//!
//! ```ignore
//! #[path = "support/crash.rs"]
//! mod crash;
//! ```

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use segmenter::generate::GeneratorConfig;

use super::service::{
    self, assert_same_changes, assert_seq_alternation, by_customer, distinct_by_id,
    expected_changes, generated_input, read_all, ChangeJson, InputProducer, Service, TestConfig,
    TopicReader,
};
use super::tansu;

const PARTITIONS: i32 = 4;

/// How hard to crash the service.
#[derive(Debug, Clone, Copy)]
pub struct KillPlan {
    /// Generated input events.
    pub events: u64,
    /// Messages per second the background producer sends.
    pub produce_rate: u64,
    /// At least this many kills (the input must last long enough), at most `max_kills`.
    pub min_kills: usize,
    pub max_kills: usize,
}

const SEGMENTS: &str = r#"
[[segment]]
id = "viewer"
rule = 'count("Product Viewed", 5m) >= 2'

[[segment]]
id = "cart_abandoner"
rule = 'last("Product Added") > last("Order Completed") and since(last("Product Added")) >= 10m'

[[segment]]
id = "idle"
rule = 'since(last(any)) >= 15m'

[[segment]]
id = "spender"
rule = 'sum("Order Completed", "revenue", 1h) >= 100'

[[segment]]
id = "frequent"
rule = 'count(any, 30m) >= 10'

[[segment]]
id = "dutch_reader"
rule = 'trait.country in ["NL", "BE"] and count("Email Opened", 1h) >= 1'

[[segment]]
id = "vip"
rule = 'in_segment("spender") and bucket(4) == 0'
"#;

/// Deterministic pseudo-random delays.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

pub fn kill_loop(plan: &KillPlan) {
    let started = Instant::now();
    let broker = tansu::Tansu::start().expect("starting the tansu broker");
    let brokers = broker.bootstrap();
    broker
        .create_topic("events", PARTITIONS)
        .expect("creating the input topic");
    for topic in ["segment-changes", "segment-membership", "segmenter-dlq"] {
        broker
            .create_topic(topic, PARTITIONS)
            .expect("creating an output topic");
    }
    let dir = tempfile::Builder::new()
        .prefix("segmenter-crash-")
        .tempdir()
        .expect("creating a temp dir");
    let mut config = TestConfig::new(&brokers, &dir.path().join("state"), &["events"], SEGMENTS);
    // A killed member stays in the group until its session times out: keep that short.
    config
        .consumer
        .insert("session.timeout.ms".into(), "1000".into());
    config
        .consumer
        .insert("heartbeat.interval.ms".into(), "250".into());
    config.batch_size = 200;
    let config_path = config.write(&dir.path().join("segmenter.toml"));
    let log = dir.path().join("segmenter.log");

    let lines = generated_input(
        "events",
        PARTITIONS,
        GeneratorConfig {
            customers: 2_000,
            events: plan.events,
            seed: 99,
            start_ms: 1_793_491_200_000,
            events_per_second: 5.0,
            late_fraction: 0.02,
            duplicate_fraction: 0.01,
            malformed_fraction: 0.005,
        },
    );
    let expected = expected_changes(&config_path, dir.path(), &lines);
    let malformed = lines.iter().filter(|l| l.malformed).count();
    assert!(expected.len() > 5_000, "only {} changes", expected.len());

    // Background producer at a steady rate.
    let produced = Arc::new(AtomicUsize::new(0));
    let producing = Arc::new(AtomicBool::new(true));
    let produce_rate = plan.produce_rate;
    let sender = {
        let lines = lines.clone();
        let brokers = brokers.clone();
        let produced = produced.clone();
        let producing = producing.clone();
        thread::spawn(move || {
            let mut producer = InputProducer::new(&brokers);
            let begun = Instant::now();
            for (i, line) in lines.iter().enumerate() {
                let due = Duration::from_micros(i as u64 * 1_000_000 / produce_rate);
                if let Some(wait) = due.checked_sub(begun.elapsed()) {
                    thread::sleep(wait);
                }
                producer.send_line(line);
                produced.store(i + 1, Ordering::Relaxed);
            }
            producer.flush();
            producing.store(false, Ordering::SeqCst);
        })
    };

    // Kill -9 in the middle of the work, again and again.
    let mut reader = TopicReader::new(&brokers, "segment-changes");
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut kills: Vec<String> = Vec::new();
    while kills.len() < plan.max_kills {
        if kills.len() >= plan.min_kills && !producing.load(Ordering::SeqCst) {
            break;
        }
        // Everything the killed process published is read first, so that new records are
        // this incarnation's work.
        reader.read_to_end();
        let mut service = Service::start(&config_path, &log);
        let before = reader.records.len();
        let deadline = Instant::now() + Duration::from_secs(30);
        // Progress in this incarnation: it published something.
        while reader.records.len() == before {
            service.assert_running();
            assert!(
                Instant::now() < deadline,
                "no change published within 30 s of restart {}; log:\n{}",
                kills.len(),
                service.log_tail()
            );
            reader.poll_for(Duration::from_millis(20));
        }
        let first = service.uptime();
        let pause = Duration::from_millis(rng.below(1000));
        let until = Instant::now() + pause;
        while Instant::now() < until {
            reader.poll_for(Duration::from_millis(10));
        }
        service.assert_running();
        let (distinct, _) = distinct_by_id(&reader.records);
        let all_done = distinct.len() >= expected.len();
        service.kill9();
        kills.push(format!(
            "kill {} after {:.2} s (first output at {:.2} s): {} produced, {} change records ({} distinct){}",
            kills.len() + 1,
            first.as_secs_f64() + pause.as_secs_f64(),
            first.as_secs_f64(),
            produced.load(Ordering::Relaxed),
            reader.records.len(),
            distinct.len(),
            if all_done { ", all output already there" } else { "" }
        ));
        eprintln!("{}", kills.last().expect("just pushed"));
        assert!(
            !all_done || kills.len() >= plan.min_kills,
            "the service finished before {} kills; make the input larger or slower",
            plan.min_kills
        );
    }
    sender.join().expect("producer thread");
    let kill_phase = started.elapsed();

    // A last, uninterrupted run until everything is there.
    let mut service = Service::start(&config_path, &log);
    let mut dlq = TopicReader::new(&brokers, "segmenter-dlq");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        reader.poll_for(Duration::from_millis(200));
        dlq.poll_for(Duration::ZERO);
        let distinct = distinct_by_id(&reader.records).0.len();
        let letters: HashSet<(i32, i64)> = dlq.records.iter().map(source_position).collect();
        if distinct >= expected.len() && letters.len() >= malformed {
            break;
        }
        service.assert_running();
        assert!(
            Instant::now() < deadline,
            "after the last restart: {distinct} of {} distinct changes and {} of {malformed} dead letters within 90 s; log:\n{}",
            expected.len(),
            letters.len(),
            service.log_tail()
        );
    }
    let caught_up = started.elapsed();
    service.sigterm();
    let status = service
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| {
            panic!(
                "no exit within 15 s of SIGTERM; log:\n{}",
                service.log_tail()
            )
        });
    assert!(status.success(), "exit status {status} after SIGTERM");
    let stopped = started.elapsed();
    reader.read_to_end();
    dlq.read_to_end();
    eprintln!(
        "caught up at {:.1} s, stopped at {:.1} s, read at {:.1} s",
        caught_up.as_secs_f64(),
        stopped.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    // Changes: the distinct set is exactly the uninterrupted run's; duplicates are identical
    // (checked by distinct_by_id).
    let (got, duplicates) = distinct_by_id(&reader.records);
    let want: BTreeMap<String, Value> = expected
        .iter()
        .map(|c| (c.s("id").to_string(), c.clone()))
        .collect();
    assert_same_changes(&got, &expected, &format!("after {} kills", kills.len()));
    assert_eq!(got, want, "payloads differ from the uninterrupted run");
    let distinct: Vec<Value> = got.values().cloned().collect();
    assert_seq_alternation(&distinct);

    // Per customer, first publications follow the uninterrupted order.
    let mut seen = HashSet::new();
    let mut first_published = Vec::new();
    for record in &reader.records {
        let change = record.json();
        if seen.insert(change.s("id").to_string()) {
            first_published.push(change);
        }
    }
    let published = by_customer(&first_published);
    for (customer, want_list) in by_customer(&expected) {
        let got_ids: Vec<&str> = published[&customer].iter().map(|c| c.s("id")).collect();
        let want_ids: Vec<&str> = want_list.iter().map(|c| c.s("id")).collect();
        assert_eq!(
            got_ids, want_ids,
            "{customer}: changes first published out of order"
        );
    }

    // Dead letters: each malformed input exactly, by position (duplicates allowed).
    let inputs = read_all(&brokers, "events");
    assert_eq!(
        inputs.len(),
        lines.len(),
        "every input message is in the topic"
    );
    let mut per_partition: HashMap<i32, usize> = HashMap::new();
    let mut want_letters: BTreeMap<(i32, i64), Vec<u8>> = BTreeMap::new();
    let by_position: HashMap<(i32, i64), &service::Record> = inputs
        .iter()
        .map(|r| ((r.partition, r.offset), r))
        .collect();
    let mut partition_records: HashMap<i32, Vec<&service::Record>> = HashMap::new();
    for record in &inputs {
        partition_records
            .entry(record.partition)
            .or_default()
            .push(record);
    }
    for list in partition_records.values_mut() {
        list.sort_by_key(|r| r.offset);
    }
    for line in &lines {
        let index = per_partition.entry(line.partition).or_default();
        let record = partition_records[&line.partition][*index];
        *index += 1;
        assert_eq!(
            record.payload.as_deref(),
            Some(&line.payload[..]),
            "input order on partition {}",
            line.partition
        );
        if line.malformed {
            want_letters.insert((record.partition, record.offset), line.payload.clone());
        }
    }
    let mut got_letters: BTreeMap<(i32, i64), Vec<u8>> = BTreeMap::new();
    for letter in &dlq.records {
        let position = source_position(letter);
        let source = by_position
            .get(&position)
            .unwrap_or_else(|| panic!("dead letter for unknown input {position:?}"));
        assert_eq!(
            letter.payload, source.payload,
            "dead letter payload of {position:?}"
        );
        got_letters.insert(position, letter.payload.clone().unwrap_or_default());
    }
    assert_eq!(
        got_letters.keys().collect::<Vec<_>>(),
        want_letters.keys().collect::<Vec<_>>(),
        "dead-lettered inputs"
    );

    // Membership: the latest record per key is the final state.
    let membership = read_all(&brokers, "segment-membership");
    let mut latest: HashMap<String, bool> = HashMap::new();
    for record in &membership {
        latest.insert(record.key_str(), record.payload.is_some());
    }
    let mut last_change: HashMap<String, bool> = HashMap::new();
    for change in &expected {
        last_change.insert(
            format!("{}/{}", change.s("customer_id"), change.s("segment")),
            change.s("change") == "entered",
        );
    }
    assert_eq!(latest, last_change, "final membership");

    let letter_duplicates = dlq.records.len() - got_letters.len();
    eprintln!(
        "crash test: {} inputs, {} kills in {:.1} s, {} changes expected; change topic {} records, \
         {duplicates} duplicates (all identical to the first copy); {} dead letters, \
         {letter_duplicates} duplicated; total {:.1} s",
        lines.len(),
        kills.len(),
        kill_phase.as_secs_f64(),
        expected.len(),
        reader.records.len(),
        got_letters.len(),
        started.elapsed().as_secs_f64()
    );
}

fn source_position(letter: &service::Record) -> (i32, i64) {
    let partition = letter
        .header("source_partition")
        .and_then(|p| p.parse().ok())
        .expect("dead letter without source_partition");
    let offset = letter
        .header("source_offset")
        .and_then(|p| p.parse().ok())
        .expect("dead letter without source_offset");
    (partition, offset)
}
