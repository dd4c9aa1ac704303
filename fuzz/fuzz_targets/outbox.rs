//! Outbox entries as read back from RocksDB: anything that decodes re-encodes to the same bytes
//! (a legacy record to its tagged form) and publishes as records without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use segmenter::outbox::{OutboxEntry, PublishBuffers, Topics};

fuzz_target!(|data: &[u8]| {
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
    };
    let mut buffers = PublishBuffers::default();
    let mut parts = 0u8;
    let published: Result<(), ()> = entry.publish(&topics, &mut buffers, |part, record| {
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
