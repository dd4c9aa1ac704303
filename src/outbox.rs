//! The outbox: what the engine decided (membership changes, dead letters) is written to RocksDB
//! in the same atomic batch as the state and the input offset that produced it, and deleted only
//! once Kafka has acknowledged every record it stands for. A crash between the two loses
//! nothing: on restart the remaining entries are published again, in order, with the same
//! deterministic change ids.
//!
//! A change is stored once, compactly ([`OutboxEntry::Change`], ~60 bytes), and becomes its two
//! Kafka records — the change event and the membership update — only when it is published; a dead
//! letter is stored as the record itself. Entries written by earlier versions (one generic record
//! per Kafka record) are still read.

use crate::model::time::format_rfc3339;
use crate::model::{Cause, Change, ChangeKind};
use crate::store::codec::CorruptValue;

/// The membership topic's value while a member.
#[derive(serde::Serialize)]
struct MembershipValue<'a> {
    customer_id: &'a str,
    segment: &'a str,
    since: String,
    seq: u64,
    segment_version: &'a str,
}

/// One stored outbox entry: the unit of the outbox and of its acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxEntry {
    /// A decided change: published as part 0, the change event, and part 1, the membership
    /// update.
    Change(Change),
    /// A ready-made record (a dead letter, or an entry from an earlier version): part 0.
    Record(OutboxRecord),
    /// A record of the partition's changelog (see `crate::changelog`): a customer's state, its
    /// erasure, a checkpoint or a state layout. Published to the changelog topic's partition of
    /// the same number as the input partition, and only once every earlier change and dead
    /// letter is acknowledged (a barrier, see `pipeline::relay`).
    Changelog(ChangelogRecord),
}

/// One changelog record as stored in the outbox: key and value in the changelog's own format
/// (`crate::changelog`), and the id of the store that wrote it (the `writer` header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangelogRecord {
    pub key: Vec<u8>,
    /// `None` is a tombstone (an erased customer).
    pub value: Option<Vec<u8>>,
    pub writer: [u8; 8],
}

/// One message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    /// `None` is a tombstone.
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A Kafka record to publish, borrowed from an outbox entry and the publisher's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    pub topic: &'a str,
    /// An explicit partition (changelog records); `None` partitions by key.
    pub partition: Option<i32>,
    pub key: Option<&'a [u8]>,
    /// `None` is a tombstone.
    pub payload: Option<&'a [u8]>,
    pub headers: &'a [(String, Vec<u8>)],
}

/// Output topic names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub changes: String,
    pub membership: String,
    pub dlq: String,
    /// The compacted changelog: partition p mirrors input partition p's state.
    pub changelog: String,
}

/// Buffers the publisher reuses to build the records of change entries.
#[derive(Debug, Default)]
pub struct PublishBuffers {
    payload: Vec<u8>,
    key: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
}

/// Leading byte of each stored form. Earlier versions stored a bare [`OutboxRecord`], which starts
/// with its topic's length as a big-endian `u32`, so with a zero byte (topics are < 256 bytes).
const LEGACY_RECORD: u8 = 0;
const CHANGE: u8 = 1;
const RECORD: u8 = 2;
const CHANGELOG: u8 = 3;

/// The header naming the store that wrote a changelog record.
pub const WRITER_HEADER: &str = "writer";

impl OutboxEntry {
    /// How many Kafka records this entry is published as.
    pub fn parts(&self) -> u8 {
        match self {
            OutboxEntry::Change(_) => 2,
            OutboxEntry::Record(_) | OutboxEntry::Changelog(_) => 1,
        }
    }

    /// Whether the entry waits for every earlier entry's acknowledgement (see
    /// [`OutboxEntry::Changelog`]).
    pub fn is_barrier(&self) -> bool {
        matches!(self, OutboxEntry::Changelog(_))
    }

