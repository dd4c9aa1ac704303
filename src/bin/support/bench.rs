//! Helpers both Kafka benchmarks (`bench_kafka`, `bench_poison`) use: local ports, scraping the
//! service's HTTP endpoints, summing metric series, the input key, stopping the service.

use std::process::{Child, Command};
use std::time::Duration;

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

/// SIGTERM, then wait for the exit.
pub fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}
