//! Replay benchmark: generates a realistic stream (`segmenter::generate`), runs the real
//! `segmenter replay` binary over it as a child process with the segments of
//! `config/segments.toml`, and reports events/s, peak RSS and state bytes per customer.
//!
//!     cargo run --release --bin bench_replay -- [--events N] [--customers N] [--rate EPS]
//!         [--config config/segments.toml] [--until-days D]
//!
//! `BENCH_KEEP_INPUT=path` keeps a copy of the generated input (for profiling `replay` on it).

use std::io::{BufWriter, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use segmenter::generate::{approx_end_ms, write_ndjson, Generator, GeneratorConfig};
use segmenter::model::time::format_rfc3339;
use segmenter::store::rocks::{RocksOptions, RocksStore};
use segmenter::store::{Store, Table};

struct Args {
    events: u64,
    customers: u64,
    rate: f64,
    config: PathBuf,
    until_days: i64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        events: 1_000_000,
        customers: 100_000,
        rate: 50.0,
        config: PathBuf::from("config/segments.toml"),
        until_days: 31,
    };
    let mut iter = std::env::args().skip(1);
    while let Some(flag) = iter.next() {
        let value = iter
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--events" => args.events = value.parse()?,
            "--customers" => args.customers = value.parse()?,
            "--rate" => args.rate = value.parse()?,
            "--config" => args.config = PathBuf::from(value),
            "--until-days" => args.until_days = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let work = tempfile::tempdir()?;
    let input = work.path().join("events.ndjson");
    let state_dir = work.path().join("state");
    let config = GeneratorConfig {
        customers: args.customers,
        events: args.events,
        events_per_second: args.rate,
        ..GeneratorConfig::default()
    };
    let until = approx_end_ms(&config) + args.until_days * 86_400_000;
    let started = Instant::now();
    let mut file = BufWriter::new(std::fs::File::create(&input)?);
    write_ndjson(Generator::new(config.clone()), &mut file)?;
    drop(file);
    let input_bytes = std::fs::metadata(&input)?.len();
    if let Ok(keep) = std::env::var("BENCH_KEEP_INPUT") {
        std::fs::copy(&input, &keep).with_context(|| format!("copying the input to {keep}"))?;
    }
    println!(
        "generated {} events ({} MB) over {} customers in {:.1} s",
        args.events,
        input_bytes >> 20,
        args.customers,
        started.elapsed().as_secs_f64()
    );

    let binary = std::env::current_exe()?
        .parent()
        .context("no parent dir")?
        .join("segmenter");
    let mut child = Command::new(&binary)
        .args(["replay", "--config"])
        .arg(&args.config)
        .arg("--input")
        .arg(&input)
        .arg("--state-dir")
        .arg(&state_dir)
        .args(["--until", &format_rfc3339(until)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let pid = child.id();
    let mut stdout = child.stdout.take().context("stdout")?;
    let counter = std::thread::spawn(move || {
        let mut buffer = vec![0u8; 1 << 16];
        let mut lines = 0u64;
        while let Ok(read) = stdout.read(&mut buffer) {
            if read == 0 {
                break;
            }
            lines += buffer[..read].iter().filter(|b| **b == b'\n').count() as u64;
        }
        lines
    });
    let mut stderr = child.stderr.take().context("stderr")?;
    let diagnostics = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let replay_started = Instant::now();
    let mut peak = 0;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        peak = peak.max(peak_rss_kib(pid).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = replay_started.elapsed();
    let changes = counter.join().unwrap_or(0);
    let diagnostics = diagnostics.join().unwrap_or_default();
    if !status.success() {
        bail!("replay failed: {diagnostics}");
    }
    let summary = diagnostics.lines().last().unwrap_or("");

    let store = RocksStore::open(&state_dir, RocksOptions::default())?;
    let customers = store.scan_prefix(Table::Customers, &[])?;
    let customer_count = customers.len().max(1) as u64;
    let value_bytes: u64 = customers
        .iter()
        .map(|(k, v)| (k.len() + v.len()) as u64)
        .sum();
    let mut sizes: Vec<usize> = customers.iter().map(|(_, v)| v.len()).collect();
    sizes.sort_unstable();
    let median = sizes.get(sizes.len() / 2).copied().unwrap_or(0);
    let p99 = sizes.get(sizes.len() * 99 / 100).copied().unwrap_or(0);
    let max = sizes.last().copied().unwrap_or(0);
    store.flush()?;
    drop(store);
    let disk = dir_bytes(&state_dir);

    println!("replay:        {summary}");
    println!(
        "throughput:    {:.0} events/s end to end ({:.2} s wall, process start to exit)",
        args.events as f64 / wall.as_secs_f64(),
        wall.as_secs_f64()
    );
    println!("changes:       {changes}");
    println!("peak RSS:      {} MiB", peak / 1024);
    println!(
        "state:         {customer_count} customers, {:.0} bytes/customer (key+value), value median {median} B, p99 {p99} B, max {max} B",
        value_bytes as f64 / customer_count as f64
    );
    println!(
        "on disk:       {} MiB RocksDB dir after flush ({:.0} bytes/customer incl. WAL/manifest)",
        disk >> 20,
        disk as f64 / customer_count as f64
    );
    Ok(())
}