    /// Hands each of the entry's Kafka records, with its part number, to `send`, in order.
    /// `partition` is the input partition the entry belongs to (a changelog record goes to
    /// the changelog partition of that number).
    pub fn publish<E>(
        &self,
        topics: &Topics,
        partition: i32,
        buffers: &mut PublishBuffers,
        mut send: impl FnMut(u8, Publish<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        match self {
            OutboxEntry::Record(record) => send(0, record.as_publish()),
            OutboxEntry::Changelog(record) => {
                buffers.headers.clear();
                buffers
                    .headers
                    .push((WRITER_HEADER.to_string(), record.writer.to_vec()));
                send(
                    0,
                    Publish {
                        topic: &topics.changelog,
                        partition: Some(partition),
                        key: Some(&record.key),
                        payload: record.value.as_deref(),
                        headers: &buffers.headers,
                    },
                )
            }
            OutboxEntry::Change(change) => {
                buffers.payload.clear();
                change.write_json(&mut buffers.payload);
                send(
                    0,
                    Publish {
                        topic: &topics.changes,
                        partition: None,
                        key: Some(change.customer_id.as_bytes()),
                        payload: Some(&buffers.payload),
                        headers: &[],
                    },
                )?;
                buffers.key.clear();
                membership_key(change, &mut buffers.key);
                buffers.payload.clear();
                let payload = match change.kind {
                    ChangeKind::Exited => None,
                    ChangeKind::Entered => {
                        membership_value(change, &mut buffers.payload);
                        Some(buffers.payload.as_slice())
                    }
                };
                send(
                    1,
                    Publish {
                        topic: &topics.membership,
                        partition: None,
                        key: Some(&buffers.key),
                        payload,
                        headers: &[],
                    },
                )
            }
        }
    }

    /// Appends the stored form to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            OutboxEntry::Record(record) => {
                out.push(RECORD);
                record.encode_into(out);
            }
            OutboxEntry::Changelog(record) => {
                out.push(CHANGELOG);
                out.extend_from_slice(&record.writer);
                put_bytes(out, Some(&record.key));
                put_bytes(out, record.value.as_deref());
            }
            OutboxEntry::Change(change) => {
                out.push(CHANGE);
                put_bytes(out, Some(change.customer_id.as_bytes()));
                put_bytes(out, Some(change.segment.as_bytes()));
                out.push(match change.kind {
                    ChangeKind::Entered => 0,
                    ChangeKind::Exited => 1,
                });
                out.extend_from_slice(&change.at.to_be_bytes());
                out.extend_from_slice(&change.seq.to_be_bytes());
                match &change.cause {
                    Cause::Event { message_id: None } => out.push(0),
                    Cause::Event {
                        message_id: Some(id),
                    } => {
                        out.push(1);
                        put_bytes(out, Some(id.as_bytes()));
                    }
                    Cause::Timer => out.push(2),
                    Cause::Definition => out.push(3),
                    Cause::Deleted => out.push(4),
                }
                put_bytes(out, Some(change.segment_version.as_bytes()));
            }
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // A dead letter is sized up front: it can carry 900 KiB, and growing a buffer to that by
        // doubling copied it about twice more and faulted in fresh pages at every step (half of
        // what poison cost the service; BENCHMARKS.md, "Poison at rate").
        let capacity = match self {
            OutboxEntry::Record(record) => 1 + record.encoded_len(),
            OutboxEntry::Change(_) => 96,
            OutboxEntry::Changelog(record) => {
                17 + record.key.len() + record.value.as_ref().map_or(0, Vec::len)
            }
        };
        let mut out = Vec::with_capacity(capacity);
        self.encode_into(&mut out);
        out
    }

    /// The stored form back, or why it is corrupt (truncated, trailing bytes, an unknown tag,
    /// text that is not UTF-8).
    pub fn decode(bytes: &[u8]) -> Result<OutboxEntry, CorruptValue> {
        let tag = *bytes
            .first()
            .ok_or_else(|| CorruptValue("empty outbox entry".into()))?;
        Self::decode_tagged(tag, bytes).ok_or_else(|| {
            CorruptValue(format!(
                "outbox entry of {} bytes (tag {tag}) is truncated or malformed",
                bytes.len()
            ))
        })
    }

    fn decode_tagged(tag: u8, bytes: &[u8]) -> Option<OutboxEntry> {
        match tag {
            LEGACY_RECORD => OutboxRecord::decode(bytes).map(OutboxEntry::Record),
            RECORD => OutboxRecord::decode(bytes.get(1..)?).map(OutboxEntry::Record),
            CHANGELOG => {
                let mut pos = 1;
                let writer = take_array::<8>(bytes, &mut pos)?;
                let key = take_bytes(bytes, &mut pos)??;
                let value = take_bytes(bytes, &mut pos)?;
                (pos == bytes.len()).then_some(OutboxEntry::Changelog(ChangelogRecord {
                    key,
                    value,
                    writer,
                }))
            }
            CHANGE => {
                let mut pos = 1;
                let customer_id = take_string(bytes, &mut pos)?;
                let segment = take_string(bytes, &mut pos)?;
                let kind = match take_array::<1>(bytes, &mut pos)? {
                    [0] => ChangeKind::Entered,
                    [1] => ChangeKind::Exited,
                    _ => return None,
                };
                let at = i64::from_be_bytes(take_array(bytes, &mut pos)?);
                let seq = u64::from_be_bytes(take_array(bytes, &mut pos)?);
                let cause = match take_array::<1>(bytes, &mut pos)? {
                    [0] => Cause::Event { message_id: None },
                    [1] => Cause::Event {
                        message_id: Some(take_string(bytes, &mut pos)?),
                    },
                    [2] => Cause::Timer,
                    [3] => Cause::Definition,
                    [4] => Cause::Deleted,
                    _ => return None,
                };
                let segment_version = take_string(bytes, &mut pos)?;
                (pos == bytes.len()).then_some(OutboxEntry::Change(Change {
                    customer_id,
                    segment,
                    kind,
                    at,
                    seq,
                    cause,
                    segment_version,
                }))
            }
            _ => None,
        }
    }
}

