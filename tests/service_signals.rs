//! Shutdown of `segmenter run` while Kafka cannot take its output: the first SIGTERM drains for
//! at most `engine.shutdown_timeout` and exits 0 (what is unpublished stays in the outbox), a
//! second signal ends the process at once.
//!
//! To have unpublished records at shutdown, the service runs on the wall clock with a
//! `since(last(any)) >= 5s` segment: after one event the broker is stopped, and the timer fires
//! 5 s after the event with nowhere to publish.

#[path = "support/tansu.rs"]
mod tansu;

#[path = "support/service.rs"]
mod service;

use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use service::{rfc3339, wall_ms, InputProducer, Service, TestConfig};

const SEGMENTS: &str = r#"
[[segment]]
id = "quiet"
rule = 'since(last(any)) >= 5s'
"#;

/// A running service whose broker is gone and whose outbox holds a timer's change.
fn service_with_unpublished_output(shutdown_timeout: &'static str) -> (Service, tempfile::TempDir) {
    let mut broker = tansu::Tansu::start().expect("starting the tansu broker");
    let brokers = broker.bootstrap();
    broker
        .create_topic("events", 1)
        .expect("creating the input topic");
    let dir = tempfile::Builder::new()
        .prefix("segmenter-signals-")
        .tempdir()
        .expect("creating a temp dir");
    let mut config = TestConfig::new(&brokers, &dir.path().join("state"), &["events"], SEGMENTS);
    config.clock = "wall";
    config.shutdown_timeout = shutdown_timeout;
    let config_path = config.write(&dir.path().join("segmenter.toml"));
    let mut service = Service::start(&config_path, &dir.path().join("segmenter.log"));
    service.wait_assigned();

    let t = wall_ms();
    let event = json!({"type":"page","userId":"s-1","messageId":"s-m-1","timestamp":rfc3339(t)});
    let mut producer = InputProducer::new(&brokers);
    producer.send("events", 0, Some(b"s-1"), event.to_string().as_bytes(), t);
    producer.flush();
    // Applied once its offset is committed to the group (about once a second).
    service::wait_committed(&brokers, &config.group_id, &["events"], &mut service);
    assert!(
        wall_ms() < t + 4_500,
        "the event took too long to be committed: the broker must be gone before the timer fires"
    );
    broker.stop();
    // The timer (event time + 5 s) fires with the broker gone.
    thread::sleep(Duration::from_millis(
        (t + 6_000 - wall_ms()).clamp(0, 6_000) as u64,
    ));
    service.assert_running();
    (service, dir)
}

/// Before the fix this exited after ~14.6 s with `shutdown_timeout = "3s"`: the drain stopped at
/// the deadline, then `app::run` committed offsets synchronously and closed the consumer with no
/// broker (~6.5 s) and flushed the producer for a full 5 s — for records that are safe in the
/// outbox anyway. Now the commit is asynchronous and the close and flush share the deadline.
#[test]
fn first_sigterm_drains_within_the_shutdown_timeout_with_kafka_gone() {
    let (mut service, _dir) = service_with_unpublished_output("3s");
    let asked = Instant::now();
    service.sigterm();
    let status = service
        .wait_exit(Duration::from_secs(8))
        .unwrap_or_else(|| {
            panic!(
                "no exit within 8 s of SIGTERM (shutdown_timeout 3 s); log:\n{}",
                service.log_tail()
            )
        });
    let took = asked.elapsed();
    assert!(
        status.success(),
        "exit status {status} after SIGTERM; log:\n{}",
        service.log_tail()
    );
    assert!(
        service
            .log_text()
            .contains("stopping with unpublished records; they stay in the outbox"),
        "the drain should have given up on the unpublished timer change; log:\n{}",
        service.log_tail()
    );
    eprintln!(
        "SIGTERM with Kafka gone: exit 0 after {:.2} s (shutdown_timeout 3 s)",
        took.as_secs_f64()
    );
}

#[test]
fn second_signal_exits_at_once() {
    let (mut service, _dir) = service_with_unpublished_output("60s");
    service.sigterm();
    thread::sleep(Duration::from_secs(1));
    assert!(
        service.try_status().is_none(),
        "the first SIGTERM should still be draining (Kafka is gone, shutdown_timeout 60 s)"
    );
    service.wait_for_log("signal received", Duration::from_secs(5));
    let asked = Instant::now();
    service.signal("INT");
    let status = service
        .wait_exit(Duration::from_secs(3))
        .unwrap_or_else(|| {
            panic!(
                "no exit within 3 s of the second signal; log:\n{}",
                service.log_tail()
            )
        });
    assert!(
        !status.success(),
        "a forced exit should not report success: {status}"
    );
    eprintln!(
        "second signal: exited ({status}) after {:.2} s",
        asked.elapsed().as_secs_f64()
    );
}
