//! Crash safety of `segmenter run` (SPEC §6): while ~20,000 generated events are being
//! produced, the real service is killed with SIGKILL again and again in the middle of its work
//! and restarted each time. Afterwards the change topic must hold exactly the changes of an
//! uninterrupted run (`segmenter replay` per partition, the same engine offline): nothing lost,
//! duplicates only as byte-identical re-publications with the same `id`, per customer and
//! segment `seq` 1..n alternating entered/exited, per customer first publications in order,
//! every malformed input dead-lettered, and the membership topic ending at the final state.
//! The loop lives in tests/support/crash.rs; tests/soak.rs runs it with 50 kills.

#[path = "support/tansu.rs"]
mod tansu;

#[path = "support/service.rs"]
mod service;

#[path = "support/crash.rs"]
mod crash;

#[test]
fn kill_9_repeatedly_loses_nothing_and_duplicates_are_identical() {
    crash::kill_loop(&crash::KillPlan {
        events: 20_000,
        produce_rate: 800,
        min_kills: 6,
        max_kills: 10,
    });
}
