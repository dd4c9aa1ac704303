//! The HTTP API and the metrics of `segmenter run` (the real binary) against a real tansu
//! broker: after known traffic, `/metrics` counts exactly what was sent and its member gauges
//! match the change stream (also after a restart); every route answers, including paging,
//! preview, explain and erasure (with its exits and tombstones on Kafka), and bad requests get
//! a 4xx with a JSON error.

#[path = "support/tansu.rs"]
mod tansu;

#[path = "support/service.rs"]
mod service;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{json, Value};

use service::{
    get_json, http, metric, rfc3339, wait_until, wall_ms, ChangeJson, InputProducer, Service,
    TestConfig, TopicReader,
};

const SEGMENTS: &str = r#"
[[segment]]
id = "buyer"
rule = 'count("Order Completed") >= 1'

[[segment]]
id = "recent_buyer"
rule = 'count("Order Completed", 1h) >= 1'

[[segment]]
id = "browser"
rule = 'count("Product Viewed") >= 2'

[[segment]]
id = "vip"
rule = 'in_segment("buyer") and trait.plan == "gold"'
"#;

const OUTPUTS: [&str; 3] = ["segment-changes", "segment-membership", "segmenter-dlq"];

fn track(customer: &str, event: &str, message_id: &str, at: i64) -> Value {
    json!({"type": "track", "event": event, "userId": customer, "messageId": message_id,
           "timestamp": rfc3339(at)})
}

fn scrape(address: &str) -> String {
    let (status, text) = http(address, "GET", "/metrics", None);
    assert_eq!(status, 200, "GET /metrics: {text}");
    text
}

fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(text, name, labels).unwrap_or_else(|| {
        let related: Vec<&str> = text.lines().filter(|l| l.starts_with(name)).collect();
        panic!("no sample {name}{labels:?} in /metrics; {name} samples: {related:#?}")
    })
}

fn members_gauges(text: &str) -> BTreeMap<String, f64> {
    ["buyer", "recent_buyer", "browser", "vip"]
        .iter()
        .map(|s| {
            (
                s.to_string(),
                value(text, "segmenter_segment_members", &[("segment", s)]),
            )
        })
        .collect()
}

/// Durable timers over both partitions.
fn timers_pending(text: &str) -> f64 {
    ["0", "1"]
        .iter()
        .map(|p| value(text, "segmenter_timers_pending", &[("partition", p)]))
        .sum()
}

/// Every member of `buyer`, from one page of `/segments/buyer/members`.
fn buyers_listed(address: &str) -> Vec<String> {
    let page = get_json(address, "/segments/buyer/members?limit=100", 200);
    page["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m.s("customer_id").to_string())
        .collect()
}

fn error_of(status_and_body: (u16, String), expect: u16) -> String {
    let (status, body) = status_and_body;
    assert_eq!(status, expect, "{body}");
    let json: Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("error body not JSON ({e}): {body}"));
    json["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no 'error' string in {json}"))
        .to_string()
}

fn wait_ready(address: &str) {
    wait_until(
        "/readyz to answer 200",
        Duration::from_secs(60),
        || (http(address, "GET", "/readyz", None).0 == 200).then_some(()),
        || format!("{:?}", http(address, "GET", "/readyz", None)),
    );
}

