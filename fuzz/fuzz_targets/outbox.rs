//! Outbox entries as read back from RocksDB: anything that decodes re-encodes to the same bytes
//! (a legacy record to its tagged form) and publishes as records without panicking. The same
//! bytes also go through the changelog's decoders (records read from Kafka by a restore, skip
//! marks and restore progress read back from RocksDB): errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use segmenter::outbox::{OutboxEntry, PublishBuffers, Topics};

fuzz_target!(|data: &[u8]| {
    changelog_decoders(data);
    let Ok(entry) = OutboxEntry::decode(data) else {
        return;
    };
    let encoded = entry.encode();
    if data.first() == Some(&0) {
        assert_eq!(
            encoded.first(),
            Some(&2),
            "a legacy record is re-encoded tagged"
        );
        assert_eq!(&encoded[1..], data, "a legacy record keeps its bytes");
    } else {
        assert_eq!(encoded, data, "decode/encode is not the identity");
    }
    assert_eq!(OutboxEntry::decode(&encoded).as_ref(), Ok(&entry));
    let topics = Topics {
        changes: "changes".into(),
        membership: "membership".into(),
        dlq: "dlq".into(),
        changelog: "changelog".into(),
    };
    let mut buffers = PublishBuffers::default();
    let mut parts = 0u8;
    let published: Result<(), ()> = entry.publish(&topics, 3, &mut buffers, |part, record| {
        assert_eq!(part, parts, "parts in order");
        parts += 1;
        if let Some(payload) = record.payload {
            if part == 0 && matches!(entry, OutboxEntry::Change(_)) {
                serde_json::from_slice::<serde_json::Value>(payload)
                    .expect("a change event is JSON");
            }
        }
        Ok(())
    });
    assert!(published.is_ok());
    assert_eq!(parts, entry.parts(), "every part published");
});

/// A changelog record (key = the bytes up to the first NUL, value = the rest, or none), a skip
/// mark and a restore's progress record, from the same bytes.
fn changelog_decoders(data: &[u8]) {
    use segmenter::changelog::{self, Record};
    let (key, value) = match data.iter().position(|b| *b == 0) {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    };
    if let Ok(Record::Checkpoint(checkpoint)) = changelog::parse(key, value) {
        let again = changelog::encode_checkpoint(&checkpoint);
        assert_eq!(
            changelog::parse(key, Some(&again)),
            Ok(Record::Checkpoint(checkpoint)),
            "a checkpoint re-encodes to itself"
        );
    }
    if let Ok(offsets) = changelog::decode_offsets(data) {
        assert_eq!(
            changelog::encode_offsets(&offsets),
            data,
            "offsets round-trip"
        );
    }
    let _ = serde_json::from_slice::<changelog::Restore>(data);
}
