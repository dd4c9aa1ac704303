//! Helpers the Kafka benchmarks (`bench_kafka`, `bench_poison`, `bench_restore`) use: local
//! ports, scraping the service's HTTP endpoints, summing metric series, a process's CPU time, the
//! input key, starting and stopping the service.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

/// The customer id of a generated input line (`userId`, else `anonymousId`): the record key.
pub fn key_of(line: &str) -> String {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| {
            ["userId", "anonymousId"]
                .iter()
                .find_map(|f| v.get(f).and_then(|x| x.as_str()).map(str::to_string))
        })
        .unwrap_or_default()
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `GET path` on the service's HTTP port, the whole answer (headers included) as text.
pub fn scrape_path(port: u16, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

pub fn scrape(port: u16) -> anyhow::Result<String> {
    scrape_path(port, "/metrics")
}

/// The sum of every series whose line starts with `prefix`.
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// User + system CPU seconds and minor page faults of a process so far, from `/proc` (Linux).
pub fn cpu_seconds(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let faults: f64 = fields.get(7)?.parse().ok()?;
    // /proc reports in USER_HZ, 100 per second on Linux (x86-64 and arm64 alike).
    Some((ticks / 100.0, faults))
}

/// SIGTERM, then wait for the exit.
pub fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}

/// Starts `segmenter run` (the binary next to this one) on `input`, in consumer group `group`,
/// with output topics `{outputs}-changes/-membership/-dlq`, changelog `{group}-changelog`, every segment of
/// config/segments.toml, the wall clock and its HTTP port on `http_port`. `$BENCH_KAFKA_CONSUMER`
/// is appended to its `[kafka.consumer]` table as TOML lines (e.g. `"fetch.queue.backoff.ms" =
/// "1000"` to measure a librdkafka setting without a rebuild); `$BENCH_SERVICE_LOG` is its
/// `RUST_LOG`.
pub fn start_service(
    brokers: &str,
    work: &std::path::Path,
    group: &str,
    input: &str,
    outputs: &str,
    http_port: u16,
) -> anyhow::Result<Child> {
    start_service_as(&Service {
        brokers,
        work,
        group,
        instance: "",
        input,
        outputs,
        http_port,
        clock: "wall",
        standby_replicas: 0,
    })
}

/// One `segmenter run` instance, for [`start_service_as`].
pub struct Service<'a> {
    pub brokers: &'a str,
    pub work: &'a std::path::Path,
    pub group: &'a str,
    /// Tells instances of one group apart (their state dirs); empty for a single one.
    pub instance: &'a str,
    pub input: &'a str,
    pub outputs: &'a str,
    pub http_port: u16,
    /// `engine.clock`: "wall" or "event".
    pub clock: &'a str,
    /// `state.standby_replicas`.
    pub standby_replicas: u32,
}

/// Starts `segmenter run` as `service` says (see [`start_service`]); the state dir is
/// `{group}{instance}-state` under `work`.
pub fn start_service_as(service: &Service<'_>) -> anyhow::Result<Child> {
    let Service {
        brokers,
        work,
        group,
        instance,
        input,
        outputs,
        http_port,
        clock,
        standby_replicas,
    } = service;
    let segments =
        std::fs::canonicalize("config/segments.toml").context("run from the repository root")?;
    let config = work.join(format!("{group}{instance}-{input}.toml"));
    std::fs::write(
        &config,
        format!(
            "segments_file = {segments:?}\n[engine]\nclock = \"{clock}\"\n[input]\ntopics = [\"{input}\"]\n[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"{group}\"\n[kafka.consumer]\n\"session.timeout.ms\" = \"6000\"\n\"fetch.wait.max.ms\" = \"20\"\n{consumer_extra}\n[output]\nchanges_topic = \"{outputs}-changes\"\nmembership_topic = \"{outputs}-membership\"\ndlq_topic = \"{outputs}-dlq\"\n[state]\ndir = {:?}\nchangelog_topic = \"{group}-changelog\"\nstandby_replicas = {standby_replicas}\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n",
            work.join(format!("{group}{instance}-state")),
            consumer_extra = std::env::var("BENCH_KAFKA_CONSUMER").unwrap_or_default(),
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
