use std::cell::{Cell, RefCell};
use std::sync::Arc;

use super::*;
use crate::changelog::{encode_checkpoint, encode_customer, Checkpoint};
use crate::engine::{EngineConfig, PartitionEngine};
use crate::model::{Change, Event, EventKind};
use crate::outbox::ChangelogRecord;
use crate::store::MemoryStore;

/// A changelog record as the test writes it: key, value, writer.
type Written = (Vec<u8>, Option<Vec<u8>>, [u8; 8]);

/// A record of the source: its offset and what was written.
type Stored = (i64, Vec<u8>, Option<Vec<u8>>, [u8; 8]);

/// A changelog partition held in memory, with gaps allowed.
struct VecSource {
    records: Vec<Stored>,
    low: i64,
    high: i64,
    /// Stop after this many records of a `read` (a rebalance in the middle).
    stop_after: Cell<Option<usize>>,
    reads: RefCell<Vec<(i64, i64)>>,
}

impl VecSource {
    fn new(records: Vec<Written>) -> VecSource {
        let high = records.len() as i64;
        VecSource {
            records: records
                .into_iter()
                .enumerate()
                .map(|(i, (k, v, w))| (i as i64, k, v, w))
                .collect(),
            low: 0,
            high,
            stop_after: Cell::new(None),
            reads: RefCell::new(Vec::new()),
        }
    }
}

impl ChangelogSource for VecSource {
    fn watermarks(&self, _partition: i32) -> Result<(i64, i64), String> {
        Ok((self.low, self.high))
    }

