//! Long fault runs (minutes each), ignored by `cargo test`; scripts/soak/*.sh run them and
//! docs/FAULTS.md records what they measured:
//! - `kafka_unreachable_for_minutes_under_load_recovers_with_nothing_lost`: the service reaches
//!   tansu only through a TCP proxy this test controls (tansu advertises the proxy's port), and
//!   the proxy cuts every connection but the load producer's (told apart by the Kafka client id
//!   in its first request) for `SOAK_OUTAGE_SECS` (default 300) while input keeps arriving:
//!   open connections are closed and new ones held without an answer, like a network partition.
//!   Afterwards the service, never restarted, must catch up by itself with output equal to an
//!   uninterrupted run's (`segmenter replay`).
//! - `kill_9_fifty_times_in_a_row_loses_nothing`: tests/support/crash.rs with `SOAK_KILLS`
//!   (default 50) SIGKILLs in a row under load.
//! - `scale_out_randomised_moves_lose_no_transition`: tests/support/scaleout.rs with
//!   `SOAK_MOVES` (default 100) randomised moves of instances in one group over 12 partitions
//!   (start on an empty state dir, restart on an old one, SIGTERM, kill -9, kill -9 and delete the
//!   state dir) under load; then the change topic, de-duplicated by `id`, must equal `segmenter
//!   replay` of the input (scripts/soak/scaleout.sh).

#[path = "support/tansu.rs"]
mod tansu;

#[path = "support/service.rs"]
mod service;

#[path = "support/crash.rs"]
mod crash;

#[path = "support/scaleout.rs"]
mod scaleout;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use segmenter::generate::GeneratorConfig;
use service::{
    assert_same_changes, assert_seq_alternation, distinct_by_id, expected_changes, generated_input,
    http, wait_committed, Service, TestConfig, TopicReader,
};

const PARTITIONS: i32 = 4;
/// The Kafka client id of the load producer, which the proxy never cuts.
const LOAD_CLIENT: &str = "soak-load";

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
"#;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

// ------------------------------------------------------------------------------------------
// A TCP proxy that can partition the service from the broker

#[derive(Default)]
struct Links {
    /// Forwarded connections: (client side, broker side, exempt from cuts).
    open: Vec<(TcpStream, TcpStream, bool)>,
    /// Connections accepted during an outage and never answered.
    held: Vec<TcpStream>,
}

struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    links: Arc<Mutex<Links>>,
    cut_connections: Arc<AtomicUsize>,
}

/// The client id in a Kafka request: after size (4), api key (2), api version (2) and correlation
/// id (4), a 16-bit length and the bytes.
fn client_id(request: &[u8]) -> Option<String> {
    let length = i16::from_be_bytes(request.get(12..14)?.try_into().ok()?);
    let length = usize::try_from(length).ok()?;
    let bytes = request.get(14..14 + length)?;
    Some(String::from_utf8_lossy(bytes).into_owned())
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let proxy = Proxy {
            port,
            up: Arc::new(AtomicBool::new(true)),
            links: Arc::new(Mutex::new(Links::default())),
            cut_connections: Arc::new(AtomicUsize::new(0)),
        };
        let up = proxy.up.clone();
        let links = proxy.links.clone();
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let up = up.clone();
                let links = links.clone();
                thread::spawn(move || serve(client, upstream, &up, &links));
            }
        });
        proxy
    }

    /// Cuts the service off: open connections are closed, new ones held unanswered.
    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        if let Ok(mut links) = self.links.lock() {
            let mut kept = Vec::new();
            for (client, broker, exempt) in links.open.drain(..) {
                if exempt {
                    kept.push((client, broker, exempt));
                } else {
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = broker.shutdown(Shutdown::Both);
                    self.cut_connections.fetch_add(1, Ordering::SeqCst);
                }
            }
            links.open = kept;
        }
    }

    /// Ends the outage: held connections are reset (the client reconnects), new ones forwarded.
    fn restore(&self) -> usize {
        self.up.store(true, Ordering::SeqCst);
        let mut held = 0;
        if let Ok(mut links) = self.links.lock() {
            held = links.held.len();
            for client in links.held.drain(..) {
                let _ = client.shutdown(Shutdown::Both);
            }
        }
        held
    }
}

