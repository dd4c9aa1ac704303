//! Kafka over TLS for real: `segmenter run` (the binary) and the test's own producer and reader
//! talk TLS to a tansu broker through stunnel (Debian's `stunnel4`) as the TLS terminator, tansu
//! advertising stunnel's port. The test makes its CA and certificates with OpenSSL.
//!
//! - end to end over mutual TLS, the client key's password read from the environment through
//!   `[kafka.secrets]` and never logged;
//! - a broker certificate from another CA, and an expired one, each refused with a log line and a
//!   `/readyz` reason naming the problem, the process staying up, idle and not ready (no crash
//!   loop), and recovering by itself once the broker presents a good certificate;
//! - SASL/SCRAM-SHA-512 over TLS against tansu's `--authentication` (which refuses every login:
//!   see README, "Kafka security"): the refusal is reported and the password appears nowhere;
//! - `segmenter check` with secrets from the environment and a file, and with an inline secret.

#[path = "support/tansu.rs"]
mod tansu;

#[path = "support/service.rs"]
mod service;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::symm::Cipher;
use openssl::x509::extension::{BasicConstraints, KeyUsage, SubjectAlternativeName};
use openssl::x509::{X509Name, X509};
use serde_json::Value;

use service::{
    distinct_by_id, expected_changes, fnv1a, http, wait_until, InputLine, InputProducer, Service,
    TestConfig, TopicReader, SEGMENTER,
};

/// 2026-11-01T00:00:00Z
const T0: i64 = 1_793_491_200_000;
const DAY: i64 = 86_400;

const SEGMENTS: &str = r#"
[[segment]]
id = "buyer"
rule = 'count("Order Completed") >= 1'
"#;

const STUNNEL: &str = "/usr/bin/stunnel4";

// ------------------------------------------------------------------------------------------
// Certificates

fn unix_now() -> i64 {
    service::wall_ms() / 1000
}

fn new_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("P-256");
    PKey::from_ec_key(EcKey::generate(&group).expect("an EC key")).expect("a PKey")
}

fn name(common_name: &str) -> X509Name {
    let mut name = X509Name::builder().expect("a name builder");
    name.append_entry_by_nid(Nid::COMMONNAME, common_name)
        .expect("a CN");
    name.build()
}

/// A test certificate authority.
struct Ca {
    key: PKey<Private>,
    cert: X509,
}

impl Ca {
    fn new(common_name: &str) -> Ca {
        let key = new_key();
        let mut cert = X509::builder().expect("an X509 builder");
        cert.set_version(2).expect("v3");
        let serial = BigNum::from_u32(1).and_then(|n| n.to_asn1_integer());
        cert.set_serial_number(&serial.expect("a serial"))
            .expect("serial");
        cert.set_subject_name(&name(common_name)).expect("subject");
        cert.set_issuer_name(&name(common_name)).expect("issuer");
        cert.set_pubkey(&key).expect("public key");
        let now = unix_now();
        cert.set_not_before(&Asn1Time::from_unix(now - 3 * DAY).expect("time"))
            .expect("not before");
        cert.set_not_after(&Asn1Time::from_unix(now + 3 * DAY).expect("time"))
            .expect("not after");
        cert.append_extension(BasicConstraints::new().critical().ca().build().expect("bc"))
            .expect("basic constraints");
        let usage = KeyUsage::new()
            .critical()
            .key_cert_sign()
            .crl_sign()
            .build();
        cert.append_extension(usage.expect("ku"))
            .expect("key usage");
        cert.sign(&key, MessageDigest::sha256())
            .expect("self-signing");
        Ca {
            key,
            cert: cert.build(),
        }
    }

