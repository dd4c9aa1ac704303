//! Rebalance handover between two `segmenter run` instances (separate state dirs, one group)
//! against a real tansu broker, while input keeps arriving: the partition taken from the first
//! instance is flushed and its offset committed before it is released, and the second instance
//! resumes exactly there — every input message is processed once, none skipped, none twice.
//!
//! Dead letters make this visible independently of per-customer state (which does not move
//! between instances yet): each malformed message yields exactly one DLQ record, whoever
//! processes it.

#[path = "support/tansu.rs"]
mod tansu;

#[path = "support/service.rs"]
mod service;

use std::collections::BTreeMap;
use std::time::Duration;

use service::{http, metric, wait_until, InputProducer, Service, TestConfig, TopicReader};

const SEGMENTS: &str = r#"
[[segment]]
id = "active"
rule = 'count(any) >= 1'
"#;

fn dead_lettered(address: &str) -> f64 {
    let (status, text) = http(address, "GET", "/metrics", None);
    assert_eq!(status, 200);
    metric(
        &text,
        "segmenter_events_consumed_total",
        &[("topic", "events"), ("outcome", "dead_lettered")],
    )
    .unwrap_or(0.0)
}

#[test]
fn a_partition_moves_to_a_new_instance_exactly_where_the_old_one_stopped() {
    let broker = tansu::Tansu::start().expect("starting the tansu broker");
    let brokers = broker.bootstrap();
    broker.create_topic("events", 2).expect("creating events");
    for topic in ["segment-changes", "segment-membership", "segmenter-dlq"] {
        broker.create_topic(topic, 2).expect("creating an output");
    }
    let dir = tempfile::Builder::new()
        .prefix("segmenter-rebalance-")
        .tempdir()
        .expect("temp dir");
    let start = |name: &str| {
        let mut config = TestConfig::new(
            &brokers,
            &dir.path().join(format!("state-{name}")),
            &["events"],
            SEGMENTS,
        );
        config.clock = "wall";
        let path = config.write(&dir.path().join(format!("{name}.toml")));
        Service::start(&path, &dir.path().join(format!("{name}.log")))
    };
    let mut producer = InputProducer::new(&brokers);
    let mut sent = 0usize;
    let mut send = |producer: &mut InputProducer, n: usize| {
        for _ in 0..n {
            let payload = format!("bad-{sent}");
            let partition = (sent % 2) as i32;
            producer.send(
                "events",
                partition,
                None,
                payload.as_bytes(),
                service::wall_ms(),
            );
            sent += 1;
        }
        producer.flush();
    };

    let mut first = start("a");
    first.wait_assigned();
    let first_address = first.http_address();
    send(&mut producer, 200);

    // The second instance joins while input keeps arriving: the first processes it right up
    // to the moment its partition is revoked.
    let mut second = start("b");
    let second_address = second.http_address();
    wait_until(
        "the second instance to get a partition",
        Duration::from_secs(60),
        || {
            send(&mut producer, 10);
            std::thread::sleep(Duration::from_millis(50));
            let (status, text) = http(&second_address, "GET", "/metrics", None);
            (status == 200
                && metric(&text, "segmenter_assigned_partitions", &[]) == Some(1.0)
                && first.log_text().contains("partition released"))
            .then_some(())
        },
        || "no partition on the second instance, or none released by the first".into(),
    );
    send(&mut producer, 200);
    let total = sent;

    let mut dlq = TopicReader::new(&brokers, "segmenter-dlq");
    wait_until(
        "every message dead-lettered",
        Duration::from_secs(60),
        || {
            dlq.poll_for(Duration::from_millis(200));
            (dlq.records.len() >= total).then_some(())
        },
        || "fewer DLQ records than messages sent".into(),
    );
    dlq.poll_for(Duration::from_secs(2));
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for record in &dlq.records {
        let payload = String::from_utf8_lossy(record.payload.as_deref().unwrap_or_default());
        *seen.entry(payload.into_owned()).or_default() += 1;
    }
    let twice: Vec<(&String, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "processed more than once: {twice:?}");
    assert_eq!(seen.len(), total, "every message processed");

    // Each instance counted what it processed; together exactly what was sent.
    let (a, b) = (
        dead_lettered(&first_address),
        dead_lettered(&second_address),
    );
    assert!(b > 0.0, "the second instance processed its partition");
    assert_eq!(a + b, total as f64, "first {a} + second {b}");
    first.assert_running();
    second.assert_running();
}
