//! Input decoding (SPEC §2): raw bytes → [`Event`], or a typed [`DecodeError`] with a reason.
//!
//! The default mapping is the Segment Spec; every field location is a JSON pointer so a company's
//! own schema decodes without a translator. Nothing here panics on input.
//!
//! When every pointer names a top-level key (the Segment mapping and most others) a document is
//! read straight into one slot per key, skipping everything else, instead of being built as a
//! JSON object first; both paths share one set of decoding rules ([`Fields`]) and the tests
//! check that they agree on generated, random and malformed input.

use serde_json::{Map, Value};

use crate::model::time::{self, TimeError};
use crate::model::{Event, EventKind};

/// Where each field lives in an input document (JSON pointers, RFC 6901).
#[derive(Debug, Clone, PartialEq)]
pub struct FieldMapping {
    /// Tried in order; the first non-empty string (or integer) wins.
    pub customer_id: Vec<String>,
    /// The event type (`track`, `page`, `screen`, `identify`); `None` means every event with a
    /// name is a `track`, and one without a name but with traits is an `identify`.
    pub event_type: Option<String>,
    pub event_name: String,
    pub timestamp: String,
    pub message_id: Option<String>,
    pub properties: Option<String>,
    pub traits: Option<String>,
}

impl Default for FieldMapping {
    fn default() -> Self {
        FieldMapping {
            customer_id: vec!["/userId".into(), "/anonymousId".into()],
            event_type: Some("/type".into()),
            event_name: "/event".into(),
            timestamp: "/timestamp".into(),
            message_id: Some("/messageId".into()),
            properties: Some("/properties".into()),
            traits: Some("/traits".into()),
        }
    }
}

/// Every way an input message can be unusable. `reason()` is the short label used in metrics
/// and dead-letter headers; `Display` is the human sentence.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("too large: {size} bytes, the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("not a JSON object")]
    NotObject,
    #[error("no customer id (none of {0})")]
    NoCustomerId(String),
    #[error("missing type")]
    MissingType,
    #[error("unknown type {0:?}")]
    UnknownType(String),
    #[error("track event without an event name")]
    MissingEventName,
    #[error("missing timestamp")]
    MissingTimestamp,
    #[error("bad timestamp: {0}")]
    BadTimestamp(TimeError),
    #[error("{0} is not an object")]
    NotAnObject(&'static str),
    #[error("timestamp is {ahead_ms} ms in the future, more than max_future_skew")]
    TooFarInFuture { ahead_ms: i64 },
}

impl DecodeError {
    /// A stable, low-cardinality label for metrics and DLQ headers.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::NotJson(_) => "not_json",
            DecodeError::NotObject => "not_object",
            DecodeError::NoCustomerId(_) => "no_customer_id",
            DecodeError::MissingType => "missing_type",
            DecodeError::UnknownType(_) => "unknown_type",
            DecodeError::MissingEventName => "missing_event_name",
            DecodeError::MissingTimestamp => "missing_timestamp",
            DecodeError::BadTimestamp(_) => "bad_timestamp",
            DecodeError::NotAnObject(_) => "bad_field",
            DecodeError::TooFarInFuture { .. } => "future_timestamp",
        }
    }
}

/// A JSON pointer split into its unescaped reference tokens once, so lookups on the hot path
/// neither split nor allocate.
#[derive(Debug, Clone, PartialEq)]
struct Pointer {
    tokens: Vec<String>,
}

impl Pointer {
    fn parse(text: &str) -> Pointer {
        let tokens = text
            .split('/')
            .skip(1)
            .map(|token| token.replace("~1", "/").replace("~0", "~"))
            .collect();
        Pointer { tokens }
    }

