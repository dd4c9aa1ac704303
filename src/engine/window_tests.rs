//! Timers read from the store a window at a time (`timers.rs`): an engine with a window of a
//! few timers decides exactly what one holding them all does, and holds only its window.

use std::sync::Arc;

use proptest::prelude::*;
use serde_json::json;

use super::tests::{arb_rule, build_events, program, rows, test_config, track, RawEvent, Row};
use super::*;
use crate::store::MemoryStore;

/// What happens after an event, the same to both engines.
#[derive(Debug, Clone)]
enum Step {
    Nothing,
    WriteBack,
    Erase(u8),
    /// Fire at most `max` timers due up to `ahead` ms after the engine's clock.
    Slice {
        ahead: i64,
        max: usize,
    },
    /// Write back, then open a new engine on the store.
    Reopen,
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => Just(Step::Nothing),
        3 => Just(Step::WriteBack),
        1 => (0u8..12).prop_map(Step::Erase),
        2 => (0i64..400, 0usize..3).prop_map(|(ahead, max)| Step::Slice { ahead, max }),
        1 => Just(Step::Reopen),
    ]
}

/// Like the reference test's events but over 12 customers, so many timers are pending.
fn arb_event() -> impl Strategy<Value = RawEvent> {
    (
        0u8..12,
        0u8..4,
        0i64..60,
        proptest::option::of(0u8..6),
        proptest::option::of(0.0f64..10.0),
        0u8..3,
        0u8..10,
    )
}

/// An engine on its own store, with everything it has decided so far.
struct Run {
    program: Arc<Program>,
    store: Arc<MemoryStore>,
    config: EngineConfig,
    engine: PartitionEngine<MemoryStore>,
    out: Vec<Change>,
}

impl Run {
    fn new(program: Arc<Program>, config: EngineConfig) -> Run {
        let store = Arc::new(MemoryStore::default());
        let engine =
            PartitionEngine::open(0, program.clone(), store.clone(), config).expect("open");
        Run {
            program,
            store,
            config,
            engine,
            out: Vec::new(),
        }
    }

    fn step(&mut self, event: &Event, step: &Step) {
        self.engine
            .apply_event(event, &mut self.out)
            .expect("apply");
        match step {
            Step::Nothing => {}
            Step::WriteBack => self.engine.flush().expect("flush"),
            Step::Erase(customer) => {
                let at = self.engine.now().unwrap_or(0);
                let customer = format!("c{customer}");
                self.engine
                    .erase(&customer, at, &mut self.out)
                    .expect("erase");
            }
            Step::Slice { ahead, max } => {
                let now = self.engine.now().unwrap_or(0) + ahead;
                self.engine
                    .advance_bounded(now, *max, &mut self.out)
                    .expect("slice");
            }
            Step::Reopen => {
                self.engine.flush().expect("flush");
                self.engine =
                    PartitionEngine::open(0, self.program.clone(), self.store.clone(), self.config)
                        .expect("reopen");
            }
        }
    }

