use std::cell::RefCell;
use std::sync::Arc;

use super::*;
use crate::changelog::{encode_checkpoint, encode_customer, Checkpoint};
use crate::engine::{EngineConfig, PartitionEngine};
use crate::model::{Change, Event, EventKind};
use crate::pipeline::restore::{bring_up_to_date, ChangelogMessage};
use crate::rules::Program;
use crate::store::MemoryStore;

/// One changelog record: key, value (`None`: a tombstone) and writer.
type LogRecord = (Vec<u8>, Option<Vec<u8>>, [u8; 8]);

/// A changelog partition in memory that grows as its owner writes.
#[derive(Default)]
struct GrowingSource {
    records: RefCell<Vec<LogRecord>>,
    reads: RefCell<Vec<(i64, i64)>>,
}

impl ChangelogSource for GrowingSource {
    fn watermarks(&self, _partition: i32) -> Result<(i64, i64), String> {
        Ok((0, self.records.borrow().len() as i64))
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
        let records = self.records.borrow();
        for (offset, (key, value, writer)) in records.iter().enumerate().skip(from.max(0) as usize)
        {
            if stop() {
                return Ok(false);
            }
            visit(ChangelogMessage {
                offset: offset as i64,
                key,
                value: value.as_deref(),
                writer: Some(writer),
            })?;
        }
        Ok(true)
    }
}

const ME: [u8; 8] = *b"me......";
const OWNER: [u8; 8] = *b"owner...";

fn program() -> Arc<Program> {
    Arc::new(crate::rules::compile_rules(&[
        ("s", "since(last(\"Order Completed\")) >= 1h"),
        ("b", "count(\"Order Completed\") >= 2"),
    ]))
}

fn event(customer: &str, at: i64) -> Event {
    Event {
        customer_id: customer.into(),
        message_id: Some(format!("{customer}-{at}")),
        timestamp: at,
        kind: EventKind::Activity {
            name: "Order Completed".into(),
        },
        properties: Default::default(),
        traits: Default::default(),
    }
}

/// The owner: an engine whose batches are written to the changelog as the relay does
/// (customer records of the batch, then its checkpoint).
struct Owner {
    engine: PartitionEngine<MemoryStore>,
    store: Arc<MemoryStore>,
    offset: i64,
}

impl Owner {
    fn new(program: &Arc<Program>) -> Owner {
        let store = Arc::new(MemoryStore::default());
        let engine =
            PartitionEngine::open(0, program.clone(), store.clone(), EngineConfig::default())
                .expect("engine");
        Owner {
            engine,
            store,
            offset: 0,
        }
    }

    fn batch(&mut self, events: &[Event], source: &GrowingSource) {
        let mut out: Vec<Change> = Vec::new();
        for event in events {
            self.engine.apply_event(event, &mut out).expect("apply");
            self.offset += 1;
        }
        self.engine.flush().expect("flush");
        let offsets = vec![("e".to_string(), self.offset)];
        let mut records = source.records.borrow_mut();
        for event in events {
            let state = self
                .store
                .get(Table::Customers, &keys::customer(0, &event.customer_id))
                .expect("read")
                .expect("state");
            records.push((
                changelog::customer_key(&event.customer_id),
                Some(encode_customer(&offsets, &state)),
                OWNER,
            ));
        }
        let clock = events.iter().map(|e| e.timestamp).max();
        records.push((
            changelog::checkpoint_key(),
            Some(encode_checkpoint(&Checkpoint {
                clock,
                offsets: offsets.clone(),
            })),
            OWNER,
        ));
    }
}

/// What the standby's feed does for one follower: everything the changelog holds past the
/// copy's position, applied and written. Returns how many records were applied.
fn follow(follower: &mut Follower<'_>, store: &MemoryStore, source: &GrowingSource) -> usize {
    let mut applied = 0;
    let never = || false;
    let from = follower.next_offset();
    let end = source.records.borrow().len() as i64;
    source
        .read(0, from, end, &never, &mut |message| {
            follower.apply(store, &message).map_err(|e| e.to_string())?;
            applied += 1;
            Ok(())
        })
        .expect("read");
    follower.flush(store).expect("flush");
    applied
}

fn table(store: &MemoryStore, table: Table) -> Vec<(Vec<u8>, Vec<u8>)> {
    store
        .scan_prefix(table, &keys::partition_prefix(0))
        .expect("scan")
}

#[test]
fn every_partition_not_owned_is_followed_and_none_without_standbys() {
    let owned: BTreeSet<i32> = [1, 3].into_iter().collect();
    assert_eq!(followed(5, &owned, 1), vec![0, 2, 4]);
    assert_eq!(followed(5, &owned, 2), vec![0, 2, 4]);
    assert_eq!(followed(5, &owned, 0), Vec::<i32>::new());
    assert_eq!(followed(0, &BTreeSet::new(), 1), Vec::<i32>::new());
}

