//! The queue against a plain in-memory model (a map customer → due): random insertions,
//! removals, firings, due counts, write-backs and reopenings, with windows of 1 to 3 so pages
//! are read, cut back and overlaid all the time.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::store::{MemoryStore, WriteSet};

#[derive(Debug, Clone)]
enum Op {
    /// Give a customer a timer (replacing its current one).
    Set(u8, Millis),
    /// Remove a customer's timer.
    Clear(u8),
    /// Fire up to `max` timers due at or before `now`.
    Fire(Millis, usize),
    /// Count the timers due at or before `now`, up to `cap`.
    CountDue(Millis, usize),
    /// Take the writes and commit them.
    WriteBack,
    /// Write back, then open a new queue on the store.
    Reopen,
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..10, 0i64..60).prop_map(|(c, due)| Op::Set(c, due)),
        2 => (0u8..10).prop_map(Op::Clear),
        2 => (0i64..60, 0usize..4).prop_map(|(now, max)| Op::Fire(now, max)),
        1 => (0i64..60, 0usize..12).prop_map(|(now, cap)| Op::CountDue(now, cap)),
        2 => Just(Op::WriteBack),
        1 => Just(Op::Reopen),
    ]
}

/// What the engine's write-back does for timers: the store ends up holding the live set.
fn write_back(store: &MemoryStore, live: &BTreeMap<String, Millis>) {
    let prefix = keys::partition_prefix(5);
    let mut writes = WriteSet::default();
    for (key, _) in store.scan_prefix(Table::Timers, &prefix).expect("scan") {
        writes.delete(Table::Timers, key);
    }
    for (customer, due) in live {
        writes.put(Table::Timers, keys::timer(5, *due, customer), Vec::new());
    }
    store.write(writes).expect("write");
}

fn in_order(live: &BTreeMap<String, Millis>) -> Vec<Timer> {
    let mut timers: Vec<Timer> = live.iter().map(|(c, due)| (*due, c.clone())).collect();
    timers.sort();
    timers
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn the_queue_behaves_as_the_whole_set_in_memory(
        window in 1usize..4,
        ops in proptest::collection::vec(arb_op(), 1..80),
    ) {
        let store = MemoryStore::default();
        // A neighbouring partition's timers must never be read.
        let mut other = WriteSet::default();
        other.put(Table::Timers, keys::timer(4, 1, "p4"), Vec::new());
        other.put(Table::Timers, keys::timer(6, 1, "p6"), Vec::new());
        store.write(other).expect("write");
        let mut queue = TimerQueue::open(&store, 5, window).expect("open");
        let mut live: BTreeMap<String, Millis> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Set(c, due) => {
                    let customer = format!("c{c}");
                    if let Some(old) = live.insert(customer.clone(), due) {
                        if old == due {
                            continue;
                        }
                        queue.remove(old, &customer);
                    }
                    queue.insert(due, &customer);
                }
                Op::Clear(c) => {
                    let customer = format!("c{c}");
                    if let Some(old) = live.remove(&customer) {
                        queue.remove(old, &customer);
                    }
                }
                Op::Fire(now, max) => {
                    let expected: Vec<Timer> = in_order(&live)
                        .into_iter()
                        .take_while(|(due, _)| *due <= now)
                        .take(max)
                        .collect();
                    let mut fired = Vec::new();
                    while fired.len() < max {
                        match queue.first_due(&store).expect("first") {
                            Some(due) if due <= now => {}
                            _ => break,
                        }
                        let timer = queue.pop_first(&store).expect("pop").expect("a timer");
                        live.remove(&timer.1);
                        fired.push(timer);
                    }
                    prop_assert_eq!(fired, expected);
                    let next = in_order(&live).first().map(|(due, _)| *due);
                    prop_assert_eq!(queue.first_due(&store).expect("first"), next);
                }
                Op::CountDue(now, cap) => {
                    let expected = live.values().filter(|due| **due <= now).count().min(cap);
                    prop_assert_eq!(queue.count_due(&store, now, cap).expect("count"), expected);
                }
                Op::WriteBack => {
                    write_back(&store, &live);
                    queue.written_back();
                    prop_assert!(queue.in_memory() <= window, "{} in memory", queue.in_memory());
                }
                Op::Reopen => {
                    write_back(&store, &live);
                    queue = TimerQueue::open(&store, 5, window).expect("reopen");
                    prop_assert!(queue.in_memory() <= window, "{} in memory", queue.in_memory());
                }
            }
            prop_assert_eq!(queue.len(), live.len());
        }
        // Whatever is left fires in order, all of it.
        let mut rest = Vec::new();
        while let Some(timer) = queue.pop_first(&store).expect("pop") {
            rest.push(timer);
        }
        prop_assert_eq!(rest, in_order(&live));
        prop_assert_eq!(queue.len(), 0);
    }
}

/// Opening keeps the window and counts the rest; a corrupt key far past the window still
/// refuses to open (it would be a customer never re-evaluated).
#[test]
fn opening_holds_only_the_window_counts_everything_and_checks_every_key() {
    let store = MemoryStore::default();
    let mut writes = WriteSet::default();
    for n in 0..1000 {
        writes.put(
            Table::Timers,
            keys::timer(0, 1000 - n, &format!("c{n}")),
            Vec::new(),
        );
    }
    store.write(writes).expect("write");
    let mut queue = TimerQueue::open(&store, 0, 10).expect("open");
    assert_eq!(queue.len(), 1000);
    assert_eq!(queue.in_memory(), 10);
    assert_eq!(
        queue.count_due(&store, 500, usize::MAX).expect("count"),
        500
    );
    assert_eq!(queue.count_due(&store, 500, 42).expect("count"), 42);
    assert_eq!(
        queue.pop_first(&store).expect("pop"),
        Some((1, "c999".into()))
    );

    let mut corrupt = WriteSet::default();
    corrupt.put(
        Table::Timers,
        vec![0, 0, 0, 0, 0xff, 0xff, 0xff],
        Vec::new(),
    );
    store.write(corrupt).expect("write");
    let message = TimerQueue::open(&store, 0, 10)
        .err()
        .map(|err| err.to_string())
        .unwrap_or_default();
    assert!(
        message.contains("timer of partition 0 00000000ffffff"),
        "{message}"
    );
}
