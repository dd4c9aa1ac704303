//! Access control, limits and TLS of the HTTP API of `segmenter run` (the real binary):
//!
//! - every route class with no token, an unknown token, a `read` and an `admin` token answers
//!   401 / 401 / 200-or-403 / 200 with JSON errors and a `WWW-Authenticate: Bearer` challenge;
//!   every erasure writes an audit line naming the token (never holding it);
//! - with no token, a non-loopback listen address is refused at start (`run` and `check`)
//!   unless `http.auth = "none"`;
//! - bodies over `http.max_body_bytes` get 413, a client that stalls gets 408 or is
//!   disconnected within `http.request_timeout`;
//! - previews beyond `http.preview_concurrency` get 429, and one preview reads at most
//!   `http.preview_max_scan` states and says so;
//! - HTTPS with a certificate the test makes, and plain HTTP failing on that port;
//! - `segmenter token new` and the demo's printed token.

#[path = "support/tansu.rs"]
mod tansu;

#[path = "support/service.rs"]
mod service;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use service::{
    metric, request, request_tls, rfc3339, wait_until, wall_ms, Answer, InputProducer, Service,
    TestConfig, SEGMENTER,
};

const SEGMENTS: &str = r#"
[[segment]]
id = "buyer"
rule = 'count("Order Completed") >= 1'
"#;

const OUTPUTS: [&str; 3] = ["segment-changes", "segment-membership", "segmenter-dlq"];

