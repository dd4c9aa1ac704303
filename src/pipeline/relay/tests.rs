use super::*;
use crate::model::{Change, ChangeKind};
use crate::outbox::ChangelogRecord;
use crate::store::MemoryStore;

/// A sink that records what it is handed and acknowledges on request.
#[derive(Default)]
struct RecordingSink {
    /// (seq, part, topic, partition) in the order handed over.
    sent: Vec<(u64, u8, String, Option<i32>)>,
    acks: Vec<Ack>,
    renew: bool,
}

impl RecordSink for RecordingSink {
    fn send(
        &mut self,
        seq: u64,
        part: u8,
        record: Publish<'_>,
        _give_up: &dyn Fn() -> bool,
    ) -> Result<bool, SinkError> {
        self.sent
            .push((seq, part, record.topic.to_string(), record.partition));
        Ok(true)
    }

    fn take_acks(&mut self) -> Vec<Ack> {
        std::mem::take(&mut self.acks)
    }

    fn renewed(&mut self) -> Result<bool, SinkError> {
        Ok(std::mem::take(&mut self.renew))
    }
}

fn topics() -> Topics {
    Topics {
        changes: "changes".into(),
        membership: "membership".into(),
        dlq: "dlq".into(),
        changelog: "changelog".into(),
    }
}

fn relay(store: &MemoryStore) -> Relay<RecordingSink> {
    Relay::open(
        7,
        store,
        RecordingSink::default(),
        topics(),
        Metrics::new("v", &[]),
        Arc::new(OnceLock::new()),
    )
    .expect("relay")
}

fn change(customer: &str) -> Decided {
    (
        OutboxEntry::Change(Change {
            customer_id: customer.into(),
            segment: "s".into(),
            kind: ChangeKind::Entered,
            at: 1,
            seq: 1,
            cause: Cause::Timer,
            segment_version: "v".into(),
        }),
        Pending::change(None),
    )
}

fn changelog(customer: &str) -> Decided {
    (
        OutboxEntry::Changelog(ChangelogRecord {
            key: customer.as_bytes().to_vec(),
            value: Some(b"state".to_vec()),
            writer: [1; 8],
        }),
        Pending::record(Output::Changelog),
    )
}

/// Stages and durably writes `records` with `offsets`, then releases them.
fn commit(
    relay: &mut Relay<RecordingSink>,
    store: &MemoryStore,
    records: Vec<Decided>,
    offset: i64,
) {
    let mut writes = WriteSet::default();
    let mut records = records;
    let offsets = HashMap::from([("events".to_string(), offset)]);
    let staged = relay.stage(&mut writes, &records, &offsets);
    store.write(writes).expect("write");
    relay.release(staged, &mut records).expect("release");
    assert!(records.is_empty());
}

fn ack(relay: &mut Relay<RecordingSink>, seq: u64, part: u8, offset: i64) -> Vec<(String, i64)> {
    relay.sink.acks.push(Ack { seq, part, offset });
    relay.collect_acks(0).expect("acks")
}

#[test]
fn a_change_entry_completes_when_both_its_records_are_acknowledged() {
    let mut pending = Pending::change(Some((5, "event")));
    assert!(!pending.complete());
    assert_eq!(pending.ack(1), Some(Output::Membership));
    assert!(!pending.complete());
    // A repeated acknowledgement and a part the entry does not have are not news.
    assert_eq!(pending.ack(1), None);
    assert_eq!(pending.ack(2), None);
    assert_eq!(pending.ack(200), None);
    assert!(!pending.complete());
    assert_eq!(pending.ack(0), Some(Output::Changes));
    assert!(pending.complete());
}

#[test]
fn a_record_entry_completes_with_its_one_record() {
    let mut pending = Pending::record(Output::DeadLetters);
    assert_eq!(pending.ack(1), None);
    assert!(!pending.complete());
    assert_eq!(pending.ack(0), Some(Output::DeadLetters));
    assert!(pending.complete());
}

/// The changelog never gets ahead of the changes: a changelog record is handed over only once
/// every change decided before it is acknowledged, and the batch's offsets become committable
/// only when its changelog records are acknowledged too.
#[test]
fn changelog_records_wait_for_every_earlier_change_and_the_offsets_for_both() {
    let store = MemoryStore::default();
    let mut relay = relay(&store);
    commit(
        &mut relay,
        &store,
        vec![change("a"), change("b"), changelog("a"), changelog("b")],
        10,
    );
    let sent: Vec<u64> = relay.sink.sent.iter().map(|(seq, ..)| *seq).collect();
    assert_eq!(
        sent,
        vec![0, 0, 1, 1],
        "only the changes (two records each)"
    );
    assert_eq!(relay.backlog(), 6);
    // Change 1 acknowledged in full, change 0 only half: still held.
    assert!(ack(&mut relay, 1, 0, 5).is_empty());
    assert!(ack(&mut relay, 1, 1, 5).is_empty());
    assert!(ack(&mut relay, 0, 1, 6).is_empty());
    assert_eq!(relay.sink.sent.len(), 4);
    // The last part of change 0: both changelog records go, to the input's partition number.
    assert!(
        ack(&mut relay, 0, 0, 7).is_empty(),
        "offsets wait for the changelog"
    );
    let tail: Vec<_> = relay.sink.sent[4..].to_vec();
    assert_eq!(
        tail,
        vec![
            (2, 0, "changelog".to_string(), Some(7)),
            (3, 0, "changelog".to_string(), Some(7)),
        ]
    );
    assert!(ack(&mut relay, 3, 0, 41).is_empty());
    assert_eq!(ack(&mut relay, 2, 0, 40), vec![("events".to_string(), 10)]);
    assert_eq!(relay.take_changelog_acked(), Some(41));
    assert_eq!(relay.take_changelog_acked(), None);
    assert!(relay.is_idle());
}

