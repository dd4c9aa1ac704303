//! Storage faults of `segmenter run` against a real tansu broker and a real RocksDB:
//! - a state directory that is read-only, or corrupt (garbage in `CURRENT` or the MANIFEST,
//!   `CURRENT` missing) is refused at start: a non-zero exit with a message naming the problem,
//!   never a service running on silently empty state;
//! - the disk filling up while state is written (the state dir on a small tmpfs this test mounts;
//!   it needs root, as CI has): intake stops, the reason is a metric and a log line, nothing of
//!   the unwritten input is published or committed, and once space returns the service resumes
//!   by itself and its output equals an uninterrupted run's.

#[path = "support/tansu.rs"]
mod tansu;

#[path = "support/service.rs"]
mod service;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use segmenter::generate::GeneratorConfig;
use service::{
    assert_same_changes, distinct_by_id, expected_changes, generated_input, http, metric,
    produce_all, wait_committed, wait_until, InputLine, Service, TestConfig, TopicReader,
};

const PARTITIONS: i32 = 2;

const SEGMENTS: &str = r#"
[[segment]]
id = "viewer"
rule = 'count("Product Viewed", 5m) >= 2'

[[segment]]
id = "idle"
rule = 'since(last(any)) >= 15m'

[[segment]]
id = "spender"
rule = 'sum("Order Completed", "revenue", 1h) >= 100'
"#;

/// A broker with the input and output topics.
fn broker() -> tansu::Tansu {
    let broker = tansu::Tansu::start().expect("starting the tansu broker");
    for topic in [
        "events",
        "segment-changes",
        "segment-membership",
        "segmenter-dlq",
    ] {
        broker
            .create_topic(topic, PARTITIONS)
            .expect("creating a topic");
    }
    broker
}

fn input(events: u64, seed: u64) -> Vec<InputLine> {
    generated_input(
        "events",
        PARTITIONS,
        GeneratorConfig {
            customers: 300,
            events,
            seed,
            start_ms: 1_793_491_200_000,
            events_per_second: 5.0,
            late_fraction: 0.0,
            duplicate_fraction: 0.0,
            malformed_fraction: 0.0,
        },
    )
}

/// A tmpfs of `size` mounted at `dir` (created), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("creating the mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "`mount -t tmpfs` failed ({status}): this test needs root (CI runs as root)"
        );
        Tmpfs(dir.to_path_buf())
    }

    fn remount(&self, options: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.0)
            .status()
            .expect("running mount");
        assert!(status.success(), "remount {options} failed ({status})");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Runs the service over a few hundred events into `state`, then stops it cleanly: a real,
/// non-empty state directory.
fn seed_state(brokers: &str, dir: &Path, state: &Path) -> (PathBuf, usize) {
    let config = TestConfig::new(brokers, state, &["events"], SEGMENTS);
    let config_path = config.write(&dir.join("seed.toml"));
    let lines = input(400, 7);
    produce_all(brokers, &lines);
    let mut service = Service::start(&config_path, &dir.join("seed.log"));
    wait_committed(brokers, &config.group_id, &["events"], &mut service);
    service.sigterm();
    let status = service.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "seeding run did not stop cleanly: {status:?}"
    );
    let changes = service::read_all(brokers, "segment-changes").len();
    assert!(changes > 0, "the seeding run published nothing");
    (config_path, changes)
}

/// Starts the service on `state` and expects it to refuse: a non-zero exit within 30 s whose
/// output contains every one of `needles`. Returns the output.
fn expect_refusal(brokers: &str, dir: &Path, name: &str, state: &Path, needles: &[&str]) -> String {
    let mut config = TestConfig::new(brokers, state, &["events"], SEGMENTS);
    config.group_id = format!("refusal-{name}");
    let config_path = config.write(&dir.join(format!("{name}.toml")));
    let mut service = Service::start(&config_path, &dir.join(format!("{name}.log")));
    let status = service
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| {
            panic!(
                "{name}: still running after 30 s on a bad state dir; log:\n{}",
                service.log_tail()
            )
        });
    let log = service.log_text();
    assert!(
        !status.success(),
        "{name}: exited successfully; log:\n{log}"
    );
    assert!(
        !log.contains("segmenter running"),
        "{name}: started serving before refusing; log:\n{log}"
    );
    for needle in needles {
        assert!(log.contains(needle), "{name}: no {needle:?} in:\n{log}");
    }
    log
}

fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("running cp");
    assert!(status.success(), "cp -a failed");
}