#[test]
fn unready_until_assigned_and_alive_meanwhile() {
    // No broker at all: the service waits for Kafka; liveness yes, readiness no, metrics served.
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
    let path = config.write(&dir.path().join("segmenter.toml"));
    let mut service = Service::start(&path, &dir.path().join("segmenter.log"));
    let address = service.http_address();
    assert_eq!(get_json(&address, "/healthz", 200), json!({"status": "ok"}));
    let ready = get_json(&address, "/readyz", 503);
    assert_eq!(ready["ready"], json!(false));
    assert!(
        ready["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("assignment"),
        "{ready}"
    );
    let text = scrape(&address);
    assert_eq!(value(&text, "segmenter_ready", &[]), 0.0);
    assert_eq!(value(&text, "segmenter_assigned_partitions", &[]), 0.0);
    assert_eq!(
        value(&text, "segmenter_segment_members", &[("segment", "buyer")]),
        0.0
    );
    service.assert_running();
}

#[test]
fn metrics_and_every_route_after_known_traffic_including_erasure_and_restart() {
    let broker = tansu::Tansu::start().expect("starting the tansu broker");
    let brokers = broker.bootstrap();
    broker.create_topic("events", 2).expect("creating events");
    for topic in OUTPUTS {
        broker.create_topic(topic, 2).expect("creating an output");
    }
    let dir = tempfile::Builder::new()
        .prefix("segmenter-http-")
        .tempdir()
        .expect("temp dir");
    let mut config = TestConfig::new(&brokers, &dir.path().join("state"), &["events"], SEGMENTS);
    config.clock = "wall";
    config
        .consumer
        .insert("statistics.interval.ms".into(), "500".into());
    let path = config.write(&dir.path().join("segmenter.toml"));
    let log = dir.path().join("segmenter.log");
    let mut service = Service::start(&path, &log);
    let address = service.http_address();
    wait_ready(&address);

    // Known traffic: 10 buyers (3 of them gold), 10 viewers (5 view twice), one duplicate,
    // three bad messages.
    let t = wall_ms();
    let mut producer = InputProducer::new(&brokers);
    let mut send = |i: usize, customer: &str, payload: &[u8]| {
        producer.send(
            "events",
            (i % 2) as i32,
            Some(customer.as_bytes()),
            payload,
            t,
        );
    };
    for i in 0..10 {
        let customer = format!("b-{i}");
        if i < 3 {
            let identify = json!({"type": "identify", "userId": customer,
                                  "messageId": format!("id-{i}"), "traits": {"plan": "gold"},
                                  "timestamp": rfc3339(t)});
            send(i, &customer, identify.to_string().as_bytes());
        }
        let order = track(&customer, "Order Completed", &format!("o-{i}"), t);
        send(i, &customer, order.to_string().as_bytes());
        if i == 0 {
            send(i, &customer, order.to_string().as_bytes()); // the duplicate
        }
    }
    for i in 0..10 {
        let customer = format!("v-{i}");
        let views = if i < 5 { 2 } else { 1 };
        for n in 0..views {
            let view = track(&customer, "Product Viewed", &format!("pv-{i}-{n}"), t);
            send(i, &customer, view.to_string().as_bytes());
        }
    }
    send(0, "x", b"not json {");
    send(
        1,
        "x",
        json!({"type": "track", "event": "e", "timestamp": rfc3339(t)})
            .to_string()
            .as_bytes(),
    );
    send(
        0,
        "x",
        json!({"type": "track", "event": "e", "userId": "x", "timestamp": "yesterday"})
            .to_string()
            .as_bytes(),
    );
    producer.flush();
    let (ok, duplicates, dead) = (28.0, 1.0, 3.0);
    let expected_changes = 28;

    let text = wait_until(
        "every input consumed and every change published",
        Duration::from_secs(60),
        || {
            let text = scrape(&address);
            let consumed: f64 = ["ok", "duplicate", "dead_lettered"]
                .iter()
                .filter_map(|o| {
                    metric(
                        &text,
                        "segmenter_events_consumed_total",
                        &[("topic", "events"), ("outcome", o)],
                    )
                })
                .sum();
            let published = metric(&text, "segmenter_published_total", &[("output", "changes")]);
            (consumed == ok + duplicates + dead && published == Some(expected_changes as f64))
                .then_some(text)
        },
        || {
            scrape(&address)
                .lines()
                .filter(|l| {
                    l.starts_with("segmenter_events") || l.starts_with("segmenter_published")
                })
                .collect::<Vec<_>>()
                .join("\n")
        },
    );
    let mut changes = TopicReader::new(&brokers, "segment-changes");
    changes.read_to_end();
    let stream: Vec<Value> = changes.records.iter().map(|r| r.json()).collect();
    assert_eq!(stream.len(), expected_changes, "{stream:#?}");

    // Counts match what was sent.
    let consumed = |outcome: &str| {
        value(
            &text,
            "segmenter_events_consumed_total",
            &[("topic", "events"), ("outcome", outcome)],
        )
    };
    assert_eq!(consumed("ok"), ok);
    assert_eq!(consumed("duplicate"), duplicates);
    assert_eq!(consumed("dead_lettered"), dead);
    for reason in ["not_json", "no_customer_id", "bad_timestamp"] {
        assert_eq!(
            value(&text, "segmenter_dead_letters_total", &[("reason", reason)]),
            1.0,
            "{reason}"
        );
    }
    assert_eq!(
        value(&text, "segmenter_published_total", &[("output", "dlq")]),
        3.0
    );
    assert_eq!(
        value(
            &text,
            "segmenter_published_total",
            &[("output", "membership")]
        ),
        expected_changes as f64
    );
    // Member gauges and change counters match the change stream.
    let mut from_stream: BTreeMap<String, f64> = BTreeMap::new();
    for change in &stream {
        let delta = if change.s("change") == "entered" {
            1.0
        } else {
            -1.0
        };
        *from_stream
            .entry(change.s("segment").to_string())
            .or_default() += delta;
        let counter = value(
            &text,
            "segmenter_segment_changes_total",
            &[
                ("segment", change.s("segment")),
                ("change", change.s("change")),
            ],
        );
        let in_stream = stream
            .iter()
            .filter(|c| {
                c.s("segment") == change.s("segment") && c.s("change") == change.s("change")
            })
            .count();
        assert_eq!(counter, in_stream as f64, "{change}");
    }
    let expected_members: BTreeMap<String, f64> = [
        ("browser", 5.0),
        ("buyer", 10.0),
        ("recent_buyer", 10.0),
        ("vip", 3.0),
    ]
    .iter()
    .map(|(s, n)| (s.to_string(), *n))
    .collect();
    assert_eq!(from_stream, expected_members);
    assert_eq!(members_gauges(&text), expected_members);
    assert_eq!(
        value(
            &text,
            "segmenter_event_to_publish_seconds_count",
            &[("cause", "event")]
        ),
        expected_changes as f64
    );
    let timers = timers_pending(&text);
    assert_eq!(timers, 10.0, "one window timer per recent buyer");
    assert_eq!(value(&text, "segmenter_assigned_partitions", &[]), 2.0);
    assert_eq!(value(&text, "segmenter_ready", &[]), 1.0);
    assert!(value(&text, "segmenter_batch_processing_seconds_count", &[]) > 0.0);
    assert!(
        value(
            &text,
            "segmenter_rocksdb",
            &[("property", "estimated_keys")]
        ) > 0.0
    );
    assert_eq!(
        value(&text, "segmenter_rebalances_total", &[("kind", "assigned")]),
        1.0
    );
    let segments = get_json(&address, "/segments", 200);
    let version = segments["definitions_version"].as_str().expect("version");
    assert_eq!(
        value(
            &text,
            "segmenter_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("segments_version", version)
            ]
        ),
        1.0
    );
    // Consumer lag from librdkafka statistics reaches 0 once offsets are committed.
    wait_until(
        "consumer lag 0 on both partitions",
        Duration::from_secs(30),
        || {
            let text = scrape(&address);
            let lags: Vec<Option<f64>> = ["0", "1"]
                .iter()
                .map(|p| {
                    metric(
                        &text,
                        "segmenter_consumer_lag",
                        &[("topic", "events"), ("partition", p)],
                    )
                })
                .collect();
            (lags == vec![Some(0.0), Some(0.0)]).then_some(())
        },
        || {
            scrape(&address)
                .lines()
                .filter(|l| l.starts_with("segmenter_consumer_lag"))
                .collect::<Vec<_>>()
                .join("\n")
        },
    );

    // GET /segments: definitions with member counts.
    let listed: BTreeMap<String, f64> = segments["segments"]
        .as_array()
        .expect("segments array")
        .iter()
        .map(|s| {
            (
                s.s("id").to_string(),
                s["members"].as_f64().expect("members"),
            )
        })
        .collect();
    assert_eq!(listed, expected_members);

    // Paged members, in customer-id order, across both partitions.
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..10 {
        let path = match &after {
            Some(a) => format!("/segments/buyer/members?limit=3&after={a}"),
            None => "/segments/buyer/members?limit=3".to_string(),
        };
        let page = get_json(&address, &path, 200);
        for member in page["members"].as_array().expect("members") {
            assert!(member.s("since").ends_with('Z'), "{member}");
            paged.push(member.s("customer_id").to_string());
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
    }
    let buyers: Vec<String> = (0..10).map(|i| format!("b-{i}")).collect();
    assert_eq!(paged, buyers, "every buyer once, in order");
    for bad in ["limit=0", "limit=abc", "limit=5000", "page=2"] {
        error_of(
            http(
                &address,
                "GET",
                &format!("/segments/buyer/members?{bad}"),
                None,
            ),
            400,
        );
    }
    error_of(http(&address, "GET", "/segments/nope/members", None), 404);

    // A customer: segments with since, and the behavioural state.
    let b0 = get_json(&address, "/customers/b-0", 200);
    let in_segments: BTreeSet<&str> = b0["segments"]
        .as_array()
        .expect("segments")
        .iter()
        .map(|s| s.s("segment"))
        .collect();
    assert_eq!(
        in_segments,
        BTreeSet::from(["buyer", "recent_buyer", "vip"])
    );
    assert_eq!(b0["state"]["traits"]["plan"], json!("gold"));
    assert!(
        b0["state"]["totals"]
            .as_array()
            .expect("totals")
            .iter()
            .any(|t| t["count"] == json!(1)),
        "{b0}"
    );
    error_of(http(&address, "GET", "/customers/nobody", None), 404);

    // Explanations.
    let why_not = get_json(&address, "/customers/v-5/explain?segment=browser", 200);
    assert_eq!(why_not["member"], json!(false));
    assert_eq!(why_not["rule_holds"], json!(false));
    assert_eq!(
        why_not["rule"]["parts"][0]["text"],
        json!(r#"count("Product Viewed")"#)
    );
    assert_eq!(why_not["rule"]["parts"][0]["value"], json!(1.0));
    assert_eq!(
        why_not["next_change"],
        Value::Null,
        "only an event can change it"
    );
    let why = get_json(&address, "/customers/b-1/explain?segment=recent_buyer", 200);
    assert_eq!(why["member"], json!(true));
    assert_eq!(why["rule_holds"], json!(true));
    assert_eq!(
        why["next_change"],
        json!(rfc3339(t + 3_600_000)),
        "the order leaves the 1 h window"
    );
    error_of(http(&address, "GET", "/customers/b-1/explain", None), 400);
    error_of(
        http(&address, "GET", "/customers/b-1/explain?segment=nope", None),
        404,
    );
    error_of(
        http(
            &address,
            "GET",
            "/customers/nobody/explain?segment=buyer",
            None,
        ),
        404,
    );

    // Preview: counts now, changes nothing.
    let (status, body) = http(
        &address,
        "POST",
        "/segments/preview",
        Some(("text/plain", r#"count("Order Completed") >= 1"#)),
    );
    assert_eq!(status, 200, "{body}");
    let preview: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(preview["members"], json!(10));
    assert_eq!(
        preview["customers"],
        json!(20),
        "bad messages create no customer"
    );
    assert_eq!(preview["sample"].as_array().map(Vec::len), Some(10));
    let body = json!({"rule": r#"count("Product Viewed") >= 2"#, "sample": 2}).to_string();
    let (status, body) = http(
        &address,
        "POST",
        "/segments/preview",
        Some(("application/json", &body)),
    );
    assert_eq!(status, 200, "{body}");
    let preview: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(preview["members"], json!(5));
    let sample: Vec<&str> = preview["sample"]
        .as_array()
        .expect("sample")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(sample.len(), 2);
    assert!(
        sample
            .iter()
            .all(|c| ["v-0", "v-1", "v-2", "v-3", "v-4"].contains(c)),
        "{sample:?}"
    );
    let invalid = error_of(
        http(
            &address,
            "POST",
            "/segments/preview",
            Some(("text/plain", "count(\"x\" >= 1")),
        ),
        400,
    );
    assert!(invalid.contains("1:"), "position in {invalid}");
    let unkept = error_of(
        http(
            &address,
            "POST",
            "/segments/preview",
            Some(("text/plain", r#"count("Email Opened") >= 1"#)),
        ),
        422,
    );
    assert!(unkept.contains("Email Opened"), "{unkept}");
    // An empty rule, a JSON body whose rule is not a string, a body that is not JSON.
    for body in [
        ("text/plain", "  "),
        ("application/json", "{\"rule\": 3}"),
        ("application/json", "{not json"),
    ] {
        error_of(http(&address, "POST", "/segments/preview", Some(body)), 400);
    }
    assert_eq!(
        members_gauges(&scrape(&address)),
        expected_members,
        "preview changed nothing"
    );

    // Erasure: exits with cause deleted, tombstones, state gone.
    let erased = get_json(&address, "/customers/b-0", 200);
    assert_eq!(erased["customer_id"], json!("b-0"));
    let (status, body) = http(&address, "DELETE", "/customers/b-0", None);
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(answer["exited"], json!(["buyer", "recent_buyer", "vip"]));
    error_of(http(&address, "GET", "/customers/b-0", None), 404);
    error_of(http(&address, "DELETE", "/customers/b-0", None), 404);
    wait_until(
        "the erasure's exits on the change topic",
        Duration::from_secs(30),
        || {
            changes.poll_for(Duration::from_millis(200));
            (changes.records.len() >= expected_changes + 3).then_some(())
        },
        || "fewer than 3 new change records".to_string(),
    );
    let exits: Vec<Value> = changes.records[expected_changes..]
        .iter()
        .map(|r| r.json())
        .collect();
    let exit_rows: BTreeSet<(String, String, String, u64)> = exits
        .iter()
        .map(|c| {
            (
                c.s("customer_id").to_string(),
                c.s("segment").to_string(),
                format!("{}/{}", c.s("change"), c.s("cause")),
                c.seq(),
            )
        })
        .collect();
    let expected_exits: BTreeSet<(String, String, String, u64)> = ["buyer", "recent_buyer", "vip"]
        .iter()
        .map(|s| {
            (
                "b-0".to_string(),
                s.to_string(),
                "exited/deleted".to_string(),
                2,
            )
        })
        .collect();
    assert_eq!(exit_rows, expected_exits);
    let mut membership = TopicReader::new(&brokers, "segment-membership");
    membership.read_to_end();
    let mut latest: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    for record in &membership.records {
        latest.insert(record.key_str(), record.payload.clone());
    }
    for segment in ["buyer", "recent_buyer", "vip"] {
        assert_eq!(
            latest.get(&format!("b-0/{segment}")),
            Some(&None),
            "tombstone for {segment}"
        );
    }
    assert!(matches!(latest.get("b-1/buyer"), Some(Some(_))));
    let after_erasure: BTreeMap<String, f64> = [
        ("browser", 5.0),
        ("buyer", 9.0),
        ("recent_buyer", 9.0),
        ("vip", 2.0),
    ]
    .iter()
    .map(|(s, n)| (s.to_string(), *n))
    .collect();
    let text = wait_until(
        "the erasure's records acknowledged",
        Duration::from_secs(30),
        || {
            let text = scrape(&address);
            (metric(
                &text,
                "segmenter_event_to_publish_seconds_count",
                &[("cause", "deleted")],
            ) == Some(3.0))
            .then_some(text)
        },
        || "no".into(),
    );
    assert_eq!(members_gauges(&text), after_erasure);
    assert_eq!(
        value(
            &text,
            "segmenter_segment_changes_total",
            &[("segment", "buyer"), ("change", "exited")]
        ),
        1.0
    );
    let timers = timers_pending(&text);
    assert_eq!(timers, 9.0, "the erased customer's timer is gone");
    let listed = buyers_listed(&address);
    assert_eq!(listed.len(), 9);
    assert!(!listed.contains(&"b-0".to_string()));

    // Routes and methods that do not exist; undecodable paths and query strings.
    error_of(http(&address, "GET", "/nope", None), 404);
    error_of(http(&address, "GET", "/customers/%FF%FE", None), 400);
    error_of(
        http(&address, "GET", "/segments/buyer/members?limit=%FF", None),
        400,
    );
    error_of(http(&address, "PUT", "/segments", None), 405);

    // Member gauges are exact after a restart, before any new traffic — also when the
    // definitions changed (a segment added), which rebuilds the members index from the states.
    service.sigterm();
    assert!(
        service
            .wait_exit(Duration::from_secs(30))
            .is_some_and(|s| s.success()),
        "clean exit"
    );
    let mut service = Service::start(&path, &log);
    let address = service.http_address();
    wait_ready(&address);
    let text = scrape(&address);
    assert_eq!(members_gauges(&text), after_erasure, "after restart");
    assert!(
        !service.log_text().contains("members counted by scanning"),
        "the counts were stored with the index, not recounted"
    );
    assert_eq!(value(&text, "segmenter_assigned_partitions", &[]), 2.0);
    let segments = get_json(&address, "/segments", 200);
    assert_eq!(segments["segments"][1]["members"], json!(9), "{segments}");
    service.sigterm();
    assert!(
        service
            .wait_exit(Duration::from_secs(30))
            .is_some_and(|s| s.success()),
        "clean exit"
    );
    config.segments = format!(
        "{SEGMENTS}\n[[segment]]\nid = \"reader\"\nrule = 'count(\"Email Opened\") >= 1'\n"
    );
    let changed = config.write(&dir.path().join("segmenter-changed.toml"));
    let mut service = Service::start(&changed, &log);
    let address = service.http_address();
    wait_ready(&address);
    assert!(
        service.log_text().contains("members index rebuilt"),
        "new definitions rebuild the index"
    );
    let text = scrape(&address);
    assert_eq!(
        members_gauges(&text),
        after_erasure,
        "after a definitions change"
    );
    assert_eq!(
        value(&text, "segmenter_segment_members", &[("segment", "reader")]),
        0.0
    );
    let rebuilt = buyers_listed(&address);
    assert_eq!(rebuilt, listed, "the rebuilt index pages the same members");
    service.assert_running();
}