    fn read(
        &self,
        _partition: i32,
        from: i64,
        until: i64,
        stop: &dyn Fn() -> bool,
        visit: &mut dyn FnMut(ChangelogMessage<'_>) -> Result<(), String>,
    ) -> Result<bool, String> {
        self.reads.borrow_mut().push((from, until));
        let mut seen = 0;
        for (offset, key, value, writer) in &self.records {
            if *offset < from || *offset >= until {
                continue;
            }
            if stop() || self.stop_after.get() == Some(seen) {
                return Ok(false);
            }
            visit(ChangelogMessage {
                offset: *offset,
                key,
                value: value.as_deref(),
                writer: Some(writer),
            })?;
            seen += 1;
        }
        Ok(true)
    }
}

const ME: [u8; 8] = *b"me......";
const OTHER: [u8; 8] = *b"other...";

fn program(rule: &str) -> Arc<Program> {
    Arc::new(crate::rules::compile_rules(&[("s", rule)]))
}

fn event(customer: &str, at: i64, id: &str) -> Event {
    Event {
        customer_id: customer.into(),
        message_id: Some(id.into()),
        timestamp: at,
        kind: EventKind::Activity {
            name: "Order Completed".into(),
        },
        properties: Default::default(),
        traits: Default::default(),
    }
}

/// The states an engine wrote for `events`, as changelog customer records.
fn states_of(program: &Arc<Program>, events: &[Event]) -> Vec<(String, Vec<u8>)> {
    let store = Arc::new(MemoryStore::default());
    let mut engine =
        PartitionEngine::open(0, program.clone(), store.clone(), EngineConfig::default())
            .expect("engine");
    let mut out: Vec<Change> = Vec::new();
    for event in events {
        engine.apply_event(event, &mut out).expect("apply");
    }
    engine.flush().expect("flush");
    store
        .scan_prefix(Table::Customers, &keys::partition_prefix(0))
        .expect("scan")
        .into_iter()
        .map(|(key, value)| (keys::parse_customer(&key).unwrap_or("?").to_string(), value))
        .collect()
}

fn customer(id: &str, state: &[u8], offset: i64, writer: [u8; 8]) -> Written {
    (
        changelog::customer_key(id),
        Some(encode_customer(&[("e".into(), offset)], state)),
        writer,
    )
}

fn checkpoint(clock: i64, offset: i64, writer: [u8; 8]) -> Written {
    (
        changelog::checkpoint_key(),
        Some(encode_checkpoint(&Checkpoint {
            clock: Some(clock),
            offsets: vec![("e".into(), offset)],
        })),
        writer,
    )
}

fn no_progress(_: u64, _: i64) {}

/// A partition whose disk was lost comes back from the changelog whole: states, the timers
/// derived from them, the clock and input position of the last checkpoint.
#[test]
fn a_lost_partition_is_rebuilt_with_its_timers_and_position() {
    let program = program("since(last(\"Order Completed\")) >= 1h");
    let states = states_of(
        &program,
        &[event("a", 1_000, "m1"), event("b", 2_000, "m2")],
    );
    let mut records = Vec::new();
    for (id, state) in &states {
        records.push(customer(id, state, 2, OTHER));
    }
    records.push(checkpoint(2_000, 2, OTHER));
    let source = VecSource::new(records);
    let store = MemoryStore::default();
    let restored = bring_up_to_date(0, &store, &source, &ME, &program, &|| false, &no_progress)
        .expect("restore")
        .expect("something restored");
    assert_eq!(restored.plan, Plan::Full { from: 0, to: 3 });
    assert_eq!(restored.records, 3);
    let timers: Vec<_> = store
        .scan_prefix(Table::Timers, &keys::partition_prefix(0))
        .expect("scan")
        .iter()
        .filter_map(|(key, _)| keys::parse_timer(key))
        .collect();
    assert_eq!(
        timers,
        vec![
            (1_000 + 3_600_000, "a".to_string()),
            (2_000 + 3_600_000, "b".to_string())
        ]
    );
    assert_eq!(
        store.get(Table::Meta, &keys::clock(0)).expect("read"),
        Some(2_000i64.to_be_bytes().to_vec())
    );
    assert_eq!(
        store
            .get(Table::Meta, &keys::input_offset(0, "e"))
            .expect("read"),
        Some(2i64.to_be_bytes().to_vec())
    );
    // Opened again: nothing left to read.
    assert_eq!(
        bring_up_to_date(0, &store, &source, &ME, &program, &|| false, &no_progress)
            .expect("restore"),
        None
    );
    assert_eq!(source.reads.borrow().len(), 1);
}

/// A restore interrupted by a rebalance continues where it stopped, and the records it had
/// applied are not read again.
#[test]
fn an_interrupted_restore_continues_where_it_stopped() {
    let program = program("count(\"Order Completed\") >= 1");
    let states = states_of(
        &program,
        &[
            event("a", 1, "m1"),
            event("b", 2, "m2"),
            event("c", 3, "m3"),
        ],
    );
    let mut records = Vec::new();
    for (id, state) in &states {
        records.push(customer(id, state, 3, OTHER));
    }
    records.push(checkpoint(3, 3, OTHER));
    let source = VecSource::new(records);
    source.stop_after.set(Some(2));
    let store = MemoryStore::default();
    let first = bring_up_to_date(0, &store, &source, &ME, &program, &|| false, &no_progress);
    assert!(matches!(first, Err(RestoreError::Interrupted)), "{first:?}");
    source.stop_after.set(None);
    let second = bring_up_to_date(0, &store, &source, &ME, &program, &|| false, &no_progress)
        .expect("restore")
        .expect("restored");
    assert_eq!(
        source.reads.borrow().last(),
        Some(&(2, 4)),
        "from where it stopped"
    );
    assert_eq!(second.records, 4, "counted across both attempts");
    assert_eq!(
        store
            .scan_prefix(Table::Customers, &keys::partition_prefix(0))
            .expect("scan")
            .len(),
        3
    );
    assert_eq!(
        store.get(Table::Meta, &keys::restore(0)).expect("read"),
        None
    );
}

/// A local copy ahead of the changelog (its outbox still holds changelog records) is kept on
/// an ordinary restart — the tail is this store's own — but rebuilt whole once another owner
/// has written after it.
#[test]
fn a_copy_ahead_of_the_changelog_is_kept_unless_another_owner_wrote_after_it() {
    let program = program("count(\"Order Completed\") >= 1");
    let states = states_of(&program, &[event("a", 1, "m1")]);
    let (_, state) = &states[0];
    let store = MemoryStore::default();
    let mut writes = WriteSet::default();
    writes.put(Table::Customers, keys::customer(0, "a"), b"LOCAL".to_vec());
    writes.put(
        Table::Meta,
        keys::changelog_next(0),
        1i64.to_be_bytes().to_vec(),
    );
    let pending = OutboxEntry::Changelog(ChangelogRecord {
        key: changelog::customer_key("a"),
        value: Some(b"x".to_vec()),
        writer: ME,
    });
    writes.put(Table::Outbox, keys::outbox(0, 9), pending.encode());
    store.write(writes).expect("write");

    let own = VecSource::new(vec![customer("a", state, 1, ME), checkpoint(1, 1, ME)]);
    assert_eq!(
        bring_up_to_date(0, &store, &own, &ME, &program, &|| false, &no_progress).expect("ok"),
        None
    );
    assert_eq!(
        store
            .get(Table::Customers, &keys::customer(0, "a"))
            .expect("read"),
        Some(b"LOCAL".to_vec()),
        "kept"
    );

    let mut writes = WriteSet::default();
    writes.put(
        Table::Meta,
        keys::changelog_next(0),
        1i64.to_be_bytes().to_vec(),
    );
    store.write(writes).expect("write");
    let foreign = VecSource::new(vec![
        customer("a", state, 1, ME),
        customer("a", state, 5, OTHER),
        checkpoint(1, 5, OTHER),
    ]);
    let restored = bring_up_to_date(0, &store, &foreign, &ME, &program, &|| false, &no_progress)
        .expect("ok")
        .expect("restored");
    assert_eq!(restored.plan, Plan::Full { from: 0, to: 3 });
    assert_eq!(
        store
            .get(Table::Customers, &keys::customer(0, "a"))
            .expect("read"),
        Some(state.clone())
    );
    assert!(
        store
            .scan_prefix(Table::Outbox, &keys::partition_prefix(0))
            .expect("scan")
            .is_empty(),
        "the stale outbox went with the copy"
    );
}

/// The timers and members index (entries and counts) a rescan of the stored states gives.
fn assert_indexes_match_states(store: &MemoryStore, program: &Program) -> Vec<i64> {
    let layout = StateLayout::of(program);
    let prefix = keys::partition_prefix(0);
    let mut timers = Vec::new();
    let mut members = Vec::new();
    let mut counts = vec![0i64; program.segments.len()];
    for (key, bytes) in store.scan_prefix(Table::Customers, &prefix).expect("scan") {
        let id = keys::parse_customer(&key)
            .expect("customer key")
            .to_string();
        let state = codec::decode(&bytes, &layout, &layout).expect("state");
        if let Some(due) = state.timer {
            timers.push(keys::timer(0, due, &id));
        }
        for ((segment, membership), count) in program
            .segments
            .iter()
            .zip(&state.memberships)
            .zip(&mut counts)
        {
            if membership.member {
                members.push((
                    keys::member(0, &segment.id, &id),
                    membership.since.to_be_bytes().to_vec(),
                ));
                *count += 1;
            }
        }
    }
    timers.sort();
    members.sort();
    let stored_timers: Vec<_> = store
        .scan_prefix(Table::Timers, &prefix)
        .expect("scan")
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert_eq!(stored_timers, timers, "timers");
    assert_eq!(
        store.scan_prefix(Table::Members, &prefix).expect("scan"),
        members,
        "members index"
    );
    let stored_counts: Vec<i64> = program
        .segments
        .iter()
        .map(|segment| {
            let bytes = store
                .get(Table::Meta, &keys::members_count(0, &segment.id))
                .expect("read")
                .expect("a stored count");
            codec::decode_i64(&bytes).expect("count")
        })
        .collect();
    assert_eq!(stored_counts, counts, "member counts");
    assert_eq!(
        store
            .get(Table::Meta, &keys::members_version(0))
            .expect("read"),
        Some(program.version.as_bytes().to_vec()),
        "the index is marked built for these definitions (the worker does not rebuild it)"
    );
    counts
}

/// A member state (two orders) and a non-member one (one order), with their due times.
fn member_and_not(program: &Arc<Program>) -> (Vec<u8>, Vec<u8>) {
    let states = states_of(
        program,
        &[
            event("m", 1_000, "e1"),
            event("m", 2_000, "e2"),
            event("n", 3_000, "e3"),
        ],
    );
    let get = |id: &str| {
        states
            .iter()
            .find(|(customer, _)| customer == id)
            .map(|(_, state)| state.clone())
            .expect("state")
    };
    (get("m"), get("n"))
}

/// A restore keeps the timers and the members index (and its counts) in step with the states
/// it writes, in one pass: a customer written twice (the older record indexed, then replaced),
/// an erased one, and a tail restore that moves customers in and out of a segment adjusts the
/// counts by each customer's old and new membership.
#[test]
fn a_restore_indexes_timers_and_members_as_it_writes() {
    let program = Arc::new(crate::rules::compile_rules(&[
        ("two", "count(\"Order Completed\") >= 2"),
        (
            "any",
            "count(\"Order Completed\") >= 1 and since(last(\"Order Completed\")) < 30d",
        ),
    ]));
    let (member, not) = member_and_not(&program);
    let mut records = vec![
        customer("a", &member, 1, OTHER),
        customer("b", &member, 2, OTHER),
        customer("c", &not, 3, OTHER),
        // Uncompacted: a again, now out of "two"; d written then erased.
        customer("a", &not, 4, OTHER),
        customer("d", &member, 5, OTHER),
        (changelog::customer_key("d"), None, OTHER),
        checkpoint(3_000, 6, OTHER),
    ];
    let source = VecSource::new(records.clone());
    let store = MemoryStore::default();
    bring_up_to_date(0, &store, &source, &ME, &program, &|| false, &no_progress)
        .expect("restore")
        .expect("restored");
    assert_eq!(assert_indexes_match_states(&store, &program), vec![1, 3]);

    // Another owner went on: c joins "two", b leaves it, a is erased, e is new.
    records.extend([
        customer("c", &member, 7, OTHER),
        customer("b", &not, 8, OTHER),
        (changelog::customer_key("a"), None, OTHER),
        customer("e", &member, 9, OTHER),
        checkpoint(4_000, 10, OTHER),
    ]);
    let source = VecSource::new(records);
    let restored = bring_up_to_date(0, &store, &source, &ME, &program, &|| false, &no_progress)
        .expect("restore")
        .expect("restored");
    assert_eq!(restored.plan, Plan::Tail { from: 7, to: 12 });
    assert_eq!(assert_indexes_match_states(&store, &program), vec![2, 3]);
}

/// An interrupted restore leaves its indexes consistent with what it wrote, and the
/// continuation (which reads its old states from the store) ends with exact counts.
#[test]
fn an_interrupted_restore_keeps_its_indexes_exact() {
    let program = Arc::new(crate::rules::compile_rules(&[(
        "two",
        "count(\"Order Completed\") >= 2",
    )]));
    let (member, not) = member_and_not(&program);
    let records = vec![
        customer("a", &member, 1, OTHER),
        customer("b", &member, 2, OTHER),
        customer("a", &not, 3, OTHER),
        customer("c", &member, 4, OTHER),
        checkpoint(3_000, 5, OTHER),
    ];
    let source = VecSource::new(records);
    source.stop_after.set(Some(2));
    let store = MemoryStore::default();
    let first = bring_up_to_date(0, &store, &source, &ME, &program, &|| false, &no_progress);
    assert!(matches!(first, Err(RestoreError::Interrupted)), "{first:?}");
    assert_eq!(assert_indexes_match_states(&store, &program), vec![2]);
    source.stop_after.set(None);
    bring_up_to_date(0, &store, &source, &ME, &program, &|| false, &no_progress)
        .expect("restore")
        .expect("restored");
    assert_eq!(assert_indexes_match_states(&store, &program), vec![2]);
}
