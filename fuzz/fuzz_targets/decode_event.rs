//! The event decoder on raw Kafka message bytes: the Segment mapping on its slot fast path must
//! decide exactly what the general path (a parsed document read through pointers) decides, with
//! and without property filtering; custom mappings (nested pointers, the whole document) must
//! never panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use segmenter::decode::{Decoder, FieldMapping};

struct Decoders {
    /// (fast path, the same decoder without it)
    pairs: Vec<(Decoder, Decoder)>,
    /// Mappings that never take the fast path.
    general: Vec<Decoder>,
}

fn decoders() -> &'static Decoders {
    static DECODERS: OnceLock<Decoders> = OnceLock::new();
    DECODERS.get_or_init(|| {
        let segment = Decoder::new(FieldMapping::default(), 65_536);
        let filtered = segment
            .clone()
            .with_property_keys(vec!["revenue".into(), "currency".into()]);
        let flat_custom = Decoder::new(
            FieldMapping {
                customer_id: vec!["/uid".into(), "/anon".into()],
                event_type: None,
                event_name: "/e".into(),
                timestamp: "/t".into(),
                message_id: None,
                properties: Some("/p".into()),
                traits: Some("/tr".into()),
            },
            4_096,
        );
        let nested = Decoder::new(
            FieldMapping {
                customer_id: vec!["/user/id".into(), "/ids/0".into()],
                event_type: Some("/meta/kind".into()),
                event_name: "/meta/name".into(),
                timestamp: "/meta/ts".into(),
                message_id: Some("/meta/id".into()),
                properties: Some("/data".into()),
                traits: Some("/user/traits".into()),
            },
            65_536,
        )
        .with_property_keys(vec!["revenue".into()]);
        let whole = Decoder::new(
            FieldMapping {
                properties: Some(String::new()),
                ..FieldMapping::default()
            },
            65_536,
        );
        let pairs = [segment, filtered, flat_custom]
            .into_iter()
            .map(|fast| {
                let general = fast.clone().without_fast_path();
                (fast, general)
            })
            .collect();
        Decoders {
            pairs,
            general: vec![nested, whole],
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let decoders = decoders();
    for (fast, general) in &decoders.pairs {
        let decided = fast.decode(data);
        assert_eq!(
            decided,
            general.decode(data),
            "fast and general paths disagree"
        );
        if let Ok(event) = decided {
            assert!(
                !event.customer_id.is_empty(),
                "an event without a customer id"
            );
        }
    }
    for decoder in &decoders.general {
        let _ = decoder.decode(data);
    }
});