/// A copy that followed the changelog hands over with a tail restore: only the records written
/// after its last step are read, and the result is the state a full restore of the whole
/// changelog gives (states, timers, clock, input position).
#[test]
fn a_followed_copy_hands_over_with_a_tail_restore() {
    let program = program();
    let source = GrowingSource::default();
    let mut owner = Owner::new(&program);
    let events: Vec<Event> = (0..40)
        .map(|i| event(&format!("c{}", i % 13), 1_000 + i))
        .collect();
    owner.batch(&events[..10], &source);
    owner.batch(&events[10..25], &source);

    let standby = MemoryStore::default();
    let never = || false;
    let mut follower = Follower::start(0, &standby, &source, &ME, &program, &never).expect("start");
    assert_eq!(follow(&mut follower, &standby, &source), 27);
    assert_eq!(follow(&mut follower, &standby, &source), 0);
    owner.batch(&events[25..32], &source);
    assert_eq!(follow(&mut follower, &standby, &source), 8);
    // Records re-sent below the copy's position (a re-assigned feed) are skipped.
    let resent = source.records.borrow()[30].clone();
    follower
        .apply(
            &standby,
            &ChangelogMessage {
                offset: 30,
                key: &resent.0,
                value: resent.1.as_deref(),
                writer: Some(&resent.2),
            },
        )
        .expect("apply");
    assert_eq!(follower.pending(), 0);
    // The owner dies after one more batch; the standby did not see it.
    owner.batch(&events[32..], &source);
    drop(follower);

    let restored = bring_up_to_date(0, &standby, &source, &ME, &program, &never, &|_, _| {})
        .expect("restore")
        .expect("restored");
    assert_eq!(restored.plan, Plan::Tail { from: 35, to: 44 });
    assert_eq!(restored.read, 9, "only the tail the copy lacked");

    let fresh = MemoryStore::default();
    let full = bring_up_to_date(0, &fresh, &source, &ME, &program, &never, &|_, _| {})
        .expect("restore")
        .expect("restored");
    assert_eq!(full.read, 44);
    // The copy's timers and members index were kept in step while it followed: the same as
    // the full restore's, counts included, with no rebuild at open.
    for t in [Table::Customers, Table::Timers, Table::Members] {
        assert_eq!(table(&standby, t), table(&fresh, t), "{t:?}");
    }
    assert!(
        !table(&fresh, Table::Members).is_empty(),
        "the fixture must have members to compare"
    );
    for key in [
        keys::members_version(0),
        keys::members_count(0, "s"),
        keys::members_count(0, "b"),
        keys::clock(0),
        keys::input_offset(0, "e"),
        keys::changelog_next(0),
    ] {
        assert_eq!(
            standby.get(Table::Meta, &key).expect("read"),
            fresh.get(Table::Meta, &key).expect("read")
        );
    }
    assert_eq!(
        standby.get(Table::Meta, &keys::restore(0)).expect("read"),
        None
    );
}

/// A copy this store owned before and left ahead of the changelog (its outbox unpublished) is
/// rebuilt whole once another owner wrote after it, not followed from where it was.
#[test]
fn an_ahead_copy_is_rebuilt_before_it_is_followed() {
    let program = program();
    let source = GrowingSource::default();
    let mut owner = Owner::new(&program);
    owner.batch(&[event("a", 1_000)], &source);
    let store = MemoryStore::default();
    // Local state and an outbox barrier: as after a crash of this store's own owner thread.
    let mut writes = WriteSet::default();
    writes.put(Table::Customers, keys::customer(0, "zombie"), b"x".to_vec());
    writes.put(
        Table::Meta,
        keys::changelog_next(0),
        0i64.to_be_bytes().to_vec(),
    );
    store.write(writes).expect("write");
    let ahead = restore::local_copy(0, &store).expect("local");
    assert!(!ahead.ahead, "no outbox here: a tail over the local copy");
    let never = || false;
    let mut follower = Follower::start(0, &store, &source, &ME, &program, &never).expect("start");
    follow(&mut follower, &store, &source);
    assert!(store
        .get(Table::Customers, &keys::customer(0, "a"))
        .expect("read")
        .is_some());
}

/// A claimed partition is not stepped; a claim waits for the step writing it.
#[test]
fn a_claim_keeps_the_standby_off_and_waits_for_its_step() {
    let handoff = Arc::new(Handoff::default());
    assert!(handoff.begin(3));
    let claimer = {
        let handoff = handoff.clone();
        std::thread::spawn(move || {
            handoff.claim(3);
            Instant::now()
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        handoff.is_claimed(3),
        "the claim is visible to the step's stop check"
    );
    let ended = Instant::now();
    handoff.end();
    let claimed = claimer.join().expect("claim");
    assert!(
        claimed >= ended,
        "the claim returned only after the step ended"
    );
    assert!(!handoff.begin(3));
    assert!(handoff.begin(4));
    handoff.end();
    handoff.release(3);
    assert!(handoff.begin(3));
    handoff.end();
}
