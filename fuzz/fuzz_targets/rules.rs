//! The rule language on arbitrary text: lexer, parser, canonical text, compiler, and — for what
//! compiles — the engine evaluating it over a few events and the passing of time (state written
//! back through the codec and read again).
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use segmenter::decode::{Decoder, FieldMapping};
use segmenter::engine::{EngineConfig, PartitionEngine};
use segmenter::model::Event;
use segmenter::rules::error::line_col;
use segmenter::rules::parser::parse;
use segmenter::rules::{compile, explain, SegmentDef};
use segmenter::store::MemoryStore;

const DAY: i64 = 86_400_000;
const T0: i64 = 1_767_225_600_000; // 2026-01-01

fn events() -> &'static [Event] {
    static EVENTS: OnceLock<Vec<Event>> = OnceLock::new();
    EVENTS.get_or_init(|| {
        let decoder = Decoder::new(FieldMapping::default(), 65_536);
        [
            r#"{"type":"identify","userId":"c1","timestamp":"2026-01-01T00:00:00Z","traits":{"plan":"pro","country":"NL","age":41,"tags":["a"],"nested":{"x":1}}}"#,
            r#"{"type":"track","event":"Order Completed","userId":"c1","messageId":"m1","timestamp":"2026-01-01T01:00:00Z","properties":{"revenue":12.5,"currency":"EUR","items":{"count":3}}}"#,
            r#"{"type":"track","event":"Order Completed","userId":"c1","messageId":"m1","timestamp":"2026-01-01T01:00:00Z","properties":{"revenue":12.5}}"#,
            r#"{"type":"page","event":"Home","userId":"c1","timestamp":"2026-01-02T00:00:00Z","properties":{"path":"/"}}"#,
            r#"{"type":"track","event":"Product Added","userId":"c1","timestamp":"2026-01-03T00:00:00Z","properties":{"price":-1e300,"sku":"x","revenue":"12"}}"#,
            r#"{"type":"track","event":"Email Opened","userId":"c2","timestamp":"2026-01-04T00:00:00Z","properties":{}}"#,
        ]
        .iter()
        .filter_map(|line| decoder.decode(line.as_bytes()).ok())
        .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse(text) {
        Ok(ast) => {
            let canonical = ast.to_string();
            // Fully parenthesised, the canonical text of a deep tree may nest deeper than the
            // parser allows; otherwise it must read back as itself.
            match parse(&canonical) {
                Ok(again) => {
                    assert_eq!(again.to_string(), canonical, "the canonical text is stable")
                }
                Err(error) => assert!(
                    error.message.contains("nested too deeply"),
                    "the canonical text does not parse: {error}: {canonical}"
                ),
            }
        }
        Err(error) => {
            assert!(error.span.start <= text.len(), "error span beyond the text");
            let _ = line_col(text, error.span.start);
        }
    }
    let defs = [
        SegmentDef {
            id: "fuzzed".into(),
            description: None,
            rule: text.to_string(),
        },
        SegmentDef {
            id: "other".into(),
            description: None,
            rule: r#"count("Order Completed", 7d) >= 1"#.into(),
        },
    ];
    let Ok(program) = compile(&defs) else {
        return;
    };
    let program = Arc::new(program);
    let store = Arc::new(MemoryStore::default());
    let config = EngineConfig::default();
    let Ok(mut engine) = PartitionEngine::open(0, program.clone(), store, config) else {
        return;
    };
    let mut changes = Vec::new();
    for event in events() {
        engine.apply_event(event, &mut changes).expect("applies");
    }
    engine
        .advance(T0 + 400 * DAY, &mut changes)
        .expect("advances");
    engine.flush().expect("writes back");
    for customer in ["c1", "c2"] {
        let state = engine
            .customer_state(customer)
            .expect("reads back what it wrote")
            .expect("the customer exists");
        for idx in 0..program.segments.len() {
            let _ = explain(&program, &state, customer, T0 + 10 * DAY, idx, 8);
        }
    }
});