    fn get<'a>(&self, document: &'a Value) -> Option<&'a Value> {
        self.tokens
            .iter()
            .try_fold(document, |value, token| match value {
                Value::Object(map) => map.get(token),
                Value::Array(items) => token.parse::<usize>().ok().and_then(|i| items.get(i)),
                _ => None,
            })
    }

    fn take(&self, document: &mut Value) -> Option<Value> {
        let mut value = document;
        for token in &self.tokens {
            value = match value {
                Value::Object(map) => map.get_mut(token)?,
                Value::Array(items) => items.get_mut(token.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(value.take())
    }
}

/// The mapping with its pointers parsed.
#[derive(Debug, Clone)]
struct Pointers {
    customer_id: Vec<Pointer>,
    event_type: Option<Pointer>,
    event_name: Pointer,
    timestamp: Pointer,
    message_id: Option<Pointer>,
    properties: Option<Pointer>,
    traits: Option<Pointer>,
}

/// Decodes raw input documents with one field mapping and size limit.
#[derive(Debug, Clone)]
pub struct Decoder {
    mapping: FieldMapping,
    pointers: Pointers,
    /// The top-level keys any pointer starts with: only these are parsed into values, the rest
    /// of a document (Segment's `context`, `integrations`…) is skipped without allocating.
    /// `None` when a pointer names the whole document.
    top_keys: Option<Vec<String>>,
    /// When set, only these keys of `properties` are kept (the rules read no others).
    property_keys: Option<Vec<String>>,
    /// Set when every pointer is a single top-level key (the Segment mapping and most others):
    /// documents then decode into one slot per key, with no intermediate JSON object.
    slots: Option<SlotLayout>,
    max_bytes: usize,
}

/// The fast path's layout: the distinct top-level keys the pointers name, and which slot each
/// field reads.
#[derive(Debug, Clone, PartialEq)]
struct SlotLayout {
    keys: Vec<String>,
    customer_id: Vec<usize>,
    event_type: Option<usize>,
    event_name: usize,
    timestamp: usize,
    message_id: Option<usize>,
    properties: Option<usize>,
    traits: Option<usize>,
}

impl SlotLayout {
    /// `None` when some pointer is not a single top-level key.
    fn of(pointers: &Pointers) -> Option<SlotLayout> {
        let mut keys: Vec<String> = Vec::new();
        let customer_id = pointers
            .customer_id
            .iter()
            .map(|pointer| slot(&mut keys, pointer))
            .collect::<Option<Vec<usize>>>()?;
        Some(SlotLayout {
            customer_id,
            event_type: optional_slot(&mut keys, pointers.event_type.as_ref())?,
            event_name: slot(&mut keys, &pointers.event_name)?,
            timestamp: slot(&mut keys, &pointers.timestamp)?,
            message_id: optional_slot(&mut keys, pointers.message_id.as_ref())?,
            properties: optional_slot(&mut keys, pointers.properties.as_ref())?,
            traits: optional_slot(&mut keys, pointers.traits.as_ref())?,
            keys,
        })
    }
}

/// The slot of a single-key pointer (added to `keys` if new); `None` for any other pointer.
fn slot(keys: &mut Vec<String>, pointer: &Pointer) -> Option<usize> {
    let [key] = pointer.tokens.as_slice() else {
        return None;
    };
    Some(match keys.iter().position(|k| k == key) {
        Some(i) => i,
        None => {
            keys.push(key.clone());
            keys.len() - 1
        }
    })
}

/// [`slot`] for an optional field: `Some(None)` when the mapping has no such field.
fn optional_slot(keys: &mut Vec<String>, pointer: Option<&Pointer>) -> Option<Option<usize>> {
    match pointer {
        None => Some(None),
        Some(pointer) => slot(keys, pointer).map(Some),
    }
}

/// One field of the mapping (`CustomerId(i)`: the i-th customer id candidate).
#[derive(Debug, Clone, Copy)]
enum Field {
    CustomerId(usize),
    Type,
    Name,
    Timestamp,
    MessageId,
    Properties,
    Traits,
}

/// Where a decoded document's fields are read from: a parsed JSON document and the pointers,
/// or the fast path's slots. One set of decoding rules ([`Decoder::decode_fields`]) serves both.
trait Fields {
    /// `None`: the field is absent (or the mapping has no such field).
    fn get(&self, field: Field) -> Option<&Value>;
    fn take(&mut self, field: Field) -> Option<Value>;
}

/// A whole parsed document, read through the mapping's pointers.
struct Document<'a> {
    value: Value,
    pointers: &'a Pointers,
}

/// The pointer a field is read through.
fn pointer_of(p: &Pointers, field: Field) -> Option<&Pointer> {
    match field {
        Field::CustomerId(i) => p.customer_id.get(i),
        Field::Type => p.event_type.as_ref(),
        Field::Name => Some(&p.event_name),
        Field::Timestamp => Some(&p.timestamp),
        Field::MessageId => p.message_id.as_ref(),
        Field::Properties => p.properties.as_ref(),
        Field::Traits => p.traits.as_ref(),
    }
}

impl Fields for Document<'_> {
    fn get(&self, field: Field) -> Option<&Value> {
        pointer_of(self.pointers, field)?.get(&self.value)
    }

    fn take(&mut self, field: Field) -> Option<Value> {
        let pointers = self.pointers;
        pointer_of(pointers, field)?.take(&mut self.value)
    }
}

