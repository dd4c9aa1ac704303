//! State that follows its partition (SPEC §1, §6; issue 11), against the real binary: several
//! `segmenter run` instances, each with its own RocksDB state dir, share one consumer group over
//! 12 input partitions of a real tansu broker while a producer thread keeps input flowing.
//! Partitions move between them (instances join, leave with SIGTERM, die with kill -9, lose
//! their state dir, a rebalance lands in the middle of a restore). The segments depend on
//! history and time (windows, inactivity timers, event clock), so a new owner that starts a
//! partition with empty state publishes wrong changes. Afterwards the change topic, de-duplicated
//! by `id`, must equal `segmenter replay` of the same input per partition, change for change,
//! with `seq` 1..n alternating per customer and segment. A failure lists what is missing, extra
//! or different per partition, with the partition's owners in turn and the moves made.
//!
//! Each instance's config has `[state] changelog_topic = "segmenter-changelog-<test>"` when the
//! binary accepts the key (`segmenter check`); the harness is tests/support/scaleout.rs.

#[path = "support/tansu.rs"]
mod tansu;

#[path = "support/service.rs"]
mod service;

#[path = "support/scaleout.rs"]
mod scaleout;

use std::time::Duration;

use scaleout::{Cluster, Plan, SETTLE};

/// Ballast customers of the restore test (env `SCALEOUT_RESTORE_CUSTOMERS`): state a new owner
/// has to restore (no changes of their own), so that its restore takes a while; the test freezes
/// it in the middle of it (`Cluster::interrupt_restore`), so it need not take long.
fn restore_customers() -> u64 {
    std::env::var("SCALEOUT_RESTORE_CUSTOMERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000)
}

/// The harness's own control: one instance that keeps its state dir (SIGTERM and kill -9, each
/// followed by a restart on the same dir) moves no state between instances, so this passes on
/// any build that survives restarts; if it fails, suspect the harness before the service.
#[test]
fn control_one_instance_restarted_on_its_own_state_dir() {
    let mut cluster = Cluster::new(Plan {
        name: "control".into(),
        customers: 1_500,
        events: 15_000,
        seed: 10,
        produce_rate: 1_500,
        ballast_customers: 0,
        session_timeout_ms: 2_000,
    });
    let a = cluster.start_fresh();
    cluster.wait_balanced(SETTLE);
    cluster.start_input();
    cluster.wait_produced(0.3);
    cluster.stop(&a);
    cluster.restart(&a);
    cluster.wait_balanced(SETTLE);
    cluster.wait_produced(0.6);
    cluster.kill9(&a, false);
    cluster.restart(&a);
    cluster.wait_balanced(SETTLE);
    cluster.settle();
    cluster.verify("one instance, restarted on its own state dir");
}

#[test]
fn scale_1_3_2_1_keeps_every_transition() {
    let mut cluster = Cluster::new(Plan {
        name: "scale-1-3-2-1".into(),
        customers: 1_500,
        events: 30_000,
        seed: 11,
        produce_rate: 1_000,
        ballast_customers: 0,
        session_timeout_ms: 2_000,
    });
    let a = cluster.start_fresh();
    cluster.wait_balanced(SETTLE);
    cluster.start_input();
    cluster.wait_produced(0.15);

    // 1 → 3: two instances join with empty state dirs and take partitions a has history for.
    cluster.start_fresh();
    cluster.start_fresh();
    cluster.wait_balanced(SETTLE);
    cluster.wait_produced(0.45);

    // 3 → 2: the original owner leaves (planned); its partitions go to instances that never
    // had them.
    cluster.stop(&a);
    cluster.wait_balanced(SETTLE);
    cluster.wait_produced(0.7);

    // 2 → 1.
    let second = cluster.live()[0].clone();
    cluster.stop(&second);
    cluster.wait_balanced(SETTLE);
    assert!(
        cluster.input_running(),
        "the input ended before the last move; make it longer"
    );

    cluster.settle();
    cluster.verify("scale 1 → 3 → 2 → 1");
}

#[test]
fn kill9_and_lost_state_dir_restores_from_the_changelog() {
    let mut cluster = Cluster::new(Plan {
        name: "kill9-lost-dir".into(),
        customers: 1_500,
        events: 24_000,
        seed: 12,
        produce_rate: 1_000,
        ballast_customers: 0,
        session_timeout_ms: 2_000,
    });
    // Both are in the group before any input, so the survivor has no local copy of the
    // victim's partitions.
    cluster.start_fresh();
    let b = cluster.start_fresh();
    cluster.wait_balanced(SETTLE);
    cluster.start_input();
    cluster.wait_produced(0.3);

    // Unplanned: b dies and its volume is gone; a takes its partitions after the session
    // timeout.
    cluster.kill9(&b, true);
    cluster.wait_balanced(SETTLE);
    cluster.wait_produced(0.6);

    // b comes back on an empty state dir (a rescheduled pod with a new volume) and takes
    // partitions back from a.
    cluster.restart(&b);
    cluster.wait_balanced(SETTLE);
    assert!(
        cluster.input_running(),
        "the input ended before the last move; make it longer"
    );

    cluster.settle();
    cluster.verify("kill -9 and a lost state dir");
}

#[test]
fn rebalance_during_a_restore() {
    let mut cluster = Cluster::new(Plan {
        name: "restore-rebalance".into(),
        customers: 1_500,
        events: 30_000,
        seed: 13,
        produce_rate: 1_000,
        ballast_customers: restore_customers(),
        // Longer than the freezes below (at most ~3 s plus a heartbeat) with room to spare.
        session_timeout_ms: 6_000,
    });
    cluster.start_fresh();
    let c = cluster.start_fresh();
    cluster.wait_balanced(SETTLE);
    cluster.start_input();
    cluster.wait_ballast_committed();
    cluster.wait_produced(0.15);

    // A new instance restores its share; a member leaves (SIGTERM) in the middle of it.
    let b = cluster.start_fresh();
    let first = cluster.interrupt_restore(&b, Duration::from_millis(500), |cluster| {
        cluster.begin_stop(&c);
        cluster.await_stopping(Duration::from_millis(2_500));
    });
    cluster.reap();
    cluster.wait_balanced(SETTLE);
    cluster.wait_produced(0.45);

    // Another new instance restores; one more joins in the middle of it.
    let d = cluster.start_fresh();
    let second = cluster.interrupt_restore(&d, Duration::from_millis(1_500), |cluster| {
        cluster.start_fresh();
    });
    cluster.wait_balanced(SETTLE);
    assert!(
        cluster.input_running(),
        "the input ended before the last move; make it longer"
    );

    cluster.settle();
    cluster.verify("rebalances during restores");
    assert!(
        first.interrupted() || second.interrupted(),
        "neither move reached an instance while it was restoring, so this test proved nothing \
         about a rebalance during a restore ({}; {}): raise SCALEOUT_RESTORE_CUSTOMERS (now {})",
        first.describe(&b),
        second.describe(&d),
        restore_customers()
    );
}