/// One client connection: reads its first request to learn the client id, then forwards it (or
/// holds it, during an outage, unless it is the load producer).
fn serve(mut client: TcpStream, upstream: u16, up: &AtomicBool, links: &Mutex<Links>) {
    let mut size = [0u8; 4];
    if client.read_exact(&mut size).is_err() {
        return;
    }
    let length = u32::from_be_bytes(size).min(1 << 20) as usize;
    let mut request = size.to_vec();
    request.resize(4 + length, 0);
    if client.read_exact(&mut request[4..]).is_err() {
        return;
    }
    let exempt = client_id(&request).as_deref() == Some(LOAD_CLIENT);
    if !exempt && !up.load(Ordering::SeqCst) {
        if let Ok(mut links) = links.lock() {
            links.held.push(client);
        }
        return;
    }
    let Ok(mut broker) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    if broker.write_all(&request).is_err() {
        return;
    }
    let (Ok(client_reader), Ok(broker_reader)) = (client.try_clone(), broker.try_clone()) else {
        return;
    };
    if let (Ok(c), Ok(b)) = (client.try_clone(), broker.try_clone()) {
        if let Ok(mut links) = links.lock() {
            links.open.push((c, b, exempt));
        }
    }
    let mut to_broker = (client_reader, broker);
    thread::spawn(move || {
        let _ = std::io::copy(&mut to_broker.0, &mut to_broker.1);
        let _ = to_broker.1.shutdown(Shutdown::Both);
    });
    let mut from_broker = broker_reader;
    let _ = std::io::copy(&mut from_broker, &mut client);
    let _ = client.shutdown(Shutdown::Both);
}

/// tansu listening on `port`, advertising `advertised` (the proxy), memory storage.
struct Broker {
    child: Child,
    port: u16,
}

impl Broker {
    fn start(dir: &Path, port: u16, advertised: u16) -> Broker {
        let bin = tansu::tansu_bin().expect("the tansu binary (scripts/install-tansu.sh)");
        let log = std::fs::File::create(dir.join("tansu.log")).expect("broker log");
        let mut command = Command::new(&bin);
        command
            .args(["broker", "--listener-url"])
            .arg(format!("tcp://127.0.0.1:{port}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://127.0.0.1:{advertised}"))
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        for name in [
            "CLUSTER_ID",
            "LISTENER_URL",
            "ADVERTISED_LISTENER_URL",
            "STORAGE_ENGINE",
            "SCHEMA_REGISTRY",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ] {
            command.env_remove(name);
        }
        let child = command.spawn().expect("starting tansu");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen within 30 s"
            );
            thread::sleep(Duration::from_millis(20));
        }
        Broker { child, port }
    }

    fn create_topic(&self, name: &str) {
        let bin = tansu::tansu_bin().expect("the tansu binary");
        let status = Command::new(bin)
            .args(["topic", "create", "--broker"])
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .args(["--partitions", &PARTITIONS.to_string(), name])
            .stdout(Stdio::null())
            .status()
            .expect("running tansu topic create");
        assert!(status.success(), "creating topic {name}");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Produces `lines` at `rate` per second through a producer the proxy never cuts.
fn produce_at_rate(
    brokers: String,
    lines: Vec<service::InputLine>,
    rate: u64,
    produced: Arc<AtomicUsize>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("client.id", LOAD_CLIENT)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("max.in.flight.requests.per.connection", "1")
            .set("message.timeout.ms", "0")
            .create()
            .expect("creating the load producer");
        let begun = Instant::now();
        for (i, line) in lines.iter().enumerate() {
            let due = Duration::from_micros(i as u64 * 1_000_000 / rate);
            if let Some(wait) = due.checked_sub(begun.elapsed()) {
                thread::sleep(wait);
            }
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&line.topic)
                .partition(line.partition)
                .payload(line.payload.as_slice())
                .timestamp(line.timestamp_ms);
            if let Some(key) = &line.key {
                record = record.key(key.as_slice());
            }
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, returned)) => {
                        record = returned;
                        producer.poll(Duration::from_millis(10));
                    }
                }
            }
            producer.poll(Duration::ZERO);
            produced.store(i + 1, Ordering::Relaxed);
        }
        producer
            .flush(Duration::from_secs(120))
            .expect("flushing the load");
    })
}