/// The fast path's decoded slots (one per top-level key of the layout).
struct Slots<'a> {
    values: Vec<Option<Value>>,
    layout: &'a SlotLayout,
}

impl Slots<'_> {
    fn slot(&self, field: Field) -> Option<usize> {
        let l = self.layout;
        match field {
            Field::CustomerId(i) => l.customer_id.get(i).copied(),
            Field::Type => l.event_type,
            Field::Name => Some(l.event_name),
            Field::Timestamp => Some(l.timestamp),
            Field::MessageId => l.message_id,
            Field::Properties => l.properties,
            Field::Traits => l.traits,
        }
    }
}

impl Fields for Slots<'_> {
    fn get(&self, field: Field) -> Option<&Value> {
        self.values.get(self.slot(field)?)?.as_ref()
    }

    fn take(&mut self, field: Field) -> Option<Value> {
        let slot = self.slot(field)?;
        self.values.get_mut(slot)?.take()
    }
}

impl Decoder {
    pub fn new(mapping: FieldMapping, max_bytes: usize) -> Self {
        let optional = |text: &Option<String>| text.as_deref().map(Pointer::parse);
        let pointers = Pointers {
            customer_id: mapping
                .customer_id
                .iter()
                .map(|p| Pointer::parse(p))
                .collect(),
            event_type: optional(&mapping.event_type),
            event_name: Pointer::parse(&mapping.event_name),
            timestamp: Pointer::parse(&mapping.timestamp),
            message_id: optional(&mapping.message_id),
            properties: optional(&mapping.properties),
            traits: optional(&mapping.traits),
        };
        let all = pointers
            .customer_id
            .iter()
            .chain([&pointers.event_name, &pointers.timestamp])
            .chain(pointers.event_type.iter())
            .chain(pointers.message_id.iter())
            .chain(pointers.properties.iter())
            .chain(pointers.traits.iter());
        let mut top_keys = Vec::new();
        let mut whole_document = false;
        for pointer in all {
            match pointer.tokens.first() {
                Some(first) => top_keys.push(first.clone()),
                None => whole_document = true,
            }
        }
        top_keys.sort();
        top_keys.dedup();
        Decoder {
            mapping,
            slots: SlotLayout::of(&pointers),
            pointers,
            top_keys: (!whole_document).then_some(top_keys),
            property_keys: None,
            max_bytes,
        }
    }

    /// Keeps only `keys` of each event's properties (those the compiled rules read), so large
    /// property payloads are skipped rather than parsed. Applies when `properties` is a
    /// top-level field.
    pub fn with_property_keys(mut self, keys: Vec<String>) -> Self {
        self.property_keys = Some(keys);
        self
    }

    fn properties_key(&self) -> Option<&str> {
        match self.pointers.properties.as_ref()?.tokens.as_slice() {
            [single] => Some(single),
            _ => None,
        }
    }

    /// The same decoder without the slot fast path: every document is parsed and read through
    /// the pointers. For differential tests and fuzzing; both must decide alike.
    pub fn without_fast_path(self) -> Self {
        Decoder {
            slots: None,
            ..self
        }
    }