    /// A certificate for `127.0.0.1`/`localhost`, valid between the two Unix times.
    fn issue(&self, common_name: &str, not_before: i64, not_after: i64) -> (X509, PKey<Private>) {
        static SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(2);
        let key = new_key();
        let mut cert = X509::builder().expect("an X509 builder");
        cert.set_version(2).expect("v3");
        let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let serial = BigNum::from_u32(serial).and_then(|n| n.to_asn1_integer());
        cert.set_serial_number(&serial.expect("a serial"))
            .expect("serial");
        cert.set_subject_name(&name(common_name)).expect("subject");
        cert.set_issuer_name(self.cert.subject_name())
            .expect("issuer");
        cert.set_pubkey(&key).expect("public key");
        cert.set_not_before(&Asn1Time::from_unix(not_before).expect("time"))
            .expect("not before");
        cert.set_not_after(&Asn1Time::from_unix(not_after).expect("time"))
            .expect("not after");
        let san = SubjectAlternativeName::new()
            .dns("localhost")
            .ip("127.0.0.1")
            .build(&cert.x509v3_context(Some(&self.cert), None))
            .expect("subject alternative names");
        cert.append_extension(san).expect("SAN");
        cert.sign(&self.key, MessageDigest::sha256())
            .expect("signing");
        (cert.build(), key)
    }

    fn write(&self, path: &Path) -> PathBuf {
        write_file(path, &self.cert.to_pem().expect("PEM"))
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path.to_path_buf()
}

/// Writes `NAME.pem` and `NAME.key` (unencrypted) into `dir`.
fn write_pair(dir: &Path, name: &str, pair: &(X509, PKey<Private>)) -> (PathBuf, PathBuf) {
    let cert = write_file(
        &dir.join(format!("{name}.pem")),
        &pair.0.to_pem().expect("PEM"),
    );
    let key = write_file(
        &dir.join(format!("{name}.key")),
        &pair.1.private_key_to_pem_pkcs8().expect("key PEM"),
    );
    (cert, key)
}

// ------------------------------------------------------------------------------------------
// stunnel and the broker behind it

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// stunnel4 terminating TLS on `accept` and forwarding to `connect`.
struct Stunnel {
    child: Child,
    log: PathBuf,
}

impl Stunnel {
    /// Serves `cert`/`key`; with `client_ca`, clients must present a certificate it signed.
    fn start(
        dir: &Path,
        accept: u16,
        connect: u16,
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Stunnel {
        assert!(
            Path::new(STUNNEL).exists(),
            "{STUNNEL} is missing: scripts/deps.sh installs Debian's stunnel4"
        );
        let log = dir.join(format!("stunnel-{accept}.log"));
        let mut config = format!(
            "foreground = yes\npid =\ndebug = notice\noutput = {}\n\n[kafka]\naccept = 127.0.0.1:{accept}\n\
             connect = 127.0.0.1:{connect}\ncert = {}\nkey = {}\n",
            log.display(),
            cert.display(),
            key.display()
        );
        if let Some(ca) = client_ca {
            config.push_str(&format!(
                "verifyChain = yes\nrequireCert = yes\nCAfile = {}\n",
                ca.display()
            ));
        }
        let conf = write_file(
            &dir.join(format!("stunnel-{accept}.conf")),
            config.as_bytes(),
        );
        let child = Command::new(STUNNEL)
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {STUNNEL}: {e}"));
        let mut stunnel = Stunnel { child, log };
        let address = SocketAddr::from(([127, 0, 0, 1], accept));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = stunnel.child.try_wait() {
                panic!("stunnel exited ({status}); log:\n{}", stunnel.log_text());
            }
            if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
                return stunnel;
            }
            assert!(
                Instant::now() < deadline,
                "stunnel did not listen on {accept} within 20 s; log:\n{}",
                stunnel.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- stunnel log:\n{}", self.log_text());
        }
    }
}

/// A tansu broker reachable only through stunnel's TLS port (which it advertises).
struct TlsBroker {
    tansu: tansu::Tansu,
    tls_port: u16,
    stunnel: Option<Stunnel>,
}

impl TlsBroker {
    fn start(
        dir: &Path,
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        tansu_args: &[&str],
    ) -> TlsBroker {
        let tls_port = free_port();
        let tansu = tansu::Tansu::start_behind(tls_port, tansu_args).expect("starting tansu");
        let stunnel = Stunnel::start(dir, tls_port, tansu.port(), cert, key, client_ca);
        TlsBroker {
            tansu,
            tls_port,
            stunnel: Some(stunnel),
        }
    }