/// The compacted membership topic's key: `customer_id/segment`.
fn membership_key(change: &Change, out: &mut Vec<u8>) {
    out.extend_from_slice(change.customer_id.as_bytes());
    out.push(b'/');
    out.extend_from_slice(change.segment.as_bytes());
}

/// The membership topic's value while a member (an exit is a tombstone).
fn membership_value(change: &Change, out: &mut Vec<u8>) {
    let value = MembershipValue {
        customer_id: &change.customer_id,
        segment: &change.segment,
        since: format_rfc3339(change.at),
        seq: change.seq,
        segment_version: &change.segment_version,
    };
    let _ = serde_json::to_writer(out, &value);
}

/// The largest payload a dead letter forwards whole. Kafka's default limits are ~1 MB per
/// message (librdkafka's `message.max.bytes` = 1,000,000 client side, the broker's
/// `message.max.bytes` = 1,048,588); a larger input (accepted because the input topic allows it)
/// would be refused by the producer and stall the partition behind it, so its dead letter
/// carries the first bytes only, with headers saying so (see docs/FAULTS.md).
pub const DEAD_LETTER_MAX_PAYLOAD: usize = 900 * 1024;
/// The largest key a dead letter forwards whole.
pub const DEAD_LETTER_MAX_KEY: usize = 4 * 1024;
/// The longest `error` header (a reason's detail can quote the input).
const DEAD_LETTER_MAX_DETAIL: usize = 1024;

/// The first `max` bytes of `bytes`, and whether that is all of it.
fn bounded(bytes: &[u8], max: usize) -> (&[u8], bool) {
    match bytes.get(..max) {
        Some(head) if bytes.len() > max => (head, true),
        _ => (bytes, false),
    }
}