#[test]
#[ignore = "soak: minutes long; run by scripts/soak/kafka-outage.sh"]
fn kafka_unreachable_for_minutes_under_load_recovers_with_nothing_lost() {
    let outage = Duration::from_secs(env_u64("SOAK_OUTAGE_SECS", 300));
    let before = Duration::from_secs(env_u64("SOAK_BEFORE_SECS", 30));
    let after = Duration::from_secs(env_u64("SOAK_AFTER_SECS", 60));
    let rate = env_u64("SOAK_RATE", 200);
    let dir = tempfile::Builder::new()
        .prefix("segmenter-soak-outage-")
        .tempdir()
        .expect("temp dir");
    let broker_port = free_port();
    let proxy = Proxy::start(broker_port);
    let broker = Broker::start(dir.path(), broker_port, proxy.port);
    for topic in [
        "events",
        "segment-changes",
        "segment-membership",
        "segmenter-dlq",
    ] {
        broker.create_topic(topic);
    }
    let brokers = format!("127.0.0.1:{}", proxy.port);
    let config = TestConfig::new(&brokers, &dir.path().join("state"), &["events"], SEGMENTS);
    let config_path = config.write(&dir.path().join("segmenter.toml"));
    let events = rate * (before + outage + after).as_secs();
    let lines = generated_input(
        "events",
        PARTITIONS,
        GeneratorConfig {
            customers: 2_000,
            events,
            seed: 5,
            start_ms: 1_793_491_200_000,
            events_per_second: 5.0,
            late_fraction: 0.02,
            duplicate_fraction: 0.01,
            malformed_fraction: 0.005,
        },
    );
    let expected = expected_changes(&config_path, dir.path(), &lines);
    eprintln!(
        "outage soak: {events} events at {rate}/s, {} changes expected; outage {} s after {} s",
        expected.len(),
        outage.as_secs(),
        before.as_secs()
    );

    let started = Instant::now();
    let mut service = Service::start(&config_path, &dir.path().join("segmenter.log"));
    let address = service.http_address();
    let produced = Arc::new(AtomicUsize::new(0));
    let sender = produce_at_rate(brokers.clone(), lines.clone(), rate, produced.clone());
    thread::sleep(before);
    service.assert_running();

    // The outage: the service keeps running, alive, with no broker.
    proxy.cut();
    let cut_at = Instant::now();
    let at_cut = produced.load(Ordering::Relaxed);
    while cut_at.elapsed() < outage {
        service.assert_running();
        let (status, _) = http(&address, "GET", "/healthz", None);
        assert_eq!(status, 200, "/healthz during the outage");
        thread::sleep(Duration::from_secs(1));
    }
    let during = produced.load(Ordering::Relaxed) - at_cut;
    let held = proxy.restore();
    let restored_at = Instant::now();
    eprintln!(
        "outage over after {:.0} s: {during} events produced meanwhile; {} connections cut, {held} held",
        outage.as_secs_f64(),
        proxy.cut_connections.load(Ordering::SeqCst)
    );

    // Recovery, unattended.
    let mut reader = TopicReader::new(&brokers, "segment-changes");
    let mut first_output: Option<Duration> = None;
    let deadline = restored_at + after + Duration::from_secs(300);
    loop {
        let before_poll = reader.records.len();
        reader.poll_for(Duration::from_millis(500));
        if first_output.is_none() && reader.records.len() > before_poll {
            first_output = Some(restored_at.elapsed());
        }
        let distinct = distinct_by_id(&reader.records).0.len();
        if distinct >= expected.len() && sender.is_finished() {
            break;
        }
        service.assert_running();
        assert!(
            Instant::now() < deadline,
            "{distinct} of {} changes {} s after the outage; log:\n{}",
            expected.len(),
            restored_at.elapsed().as_secs(),
            service.log_tail()
        );
    }
    let caught_up = restored_at.elapsed();
    sender.join().expect("load producer");
    wait_committed(&brokers, &config.group_id, &["events"], &mut service);
    service.sigterm();
    let status = service.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "no clean exit: {status:?}; log:\n{}",
        service.log_tail()
    );
    reader.read_to_end();
    let (got, duplicates) = distinct_by_id(&reader.records);
    assert_same_changes(&got, &expected, "after the outage");
    let distinct: Vec<serde_json::Value> = got.values().cloned().collect();
    assert_seq_alternation(&distinct);
    let log = std::fs::read_to_string(dir.path().join("segmenter.log")).unwrap_or_default();
    let starts = log.matches("=== test: starting").count();
    assert_eq!(starts, 1, "the service was never restarted");
    eprintln!(
        "outage soak: recovered unattended; first output {:.1} s and everything {:.1} s after the \
         outage ended (input ended {:.0} s after it); {} changes, {duplicates} duplicates, equal to \
         the uninterrupted run; {} warn/error log lines; total {:.0} s",
        first_output.unwrap_or_default().as_secs_f64(),
        caught_up.as_secs_f64(),
        after.as_secs_f64(),
        got.len(),
        log.lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .count(),
        started.elapsed().as_secs_f64()
    );
    drop(broker);
}