/// A later batch's changes are not held up by an earlier batch's waiting changelog records.
#[test]
fn a_held_changelog_record_does_not_hold_back_later_changes() {
    let store = MemoryStore::default();
    let mut relay = relay(&store);
    commit(&mut relay, &store, vec![change("a"), changelog("a")], 1);
    commit(&mut relay, &store, vec![change("b"), changelog("b")], 2);
    let sent: Vec<u64> = relay.sink.sent.iter().map(|(seq, ..)| *seq).collect();
    assert_eq!(sent, vec![0, 0, 2, 2]);
    // b's change acknowledged first: a's changelog record still waits for a's change, and b's
    // for a's too (it is earlier).
    ack(&mut relay, 2, 0, 0);
    ack(&mut relay, 2, 1, 0);
    assert_eq!(relay.sink.sent.len(), 4);
    ack(&mut relay, 0, 0, 0);
    ack(&mut relay, 0, 1, 0);
    let released: Vec<u64> = relay.sink.sent[4..].iter().map(|(seq, ..)| *seq).collect();
    assert_eq!(released, vec![1, 3]);
}

/// After a restart the stored outbox is published again in order, barriers included.
#[test]
fn a_restart_republishes_the_outbox_with_its_barriers() {
    let store = MemoryStore::default();
    let mut first = relay(&store);
    commit(&mut first, &store, vec![change("a"), changelog("a")], 1);
    drop(first);
    let mut second = relay(&store);
    assert_eq!(second.resend(&store).expect("resend"), 2);
    let sent: Vec<u64> = second.sink.sent.iter().map(|(seq, ..)| *seq).collect();
    assert_eq!(sent, vec![0, 0], "the changelog record waits again");
    ack(&mut second, 0, 0, 0);
    ack(&mut second, 0, 1, 0);
    assert_eq!(second.sink.sent.len(), 3);
    // New entries continue the sequence.
    commit(&mut second, &store, vec![change("b")], 2);
    assert_eq!(second.sink.sent.last().map(|(seq, ..)| *seq), Some(2));
}

/// A replaced producer gets every unacknowledged record again, but not the acknowledged parts,
/// and held barriers stay held.
#[test]
fn a_new_producer_gets_what_the_old_one_did_not_deliver() {
    let store = MemoryStore::default();
    let mut relay = relay(&store);
    commit(&mut relay, &store, vec![change("a"), changelog("a")], 1);
    ack(&mut relay, 0, 1, 0);
    relay.sink.sent.clear();
    relay.sink.renew = true;
    relay.follow_producer(&store).expect("follow");
    assert_eq!(
        relay.sink.sent,
        vec![(0, 0, "changes".to_string(), None)],
        "only the change event: its membership update was acknowledged"
    );
}

/// Acknowledged entries are deleted by the next commit's write.
#[test]
fn acknowledged_entries_leave_the_outbox_at_the_next_commit() {
    let store = MemoryStore::default();
    let mut relay = relay(&store);
    commit(&mut relay, &store, vec![change("a"), change("b")], 1);
    ack(&mut relay, 0, 0, 0);
    ack(&mut relay, 0, 1, 0);
    assert!(relay.has_deletions());
    commit(&mut relay, &store, Vec::new(), 1);
    let left: Vec<u64> = store
        .scan_prefix(Table::Outbox, &keys::partition_prefix(7))
        .expect("scan")
        .iter()
        .filter_map(|(key, _)| keys::parse_outbox(key))
        .collect();
    assert_eq!(left, vec![1]);
}

/// Exactly-once recovery: the witness stored with the group's offsets decides whether the open
/// transaction committed; another writer's witness means its input was re-done elsewhere.
#[test]
fn the_witness_says_whether_the_open_transaction_committed() {
    let ours = Witness {
        writer: [7; 8],
        next_seq: 40,
    };
    assert_eq!(Witness::decode(&ours.encode()), Some(ours));
    assert_eq!(Witness::decode("something else"), None);
    let offsets = vec![("events".to_string(), 100)];
    let stored = |witness: Option<Witness>, offset: i64| Committed {
        offsets: [("events".to_string(), offset)].into_iter().collect(),
        witness,
    };
    assert!(stored(Some(ours), 100).covers(&offsets, ours));
    let before = Witness {
        next_seq: 30,
        ..ours
    };
    assert!(!stored(Some(before), 90).covers(&offsets, ours));
    let other = Witness {
        writer: [9; 8],
        next_seq: 5,
    };
    assert!(stored(Some(other), 90).covers(&offsets, ours));
    // Without a stored witness the offsets decide.
    assert!(stored(None, 100).covers(&offsets, ours));
    assert!(!stored(None, 99).covers(&offsets, ours));
}