#[test]
fn a_corrupt_or_read_only_state_dir_is_refused_at_start() {
    let broker = broker();
    let brokers = broker.bootstrap();
    let dir = tempfile::Builder::new()
        .prefix("segmenter-faults-")
        .tempdir()
        .expect("temp dir");
    let seeded = dir.path().join("seeded");
    let (_, published) = seed_state(&brokers, dir.path(), &seeded);
    eprintln!("seeded state: {published} changes published");

    // Garbage in CURRENT.
    let state = dir.path().join("garbage-current");
    copy_dir(&seeded, &state);
    std::fs::write(state.join("CURRENT"), b"\x00\xffnot a manifest name").expect("writing");
    expect_refusal(
        &brokers,
        dir.path(),
        "garbage-current",
        &state,
        &["error: opening state in", "CURRENT"],
    );

    // CURRENT gone: RocksDB alone would create an empty database over the old files.
    let state = dir.path().join("no-current");
    copy_dir(&seeded, &state);
    std::fs::remove_file(state.join("CURRENT")).expect("removing CURRENT");
    expect_refusal(
        &brokers,
        dir.path(),
        "no-current",
        &state,
        &["error: opening state in", "no CURRENT file", "refusing"],
    );
    assert!(
        !state.join("CURRENT").exists(),
        "the refusal must not create a new database"
    );

    // Garbage in the MANIFEST that CURRENT names.
    let state = dir.path().join("garbage-manifest");
    copy_dir(&seeded, &state);
    let current = std::fs::read_to_string(state.join("CURRENT")).expect("reading CURRENT");
    let manifest = state.join(current.trim());
    let length = std::fs::metadata(&manifest).expect("manifest").len() as usize;
    let garbage: Vec<u8> = (0..length).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&manifest, garbage).expect("overwriting the manifest");
    let log = expect_refusal(
        &brokers,
        dir.path(),
        "garbage-manifest",
        &state,
        &["error: opening state in"],
    );
    assert!(
        log.contains("Corruption") || log.contains("corrupt"),
        "garbage-manifest: the error names no corruption:\n{log}"
    );

    // Read-only: the seeded state on a tmpfs remounted read-only.
    let mount = dir.path().join("ro");
    let tmpfs = Tmpfs::mount(&mount, "64m");
    let state = mount.join("state");
    copy_dir(&seeded, &state);
    tmpfs.remount("ro");
    expect_refusal(
        &brokers,
        dir.path(),
        "read-only",
        &state,
        &["error: opening state in", "Read-only file system"],
    );
    // An empty read-only dir is refused the same way (no empty state in memory instead).
    tmpfs.remount("rw");
    let empty = mount.join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    tmpfs.remount("ro");
    expect_refusal(
        &brokers,
        dir.path(),
        "read-only-empty",
        &empty,
        &["error: opening state in", "Read-only file system"],
    );
}

/// Free bytes on the filesystem holding `path`.
fn free_bytes(path: &Path) -> u64 {
    let output = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .expect("running df");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("cannot parse df output {output:?}"))
}

/// Keeps the filesystem of `dir` full with a growing file until dropped, then removes the file:
/// space RocksDB frees (a reopened WAL gives back its preallocation) is taken again at once.
struct Filler {
    path: PathBuf,
    keep_full: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Filler {
    fn start(dir: &Path) -> Filler {
        let path = dir.join("filler");
        let mut file = std::fs::File::create(&path).expect("creating the filler");
        let keep_full = Arc::new(AtomicBool::new(true));
        let full = keep_full.clone();
        let fill = move |file: &mut std::fs::File| {
            for size in [64 << 10, 512] {
                let chunk = vec![0x5a_u8; size];
                while file.write_all(&chunk).is_ok() {}
            }
        };
        fill(&mut file);
        let thread = thread::spawn(move || {
            while full.load(Ordering::SeqCst) {
                fill(&mut file);
                thread::sleep(Duration::from_millis(20));
            }
        });
        Filler {
            path,
            keep_full,
            thread: Some(thread),
        }
    }

    /// Space returns.
    fn release(&mut self) {
        self.keep_full.store(false, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        self.release();
    }
}

fn scrape(address: &str) -> String {
    http(address, "GET", "/metrics", None).1
}

fn write_errors(address: &str) -> f64 {
    metric(
        &scrape(address),
        "segmenter_state_write_errors_total",
        &[("kind", "no_space")],
    )
    .unwrap_or(0.0)
}

/// The group's committed offsets for every input partition.
fn committed(brokers: &str, group: &str) -> Vec<i64> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("creating an offsets reader");
    let mut list = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        list.add_partition("events", p);
    }
    let offsets = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .expect("reading committed offsets");
    (0..PARTITIONS)
        .map(
            |p| match offsets.find_partition("events", p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => 0,
            },
        )
        .collect()
}