    fn due(&self, ahead: i64) -> usize {
        let now = self.engine.now().unwrap_or(0) + ahead;
        self.engine.due_timers(now, 50).expect("due")
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn a_tiny_timer_window_fires_the_same_timers_at_the_same_times_as_a_huge_one(
        rules in (arb_rule(0), arb_rule(1), arb_rule(2)),
        script in proptest::collection::vec((arb_event(), arb_step()), 1..60),
        window in 1usize..4,
        tail in 0i64..1500,
    ) {
        let texts = [rules.0, rules.1, rules.2];
        let named: Vec<(String, &str)> = texts.iter().enumerate().map(|(i, r)| (format!("s{i}"), r.as_str())).collect();
        let pairs: Vec<(&str, &str)> = named.iter().map(|(id, r)| (id.as_str(), *r)).collect();
        let program = program(&pairs);
        let raw: Vec<RawEvent> = script.iter().map(|(event, _)| *event).collect();
        let events = build_events(&raw);
        let mut tiny = Run::new(program.clone(), EngineConfig { timer_window: window, ..test_config() });
        let mut huge = Run::new(program, EngineConfig { timer_window: usize::MAX, ..test_config() });
        for (event, (_, step)) in events.iter().zip(&script) {
            tiny.step(event, step);
            huge.step(event, step);
            prop_assert_eq!(&tiny.out, &huge.out, "rules: {:#?}, at {:?}", texts, step);
            prop_assert_eq!(tiny.engine.now(), huge.engine.now());
            prop_assert_eq!(tiny.engine.pending_timers(), huge.engine.pending_timers());
            prop_assert_eq!(tiny.due(700), huge.due(700));
            if matches!(step, Step::WriteBack | Step::Reopen) {
                let held = tiny.engine.timers_in_memory();
                prop_assert!(held <= window, "{} timers in memory, window {}", held, window);
            }
        }
        let until = events.iter().map(|e| e.timestamp).max().unwrap_or(0) + tail;
        tiny.engine.advance(until, &mut tiny.out).expect("advance");
        huge.engine.advance(until, &mut huge.out).expect("advance");
        prop_assert_eq!(&tiny.out, &huge.out, "rules: {:#?}", texts);
        prop_assert_eq!(tiny.engine.stats(), huge.engine.stats());
        prop_assert_eq!(tiny.engine.pending_timers(), huge.engine.pending_timers());
    }
}

/// Wall clock, one segment entered 1 s after a customer's last event.
fn quiet_config(window: usize) -> EngineConfig {
    EngineConfig {
        clock: ClockMode::Wall,
        timer_window: window,
        ..test_config()
    }
}

fn quiet() -> Arc<Program> {
    program(&[("quiet", "since(last(any)) >= 1000ms")])
}

fn page(engine: &mut PartitionEngine<MemoryStore>, customer: &str, at: Millis) {
    let mut out = Vec::new();
    engine.advance(at, &mut out).expect("advance");
    let event = track(customer, "page", at, None, json!({}));
    engine.apply_event(&event, &mut out).expect("apply");
    assert!(out.is_empty(), "{out:?}");
}

/// A store holding timers of c0..c{n-1}, due at 1000 + i, and an engine re-opened on it with
/// a window of `window` (so c0 and c1 are in memory with a window of 2, the rest only stored).
fn stored_timers(n: usize, window: usize) -> PartitionEngine<MemoryStore> {
    let store = Arc::new(MemoryStore::default());
    let mut engine =
        PartitionEngine::open(0, quiet(), store.clone(), quiet_config(window)).expect("open");
    for i in 0..n {
        page(&mut engine, &format!("c{i}"), i as Millis);
    }
    engine.flush().expect("flush");
    PartitionEngine::open(0, quiet(), store, quiet_config(window)).expect("reopen")
}

fn entered(customer: &str, at: Millis) -> Row {
    (
        customer.into(),
        "quiet".into(),
        ChangeKind::Entered,
        at,
        1,
        "timer",
    )
}

#[test]
fn a_timer_inserted_beyond_the_window_before_a_write_back_is_not_lost() {
    let mut engine = stored_timers(4, 2);
    assert_eq!(engine.timers_in_memory(), 2);
    // Due at 1010: after every stored timer, only in memory until a write-back.
    page(&mut engine, "late", 10);
    assert_eq!(engine.pending_timers(), 5);
    assert_eq!(engine.due_timers(1010, 100).expect("due"), 5);
    let mut out = Vec::new();
    engine.advance(5_000, &mut out).expect("advance");
    assert_eq!(
        rows(&out),
        vec![
            entered("c0", 1000),
            entered("c1", 1001),
            entered("c2", 1002),
            entered("c3", 1003),
            entered("late", 1010),
        ]
    );
    assert_eq!(engine.pending_timers(), 0);
}

#[test]
fn a_timer_rescheduled_or_erased_before_a_write_back_is_not_fired_or_counted_from_the_store() {
    let mut engine = stored_timers(10, 2);
    // c5's stored timer (1005) moves to 1020 and c7's (1007) goes with c7; the stored keys stay
    // until the next write-back.
    page(&mut engine, "c5", 20);
    let mut out = Vec::new();
    assert!(engine.erase("c7", 20, &mut out).expect("erase"));
    assert!(out.is_empty(), "c7 was in no segment: {out:?}");
    assert_eq!(engine.pending_timers(), 9);
    assert_eq!(
        engine.due_timers(1010, 100).expect("due"),
        8,
        "c0..c9 but c5 (not due) and c7 (erased)"
    );
    engine.advance(5_000, &mut out).expect("advance");
    let expected: Vec<Row> = [0, 1, 2, 3, 4, 6, 8, 9]
        .iter()
        .map(|i| entered(&format!("c{i}"), 1000 + i))
        .chain([entered("c5", 1020)])
        .collect();
    assert_eq!(rows(&out), expected);
    assert_eq!(engine.stats().timers_fired, 9);
    assert_eq!(engine.pending_timers(), 0);
    engine.flush().expect("flush");
    assert_eq!(
        engine.customer_state("c7").expect("read"),
        None,
        "the erased customer's stored timer did not bring it back"
    );
}

#[test]
fn an_engine_reopened_on_many_timers_holds_only_its_window_and_counts_them_all() {
    let mut engine = stored_timers(1000, 16);
    assert_eq!(engine.timers_in_memory(), 16);
    assert_eq!(engine.pending_timers(), 1000);
    assert_eq!(engine.due_timers(1499, usize::MAX).expect("due"), 500);
    assert_eq!(engine.due_timers(9999, 300).expect("due"), 300);
    let mut out = Vec::new();
    let mut held = 0;
    while engine.advance_bounded(5_000, 10, &mut out).expect("slice") {
        held = held.max(engine.timers_in_memory());
        engine.flush().expect("flush");
    }
    assert!(held <= 16, "at most the window: {held}");
    let expected: Vec<Row> = (0..1000)
        .map(|i| entered(&format!("c{i}"), 1000 + i))
        .collect();
    assert_eq!(rows(&out), expected);
    assert_eq!(engine.pending_timers(), 0);
    assert_eq!(engine.timers_in_memory(), 0);
}
