//! The other bytes read back from RocksDB: timer, outbox, customer and member keys (parsed back
//! into their parts when the timers and the members index are restored), the fixed-width meta
//! values (clock, counts, offsets, the next outbox sequence) and the stored layout descriptions
//! (JSON) that old states are re-slotted with. Whatever parses must rebuild the same bytes.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use segmenter::features::CustomerState;
use segmenter::rules::{compile, SegmentDef};
use segmenter::store::codec::{self, StateLayout};
use segmenter::store::keys;

/// A valid state value and the layout it is shaped for.
fn valid_state() -> &'static (Vec<u8>, StateLayout) {
    static STATE: OnceLock<(Vec<u8>, StateLayout)> = OnceLock::new();
    STATE.get_or_init(|| {
        let program = compile(&[SegmentDef {
            id: "a".into(),
            description: None,
            rule: r#"count("X", 7d) > 1 and trait.plan == "pro" and since(last(any)) > 1h"#.into(),
        }])
        .expect("compiles");
        let layout = StateLayout::of(&program);
        let state = CustomerState::new(&program.layout, 1);
        (codec::encode(&state, &layout), layout)
    })
}

fuzz_target!(|data: &[u8]| {
    let partition = data
        .get(..4)
        .and_then(|bytes| bytes.try_into().ok())
        .map(u32::from_be_bytes);
    if let Some((due, customer)) = keys::parse_timer(data) {
        let p = partition.expect("a timer key has a partition");
        assert_eq!(keys::timer(p, due, &customer), data, "timer key round trip");
    }
    if let Some(seq) = keys::parse_outbox(data) {
        let p = partition.expect("an outbox key has a partition");
        assert_eq!(keys::outbox(p, seq), data, "outbox key round trip");
    }
    if let Some(customer) = keys::parse_customer(data) {
        let p = partition.expect("a customer key has a partition");
        assert_eq!(keys::customer(p, customer), data, "customer key round trip");
    }
    if let Some(p) = partition {
        if let Some(nul) = data.iter().skip(4).position(|&b| b == 0) {
            let segment = String::from_utf8_lossy(&data[4..4 + nul]).into_owned();
            let prefix = keys::members_prefix(p, &segment);
            if data.starts_with(&prefix) {
                if let Some(customer) = keys::parse_member(data, prefix.len()) {
                    assert_eq!(
                        keys::member(p, &segment, customer),
                        data,
                        "member key round trip"
                    );
                }
            }
        }
    }
    match codec::decode_i64(data) {
        Ok(value) => assert_eq!(value.to_be_bytes(), data, "i64 value round trip"),
        Err(_) => assert_ne!(data.len(), 8, "8 bytes are always an i64"),
    }
    if let Ok(value) = codec::decode_u64(data) {
        assert_eq!(value.to_be_bytes(), data, "u64 value round trip");
    }
    let _ = codec::layout_id(data);
    // A stored layout description (meta `layout/<id>`), used to re-slot an old state.
    if let Ok(old) = serde_json::from_slice::<StateLayout>(data) {
        let (bytes, current) = valid_state();
        let _ = codec::decode(bytes, &old, current);
        let _ = codec::decode(bytes, current, &old);
    }
});