/// `text` cut to at most `max` bytes on a character boundary.
fn bounded_text(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl OutboxRecord {
    /// A dead letter: the original message unchanged, with headers saying why and where from.
    /// A payload over [`DEAD_LETTER_MAX_PAYLOAD`] (or a key over [`DEAD_LETTER_MAX_KEY`]) is
    /// cut to that size and the record says so: `truncated` names what was cut
    /// (`payload`, `key` or `key,payload`) and `original_payload_bytes` /
    /// `original_key_bytes` give the full sizes. A payload the consumer already cut
    /// (`source.payload_bytes` more than it holds) counts as cut too.
    pub fn dead_letter(
        topics: &Topics,
        source: &SourceRef<'_>,
        reason: &str,
        detail: &str,
    ) -> OutboxRecord {
        let (key, key_cut) = match source.key {
            Some(key) => {
                let (head, cut) = bounded(key, DEAD_LETTER_MAX_KEY);
                (Some(head.to_vec()), cut)
            }
            None => (None, false),
        };
        let (payload, payload_cut) = match source.payload {
            Some(payload) => {
                let (head, cut) = bounded(payload, DEAD_LETTER_MAX_PAYLOAD);
                (
                    Some(head.to_vec()),
                    cut || source.payload_bytes > payload.len(),
                )
            }
            None => (None, false),
        };
        let mut headers = vec![
            ("reason".into(), reason.as_bytes().to_vec()),
            (
                "error".into(),
                bounded_text(detail, DEAD_LETTER_MAX_DETAIL)
                    .as_bytes()
                    .to_vec(),
            ),
            ("source_topic".into(), source.topic.as_bytes().to_vec()),
            (
                "source_partition".into(),
                source.partition.to_string().into_bytes(),
            ),
            (
                "source_offset".into(),
                source.offset.to_string().into_bytes(),
            ),
        ];
        let truncated = match (key_cut, payload_cut) {
            (false, false) => None,
            (true, false) => Some("key"),
            (false, true) => Some("payload"),
            (true, true) => Some("key,payload"),
        };
        if let Some(what) = truncated {
            headers.push(("truncated".into(), what.as_bytes().to_vec()));
        }
        if payload_cut {
            let size = source
                .payload
                .map_or(0, <[u8]>::len)
                .max(source.payload_bytes);
            headers.push((
                "original_payload_bytes".into(),
                size.to_string().into_bytes(),
            ));
        }
        if key_cut {
            let size = source.key.map_or(0, <[u8]>::len);
            headers.push(("original_key_bytes".into(), size.to_string().into_bytes()));
        }
        OutboxRecord {
            topic: topics.dlq.clone(),
            key,
            payload,
            headers,
        }
    }

    pub fn as_publish(&self) -> Publish<'_> {
        Publish {
            topic: &self.topic,
            partition: None,
            key: self.key.as_deref(),
            payload: self.payload.as_deref(),
            headers: &self.headers,
        }
    }

    /// The length of what [`OutboxRecord::encode_into`] appends.
    fn encoded_len(&self) -> usize {
        let field = |bytes: Option<&[u8]>| 4 + bytes.map_or(0, <[u8]>::len);
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| field(Some(name.as_bytes())) + field(Some(value)))
            .sum();
        field(Some(self.topic.as_bytes()))
            + field(self.key.as_deref())
            + field(self.payload.as_deref())
            + 4
            + headers
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        put_bytes(out, Some(self.topic.as_bytes()));
        put_bytes(out, self.key.as_deref());
        put_bytes(out, self.payload.as_deref());
        out.extend_from_slice(&(self.headers.len() as u32).to_be_bytes());
        for (name, value) in &self.headers {
            put_bytes(out, Some(name.as_bytes()));
            put_bytes(out, Some(value));
        }
    }

    fn decode(bytes: &[u8]) -> Option<OutboxRecord> {
        let mut pos = 0;
        let topic = take_string(bytes, &mut pos)?;
        let key = take_bytes(bytes, &mut pos)?;
        let payload = take_bytes(bytes, &mut pos)?;
        let count = u32::from_be_bytes(take_array(bytes, &mut pos)?);
        let mut headers = Vec::new();
        for _ in 0..count {
            let name = take_string(bytes, &mut pos)?;
            let value = take_bytes(bytes, &mut pos)??;
            headers.push((name, value));
        }
        (pos == bytes.len()).then_some(OutboxRecord {
            topic,
            key,
            payload,
            headers,
        })
    }
}