    /// What clients bootstrap from: stunnel's TLS port.
    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.tls_port)
    }

    /// Replaces the terminator on the same port, now presenting `cert` (a certificate renewed).
    fn serve_certificate(&mut self, dir: &Path, cert: &Path, key: &Path, client_ca: Option<&Path>) {
        self.stunnel = None;
        let stunnel = Stunnel::start(dir, self.tls_port, self.tansu.port(), cert, key, client_ca);
        self.stunnel = Some(stunnel);
    }
}

// ------------------------------------------------------------------------------------------
// The service

/// One `Order Completed` per customer, on partition `fnv1a(customer) % partitions`.
fn orders(customers: usize, partitions: i32) -> Vec<InputLine> {
    (0..customers)
        .map(|i| {
            let customer = format!("c-{i}");
            let at = T0 + i as i64 * 1000;
            let payload = format!(
                r#"{{"type":"track","event":"Order Completed","userId":"{customer}","messageId":"m-{i}","timestamp":{at}}}"#
            );
            InputLine {
                topic: "events".into(),
                partition: (fnv1a(&customer) % partitions as u64) as i32,
                key: Some(customer.into_bytes()),
                payload: payload.into_bytes(),
                timestamp_ms: at,
                malformed: false,
            }
        })
        .collect()
}

fn readyz(address: &str) -> (u16, Value) {
    let (status, body) = http(address, "GET", "/readyz", None);
    let json =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/readyz is not JSON ({e}): {body}"));
    (status, json)
}

/// CPU seconds (user + system) the process has used, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("reading /proc stat");
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat(5) are utime and stime; `fields` starts at field 3.
    let ticks: u64 =
        fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
    ticks as f64 / 100.0
}

/// Waits until `/readyz` is 503 with a reason containing `needle`; returns the reason.
fn wait_unready_because(service: &mut Service, address: &str, needle: &str) -> String {
    wait_until(
        &format!("/readyz to be 503 naming {needle:?}"),
        Duration::from_secs(60),
        || {
            service.assert_running();
            let (status, json) = readyz(address);
            let reason = json["reason"].as_str().unwrap_or_default().to_string();
            (status == 503 && reason.contains(needle)).then_some(reason)
        },
        || format!("last /readyz: {:?}", readyz(address)),
    )
}