    /// The size limit, in bytes.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Decodes one message; the size limit is checked before any parsing.
    pub fn decode(&self, bytes: &[u8]) -> Result<Event, DecodeError> {
        self.decode_sized(bytes, bytes.len())
    }

    /// Decodes one message of `size` bytes of which `bytes` may be only the head (the consumer
    /// copies no more of an oversized payload than its dead letter keeps): the limit is
    /// checked on `size`, and a cut message is never parsed.
    pub fn decode_sized(&self, bytes: &[u8], size: usize) -> Result<Event, DecodeError> {
        if size > self.max_bytes || bytes.len() < size {
            return Err(DecodeError::TooLarge {
                size,
                limit: self.max_bytes,
            });
        }
        if let Some(layout) = &self.slots {
            let mut deserializer = serde_json::Deserializer::from_slice(bytes);
            let seed = SlotsSeed {
                keys: &layout.keys,
                properties: layout.properties.zip(self.property_keys.as_deref()),
            };
            let values = serde::de::DeserializeSeed::deserialize(seed, &mut deserializer)
                .and_then(|values| deserializer.end().map(|()| values))
                .map_err(|err| DecodeError::NotJson(err.to_string()))?
                .ok_or(DecodeError::NotObject)?;
            return self.decode_fields(Slots { values, layout });
        }
        let document = match &self.top_keys {
            Some(keys) => {
                let mut deserializer = serde_json::Deserializer::from_slice(bytes);
                let seed = TopLevel {
                    keep: keys,
                    properties: self.properties_key().zip(self.property_keys.as_deref()),
                };
                let pruned = serde::de::DeserializeSeed::deserialize(seed, &mut deserializer)
                    .and_then(|document| deserializer.end().map(|()| document))
                    .map_err(|err| DecodeError::NotJson(err.to_string()))?;
                pruned.ok_or(DecodeError::NotObject)?
            }
            None => serde_json::from_slice(bytes)
                .map_err(|err| DecodeError::NotJson(err.to_string()))?,
        };
        self.decode_value(document)
    }

    fn decode_value(&self, document: Value) -> Result<Event, DecodeError> {
        if !document.is_object() {
            return Err(DecodeError::NotObject);
        }
        self.decode_fields(Document {
            value: document,
            pointers: &self.pointers,
        })
    }

    /// The decoding rules, whatever the fields were read from.
    fn decode_fields(&self, mut fields: impl Fields) -> Result<Event, DecodeError> {
        let customer_id = (0..self.pointers.customer_id.len())
            .find_map(|i| id_text(fields.get(Field::CustomerId(i))))
            .ok_or_else(|| DecodeError::NoCustomerId(self.mapping.customer_id.join(", ")))?;
        let name = fields
            .get(Field::Name)
            .and_then(Value::as_str)
            .filter(|name| !name.is_empty())
            .map(str::to_string);
        let kind = if self.pointers.event_type.is_some() {
            let event_type = fields
                .get(Field::Type)
                .ok_or(DecodeError::MissingType)?
                .as_str()
                .ok_or_else(|| DecodeError::UnknownType("(not a string)".into()))?;
            kind_of(event_type, name)?
        } else {
            match name {
                Some(name) => EventKind::Activity { name },
                None => EventKind::Identify,
            }
        };
        let timestamp = match fields.get(Field::Timestamp) {
            None | Some(Value::Null) => return Err(DecodeError::MissingTimestamp),
            Some(Value::String(text)) => time::parse_rfc3339(text),
            Some(Value::Number(number)) => time::from_epoch_number(number),
            Some(_) => Err(TimeError::WrongType),
        }
        .map_err(DecodeError::BadTimestamp)?;
        let message_id = id_text(fields.get(Field::MessageId));
        let properties = take_object(&mut fields, Field::Properties, "properties")?;
        let traits = match kind {
            EventKind::Identify => take_object(&mut fields, Field::Traits, "traits")?,
            EventKind::Activity { .. } => Map::new(),
        };
        Ok(Event {
            customer_id,
            kind,
            timestamp,
            message_id,
            properties,
            traits,
        })
    }
}

