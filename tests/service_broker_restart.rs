//! The broker goes away mid-stream and comes back: `segmenter run` must neither lose nor alter
//! anything. tansu's `memory://` storage forgets everything on restart, so this test stores the
//! broker's data in S3 (`s3://tansu/`, supported by the pinned tansu build's `dynostore`) served
//! by a local moto server (`scripts/install-moto.sh`, or `$MOTO_SERVER`).

#[path = "support/tansu.rs"]
mod tansu;

#[path = "support/service.rs"]
mod service;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use segmenter::generate::GeneratorConfig;
use service::{
    assert_same_changes, assert_seq_alternation, distinct_by_id, expected_changes, generated_input,
    ChangeJson, InputLine, InputProducer, Service, TestConfig, TopicReader,
};

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
"#;

/// A moto S3 server on a free port with one bucket, `tansu`.
struct Moto {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Moto {
    fn start(dir: &Path) -> Moto {
        let bin = moto_bin();
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("finding a free port")
            .port();
        let log = dir.join("moto.log");
        let file = std::fs::File::create(&log).expect("creating moto.log");
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log handle"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let moto = Moto { child, port, log };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(30);
        // Create the bucket (path style; moto does not check credentials by default).
        loop {
            if let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                let request = format!(
                    "PUT /tansu HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                stream.write_all(request.as_bytes()).expect("moto request");
                let mut answer = String::new();
                let _ = stream.read_to_string(&mut answer);
                assert!(
                    answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
                    "creating the bucket: {answer}"
                );
                return moto;
            }
            assert!(
                Instant::now() < deadline,
                "moto did not listen within 30 s; log:\n{}",
                std::fs::read_to_string(&moto.log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_DEFAULT_REGION", "eu-west-1".into()),
            ("AWS_REGION", "eu-west-1".into()),
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `$MOTO_SERVER`, else what `scripts/install-moto.sh` prints last.
fn moto_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("MOTO_SERVER").filter(|v| !v.is_empty()) {
        return PathBuf::from(bin);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-moto.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(path) if out.status.success() => PathBuf::from(path.trim()),
        _ => panic!(
            "{} failed ({}); set MOTO_SERVER to a moto_server binary.\n{stdout}\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn broker_restart_mid_stream_loses_nothing() {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("segmenter-broker-restart-")
        .tempdir()
        .expect("creating a temp dir");
    let moto = Moto::start(dir.path());
    let env = moto.env();
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut broker =
        tansu::Tansu::start_with_storage("s3://tansu/", &env_refs).expect("starting tansu on S3");
    let brokers = broker.bootstrap();
    broker
        .create_topic("events", 4)
        .expect("creating the input topic");
    for topic in ["segment-changes", "segment-membership", "segmenter-dlq"] {
        broker
            .create_topic(topic, 4)
            .expect("creating an output topic");
    }
    let config = TestConfig::new(&brokers, &dir.path().join("state"), &["events"], SEGMENTS);
    let config_path = config.write(&dir.path().join("segmenter.toml"));
    let lines = generated_input(
        "events",
        4,
        GeneratorConfig {
            customers: 300,
            events: 6_000,
            seed: 77,
            start_ms: 1_793_491_200_000,
            events_per_second: 5.0,
            late_fraction: 0.02,
            duplicate_fraction: 0.01,
            malformed_fraction: 0.0,
        },
    );
    let expected = expected_changes(&config_path, dir.path(), &lines);

    // Background producer, ~1,000 messages/s.
    let producing = Arc::new(AtomicBool::new(true));
    let sender = {
        let lines = lines.clone();
        let brokers = brokers.clone();
        let producing = producing.clone();
        thread::spawn(move || {
            let mut producer = InputProducer::new(&brokers);
            let begun = Instant::now();
            for (i, line) in lines.iter().enumerate() {
                if let Some(wait) = Duration::from_millis(i as u64).checked_sub(begun.elapsed()) {
                    thread::sleep(wait);
                }
                producer.send_line(line);
            }
            producer.flush();
            producing.store(false, Ordering::SeqCst);
        })
    };

    let mut service = Service::start(&config_path, &dir.path().join("segmenter.log"));
    let mut reader = TopicReader::new(&brokers, "segment-changes");
    let deadline = Instant::now() + Duration::from_secs(60);
    while reader.records.len() < 200 {
        service.assert_running();
        assert!(Instant::now() < deadline, "no output within 60 s");
        reader.poll_for(Duration::from_millis(50));
    }
    drop(reader);
    assert!(
        producing.load(Ordering::SeqCst),
        "the producer finished before the broker was stopped"
    );
    let outage = Instant::now();
    broker.terminate(Duration::from_secs(10));
    eprintln!("broker stopped in {:.2} s", outage.elapsed().as_secs_f64());
    thread::sleep(Duration::from_secs(3));
    service.assert_running();
    broker
        .restart()
        .expect("restarting tansu on the same S3 bucket");
    eprintln!(
        "broker was down for {:.1} s",
        outage.elapsed().as_secs_f64()
    );
    sender.join().expect("producer thread");

    let mut reader = TopicReader::new(&brokers, "segment-changes");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        reader.poll_for(Duration::from_millis(200));
        let distinct = distinct_by_id(&reader.records).0.len();
        if distinct >= expected.len() {
            break;
        }
        service.assert_running();
        assert!(
            Instant::now() < deadline,
            "after the broker restart: {distinct} of {} changes within 90 s",
            expected.len()
        );
    }
    service.sigterm();
    let status = service
        .wait_exit(Duration::from_secs(20))
        .expect("exit after SIGTERM");
    assert!(status.success(), "exit status {status}");
    reader.read_to_end();
    let (got, duplicates) = distinct_by_id(&reader.records);
    let want: BTreeSet<&str> = expected.iter().map(|c| c.s("id")).collect();
    if !got.keys().map(String::as_str).eq(want.iter().copied()) {
        eprintln!("{}", input_diagnostics(&brokers, &lines));
    }
    assert_same_changes(&got, &expected, "after a broker restart");
    let distinct: Vec<Value> = got.values().cloned().collect();
    assert_seq_alternation(&distinct);
    eprintln!(
        "broker restart: {} changes, {duplicates} duplicates, {:.1} s",
        expected.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Whether the input topic holds what was produced, per partition (a broker that loses
/// acknowledged records cannot be blamed on the service).
fn input_diagnostics(brokers: &str, lines: &[InputLine]) -> String {
    let mut produced: BTreeMap<i32, Vec<&[u8]>> = BTreeMap::new();
    for line in lines {
        produced
            .entry(line.partition)
            .or_default()
            .push(&line.payload);
    }
    let inputs = service::read_all(brokers, "events");
    let mut out = String::from("input topic after the outage:");
    for (partition, want) in &produced {
        let got: Vec<(i64, &[u8])> = inputs
            .iter()
            .filter(|r| r.partition == *partition)
            .map(|r| (r.offset, r.payload.as_deref().unwrap_or_default()))
            .collect();
        let first_difference = got
            .iter()
            .map(|(_, p)| *p)
            .zip(want.iter().copied())
            .position(|(a, b)| a != b);
        out.push_str(&format!(
            "\n  partition {partition}: {} records at offsets {:?}..{:?}, {} produced, first difference at index {first_difference:?}",
            got.len(),
            got.first().map(|(o, _)| *o),
            got.last().map(|(o, _)| *o),
            want.len()
        ));
    }
    out
}