/// A token minted by the real CLI: (token, tokens-file line).
fn mint(name: &str, role: &str) -> (String, String) {
    let out = Command::new(SEGMENTER)
        .args(["token", "new", "--name", name, "--role", role])
        .stdin(Stdio::null())
        .output()
        .expect("running segmenter token new");
    assert!(
        out.status.success(),
        "token new failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("UTF-8");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "token and its line on stdout: {stdout:?}");
    (lines[0].to_string(), lines[1].to_string())
}

/// A config whose `[http]` section (the last one) is `listen` plus `extra` lines.
fn write_config(config: &TestConfig, path: &Path, listen: &str, extra: &str) {
    let text = config
        .to_toml()
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = {listen:?}"));
    std::fs::write(path, format!("{text}{extra}\n")).expect("writing the config");
}

/// A request body: content type and text.
type Body<'a> = Option<(&'a str, &'a str)>;

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Asserts a JSON error answer with `status`; returns its message.
fn json_error(answer: &Answer, status: u16, what: &str) -> String {
    assert_eq!(answer.status, status, "{what}: {answer:?}");
    let body = answer.json();
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no 'error' string in {body}"))
        .to_string()
}

fn order(customer: &str, message_id: &str, at: i64) -> Vec<u8> {
    json!({"type": "track", "event": "Order Completed", "userId": customer,
           "messageId": message_id, "timestamp": rfc3339(at)})
    .to_string()
    .into_bytes()
}

/// Waits until `/metrics` counts `n` consumed events as ok.
fn wait_consumed(address: &str, n: f64) {
    let consumed = || {
        let answer = request(address, "GET", "/metrics", &[], None);
        metric(
            &answer.body,
            "segmenter_events_consumed_total",
            &[("topic", "events"), ("outcome", "ok")],
        )
    };
    wait_until(
        &format!("{n} events consumed"),
        Duration::from_secs(90),
        || (consumed() == Some(n)).then_some(()),
        || format!("consumed: {:?}", consumed()),
    );
}

/// A broker with the input and output topics, 2 partitions each.
fn broker() -> tansu::Tansu {
    let broker = tansu::Tansu::start().expect("starting the tansu broker");
    for topic in std::iter::once("events").chain(OUTPUTS) {
        broker.create_topic(topic, 2).expect("creating a topic");
    }
    broker
}

#[test]
fn every_route_class_needs_its_role_and_erasure_is_audited() {
    let broker = broker();
    let brokers = broker.bootstrap();
    let dir = tempfile::tempdir().expect("temp dir");
    let (read_token, read_line) = mint("dashboards", "read");
    let (admin_token, admin_line) = mint("ops", "admin");
    std::fs::write(
        dir.path().join("tokens"),
        format!("# test tokens\n{read_line}\n{admin_line}\n"),
    )
    .expect("writing the tokens file");
    let mut config = TestConfig::new(&brokers, &dir.path().join("state"), &["events"], SEGMENTS);
    config.clock = "wall";
    let path = dir.path().join("segmenter.toml");
    // Tokens are enforced on loopback too once configured; the file is relative to the config.
    write_config(
        &config,
        &path,
        "127.0.0.1:0",
        "tokens_file = \"tokens\"\npreview_max_scan = 4",
    );
    let mut service = Service::start(&path, &dir.path().join("segmenter.log"));
    let address = service.http_address();
    let t = wall_ms();
    let mut producer = InputProducer::new(&brokers);
    for i in 0..10 {
        let customer = format!("c-{i}");
        let payload = order(&customer, &format!("m-{i}"), t);
        producer.send("events", i % 2, Some(customer.as_bytes()), &payload, t);
    }
    producer.flush();
    wait_consumed(&address, 10.0);

    // Open routes: no token needed.
    for route in ["/metrics", "/healthz", "/readyz"] {
        let answer = request(&address, "GET", route, &[], None);
        assert_eq!(
            answer.status, 200,
            "GET {route} without a token: {answer:?}"
        );
    }

    let unknown = bearer("sgt_0000000000000000000000000000000000000000000000000000000000000000");
    let reader = bearer(&read_token);
    let admin = bearer(&admin_token);
    // Consumed is counted as events arrive, their state is written with the batch: wait for
    // the customers to be readable before checking who may read them.
    wait_until(
        "the customers readable",
        Duration::from_secs(30),
        || {
            (0..10)
                .all(|i| {
                    let route = format!("/customers/c-{i}");
                    request(&address, "GET", &route, &[("Authorization", &admin)], None).status
                        == 200
                })
                .then_some(())
        },
        || "GET /customers/c-N with the admin token is not 200 for every N".to_string(),
    );
    let preview_body = Some(("text/plain", r#"count("Order Completed") >= 1"#));
    let reads: [(&str, &str, Body); 5] = [
        ("GET", "/segments", None),
        ("GET", "/segments/buyer/members?limit=5", None),
        ("GET", "/customers/c-1", None),
        ("GET", "/customers/c-1/explain?segment=buyer", None),
        ("POST", "/segments/preview", preview_body),
    ];
    for (method, route, body) in reads {
        let what = format!("{method} {route}");
        let none = request(&address, method, route, &[], body);
        json_error(&none, 401, &format!("{what} without a token"));
        assert!(
            none.header("www-authenticate")
                .is_some_and(|c| c.starts_with("Bearer")),
            "{what}: {none:?}"
        );
        let wrong = request(
            &address,
            method,
            route,
            &[("Authorization", &unknown)],
            body,
        );
        json_error(&wrong, 401, &format!("{what} with an unknown token"));
        assert!(wrong.header("www-authenticate").is_some(), "{wrong:?}");
        let basic = request(
            &address,
            method,
            route,
            &[("Authorization", &format!("Basic {read_token}"))],
            body,
        );
        json_error(&basic, 401, &format!("{what} with a Basic header"));
        for (who, token) in [("read", &reader), ("admin", &admin)] {
            let answer = request(&address, method, route, &[("Authorization", token)], body);
            assert_eq!(
                answer.status, 200,
                "{what} with the {who} token: {answer:?}"
            );
            answer.json();
        }
    }
    // The scan budget (4 states of 10): cut short, and it says so.
    let preview = request(
        &address,
        "POST",
        "/segments/preview",
        &[("Authorization", &reader)],
        preview_body,
    )
    .json();
    assert_eq!(preview["complete"], json!(false), "{preview}");
    assert_eq!(preview["customers"], json!(4), "{preview}");
    assert_eq!(preview["members"], json!(4), "{preview}");
    assert_eq!(preview["max_scan"], json!(4), "{preview}");

    // Erasure: admin only.
    let erase = |token: Option<&str>| {
        let headers: Vec<(&str, &str)> = token.map(|t| ("Authorization", t)).into_iter().collect();
        request(&address, "DELETE", "/customers/c-2", &headers, None)
    };
    json_error(&erase(None), 401, "erasure without a token");
    json_error(&erase(Some(&unknown)), 401, "erasure with an unknown token");
    let forbidden = json_error(&erase(Some(&reader)), 403, "erasure with the read token");
    assert!(forbidden.contains("admin"), "{forbidden}");
    let before = request(
        &address,
        "GET",
        "/customers/c-2",
        &[("Authorization", &admin)],
        None,
    );
    assert_eq!(
        before.status, 200,
        "refused erasures erased nothing: {before:?}"
    );
    let erased = erase(Some(&admin));
    assert_eq!(erased.status, 200, "{erased:?}");
    assert_eq!(erased.json()["exited"], json!(["buyer"]));
    let again = erase(Some(&admin));
    json_error(&again, 404, "erasing an erased customer");

    // The audit log: one line per erasure attempt, naming the token, never holding it.
    let log = service.log_text();
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("audit") && l.contains("c-2"))
        .collect();
    let erasures: Vec<&&str> = audit
        .iter()
        .filter(|l| l.contains("customer erasure"))
        .collect();
    assert_eq!(erasures.len(), 2, "erased + not found: {audit:#?}");
    assert!(
        erasures[0].contains("ops") && erasures[0].contains("erased"),
        "{erasures:#?}"
    );
    assert!(erasures[1].contains("not_found"), "{erasures:#?}");
    let refused: Vec<&&str> = audit
        .iter()
        .filter(|l| l.contains("admin request refused"))
        .collect();
    assert_eq!(
        refused.len(),
        3,
        "no token, unknown token, read token: {audit:#?}"
    );
    assert!(
        refused.iter().any(|l| l.contains("dashboards")),
        "{refused:#?}"
    );
    for secret in [&read_token, &admin_token] {
        assert!(
            !log.contains(secret.as_str()),
            "a token is in the service log"
        );
    }
    service.assert_running();
}

#[test]
fn no_token_off_loopback_is_refused_at_start_unless_auth_is_none() {
    let dir = tempfile::tempdir().expect("temp dir");
    let unused = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let config = TestConfig::new(
        &unused.to_string(),
        &dir.path().join("state"),
        &["events"],
        SEGMENTS,
    );
    let path = dir.path().join("segmenter.toml");
    write_config(&config, &path, "0.0.0.0:0", "");
    for command in ["run", "check"] {
        let stderr_path = dir.path().join(format!("{command}.stderr"));
        let mut child = Command::new(SEGMENTER)
            .args([command, "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
            .spawn()
            .expect("running segmenter");
        // A service that starts instead of refusing must fail the test, not hang it.
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("waiting for segmenter") {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        let status =
            status.unwrap_or_else(|| panic!("{command} started instead of refusing: {stderr}"));
        assert!(!status.success(), "{command} accepted it: {stderr}");
        assert!(
            stderr.contains(&format!("{}: http.listen = \"0.0.0.0:0\"", path.display())),
            "{command}: the error names the file and the key: {stderr}"
        );
        assert!(stderr.contains("http.auth = \"none\""), "{stderr}");
        assert!(
            !dir.path().join("state").exists(),
            "{command} touched the state"
        );
    }
    // An explicit "none" starts, and warns.
    write_config(&config, &path, "0.0.0.0:0", "auth = \"none\"");
    let mut service = Service::start(&path, &dir.path().join("segmenter.log"));
    let address = service.http_address();
    let port = address.rsplit(':').next().expect("a port");
    let answer = request(&format!("127.0.0.1:{port}"), "GET", "/segments", &[], None);
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(
        service.log_text().contains("without access control"),
        "{}",
        service.log_text()
    );
    service.assert_running();
}

/// Reads until the peer closes or `limit` passes; what arrived and whether it closed.
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    let deadline = Instant::now() + limit;
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while Instant::now() < deadline {
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        match stream.read(&mut buffer) {
            Ok(0) => return (String::from_utf8_lossy(&received).into_owned(), true),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (String::from_utf8_lossy(&received).into_owned(), true),
        }
    }
    (String::from_utf8_lossy(&received).into_owned(), false)
}

#[test]
fn large_bodies_get_413_and_stalled_clients_are_cut_off() {
    // No broker: the HTTP API is up before Kafka is.
    let dir = tempfile::tempdir().expect("temp dir");
    let unused = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let config = TestConfig::new(
        &unused.to_string(),
        &dir.path().join("state"),
        &["events"],
        SEGMENTS,
    );
    let path = dir.path().join("segmenter.toml");
    write_config(
        &config,
        &path,
        "127.0.0.1:0",
        "max_body_bytes = 1000\nrequest_timeout = \"2s\"",
    );
    let mut service = Service::start(&path, &dir.path().join("segmenter.log"));
    let address = service.http_address();

    // Declared too large: 413 JSON without reading it.
    let large = "x".repeat(1001);
    let answer = request(
        &address,
        "POST",
        "/segments/preview",
        &[],
        Some(("text/plain", &large)),
    );
    let message = json_error(&answer, 413, "a 1001-byte body");
    assert!(message.contains("1000"), "{message}");
    // Chunked (no length) and too large: cut at the limit, 413 JSON.
    let mut stream = TcpStream::connect(&address).expect("connect");
    let chunk = "y".repeat(600);
    let chunked = format!(
        "POST /segments/preview HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{chunk}\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len(),
        chunk.len()
    );
    stream.write_all(chunked.as_bytes()).expect("write");
    let (text, _) = read_until_closed(&mut stream, Duration::from_secs(10));
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("\"error\""), "{text}");
    // At the limit: answered (a rule of 1000 bytes that does not parse is a 400, not a 413).
    let answer = request(
        &address,
        "POST",
        "/segments/preview",
        &[],
        Some(("text/plain", &"z".repeat(1000))),
    );
    json_error(&answer, 400, "a 1000-byte body");

    // Headers sent, then the body stalls: 408 JSON and the connection closed, in ~2 s.
    let started = Instant::now();
    let mut stalled = TcpStream::connect(&address).expect("connect");
    stalled
        .write_all(
            b"POST /segments/preview HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\ncount(",
        )
        .expect("write");
    let (text, closed) = read_until_closed(&mut stalled, Duration::from_secs(15));
    let waited = started.elapsed();
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?}");
    assert!(text.contains("request_timeout"), "{text}");
    assert!(closed, "the stalled connection stays open");
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(10),
        "answered after {waited:?}"
    );
    // Headers that never end, and a connection that sends nothing: closed in ~2 s.
    for partial in [&b"GET /healthz HTTP/1.1\r\nHost: x\r\n"[..], &b""[..]] {
        let started = Instant::now();
        let mut slow = TcpStream::connect(&address).expect("connect");
        slow.write_all(partial).expect("write");
        let (_, closed) = read_until_closed(&mut slow, Duration::from_secs(15));
        assert!(
            closed,
            "a connection that sent {partial:?} is still open after 15 s"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }
    // Meanwhile the service answers others.
    assert_eq!(request(&address, "GET", "/healthz", &[], None).status, 200);
    service.assert_running();
}

#[test]
fn previews_beyond_the_concurrency_bound_get_429() {
    let broker = broker();
    let brokers = broker.bootstrap();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = TestConfig::new(&brokers, &dir.path().join("state"), &["events"], SEGMENTS);
    config.clock = "wall";
    config.batch_size = 5000;
    let path = dir.path().join("segmenter.toml");
    write_config(&config, &path, "127.0.0.1:0", "preview_concurrency = 1");
    let mut service = Service::start(&path, &dir.path().join("segmenter.log"));
    let address = service.http_address();
    // Enough stored customers that one preview takes a while to scan.
    let customers = 30_000;
    let t = wall_ms();
    let mut producer = InputProducer::new(&brokers);
    for i in 0..customers {
        let customer = format!("c-{i}");
        let payload = order(&customer, &format!("m-{i}"), t);
        producer.send("events", i % 2, Some(customer.as_bytes()), &payload, t);
    }
    producer.flush();
    wait_consumed(&address, f64::from(customers));
    // Consumed is counted as a batch is applied, a moment before its write lands: the preview
    // (read from the store) sees every customer once the last batch is committed.
    let preview = || {
        request(
            &address,
            "POST",
            "/segments/preview",
            &[],
            Some(("text/plain", r#"count("Order Completed") >= 1"#)),
        )
    };
    let single = wait_until(
        "every customer stored",
        Duration::from_secs(30),
        || {
            let answer = preview();
            (answer.status != 200 || answer.json()["customers"] == json!(customers))
                .then_some(answer)
        },
        || format!("{:?}", preview()),
    );
    assert_eq!(single.status, 200, "{single:?}");
    assert_eq!(single.json()["customers"], json!(customers), "{single:?}");
    assert_eq!(single.json()["complete"], json!(true), "{single:?}");

    // Eight previews at once, a few rounds: with one slot, some must be turned away.
    let mut statuses = Vec::new();
    let mut busy: Option<Answer> = None;
    for _ in 0..5 {
        let barrier = Arc::new(Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (barrier, address) = (barrier.clone(), address.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    request(
                        &address,
                        "POST",
                        "/segments/preview",
                        &[],
                        Some(("text/plain", r#"count("Order Completed") >= 1"#)),
                    )
                })
            })
            .collect();
        for thread in threads {
            let answer = thread.join().expect("a preview thread");
            statuses.push(answer.status);
            if answer.status == 429 {
                busy = Some(answer);
            }
        }
        if busy.is_some() {
            break;
        }
    }
    let busy = busy.unwrap_or_else(|| panic!("no preview was turned away: {statuses:?}"));
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    let message = json_error(&busy, 429, "a preview beyond the bound");
    assert!(message.contains("preview_concurrency"), "{message}");
    assert_eq!(busy.header("retry-after"), Some("1"), "{busy:?}");
    // The slot is free again afterwards.
    let after = request(
        &address,
        "POST",
        "/segments/preview",
        &[],
        Some(("text/plain", r#"count("Order Completed") >= 1"#)),
    );
    assert_eq!(after.status, 200, "{after:?}");
    service.assert_running();
}

/// A CA and a certificate for `localhost` / 127.0.0.1 signed by it: (ca, cert, key) PEM.
fn test_certificates() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "segmenter test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("server params");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("server cert");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[test]
fn https_with_a_configured_certificate_and_plain_http_fails_on_its_port() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ca, cert, key) = test_certificates();
    std::fs::write(dir.path().join("tls.crt"), &cert).expect("write cert");
    std::fs::write(dir.path().join("tls.key"), &key).expect("write key");
    let (token, line) = mint("dashboards", "read");
    let unused = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let config = TestConfig::new(
        &unused.to_string(),
        &dir.path().join("state"),
        &["events"],
        SEGMENTS,
    );
    let path = dir.path().join("segmenter.toml");
    write_config(
        &config,
        &path,
        "127.0.0.1:0",
        &format!("tls_cert = \"tls.crt\"\ntls_key = \"tls.key\"\ntokens = [\"{line}\"]"),
    );
    let mut service = Service::start(&path, &dir.path().join("segmenter.log"));
    let address = service.http_address();
    assert!(
        service.log_text().contains("https"),
        "{}",
        service.log_text()
    );

    let healthz = request_tls(&address, "localhost", &ca, "GET", "/healthz", &[])
        .unwrap_or_else(|e| panic!("HTTPS /healthz: {e}"));
    assert_eq!(healthz.status, 200, "{healthz:?}");
    assert_eq!(healthz.json(), json!({"status": "ok"}));
    let auth = bearer(&token);
    let segments = request_tls(
        &address,
        "127.0.0.1",
        &ca,
        "GET",
        "/segments",
        &[("Authorization", &auth)],
    )
    .unwrap_or_else(|e| panic!("HTTPS /segments: {e}"));
    assert_eq!(segments.status, 200, "{segments:?}");
    let refused = request_tls(&address, "localhost", &ca, "GET", "/segments", &[])
        .unwrap_or_else(|e| panic!("HTTPS /segments without a token: {e}"));
    json_error(&refused, 401, "HTTPS without a token");
    // A client that trusts another CA refuses the server's certificate.
    let (other_ca, _, _) = test_certificates();
    let error = request_tls(&address, "localhost", &other_ca, "GET", "/healthz", &[])
        .expect_err("a certificate of an unknown CA was accepted");
    assert!(error.to_lowercase().contains("certificate"), "{error}");

    // Plain HTTP on the TLS port: no HTTP answer, the connection is closed.
    let mut plain = TcpStream::connect(&address).expect("connect");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let (text, closed) = read_until_closed(&mut plain, Duration::from_secs(10));
    assert!(closed, "plain HTTP left the connection open");
    assert!(
        !text.contains("HTTP/1.1 200"),
        "plain HTTP was answered: {text:?}"
    );
    assert!(
        !text.contains("\"status\""),
        "plain HTTP was answered: {text:?}"
    );
    service.assert_running();
}

#[test]
fn the_demo_prints_a_token_that_works() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let address = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().expect("temp dir");
    let out_path = dir.path().join("demo.out");
    let out = std::fs::File::create(&out_path).expect("demo output");
    let mut demo = Command::new(SEGMENTER)
        .args([
            "demo",
            "--duration",
            "60",
            "--rate",
            "5",
            "--http",
            &address,
        ])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the demo");
    let printed = wait_until(
        "the demo to print its token",
        Duration::from_secs(60),
        || {
            let text = std::fs::read_to_string(&out_path).unwrap_or_default();
            text.lines()
                .find_map(|l| l.trim().strip_prefix("export TOKEN="))
                .map(str::to_string)
        },
        || std::fs::read_to_string(&out_path).unwrap_or_default(),
    );
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(
        text.contains("Authorization: Bearer $TOKEN"),
        "curl examples with the token: {text}"
    );
    let answer = wait_until(
        "the demo's API",
        Duration::from_secs(60),
        || {
            TcpStream::connect(&address).ok()?;
            let answer = request(
                &address,
                "GET",
                "/segments",
                &[("Authorization", &bearer(&printed))],
                None,
            );
            Some(answer)
        },
        String::new,
    );
    let refused = request(&address, "GET", "/segments", &[], None);
    let _ = demo.kill();
    let _ = demo.wait();
    assert_eq!(answer.status, 200, "{answer:?}");
    let value: Value = answer.json();
    assert!(value["segments"].as_array().is_some_and(|s| !s.is_empty()));
    json_error(&refused, 401, "the demo without the token");
}