/// Where a dead-lettered input message came from.
pub struct SourceRef<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    /// The payload, or only its head if the consumer cut an oversized one.
    pub payload: Option<&'a [u8]>,
    /// The payload's size in Kafka (more than `payload` holds when it was cut).
    pub payload_bytes: usize,
}

fn put_bytes(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        None => out.extend_from_slice(&u32::MAX.to_be_bytes()),
        Some(bytes) => {
            out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            out.extend_from_slice(bytes);
        }
    }
}

fn take_array<const N: usize>(bytes: &[u8], pos: &mut usize) -> Option<[u8; N]> {
    let value = bytes.get(*pos..pos.checked_add(N)?)?.try_into().ok()?;
    *pos += N;
    Some(value)
}

/// `None` on truncation, `Some(None)` for an absent value.
fn take_bytes(bytes: &[u8], pos: &mut usize) -> Option<Option<Vec<u8>>> {
    let len = u32::from_be_bytes(take_array(bytes, pos)?);
    if len == u32::MAX {
        return Some(None);
    }
    let end = pos.checked_add(len as usize)?;
    let value = bytes.get(*pos..end)?.to_vec();
    *pos = end;
    Some(Some(value))
}

/// A present UTF-8 string; `None` if truncated, absent or not UTF-8.
fn take_string(bytes: &[u8], pos: &mut usize) -> Option<String> {
    String::from_utf8(take_bytes(bytes, pos)??).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> Topics {
        Topics {
            changes: "c".into(),
            membership: "m".into(),
            dlq: "d".into(),
            changelog: "l".into(),
        }
    }

    fn change(kind: ChangeKind, cause: Cause) -> Change {
        Change {
            customer_id: "c-1".into(),
            segment: "vip".into(),
            kind,
            at: 1_000,
            seq: 2,
            cause,
            segment_version: "v".into(),
        }
    }

    fn dead_letter() -> OutboxRecord {
        let source = SourceRef {
            topic: "clicks",
            partition: 3,
            offset: 42,
            key: None,
            payload: Some(b"not json"),
            payload_bytes: 8,
        };
        OutboxRecord::dead_letter(&topics(), &source, "not_json", "expected value")
    }

    fn header<'a>(record: &'a OutboxRecord, name: &str) -> Option<&'a [u8]> {
        record
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    #[test]
    fn a_dead_letter_within_the_limits_is_the_input_unchanged() {
        let payload = vec![b'x'; DEAD_LETTER_MAX_PAYLOAD];
        let source = SourceRef {
            topic: "clicks",
            partition: 1,
            offset: 7,
            key: Some(b"c-1"),
            payload: Some(&payload),
            payload_bytes: payload.len(),
        };
        let record = OutboxRecord::dead_letter(&topics(), &source, "too_large", "too large");
        assert_eq!(record.payload.as_deref(), Some(&payload[..]));
        assert_eq!(record.key.as_deref(), Some(&b"c-1"[..]));
        assert_eq!(header(&record, "truncated"), None);
        assert_eq!(header(&record, "reason"), Some(&b"too_large"[..]));
    }

    /// A 10 MB input cannot be re-published whole under Kafka's default 1 MB limit: its dead
    /// letter carries the first bytes and says so, with the original sizes.
    #[test]
    fn an_oversized_dead_letter_is_truncated_and_says_so() {
        let payload = vec![b'{'; 10 << 20];
        let key = vec![b'k'; DEAD_LETTER_MAX_KEY + 1];
        let detail = "é".repeat(4_000);
        let source = SourceRef {
            topic: "clicks",
            partition: 1,
            offset: 7,
            key: Some(&key),
            payload: Some(&payload),
            payload_bytes: payload.len(),
        };
        let record = OutboxRecord::dead_letter(&topics(), &source, "too_large", &detail);
        assert_eq!(
            record.payload.as_deref(),
            Some(&payload[..DEAD_LETTER_MAX_PAYLOAD])
        );
        assert_eq!(record.key.as_deref(), Some(&key[..DEAD_LETTER_MAX_KEY]));
        assert_eq!(header(&record, "truncated"), Some(&b"key,payload"[..]));
        assert_eq!(
            header(&record, "original_payload_bytes"),
            Some(format!("{}", 10 << 20).as_bytes())
        );
        assert_eq!(
            header(&record, "original_key_bytes"),
            Some(format!("{}", DEAD_LETTER_MAX_KEY + 1).as_bytes())
        );
        assert_eq!(header(&record, "reason"), Some(&b"too_large"[..]));
        let error = header(&record, "error").expect("error header");
        assert!(error.len() <= DEAD_LETTER_MAX_DETAIL);
        assert!(std::str::from_utf8(error).is_ok(), "cut on a char boundary");
        let size: usize = record
            .headers
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum::<usize>()
            + DEAD_LETTER_MAX_PAYLOAD
            + DEAD_LETTER_MAX_KEY;
        assert!(
            size < 1_000_000,
            "fits librdkafka's default message.max.bytes"
        );
    }

    /// A dead letter's stored form is allocated once, at its exact size.
    #[test]
    fn a_dead_letter_is_encoded_into_one_exact_allocation() {
        let payload = vec![b'x'; DEAD_LETTER_MAX_PAYLOAD];
        let source = SourceRef {
            topic: "clicks",
            partition: 1,
            offset: 7,
            key: Some(b"c-1"),
            payload: Some(&payload),
            payload_bytes: 10 << 20,
        };
        for record in [
            OutboxRecord::dead_letter(&topics(), &source, "too_large", "too large"),
            dead_letter(),
        ] {
            let encoded = OutboxEntry::Record(record).encode();
            assert_eq!(encoded.capacity(), encoded.len());
        }
    }

    /// The consumer keeps only the head of an oversized payload: the dead letter forwards that
    /// head and says it is cut, with the size the message had in Kafka.
    #[test]
    fn a_payload_cut_by_the_consumer_is_dead_lettered_as_cut() {
        let head = vec![b'x'; DEAD_LETTER_MAX_PAYLOAD];
        let source = SourceRef {
            topic: "clicks",
            partition: 1,
            offset: 7,
            key: None,
            payload: Some(&head),
            payload_bytes: 10 << 20,
        };
        let record = OutboxRecord::dead_letter(&topics(), &source, "too_large", "too large");
        assert_eq!(record.payload.as_deref(), Some(&head[..]));
        assert_eq!(header(&record, "truncated"), Some(&b"payload"[..]));
        assert_eq!(
            header(&record, "original_payload_bytes"),
            Some(format!("{}", 10 << 20).as_bytes())
        );
    }

    /// (part, topic, key, payload) of every record an entry is published as.
    type Published = Vec<(u8, String, Option<Vec<u8>>, Option<Vec<u8>>)>;

    /// Publishes `entries` in turn through one set of buffers.
    fn published(entries: &[OutboxEntry]) -> Published {
        let mut out = Vec::new();
        let mut buffers = PublishBuffers::default();
        for entry in entries {
            let sent: Result<(), ()> = entry.publish(&topics(), 0, &mut buffers, |part, record| {
                out.push((
                    part,
                    record.topic.to_string(),
                    record.key.map(<[u8]>::to_vec),
                    record.payload.map(<[u8]>::to_vec),
                ));
                Ok(())
            });
            assert_eq!(sent, Ok(()));
        }
        out
    }

    #[test]
    fn entries_round_trip_and_truncation_is_detected() {
        let entries = [
            OutboxEntry::Change(change(ChangeKind::Entered, Cause::Timer)),
            OutboxEntry::Change(change(
                ChangeKind::Exited,
                Cause::Event {
                    message_id: Some("m-9".into()),
                },
            )),
            OutboxEntry::Change(change(
                ChangeKind::Entered,
                Cause::Event { message_id: None },
            )),
            OutboxEntry::Change(change(ChangeKind::Exited, Cause::Definition)),
            OutboxEntry::Change(change(ChangeKind::Exited, Cause::Deleted)),
            OutboxEntry::Record(dead_letter()),
            OutboxEntry::Changelog(ChangelogRecord {
                key: b"cc-1".to_vec(),
                value: Some(b"state".to_vec()),
                writer: *b"w1234567",
            }),
            OutboxEntry::Changelog(ChangelogRecord {
                key: b"cc-2".to_vec(),
                value: None,
                writer: *b"w1234567",
            }),
        ];
        for entry in entries {
            let bytes = entry.encode();
            assert_eq!(OutboxEntry::decode(&bytes).ok(), Some(entry.clone()));
            for end in 0..bytes.len() {
                assert!(
                    OutboxEntry::decode(&bytes[..end]).is_err(),
                    "prefix of {end}"
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(OutboxEntry::decode(&longer).is_err());
        }
        assert!(OutboxEntry::decode(b"\x07").is_err());
    }

    #[test]
    fn records_stored_by_earlier_versions_are_read() {
        // Earlier versions stored each Kafka record on its own, without a leading tag.
        let record = dead_letter();
        let mut legacy = Vec::new();
        record.encode_into(&mut legacy);
        assert_eq!(legacy[0], LEGACY_RECORD);
        assert_eq!(
            OutboxEntry::decode(&legacy).ok(),
            Some(OutboxEntry::Record(record))
        );
    }

    #[test]
    fn a_change_is_published_as_its_event_and_its_membership() {
        let enter = change(ChangeKind::Entered, Cause::Timer);
        let mut exit = change(ChangeKind::Exited, Cause::Timer);
        exit.customer_id = "c-22".into();
        let records = published(&[
            OutboxEntry::Change(enter.clone()),
            OutboxEntry::Change(exit.clone()),
        ]);
        assert_eq!(records.len(), 4);
        assert_eq!(
            records[0],
            (
                0,
                "c".into(),
                Some(b"c-1".to_vec()),
                Some(enter.to_json_bytes())
            )
        );
        let (part, topic, key, payload) = &records[1];
        assert_eq!((*part, topic.as_str()), (1, "m"));
        assert_eq!(key.as_deref(), Some(&b"c-1/vip"[..]));
        let value: serde_json::Value =
            serde_json::from_slice(payload.as_deref().unwrap_or_default()).expect("json");
        assert_eq!(value["since"], "1970-01-01T00:00:01.000Z");
        assert_eq!(value["seq"], 2);

        // An exit is a membership tombstone; the reused buffers carry nothing over from the
        // entry before.
        assert_eq!(records[2].3, Some(exit.to_json_bytes()));
        assert_eq!(records[3].2.as_deref(), Some(&b"c-22/vip"[..]));
        assert_eq!(records[3].3, None);
        assert_eq!(OutboxEntry::Change(exit).parts(), 2);
    }

    #[test]
    fn a_dead_letter_is_published_as_is() {
        let record = dead_letter();
        let entry = OutboxEntry::Record(record.clone());
        assert_eq!(entry.parts(), 1);
        assert_eq!(
            published(&[entry]),
            vec![(0, "d".into(), None, record.payload.clone())]
        );
        let headers = record.as_publish().headers;
        assert!(headers
            .iter()
            .any(|(name, value)| name == "source_offset" && value == b"42"));
    }
}