/// The arms of an object visitor for every other JSON value: arrays are still read through (to
/// check their syntax) and become `$other`, like any scalar; `null` becomes `$null`.
macro_rules! non_objects_are {
    ($other:expr, $null:expr) => {
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok($other)
        }

        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other)
        }

        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other)
        }

        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok($other)
        }

        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other)
        }

        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok($other)
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($null)
        }
    };
}

/// Deserializes a top-level JSON object into one slot per wanted key (the last occurrence wins,
/// as in a parsed object); `None` for any other JSON value (still fully checked for syntax).
struct SlotsSeed<'k> {
    keys: &'k [String],
    /// The properties slot and the keys of it to keep.
    properties: Option<(usize, &'k [String])>,
}

impl<'de> serde::de::DeserializeSeed<'de> for SlotsSeed<'_> {
    type Value = Option<Vec<Option<Value>>>;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for SlotsSeed<'_> {
    type Value = Option<Vec<Option<Value>>>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut values: Vec<Option<Value>> = vec![None; self.keys.len()];
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let name = key.as_str();
            match self.keys.iter().position(|wanted| wanted == name) {
                Some(slot) => {
                    let value = match self.properties {
                        Some((properties, keep)) if properties == slot => {
                            map.next_value_seed(Properties { keep })?
                        }
                        _ => map.next_value::<Value>()?,
                    };
                    values[slot] = Some(value);
                }
                None => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(Some(values))
    }

    non_objects_are!(None, None);
}

/// Deserializes a top-level JSON object keeping only the `keep` keys; `None` for any other JSON
/// value (which is still fully checked for syntax).
struct TopLevel<'k> {
    keep: &'k [String],
    /// The properties field and the keys of it to keep.
    properties: Option<(&'k str, &'k [String])>,
}

impl<'de> serde::de::DeserializeSeed<'de> for TopLevel<'_> {
    type Value = Option<Value>;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for TopLevel<'_> {
    type Value = Option<Value>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut kept = Map::new();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let name = key.as_str();
            if let Some((field, keys)) = self.properties.filter(|(field, _)| *field == name) {
                let properties = map.next_value_seed(Properties { keep: keys })?;
                kept.insert(field.to_string(), properties);
            } else if self.keep.iter().any(|wanted| wanted == name) {
                kept.insert(name.to_string(), map.next_value::<Value>()?);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(Some(Value::Object(kept)))
    }

    non_objects_are!(None, None);
}

/// The `properties` object with only the `keep` keys; any other JSON value becomes `false`
/// (still "not an object" to the decoder), `null` stays null.
struct Properties<'k> {
    keep: &'k [String],
}

impl<'de> serde::de::DeserializeSeed<'de> for Properties<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Properties<'_> {
    type Value = Value;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut kept = Map::new();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let name = key.as_str();
            if self.keep.iter().any(|wanted| wanted == name) {
                kept.insert(name.to_string(), map.next_value::<Value>()?);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(Value::Object(kept))
    }

    non_objects_are!(Value::Bool(false), Value::Null);
}

/// An object key, borrowed from the input unless it contains escapes.
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Key<'_> {
    fn as_str(&self) -> &str {
        match self {
            Key::Borrowed(name) => name,
            Key::Owned(name) => name,
        }
    }
}

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> serde::de::Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("an object key")
            }

            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Key<'de>, E> {
                Ok(Key::Borrowed(text))
            }

            fn visit_str<E>(self, text: &str) -> Result<Key<'de>, E> {
                Ok(Key::Owned(text.to_string()))
            }

            fn visit_string<E>(self, text: String) -> Result<Key<'de>, E> {
                Ok(Key::Owned(text))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

fn kind_of(event_type: &str, name: Option<String>) -> Result<EventKind, DecodeError> {
    match event_type {
        "track" => name
            .map(|name| EventKind::Activity { name })
            .ok_or(DecodeError::MissingEventName),
        "page" => Ok(EventKind::Activity {
            name: "page".into(),
        }),
        "screen" => Ok(EventKind::Activity {
            name: "screen".into(),
        }),
        "identify" => Ok(EventKind::Identify),
        other => Err(DecodeError::UnknownType(other.to_string())),
    }
}