#[test]
fn a_full_disk_stops_intake_and_it_resumes_with_nothing_lost_when_space_returns() {
    let broker = broker();
    let brokers = broker.bootstrap();
    let dir = tempfile::Builder::new()
        .prefix("segmenter-disk-full-")
        .tempdir()
        .expect("temp dir");
    let mount = dir.path().join("disk");
    let _tmpfs = Tmpfs::mount(&mount, "24m");
    let state = mount.join("state");
    let config = TestConfig::new(&brokers, &state, &["events"], SEGMENTS);
    let config_path = config.write(&dir.path().join("segmenter.toml"));
    let lines = input(6_000, 11);
    let (first, second) = lines.split_at(2_000);
    let expected = expected_changes(&config_path, dir.path(), &lines);

    let mut service = Service::start(&config_path, &dir.path().join("segmenter.log"));
    let address = service.http_address();
    produce_all(&brokers, first);
    wait_committed(&brokers, &config.group_id, &["events"], &mut service);
    let mut changes = TopicReader::new(&brokers, "segment-changes");
    changes.read_to_end();
    let before_fault = changes.records.len();

    // The disk fills up; then more input arrives.
    let mut filler = Filler::start(&mount);
    eprintln!(
        "disk full: {} bytes free, {before_fault} change records so far",
        free_bytes(&mount)
    );
    let committed_at_fault = committed(&brokers, &config.group_id);
    produce_all(&brokers, second);
    let stalled_at = Instant::now();
    wait_until(
        "a no_space state write error in the metrics",
        Duration::from_secs(60),
        || (write_errors(&address) > 0.0).then_some(()),
        || service.log_tail(),
    );
    service.wait_for_log("state write failed", Duration::from_secs(10));
    assert!(
        service.log_text().contains("kind=\"no_space\""),
        "the log line names the reason"
    );

    // Stalled: the process lives, nothing new is published or committed. A write may still get
    // through now and then (reopening the store after failed writes deletes an old WAL file,
    // and the space is briefly free before the filler takes it back); what such a write made
    // durable may be published. So the check needs a window in which no partition changed between
    // stalled and writing, from 2 s before it (publishing lags the write) to its end.
    // Every stall starts with a "failed" line and ends with a "succeeded again" line.
    let successes = |service: &Service| {
        let log = service.log_text();
        (
            log.matches("state write succeeded again").count(),
            log.matches("state write failed").count(),
        )
    };
    let mut quiet_window = None;
    for _ in 0..6 {
        let successes_before = successes(&service);
        thread::sleep(Duration::from_secs(2));
        changes.read_to_end();
        let while_stalled = changes.records.len();
        let committed_stalled = committed(&brokers, &config.group_id);
        thread::sleep(Duration::from_secs(3));
        service.assert_running();
        changes.read_to_end();
        let published_after = changes.records.len();
        let committed_after = committed(&brokers, &config.group_id);
        if successes(&service) == successes_before {
            quiet_window = Some((
                while_stalled,
                published_after,
                committed_stalled,
                committed_after,
            ));
            break;
        }
    }
    let Some((while_stalled, published_after, committed_stalled, committed_after)) = quiet_window
    else {
        panic!(
            "no 5 s window without a successful state write while the disk was full; log:\n{}",
            service.log_tail()
        );
    };
    assert_eq!(
        published_after, while_stalled,
        "changes were published while state could not be written"
    );
    assert_eq!(
        committed_after, committed_stalled,
        "input offsets were committed while state could not be written"
    );
    let (status, _) = http(&address, "GET", "/healthz", None);
    assert_eq!(status, 200, "alive while stalled");
    let errors_stalled = write_errors(&address);
    assert!(
        errors_stalled >= 2.0,
        "the write is retried ({errors_stalled} attempts)"
    );
    let ends: Vec<i64> = {
        let reader = TopicReader::new(&brokers, "events");
        let highs = reader.high_watermarks();
        (0..PARTITIONS).map(|p| highs[&p]).collect()
    };
    assert!(
        committed_stalled.iter().zip(&ends).any(|(c, e)| c < e),
        "all input was committed although the disk was full: {committed_stalled:?} of {ends:?} \
         (at the fault: {committed_at_fault:?})"
    );

    // Space returns: the service resumes by itself.
    filler.release();
    let freed_at = Instant::now();
    service.wait_for_log("state write succeeded again", Duration::from_secs(120));
    let resumed_after = freed_at.elapsed();
    wait_committed(&brokers, &config.group_id, &["events"], &mut service);
    let caught_up_after = freed_at.elapsed();
    changes.read_to_end();
    let deadline = Instant::now() + Duration::from_secs(60);
    while distinct_by_id(&changes.records).0.len() < expected.len() && Instant::now() < deadline {
        changes.poll_for(Duration::from_millis(200));
    }
    let failed_writes = write_errors(&address);
    service.sigterm();
    let status = service.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "no clean exit after SIGTERM: {status:?}; log:\n{}",
        service.log_tail()
    );
    changes.read_to_end();
    let (got, duplicates) = distinct_by_id(&changes.records);
    assert_same_changes(&got, &expected, "after the disk was full");
    eprintln!(
        "disk full: stalled {:.1} s with {} failed writes; resumed {:.1} s and caught up {:.1} s \
         after space returned; {} changes, {duplicates} duplicates",
        (freed_at - stalled_at).as_secs_f64(),
        failed_writes,
        resumed_after.as_secs_f64(),
        caught_up_after.as_secs_f64(),
        got.len()
    );
}
