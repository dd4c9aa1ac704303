use super::*;
use crate::store::{MemoryStore, Store};

fn offsets(pairs: &[(&str, i64)]) -> Offsets {
    pairs.iter().map(|(t, o)| (t.to_string(), *o)).collect()
}

#[test]
fn records_round_trip_and_garbage_is_an_error_not_a_panic() {
    let value = encode_customer(&offsets(&[("events", 42), ("orders", 7)]), b"STATE");
    let key = customer_key("c-1");
    assert_eq!(
        parse(&key, Some(&value)),
        Ok(Record::Customer {
            id: "c-1",
            value: Some(CustomerRecord {
                offsets: offsets(&[("events", 42), ("orders", 7)]),
                state: b"STATE",
            }),
        })
    );
    assert_eq!(
        parse(&key, None),
        Ok(Record::Customer {
            id: "c-1",
            value: None
        })
    );
    let checkpoint = Checkpoint {
        clock: Some(-5),
        offsets: offsets(&[("events", 9)]),
    };
    let bytes = encode_checkpoint(&checkpoint);
    assert_eq!(
        parse(&checkpoint_key(), Some(&bytes)),
        Ok(Record::Checkpoint(checkpoint.clone()))
    );
    for end in 0..bytes.len() {
        assert!(
            parse(&checkpoint_key(), Some(&bytes[..end])).is_err(),
            "prefix {end}"
        );
    }
    let none = Checkpoint {
        clock: None,
        offsets: Vec::new(),
    };
    assert_eq!(
        parse(&checkpoint_key(), Some(&encode_checkpoint(&none))),
        Ok(Record::Checkpoint(none))
    );
    assert_eq!(
        parse(&layout_key(77), Some(b"{}")),
        Ok(Record::Layout {
            id: 77,
            descriptor: b"{}"
        })
    );
    assert!(parse(b"", None).is_err());
    assert!(parse(b"zzz", Some(b"x")).is_err());
    assert!(parse(&customer_key("c"), Some(&[FORMAT, 3, 0])).is_err());
    assert!(parse(&[CUSTOMER, 0xff], None).is_err(), "key not UTF-8");
}

fn local(next: Option<i64>, has_state: bool, ahead: bool) -> LocalCopy {
    LocalCopy {
        next_offset: next,
        has_state,
        ahead,
    }
}

#[test]
fn the_plan_reads_only_what_the_local_copy_lacks() {
    let never = |_, _| panic!("the tail need not be read");
    assert_eq!(plan(local(None, false, false), 0, 0, never), Plan::UpToDate);
    assert_eq!(
        plan(local(None, false, false), 3, 10, never),
        Plan::Full { from: 3, to: 10 },
        "no local copy: everything"
    );
    assert_eq!(
        plan(local(Some(10), true, true), 0, 10, never),
        Plan::UpToDate,
        "an ordinary restart"
    );
    assert_eq!(
        plan(local(Some(6), true, false), 0, 10, never),
        Plan::Tail { from: 6, to: 10 },
        "moved away and back after a clean handover: the tail only"
    );
    assert_eq!(
        plan(local(Some(2), true, false), 4, 10, never),
        Plan::Tail { from: 4, to: 10 },
        "the log was truncated past the checkpoint"
    );
    assert_eq!(
        plan(local(Some(6), true, true), 0, 10, |from, to| {
            assert_eq!((from, to), (6, 10));
            true
        }),
        Plan::UpToDate,
        "a crash after records this store wrote but had not recorded"
    );
    assert_eq!(
        plan(local(Some(6), true, true), 0, 10, |_, _| false),
        Plan::Full { from: 0, to: 10 },
        "ahead of the changelog, and another owner wrote after: rebuilt whole"
    );
    assert_eq!(
        plan(local(None, true, false), 0, 10, never),
        Plan::Tail { from: 0, to: 10 },
        "state from before the changelog"
    );
}

/// A restore ends at the last checkpoint's position and clock; customers whose records came
/// after it keep skip marks, and only those marks that lie above where the input resumes.
#[test]
fn a_restore_resumes_at_the_last_checkpoint_and_marks_the_customers_ahead_of_it() {
    let store = MemoryStore::default();
    let mut restore = Restore::new(0, 100);
    let mut writes = WriteSet::default();
    let p = 3;
    let records: Vec<(Vec<u8>, Option<Vec<u8>>)> = vec![
        (layout_key(5), Some(b"{\"layout\":1}".to_vec())),
        (
            customer_key("a"),
            Some(encode_customer(&offsets(&[("e", 10)]), b"A1")),
        ),
        (
            customer_key("b"),
            Some(encode_customer(&offsets(&[("e", 10)]), b"B1")),
        ),
        (
            checkpoint_key(),
            Some(encode_checkpoint(&Checkpoint {
                clock: Some(500),
                offsets: offsets(&[("e", 10)]),
            })),
        ),
        // The next batch: a's record came, its checkpoint never did.
        (
            customer_key("a"),
            Some(encode_customer(&offsets(&[("e", 14)]), b"A2")),
        ),
        // b erased.
        (customer_key("b"), None),
    ];
    for (offset, (key, value)) in records.iter().enumerate() {
        restore
            .apply(p, offset as i64 * 2, key, value.as_deref(), &mut writes)
            .expect("valid record");
    }
    assert_eq!(restore.records, 6);
    restore.finish(p, &mut writes);
    store.write(writes).expect("write");
    let get = |table, key: Vec<u8>| store.get(table, &key).expect("read");
    assert_eq!(
        get(Table::Customers, keys::customer(p, "a")),
        Some(b"A2".to_vec())
    );
    assert_eq!(get(Table::Customers, keys::customer(p, "b")), None);
    assert_eq!(
        get(Table::Meta, keys::layout(5)),
        Some(b"{\"layout\":1}".to_vec())
    );
    assert_eq!(
        get(Table::Meta, keys::clock(p)),
        Some(500i64.to_be_bytes().to_vec())
    );
    assert_eq!(
        get(Table::Meta, keys::input_offset(p, "e")),
        Some(10i64.to_be_bytes().to_vec())
    );
    let mark = get(Table::Meta, keys::skip(p, "a")).expect("a is ahead");
    assert_eq!(decode_offsets(&mark), Ok(offsets(&[("e", 14)])));
    assert_eq!(get(Table::Meta, keys::skip(p, "b")), None);
    assert_eq!(
        get(Table::Meta, keys::changelog_next(p)),
        Some(100i64.to_be_bytes().to_vec()),
        "the end read at the start, although the last record was at 10 (gaps)"
    );
    assert!(is_skipped(&offsets(&[("e", 14)]), "e", 13));
    assert!(!is_skipped(&offsets(&[("e", 14)]), "e", 14));
    assert!(!is_skipped(&offsets(&[("e", 14)]), "other", 0));
}