/// A non-empty string, or an integer as its decimal text.
fn id_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(text) if !text.is_empty() => Some(text.clone()),
        Value::Number(number) if number.is_i64() || number.is_u64() => Some(number.to_string()),
        _ => None,
    }
}

fn take_object(
    fields: &mut impl Fields,
    field: Field,
    what: &'static str,
) -> Result<Map<String, Value>, DecodeError> {
    match fields.take(field) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(map)) => Ok(map),
        Some(_) => Err(DecodeError::NotAnObject(what)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder() -> Decoder {
        Decoder::new(FieldMapping::default(), 65_536)
    }

    /// The same decoder forced onto the general path (a parsed object read through pointers).
    fn general(decoder: &Decoder) -> Decoder {
        decoder.clone().without_fast_path()
    }

    /// The slot fast path must decide exactly what the general path decides, error included.
    fn assert_same(decoder: &Decoder, input: &[u8]) {
        assert!(
            decoder.slots.is_some(),
            "the mapping should take the fast path"
        );
        assert_eq!(
            decoder.decode(input),
            general(decoder).decode(input),
            "{}",
            String::from_utf8_lossy(input)
        );
    }

    #[test]
    fn fast_path_agrees_with_the_general_path_on_generated_traffic() {
        let keys = vec!["revenue".to_string(), "cart_id".to_string()];
        let filtered = decoder().with_property_keys(keys);
        let config = crate::generate::GeneratorConfig {
            customers: 500,
            events: 5_000,
            malformed_fraction: 0.1,
            ..crate::generate::GeneratorConfig::default()
        };
        let mut malformed = 0;
        for line in crate::generate::Generator::new(config) {
            malformed += usize::from(decoder().decode(line.as_bytes()).is_err());
            assert_same(&decoder(), line.as_bytes());
            assert_same(&filtered, line.as_bytes());
        }
        assert!(
            malformed > 100,
            "the stream should hold bad input too ({malformed})"
        );
    }

    proptest::proptest! {
        /// Random objects over the mapping's keys (repeats, wrong types and nulls included).
        #[test]
        fn fast_path_agrees_on_random_objects(
            fields in proptest::collection::vec((0usize..9, 0usize..12), 0..10)
        ) {
            const KEYS: [&str; 9] = [
                "type", "event", "userId", "anonymousId", "timestamp", "messageId",
                "properties", "traits", "context",
            ];
            const VALUES: [&str; 12] = [
                r#""track""#, r#""identify""#, r#""page""#, r#""""#, r#""u-1""#, "17", "1.5",
                "null", "true", r#"{"revenue":2,"cart_id":"c"}"#, "[1]",
                r#""2026-11-01T09:00:00Z""#,
            ];
            let body: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("\"{}\":{}", KEYS[*k], VALUES[*v]))
                .collect();
            let input = format!("{{{}}}", body.join(","));
            assert_same(&decoder(), input.as_bytes());
            assert_same(
                &decoder().with_property_keys(vec!["revenue".into()]),
                input.as_bytes(),
            );
        }
    }

    #[test]
    fn fast_path_agrees_on_edge_cases() {
        let cases: &[&[u8]] = &[
            br#"{"type":"track","event":"a","userId":"u","timestamp":1,"userId":"v"}"#,
            br#"{"type":"track","event":"a","userId":"","anonymousId":5,"timestamp":1}"#,
            br#"{"type":"track","event":"a","userId":1.5,"anonymousId":"x","timestamp":1}"#,
            br#"{"type":"identify","userId":"u","timestamp":"2026-11-01T09:00:00Z","traits":null}"#,
            br#"{"type":"identify","userId":"u","timestamp":1,"traits":[1]}"#,
            br#"{"type":"track","event":"a","userId":"u","timestamp":1,"properties":"x"}"#,
            br#"{"type":"track","event":"a","userId":"u","timestamp":1,"properties":null}"#,
            br#"{"type":7,"event":"a","userId":"u","timestamp":1}"#,
            br#"{"type":"track","event":"","userId":"u","timestamp":1}"#,
            br#"{"type":"track","event":"a","userId":"u","timestamp":true}"#,
            br#"{"type":"track","event":"a","userId":"u","timestamp":null}"#,
            br#"{"type":"page","userId":"u","timestamp":1,"messageId":12}"#,
            br#"{"type":"page","userId":"escaped","timestamp":1}"#,
            br#"{"type":"track","event":"a","userId":"u","timestamp":1,"properties":{"revenue":1,"x":{"y":[1,2]}},"context":{"ip":"1"}}"#,
            br#"{"type":"track","event":"a","userId":"u","timestamp":1} trailing"#,
            br#"[{"userId":"u"}]"#,
            b"42",
            b"",
            br#"{"userId":"u""#,
        ];
        for case in cases {
            assert_same(&decoder(), case);
        }
        // A nested pointer anywhere keeps the whole mapping on the general path.
        let nested = FieldMapping {
            customer_id: vec!["/context/traits/id".into()],
            ..FieldMapping::default()
        };
        assert!(Decoder::new(nested, 65_536).slots.is_none());
    }

    #[test]
    fn decodes_segment_track() {
        let event = decoder()
            .decode(br#"{"type":"track","event":"Order Completed","userId":"c-42","messageId":"m-1","timestamp":"2026-11-01T10:00:00.000Z","properties":{"revenue":59.9}}"#)
            .expect("valid");
        assert_eq!(event.customer_id, "c-42");
        assert_eq!(event.activity_name(), Some("Order Completed"));
        assert_eq!(event.message_id.as_deref(), Some("m-1"));
        assert_eq!(event.properties["revenue"], 59.9);
    }

    #[test]
    fn page_identify_and_anonymous_fallback() {
        let page = decoder()
            .decode(br#"{"type":"page","anonymousId":"a-1","userId":"","timestamp":1762000000000}"#)
            .expect("page");
        assert_eq!(page.customer_id, "a-1");
        assert_eq!(page.activity_name(), Some("page"));
        let identify = decoder()
            .decode(br#"{"type":"identify","userId":7,"timestamp":"2026-11-01T09:00:00Z","traits":{"country":"NL"}}"#)
            .expect("identify");
        assert_eq!(identify.customer_id, "7");
        assert_eq!(identify.kind, EventKind::Identify);
        assert_eq!(identify.traits["country"], "NL");
    }

    #[test]
    fn every_bad_input_is_a_typed_error() {
        let cases: [(&[u8], &str); 9] = [
            (b"not json", "not_json"),
            (b"[1,2]", "not_object"),
            (
                br#"{"type":"track","event":"x","timestamp":1}"#,
                "no_customer_id",
            ),
            (
                br#"{"type":"alias","userId":"u","timestamp":1}"#,
                "unknown_type",
            ),
            (
                br#"{"userId":"u","event":"x","timestamp":1}"#,
                "missing_type",
            ),
            (
                br#"{"type":"track","userId":"u","timestamp":1}"#,
                "missing_event_name",
            ),
            (
                br#"{"type":"track","event":"x","userId":"u"}"#,
                "missing_timestamp",
            ),
            (
                br#"{"type":"track","event":"x","userId":"u","timestamp":"yesterday"}"#,
                "bad_timestamp",
            ),
            (
                br#"{"type":"track","event":"x","userId":"u","timestamp":1,"properties":[1]}"#,
                "bad_field",
            ),
        ];
        for (input, reason) in cases {
            let err = decoder().decode(input).expect_err("must be rejected");
            assert_eq!(err.reason(), reason, "{}", String::from_utf8_lossy(input));
        }
        let big = vec![b' '; 70_000];
        assert_eq!(
            decoder().decode(&big).map_err(|e| e.reason()),
            Err("too_large")
        );
    }

    /// The consumer hands over only the head of an oversized payload: it is refused by the size
    /// it had in Kafka, and a cut message is never parsed, even where the head would fit.
    #[test]
    fn a_cut_message_is_refused_by_its_whole_size() {
        let event = br#"{"type":"track","event":"x","userId":"u","timestamp":1}"#;
        let refused = decoder().decode_sized(event, 10 << 20);
        assert!(
            matches!(refused, Err(DecodeError::TooLarge { size, limit: 65_536 }) if size == 10 << 20),
            "{refused:?}"
        );
        let cut = decoder().decode_sized(event, event.len() + 1);
        assert_eq!(cut.map_err(|e| e.reason()), Err("too_large"));
        assert!(decoder().decode_sized(event, event.len()).is_ok());
    }

    #[test]
    fn skipped_fields_are_still_checked_for_syntax() {
        let valid = br#"{"type":"page","userId":"u","timestamp":1,"context":{"ip":"1.2.3.4","a":[1,{"b":null}]}}"#;
        assert!(decoder().decode(valid).is_ok());
        let broken = br#"{"type":"page","userId":"u","timestamp":1,"context":{"ip":}}"#;
        assert_eq!(
            decoder().decode(broken).map_err(|e| e.reason()),
            Err("not_json")
        );
        let trailing = br#"{"type":"page","userId":"u","timestamp":1} x"#;
        assert_eq!(
            decoder().decode(trailing).map_err(|e| e.reason()),
            Err("not_json")
        );
        for scalar in [&b"1"[..], b"\"x\"", b"true", b"null"] {
            assert_eq!(
                decoder().decode(scalar).map_err(|e| e.reason()),
                Err("not_object")
            );
        }
        let escaped_key = br#"{"type":"page","user\u0049d":"u","timestamp":1}"#;
        assert_eq!(
            decoder().decode(escaped_key).map(|e| e.customer_id),
            Ok("u".to_string())
        );
    }

    #[test]
    fn only_the_properties_rules_read_are_kept() {
        let decoder = decoder().with_property_keys(vec!["revenue".into()]);
        let event = decoder
            .decode(br#"{"type":"track","event":"O","userId":"u","timestamp":1,"properties":{"revenue":5,"products":[{"id":1}],"note":"x"}}"#)
            .expect("valid");
        assert_eq!(
            Value::Object(event.properties),
            serde_json::json!({"revenue": 5})
        );
        let bad = br#"{"type":"track","event":"O","userId":"u","timestamp":1,"properties":[1]}"#;
        assert_eq!(
            decoder.decode(bad).map_err(|e| e.reason()),
            Err("bad_field")
        );
        let null = br#"{"type":"track","event":"O","userId":"u","timestamp":1,"properties":null}"#;
        assert!(decoder.decode(null).is_ok());
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let decoder = Decoder::new(FieldMapping::default(), 1 << 20);
        assert!(decoder.decode(deep.as_bytes()).is_err());
    }

    #[test]
    fn pointers_unescape_and_index_arrays() {
        let document: Value =
            serde_json::from_str(r#"{"a/b":{"c~d":[10,{"e":1}]}}"#).expect("json");
        assert_eq!(
            Pointer::parse("/a~1b/c~0d/0").get(&document),
            Some(&Value::from(10))
        );
        assert_eq!(
            Pointer::parse("/a~1b/c~0d/1/e").get(&document),
            Some(&Value::from(1))
        );
        assert_eq!(Pointer::parse("/a~1b/x").get(&document), None);
        assert_eq!(Pointer::parse("").get(&document), Some(&document));
    }

    #[test]
    fn custom_mapping() {
        let mapping = FieldMapping {
            customer_id: vec!["/customer/id".into()],
            event_type: None,
            event_name: "/action".into(),
            timestamp: "/ts".into(),
            message_id: Some("/uuid".into()),
            properties: Some("/data".into()),
            traits: Some("/profile".into()),
        };
        let decoder = Decoder::new(mapping, 4096);
        let event = decoder
            .decode(br#"{"customer":{"id":"k1"},"action":"Product Added","ts":1762000000000,"uuid":"u1","data":{"price":3}}"#)
            .expect("custom");
        assert_eq!(event.customer_id, "k1");
        assert_eq!(event.activity_name(), Some("Product Added"));
        assert_eq!(event.properties["price"], 3);
    }
}
