//! Customer state bytes as read back from RocksDB: the codec directly (a value that decodes
//! re-encodes to a fixed point) and through the engine, which must refuse a corrupt value with
//! an error naming partition and customer, or else evaluate, update and write it back. The
//! first byte picks the header: as given, the current layout's, or an older layout's (the
//! re-slotting path).
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use segmenter::decode::{Decoder, FieldMapping};
use segmenter::engine::{EngineConfig, EngineError, PartitionEngine};
use segmenter::model::Event;
use segmenter::rules::{compile, evaluate, explain, next_change, Program, SegmentDef};
use segmenter::store::codec::{self, StateLayout};
use segmenter::store::{keys, MemoryStore, Store, Table, WriteSet};

const RULES: [(&str, &str); 4] = [
    (
        "a",
        r#"count("X", 7d) > 1 and count("X") > 0 and since(last("X")) > 1h"#,
    ),
    (
        "b",
        r#"trait.plan == "pro" or sum("Order", "revenue", 30d) >= 10"#,
    ),
    (
        "c",
        r#"avg("Order", "revenue") > 2 and first(any) < last(any) and in_segment("a")"#,
    ),
    (
        "d",
        r#"max("Order", "revenue", 1d) > min("Order", "revenue", 1d) or bucket(10) < 5"#,
    ),
];

struct Fixture {
    current: Arc<Program>,
    current_layout: StateLayout,
    old_layout: StateLayout,
    event: Event,
}

fn program(rules: &[(&str, &str)]) -> Program {
    let defs: Vec<SegmentDef> = rules
        .iter()
        .map(|(id, rule)| SegmentDef {
            id: (*id).into(),
            description: None,
            rule: (*rule).into(),
        })
        .collect();
    compile(&defs).expect("the fixture rules compile")
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let current = program(&RULES);
        let old = program(&[RULES[1], RULES[0], ("e", r#"count("Y", 2d) > 0"#)]);
        let event = Decoder::new(FieldMapping::default(), 65_536)
            .decode(br#"{"type":"track","event":"Order","userId":"c","messageId":"m","timestamp":"2026-01-01T00:00:00Z","properties":{"revenue":4}}"#)
            .expect("the fixture event decodes");
        Fixture {
            current_layout: StateLayout::of(&current),
            old_layout: StateLayout::of(&old),
            current: Arc::new(current),
            event,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let header = match selector % 3 {
        0 => None,
        1 => Some(fixture.current_layout.id),
        _ => Some(fixture.old_layout.id),
    };
    let mut bytes = Vec::with_capacity(body.len() + 9);
    if let Some(id) = header {
        bytes.push(1);
        bytes.extend_from_slice(&id.to_be_bytes());
    }
    bytes.extend_from_slice(body);

    // The codec: a value that decodes is a fixed point of encode ∘ decode.
    let current = &fixture.current_layout;
    let stored = if header == Some(fixture.old_layout.id) {
        &fixture.old_layout
    } else {
        current
    };
    if let Ok(state) = codec::decode(&bytes, stored, current) {
        let encoded = codec::encode(&state, current);
        let again = codec::decode(&encoded, current, current).expect("an encoding decodes");
        assert_eq!(
            codec::encode(&again, current),
            encoded,
            "encode/decode is not stable"
        );
        let program = &fixture.current;
        let t = fixture.event.timestamp;
        let evaluation = evaluate(program, &state, "c", t);
        let _ = next_change(program, &state, "c", &evaluation, None, 8);
        let _ = explain(program, &state, "c", t, 2, 8);
    }

    // The engine, reading it as a stored customer.
    let store = Arc::new(MemoryStore::default());
    let mut writes = WriteSet::default();
    let old_json = serde_json::to_vec(&fixture.old_layout).expect("layout json");
    writes.put(Table::Meta, keys::layout(fixture.old_layout.id), old_json);
    writes.put(Table::Customers, keys::customer(3, "c"), bytes);
    store.write(writes).expect("memory store");
    let config = EngineConfig::default();
    let mut engine = PartitionEngine::open(3, fixture.current.clone(), store, config)
        .expect("opens over a corrupt customer value");
    let mut changes = Vec::new();
    match engine.apply_event(&fixture.event, &mut changes) {
        Ok(_) => {
            engine
                .advance(fixture.event.timestamp + 40 * 86_400_000, &mut changes)
                .expect("advances");
            engine.flush().expect("writes back");
            let state = engine
                .customer_state("c")
                .expect("reads back what it wrote");
            assert!(state.is_some(), "the customer is gone");
        }
        Err(EngineError::CorruptState {
            partition,
            customer,
            ..
        }) => {
            assert_eq!(
                (partition, customer.as_str()),
                (3, "c"),
                "the error names the value"
            );
        }
        Err(other) => panic!("unexpected error: {other}"),
    }
});