#[test]
fn an_interrupted_restore_continues_from_its_saved_progress() {
    let store = MemoryStore::default();
    let mut restore = Restore::new(0, 10);
    let mut writes = WriteSet::default();
    restore
        .apply(
            1,
            0,
            &customer_key("a"),
            Some(&encode_customer(&[], b"A")),
            &mut writes,
        )
        .expect("valid");
    restore.save(1, &mut writes);
    store.write(writes).expect("write");
    let saved = store
        .get(Table::Meta, &keys::restore(1))
        .expect("read")
        .expect("saved");
    let resumed: Restore = serde_json::from_slice(&saved).expect("progress JSON");
    assert_eq!(resumed, restore);
    assert_eq!(resumed.next_offset, 1);
    assert_eq!(resumed.ahead.len(), 1);
}

#[test]
fn wiping_a_partition_leaves_the_others() {
    let store = MemoryStore::default();
    let mut writes = WriteSet::default();
    for p in [1u32, 2] {
        writes.put(Table::Customers, keys::customer(p, "x"), b"s".to_vec());
        writes.put(Table::Timers, keys::timer(p, 5, "x"), Vec::new());
        writes.put(Table::Outbox, keys::outbox(p, 0), b"o".to_vec());
        writes.put(Table::Meta, keys::clock(p), 1i64.to_be_bytes().to_vec());
        writes.put(
            Table::Meta,
            keys::input_offset(p, "e"),
            1i64.to_be_bytes().to_vec(),
        );
        writes.put(
            Table::Meta,
            keys::members_count(p, "s"),
            1i64.to_be_bytes().to_vec(),
        );
    }
    store.write(writes).expect("write");
    let mut wipe_writes = WriteSet::default();
    wipe(1, &mut wipe_writes);
    store.write(wipe_writes).expect("wipe");
    for table in [Table::Customers, Table::Timers, Table::Outbox] {
        assert!(store
            .scan_prefix(table, &keys::partition_prefix(1))
            .expect("scan")
            .is_empty());
        assert_eq!(
            store
                .scan_prefix(table, &keys::partition_prefix(2))
                .expect("scan")
                .len(),
            1
        );
    }
    assert_eq!(store.get(Table::Meta, &keys::clock(1)).expect("read"), None);
    assert_eq!(
        store
            .get(Table::Meta, &keys::input_offset(1, "e"))
            .expect("read"),
        None
    );
    assert_eq!(
        store
            .get(Table::Meta, &keys::members_count(1, "s"))
            .expect("read"),
        None
    );
    assert!(store
        .get(Table::Meta, &keys::clock(2))
        .expect("read")
        .is_some());
    assert!(store
        .get(Table::Meta, &keys::input_offset(2, "e"))
        .expect("read")
        .is_some());
}

/// Beyond SAVED_AHEAD customers after the last checkpoint, the saved progress does not carry
/// them (that made restores quadratic) but says to read again from after that checkpoint.
#[test]
fn a_large_ahead_set_is_not_saved_but_read_again() {
    let store = MemoryStore::default();
    let mut restore = Restore::new(5, 1_000_000);
    let mut writes = WriteSet::default();
    let checkpoint = encode_checkpoint(&Checkpoint {
        clock: None,
        offsets: offsets(&[("e", 1)]),
    });
    restore
        .apply(1, 5, &checkpoint_key(), Some(&checkpoint), &mut writes)
        .expect("valid");
    for i in 0..=SAVED_AHEAD as i64 {
        let value = encode_customer(&offsets(&[("e", 2)]), b"S");
        restore
            .apply(
                1,
                6 + i,
                &customer_key(&format!("c{i}")),
                Some(&value),
                &mut writes,
            )
            .expect("valid");
    }
    assert_eq!(restore.ahead.len(), SAVED_AHEAD + 1);
    restore.save(1, &mut writes);
    store.write(writes).expect("write");
    let saved = store
        .get(Table::Meta, &keys::restore(1))
        .expect("read")
        .expect("saved");
    let resumed: Restore = serde_json::from_slice(&saved).expect("JSON");
    assert_eq!(resumed.next_offset, 6, "right after the checkpoint at 5");
    assert!(resumed.ahead.is_empty());
    assert_eq!(resumed.checkpoint, restore.checkpoint);
    assert!(saved.len() < 1_000, "{} bytes", saved.len());
}
