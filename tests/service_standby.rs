//! Standby replicas (`state.standby_replicas`, SPEC §6; issue 11 item 3) against the real
//! binary on a real tansu broker: two instances, each with its own RocksDB state dir, share 12
//! input partitions; with `standby_replicas = 1` each keeps a warm copy of the partitions the
//! other owns by following their changelog. When an owner dies (kill -9), the survivor takes
//! its partitions over from those copies and reads only the changelog tail they lacked, not
//! the partitions' whole state. Afterwards the change topic, de-duplicated by `id`, must equal
//! `segmenter replay` of the same input, change for change, with `seq` continuous.

#[path = "support/tansu.rs"]
mod tansu;

#[path = "support/service.rs"]
mod service;

#[path = "support/scaleout.rs"]
mod scaleout;

use std::thread;
use std::time::{Duration, Instant};

use scaleout::{Cluster, Plan, SETTLE};

const RESTORED: &str = "segmenter_restore_records_total";

/// Waits until instance `name` has logged that its standby follows every partition of
/// `partitions`, then two more standby rounds (its copies have caught up).
fn wait_following(cluster: &Cluster, name: &str, partitions: &std::collections::BTreeSet<i32>) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let log = cluster.log(name);
        let missing: Vec<i32> = partitions
            .iter()
            .copied()
            .filter(|p| {
                !log.lines().any(|line| {
                    line.contains("standby: following the changelog")
                        && line.contains(&format!("partition={p} "))
                })
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name}'s standby does not follow partitions {missing:?} within {SETTLE:?}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    thread::sleep(Duration::from_secs(2));
}

/// The survivor of a kill -9 takes the dead owner's partitions over from its standby copies:
/// its restores read a tail, far less than the ballast state those partitions hold (which a
/// restore without a standby reads whole, `service_scaleout.rs`). The killed instance then
/// comes back on its own state dir and takes partitions back from copies of its own standby.
#[test]
fn a_standby_copy_takes_over_from_a_killed_owner_with_a_tail_restore() {
    let mut cluster = Cluster::new(Plan {
        name: "standby-kill9".into(),
        customers: 1_500,
        events: 24_000,
        seed: 31,
        produce_rate: 1_000,
        ballast_customers: 24_000,
        session_timeout_ms: 2_000,
    });
    cluster.add_state("standby_replicas = 1\n");
    let a = cluster.start_fresh();
    let b = cluster.start_fresh();
    cluster.wait_balanced(SETTLE);
    cluster.start_input();
    cluster.wait_ballast_committed();
    cluster.wait_produced(0.3);

    let victim = cluster.owned(&a);
    assert!(!victim.is_empty(), "{a} owns no partition");
    wait_following(&cluster, &b, &victim);
    let before = cluster.series(&b, RESTORED);
    let continued = |cluster: &Cluster| {
        cluster
            .log(&b)
            .matches("continuing an interrupted restore")
            .count()
    };
    let continued_before = continued(&cluster);
    cluster.kill9(&a, false);
    cluster.wait_balanced(SETTLE);
    let read = cluster.series(&b, RESTORED) - before;
    let whole = cluster.ballast_on(&victim) as f64;
    cluster.note(format!(
        "{b} took over partitions {victim:?}: {read} changelog records read; they hold \
         {whole} ballast customers"
    ));
    if read >= whole / 4.0 {
        let kept = cluster.keep_dir();
        panic!(
            "the takeover read {read} changelog records for partitions {victim:?}, which hold \
             {whole} ballast customers: the standby copies were not used (logs in {})",
            kept.display()
        );
    }
    // Each copy is a restore kept open: the takeover continues it (`restore::bring_up_to_date`).
    let taken_over = continued(&cluster) - continued_before;
    if taken_over < victim.len() {
        let kept = cluster.keep_dir();
        panic!(
            "{b} continued {taken_over} standby copies for the {} partitions it took over (logs \
             in {})",
            victim.len(),
            kept.display()
        );
    }

    cluster.wait_produced(0.6);
    cluster.restart(&a);
    cluster.wait_balanced(SETTLE);
    assert!(
        cluster.input_running(),
        "the input ended before the last move; make it longer"
    );
    cluster.settle();
    cluster.verify("standby takeover after kill -9, then the owner back");
}