/// The process stays up, not ready, and nearly idle for `window`: librdkafka reconnects with
/// backoff, the service waits for Kafka; nothing spins, exits or restarts.
fn assert_waits_quietly(service: &mut Service, address: &str, window: Duration) {
    let pid = service.pid();
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    while started.elapsed() < window {
        service.assert_running();
        let (status, _) = readyz(address);
        assert_eq!(status, 503, "not ready while Kafka refuses the connection");
        thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(service.pid(), pid, "the same process throughout");
    let used = cpu_seconds(pid) - cpu_before;
    assert!(
        used < 0.5 * window.as_secs_f64(),
        "the waiting service used {used:.2} CPU-s in {window:?}: it spins"
    );
}

struct Tls {
    dir: tempfile::TempDir,
    ca: Ca,
    ca_path: PathBuf,
}

impl Tls {
    fn new() -> Tls {
        let dir = tempfile::Builder::new()
            .prefix("segmenter-tls-")
            .tempdir()
            .expect("a temp dir");
        let ca = Ca::new("segmenter test CA");
        let ca_path = ca.write(&dir.path().join("ca.pem"));
        Tls { dir, ca, ca_path }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A server certificate valid now.
    fn good_server(&self, name: &str) -> (PathBuf, PathBuf) {
        let now = unix_now();
        write_pair(
            self.path(),
            name,
            &self.ca.issue("localhost", now - DAY, now + DAY),
        )
    }

    /// The test clients' TLS settings.
    fn client_settings(&self) -> Vec<(&'static str, String)> {
        vec![
            ("security.protocol", "SSL".to_string()),
            ("ssl.ca.location", self.ca_path.display().to_string()),
        ]
    }

    fn config(&self, brokers: &str, name: &str, client_toml: &str) -> PathBuf {
        let state = self.path().join(format!("state-{name}"));
        let mut config = TestConfig::new(brokers, &state, &["events"], SEGMENTS);
        config.extra_toml = client_toml.to_string();
        config.write(&self.path().join(format!("{name}.toml")))
    }
}

fn refs<'a>(settings: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    settings.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

// ------------------------------------------------------------------------------------------
// Tests

/// Mutual TLS end to end: stunnel requires a client certificate; the service's key is
/// encrypted and its password comes from the environment (`[kafka.secrets]`). Events go in over
/// TLS, the changes the `segmenter replay` oracle expects come out over TLS, and the key's
/// password is nowhere in the service's log.
#[test]
fn the_service_and_its_clients_talk_mutual_tls_end_to_end() {
    let tls = Tls::new();
    let (server_cert, server_key) = tls.good_server("server");
    let now = unix_now();
    let client = tls.ca.issue("segmenter", now - DAY, now + DAY);
    let (client_cert, client_key) = write_pair(tls.path(), "client", &client);
    let key_password = "key-password-7f3a9c";
    let encrypted = client
        .1
        .private_key_to_pem_pkcs8_passphrase(Cipher::aes_256_cbc(), key_password.as_bytes())
        .expect("an encrypted key");
    let encrypted_key = write_file(&tls.path().join("client-encrypted.key"), &encrypted);

    let broker = TlsBroker::start(
        tls.path(),
        &server_cert,
        &server_key,
        Some(&tls.ca_path),
        &[],
    );
    broker
        .tansu
        .create_topic("events", 2)
        .expect("creating events");

    let client_toml = format!(
        "\n[kafka.client]\n\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = {:?}\n\
         \"ssl.certificate.location\" = {:?}\n\"ssl.key.location\" = {:?}\n\
         \"debug\" = \"security,conf\"\n\n\
         [kafka.secrets]\n\"ssl.key.password\" = {{ env = \"TEST_KAFKA_KEY_PASSWORD\" }}\n",
        tls.ca_path.display().to_string(),
        client_cert.display().to_string(),
        encrypted_key.display().to_string(),
    );
    let config = tls.config(&broker.bootstrap(), "mtls", &client_toml);
    let log = tls.path().join("service-mtls.log");
    let mut service = Service::start_with_env(
        &config,
        &log,
        &[
            ("TEST_KAFKA_KEY_PASSWORD", key_password),
            ("RUST_LOG", "debug"),
        ],
    );
    let address = service.http_address();
    service.wait_assigned();

    let mut settings = tls.client_settings();
    settings.push((
        "ssl.certificate.location",
        client_cert.display().to_string(),
    ));
    settings.push(("ssl.key.location", client_key.display().to_string()));
    let lines = orders(20, 2);
    let mut producer = InputProducer::with_config(&broker.bootstrap(), &refs(&settings));
    for line in &lines {
        producer.send_line(line);
    }
    producer.flush();

    // The oracle reads only the segments (the service config names a secret it cannot read).
    let segments_only = write_file(&tls.path().join("segments.toml"), SEGMENTS.as_bytes());
    let expected = expected_changes(&segments_only, tls.path(), &lines);
    assert_eq!(expected.len(), 20, "the oracle: one entry per customer");
    let mut reader =
        TopicReader::with_config(&broker.bootstrap(), "segment-changes", &refs(&settings));
    let seen = std::cell::Cell::new(0);
    wait_until(
        "every expected change on the change topic, read over TLS",
        Duration::from_secs(90),
        || {
            reader.poll_for(Duration::from_millis(500));
            seen.set(distinct_by_id(&reader.records).0.len());
            (seen.get() >= expected.len()).then_some(())
        },
        || format!("{} distinct changes so far", seen.get()),
    );
    let (got, _) = distinct_by_id(&reader.records);
    service::assert_same_changes(&got, &expected, "over mutual TLS");
    let (status, json) = readyz(&address);
    assert_eq!(status, 200, "ready over TLS: {json}");

    service.assert_running();
    let text = service.log_text();
    assert!(
        !text.contains(key_password),
        "the key password appears in the service log"
    );
    assert!(
        text.contains("ssl.key.password"),
        "librdkafka's debug output names the property (redacted), so the log was searched"
    );
}

/// A broker certificate signed by a CA the service does not trust: refused with a log line and
/// a `/readyz` reason that say so, the process waits (up, not ready, idle) instead of exiting.
#[test]
fn a_broker_certificate_from_another_ca_is_refused_clearly_without_a_crash_loop() {
    let tls = Tls::new();
    let other = Ca::new("some other CA");
    let now = unix_now();
    let (cert, key) = write_pair(
        tls.path(),
        "foreign",
        &other.issue("localhost", now - DAY, now + DAY),
    );
    let broker = TlsBroker::start(tls.path(), &cert, &key, None, &[]);
    broker
        .tansu
        .create_topic("events", 2)
        .expect("creating events");
    let client_toml = format!(
        "\n[kafka.client]\n\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = {:?}\n",
        tls.ca_path.display().to_string()
    );
    let config = tls.config(&broker.bootstrap(), "wrong-ca", &client_toml);
    let mut service = Service::start(&config, &tls.path().join("service-wrong-ca.log"));
    let address = service.http_address();

    let problem = "unable to get local issuer certificate";
    service.wait_for_log("kafka broker certificate rejected", Duration::from_secs(60));
    let line = service
        .log_text()
        .lines()
        .find(|l| l.contains("kafka broker certificate rejected"))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        line.contains(problem),
        "the log line names the problem: {line}"
    );
    assert!(
        line.contains("some other CA"),
        "and the certificate's issuer chain: {line}"
    );
    let reason = wait_unready_because(&mut service, &address, problem);
    assert!(reason.contains("TLS"), "{reason}");
    assert_waits_quietly(&mut service, &address, Duration::from_secs(8));
}

/// An expired broker certificate: refused, named as expired, no crash loop — and once the
/// broker presents a renewed certificate the service connects and works by itself.
#[test]
fn an_expired_broker_certificate_is_refused_clearly_and_a_renewed_one_recovers() {
    let tls = Tls::new();
    let now = unix_now();
    let (expired_cert, expired_key) = write_pair(
        tls.path(),
        "expired",
        &tls.ca.issue("localhost", now - 3 * DAY, now - DAY),
    );
    let mut broker = TlsBroker::start(tls.path(), &expired_cert, &expired_key, None, &[]);
    broker
        .tansu
        .create_topic("events", 2)
        .expect("creating events");
    let client_toml = format!(
        "\n[kafka.client]\n\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = {:?}\n",
        tls.ca_path.display().to_string()
    );
    let config = tls.config(&broker.bootstrap(), "expired", &client_toml);
    let mut service = Service::start(&config, &tls.path().join("service-expired.log"));
    let address = service.http_address();

    service.wait_for_log("certificate has expired", Duration::from_secs(60));
    let reason = wait_unready_because(&mut service, &address, "certificate has expired");
    assert!(
        reason.contains("valid from"),
        "the validity is shown: {reason}"
    );
    assert_waits_quietly(&mut service, &address, Duration::from_secs(8));

    let pid = service.pid();
    let (cert, key) = tls.good_server("renewed");
    broker.serve_certificate(tls.path(), &cert, &key, None);
    wait_until(
        "the service to become ready after the certificate was renewed",
        Duration::from_secs(120),
        || {
            service.assert_running();
            (readyz(&address).0 == 200).then_some(())
        },
        || format!("last /readyz: {:?}", readyz(&address)),
    );
    assert_eq!(service.pid(), pid, "recovered in the same process");
    let settings = tls.client_settings();
    let lines = orders(4, 2);
    let mut producer = InputProducer::with_config(&broker.bootstrap(), &refs(&settings));
    for line in &lines {
        producer.send_line(line);
    }
    producer.flush();
    let mut reader =
        TopicReader::with_config(&broker.bootstrap(), "segment-changes", &refs(&settings));
    let seen = std::cell::Cell::new(0);
    wait_until(
        "the changes of events sent after the renewal",
        Duration::from_secs(60),
        || {
            reader.poll_for(Duration::from_millis(500));
            seen.set(distinct_by_id(&reader.records).0.len());
            (seen.get() >= lines.len()).then_some(())
        },
        || format!("{} distinct changes so far", seen.get()),
    );
}

/// SASL/SCRAM-SHA-512 over TLS, the password from a file. tansu 0.6.0 with `--authentication`
/// runs the SCRAM exchange but has no stored users to accept (README), so the login is refused:
/// the service reports that and keeps waiting, and the password (sent with librdkafka's debug
/// logging on) is in neither the log nor `/readyz` nor `/metrics`.
#[test]
fn a_refused_sasl_login_over_tls_is_reported_and_the_password_appears_nowhere() {
    let tls = Tls::new();
    let (cert, key) = tls.good_server("server");
    let broker = TlsBroker::start(tls.path(), &cert, &key, None, &["--authentication"]);
    let password = "scram-password-4d1e8b";
    let password_file = write_file(
        &tls.path().join("sasl-password"),
        format!("{password}\n").as_bytes(),
    );
    let client_toml = format!(
        "\n[kafka.client]\n\"security.protocol\" = \"SASL_SSL\"\n\"ssl.ca.location\" = {:?}\n\
         \"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\"sasl.username\" = \"segmenter\"\n\
         \"debug\" = \"security,broker,conf\"\n\n\
         [kafka.secrets]\n\"sasl.password\" = {{ file = {:?} }}\n",
        tls.ca_path.display().to_string(),
        password_file.display().to_string(),
    );
    let config = tls.config(&broker.bootstrap(), "sasl", &client_toml);
    let mut service = Service::start_with_env(
        &config,
        &tls.path().join("service-sasl.log"),
        &[("RUST_LOG", "debug")],
    );
    let address = service.http_address();
    let reason = wait_unready_because(&mut service, &address, "SASL authentication failed");
    assert!(reason.contains("SCRAM"), "{reason}");
    assert_waits_quietly(&mut service, &address, Duration::from_secs(6));

    let (_, metrics) = http(&address, "GET", "/metrics", None);
    let (_, ready) = http(&address, "GET", "/readyz", None);
    let log = service.log_text();
    assert!(
        log.contains("sasl.password"),
        "the debug log was on (it names the property)"
    );
    for (place, text) in [("log", &log), ("/metrics", &metrics), ("/readyz", &ready)] {
        assert!(
            !text.contains(password),
            "the SASL password appears in {place}"
        );
    }
}

/// `segmenter check` reads secrets from the environment and a file and shows only where they
/// came from; an inline secret is refused with its position, and its value is not echoed.
#[test]
fn check_shows_where_secrets_come_from_never_their_values() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let secret_file = write_file(&dir.path().join("key-password"), b"file-secret-31c7\n");
    let config = format!(
        "{SEGMENTS}\n[kafka.client]\n\"security.protocol\" = \"SASL_SSL\"\n\n[kafka.secrets]\n\
         \"sasl.password\" = {{ env = \"TEST_SASL_PASSWORD\" }}\n\"ssl.key.password\" = {{ file = {:?} }}\n",
        secret_file.display().to_string()
    );
    let path = write_file(&dir.path().join("ok.toml"), config.as_bytes());
    let out = Command::new(SEGMENTER)
        .args(["check", "--config"])
        .arg(&path)
        .env("TEST_SASL_PASSWORD", "env-secret-90ab")
        .output()
        .expect("running segmenter check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "check failed: {stdout}\n{stderr}");
    assert!(
        stdout.contains("sasl.password from environment variable TEST_SASL_PASSWORD"),
        "{stdout}"
    );
    assert!(stdout.contains("ssl.key.password from file"), "{stdout}");
    for value in ["env-secret-90ab", "file-secret-31c7"] {
        assert!(
            !stdout.contains(value) && !stderr.contains(value),
            "{value} shown:\n{stdout}\n{stderr}"
        );
    }

    let inline =
        format!("{SEGMENTS}\n[kafka.client]\n\"sasl.password\" = \"inline-secret-55e2\"\n");
    let path = write_file(&dir.path().join("inline.toml"), inline.as_bytes());
    let out = Command::new(SEGMENTER)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("running segmenter check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let line = SEGMENTS.lines().count() + 3;
    let position =
        format!("inline.toml:{line}:1: kafka.client.\"sasl.password\": a secret cannot be written");
    assert!(
        stderr.contains(&position),
        "expected {position:?} in:\n{stderr}"
    );
    assert!(
        !stdout.contains("inline-secret-55e2") && !stderr.contains("inline-secret-55e2"),
        "the inline value is echoed:\n{stdout}\n{stderr}"
    );
    let _ = std::io::stdout().flush();
}