#[test]
#[ignore = "soak: minutes long; run by scripts/soak/kill9.sh"]
fn kill_9_fifty_times_in_a_row_loses_nothing() {
    let kills = env_u64("SOAK_KILLS", 50) as usize;
    let rate = env_u64("SOAK_RATE", 400);
    // Input for ~6 s per kill, so the producer outlasts the kills.
    let events = env_u64("SOAK_EVENTS", rate * 6 * kills as u64);
    crash::kill_loop(&crash::KillPlan {
        events,
        produce_rate: rate,
        min_kills: kills,
        max_kills: kills,
    });
}

#[test]
#[ignore = "soak: minutes long; run by scripts/soak/scaleout.sh"]
fn scale_out_randomised_moves_lose_no_transition() {
    let moves = env_u64("SOAK_MOVES", 100) as usize;
    let rate = env_u64("SOAK_RATE", 300);
    let max_live = env_u64("SOAK_MAX_INSTANCES", 3) as usize;
    let seed = env_u64("SOAK_SEED", service::wall_ms() as u64);
    // About 4 s of input per move (a move and its rebalance take 1-4 s), so it outlasts them.
    let events = env_u64("SOAK_EVENTS", rate * (4 * moves as u64 + 10));
    let mut cluster = scaleout::Cluster::new(scaleout::Plan {
        name: "soak-scaleout".into(),
        customers: env_u64("SOAK_CUSTOMERS", 2_000),
        events,
        seed,
        produce_rate: rate,
        ballast_customers: env_u64("SOAK_BALLAST", 0),
        session_timeout_ms: 2_000,
    });
    eprintln!(
        "scale-out soak: seed {seed} (SOAK_SEED), {moves} moves, at most {max_live} instances, \
         {events} events at {rate}/s"
    );
    cluster.start_fresh();
    cluster.wait_balanced(scaleout::SETTLE);
    cluster.start_input();
    let mut rng = scaleout::Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let started = Instant::now();
    let counts = scaleout::random_moves(&mut cluster, moves, max_live, &mut rng);
    let moving = started.elapsed();
    let flowing = cluster.input_running();
    let produced_at_end = cluster.produced();
    cluster.settle();
    let verdict = cluster.compare(&format!("{moves} randomised moves (seed {seed})"));
    let by_kind: Vec<String> = counts
        .iter()
        .map(|(kind, n)| format!("{} {n}", kind.label()))
        .collect();
    eprintln!(
        "scale-out soak: {}; seed {seed}; {moves} moves in {:.0} s: {}; input {} lines at \
         {rate}/s, {}; {} changes compared, {} change records read, {} duplicates dropped; \
         total {:.0} s",
        if verdict.report.is_none() {
            "PASSED (equal to the replay)"
        } else {
            "FAILED (see below)"
        },
        moving.as_secs_f64(),
        by_kind.join(", "),
        cluster.input_lines(),
        if flowing {
            format!("still flowing after the last move ({produced_at_end} produced by then)")
        } else {
            "ended before the last move (raise SOAK_EVENTS)".to_string()
        },
        verdict.expected,
        verdict.records,
        verdict.duplicates,
        started.elapsed().as_secs_f64()
    );
    if let Some(report) = verdict.report {
        panic!("{report}");
    }
}
