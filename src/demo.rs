//! `segmenter demo`: the whole service with no external Kafka. An in-process Kafka-protocol
//! broker (librdkafka's mock cluster), realistic generated traffic stamped with the wall clock,
//! the real service (`app::run`), and every change event printed as it is published.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Message;

use crate::auth::{self, Role};
use crate::loadgen::{self, LoadOptions, Routing};
use crate::pipeline::wall_clock_ms;
use crate::settings;

/// The demo's own segments, built into the binary so `segmenter demo` works from any directory.
const DEMO_SEGMENTS: &str = include_str!("../config/demo-segments.toml");
const PARTITIONS: i32 = 4;

/// Demo knobs.
pub struct DemoOptions {
    /// Input events per second.
    pub rate: f64,
    pub customers: u64,
    /// Stop after this long (`None`: until Ctrl-C).
    pub duration: Option<Duration>,
    /// Segment definitions to use instead of the built-in demo set.
    pub segments: Option<PathBuf>,
    /// Where the HTTP API and /metrics listen.
    pub http: String,
}

/// Runs the demo until `shutdown` is set or the duration passes.
pub async fn run(options: DemoOptions, shutdown: Arc<AtomicBool>) -> anyhow::Result<()> {
    let cluster = MockCluster::new(1).context("starting the in-process Kafka broker")?;
    let brokers = cluster.bootstrap_servers();
    for topic in [
        "events",
        "segment-changes",
        "segment-membership",
        "segmenter-dlq",
    ] {
        cluster
            .create_topic(topic, PARTITIONS, 1)
            .with_context(|| format!("creating topic {topic}"))?;
    }
    let work = tempfile::tempdir().context("creating a temporary state dir")?;
    let segments = match &options.segments {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => DEMO_SEGMENTS.to_string(),
    };
    let config_path = work.path().join("demo.toml");
    // One admin token for this run; the config holds only its hash.
    let (token, entry) =
        auth::mint("demo", Role::Admin).map_err(|reason| anyhow::anyhow!(reason))?;
    let config = format!(
        "[engine]\nclock = \"wall\"\n\n[input]\ntopics = [\"events\"]\n\n[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"segmenter-demo\"\n\n[kafka.consumer]\n\"session.timeout.ms\" = \"6000\"\n\n[state]\ndir = \"{}\"\n\n[http]\nlisten = \"{}\"\ntokens = [\"{}\"]\n\n{segments}\n",
        work.path().join("state").display(),
        options.http,
        entry.line(),
    );
    std::fs::write(&config_path, config).context("writing the demo config")?;
    let settings =
        settings::load(&config_path, &[]).map_err(|errors| anyhow::anyhow!("{errors}"))?;

    println!(
        "segmenter demo: in-process Kafka at {brokers}, {} segments, {} events/s over {} customers",
        settings.program.segments.len(),
        options.rate,
        options.customers
    );
    for segment in &settings.program.segments {
        println!("  {:<22} {}", segment.id, segment.canonical);
    }
    let segment = settings
        .program
        .segments
        .first()
        .map_or("recent_buyer", |s| s.id.as_str());
    println!("\n{}\n", http_help(&options.http, &token, segment));
    println!("joining the consumer group takes a few seconds; changes appear below as they are published.\n");

    let stop = Arc::new(AtomicBool::new(false));
    let generator = {
        let stop = stop.clone();
        let brokers = brokers.clone();
        let (rate, customers) = (options.rate, options.customers);
        let traffic = LoadOptions::new(&brokers, rate, customers, Routing::single("events"));
        std::thread::spawn(move || loadgen::run(&traffic, &stop).map(|stats| stats.sent))
    };
    let printer = {
        let stop = stop.clone();
        let brokers = brokers.clone();
        std::thread::spawn(move || print_changes(&brokers, &stop))
    };
    let deadline = options.duration.map(|d| Instant::now() + d);
    let service_shutdown = Arc::new(AtomicBool::new(false));
    let watcher = {
        let service_shutdown = service_shutdown.clone();
        tokio::spawn(async move {
            while !shutdown.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            service_shutdown.store(true, Ordering::Relaxed);
        })
    };
    let outcome = crate::app::run(settings, service_shutdown.clone()).await;
    service_shutdown.store(true, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let _ = watcher.await;
    let produced = generator.join().unwrap_or(Ok(0));
    let printed = printer.join().unwrap_or(0);
    println!(
        "\ndemo finished: {} events produced, {printed} changes printed",
        produced.unwrap_or(0)
    );
    drop(cluster);
    outcome
}

/// The HTTP API's URLs as curl commands that work with this run's token.
fn http_help(address: &str, token: &str, segment: &str) -> String {
    let api = format!("http://{address}");
    let auth = "-H \"Authorization: Bearer $TOKEN\"";
    [
        format!("HTTP API (open: {api}/metrics {api}/healthz {api}/readyz); every other route needs the token:"),
        format!("  export TOKEN={token}"),
        format!("  curl {auth} {api}/segments"),
        format!("  curl {auth} '{api}/segments/{segment}/members?limit=10'"),
        format!("  curl {auth} {api}/customers/c-42"),
        format!("  curl {auth} '{api}/customers/c-42/explain?segment={segment}'"),
        format!("  curl {auth} -d 'count(\"Order Completed\", 7d) >= 1' {api}/segments/preview"),
        format!("  curl {auth} -X DELETE {api}/customers/c-42      # erasure (admin)"),
    ]
    .join("\n")
}

/// Prints each published change: time, change, segment, customer, cause.
fn print_changes(brokers: &str, stop: &AtomicBool) -> u64 {
    let consumer: BaseConsumer = match ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "segmenter-demo-printer")
        .set("enable.auto.commit", "false")
        .create()
    {
        Ok(consumer) => consumer,
        Err(error) => {
            eprintln!("demo printer: {error}");
            return 0;
        }
    };
    let mut partitions = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        let _ = partitions.add_partition_offset("segment-changes", partition, Offset::Beginning);
    }
    if let Err(error) = consumer.assign(&partitions) {
        eprintln!("demo printer: {error}");
        return 0;
    }
    let mut printed = 0;
    let mut out = std::io::stdout();
    while !stop.load(Ordering::Relaxed) {
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let Some(change) = message
            .payload()
            .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
        else {
            continue;
        };
        let field = |name: &str| {
            change
                .get(name)
                .and_then(|v| v.as_str())
                .unwrap_or("?")
                .to_string()
        };
        let lag = message
            .timestamp()
            .to_millis()
            .map(|published| {
                format!(
                    "published {:>4} ms after `at`",
                    published - parse_at(&field("at"))
                )
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{}  {:<7} {:<22} {:<8} cause={:<5} {lag}",
            field("at"),
            field("change"),
            field("segment"),
            field("customer_id"),
            field("cause"),
        );
        printed += 1;
    }
    printed
}

fn parse_at(text: &str) -> i64 {
    crate::model::time::parse_rfc3339(text).unwrap_or_else(|_| wall_clock_ms())
}
