//! The outbox: records decided by the engine (change events, membership updates, dead letters)
//! are written to RocksDB in the same atomic batch as the state and the input offset that
//! produced them, and deleted only once Kafka has acknowledged them. A crash between the two
//! loses nothing: on restart the remaining records are published again, in order, with the
//! same deterministic change ids.

use crate::model::time::format_rfc3339;
use crate::model::{Change, ChangeKind};

/// The membership topic's value while a member.
#[derive(serde::Serialize)]
struct MembershipValue<'a> {
    customer_id: &'a str,
    segment: &'a str,
    since: String,
    seq: u64,
    segment_version: &'a str,
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

/// Output topic names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub changes: String,
    pub membership: String,
    pub dlq: String,
}

impl OutboxRecord {
    /// The change-topic record (SPEC §5): key = customer id.
    pub fn change(topics: &Topics, change: &Change) -> OutboxRecord {
        OutboxRecord {
            topic: topics.changes.clone(),
            key: Some(change.customer_id.as_bytes().to_vec()),
            payload: Some(change.to_json_bytes()),
            headers: Vec::new(),
        }
    }

    /// The compacted membership-topic record: key `customer_id/segment`, the current membership
    /// as value, a tombstone on exit.
    pub fn membership(topics: &Topics, change: &Change) -> OutboxRecord {
        let key = format!("{}/{}", change.customer_id, change.segment).into_bytes();
        let payload = match change.kind {
            ChangeKind::Exited => None,
            ChangeKind::Entered => {
                let value = MembershipValue {
                    customer_id: &change.customer_id,
                    segment: &change.segment,
                    since: format_rfc3339(change.at),
                    seq: change.seq,
                    segment_version: &change.segment_version,
                };
                let mut out = Vec::with_capacity(192);
                let _ = serde_json::to_writer(&mut out, &value);
                Some(out)
            }
        };
        OutboxRecord {
            topic: topics.membership.clone(),
            key: Some(key),
            payload,
            headers: Vec::new(),
        }
    }

    /// A dead letter: the original message unchanged, with headers saying why and where from.
    pub fn dead_letter(
        topics: &Topics,
        source: &SourceRef<'_>,
        reason: &str,
        detail: &str,
    ) -> OutboxRecord {
        OutboxRecord {
            topic: topics.dlq.clone(),
            key: source.key.map(<[u8]>::to_vec),
            payload: source.payload.map(<[u8]>::to_vec),
            headers: vec![
                ("reason".into(), reason.as_bytes().to_vec()),
                ("error".into(), detail.as_bytes().to_vec()),
                ("source_topic".into(), source.topic.as_bytes().to_vec()),
                (
                    "source_partition".into(),
                    source.partition.to_string().into_bytes(),
                ),
                (
                    "source_offset".into(),
                    source.offset.to_string().into_bytes(),
                ),
            ],
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.payload.as_ref().map_or(0, Vec::len));
        put_bytes(&mut out, Some(self.topic.as_bytes()));
        put_bytes(&mut out, self.key.as_deref());
        put_bytes(&mut out, self.payload.as_deref());
        out.extend_from_slice(&(self.headers.len() as u32).to_be_bytes());
        for (name, value) in &self.headers {
            put_bytes(&mut out, Some(name.as_bytes()));
            put_bytes(&mut out, Some(value));
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<OutboxRecord> {
        let mut pos = 0;
        let topic = String::from_utf8(take_bytes(bytes, &mut pos)??).ok()?;
        let key = take_bytes(bytes, &mut pos)?;
        let payload = take_bytes(bytes, &mut pos)?;
        let count = u32::from_be_bytes(bytes.get(pos..pos + 4)?.try_into().ok()?);
        pos += 4;
        let mut headers = Vec::new();
        for _ in 0..count {
            let name = String::from_utf8(take_bytes(bytes, &mut pos)??).ok()?;
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
    pub payload: Option<&'a [u8]>,
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

/// `None` on truncation, `Some(None)` for an absent value.
fn take_bytes(bytes: &[u8], pos: &mut usize) -> Option<Option<Vec<u8>>> {
    let len = u32::from_be_bytes(bytes.get(*pos..*pos + 4)?.try_into().ok()?);
    *pos += 4;
    if len == u32::MAX {
        return Some(None);
    }
    let end = pos.checked_add(len as usize)?;
    let value = bytes.get(*pos..end)?.to_vec();
    *pos = end;
    Some(Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Cause;

    fn topics() -> Topics {
        Topics {
            changes: "c".into(),
            membership: "m".into(),
            dlq: "d".into(),
        }
    }

    fn change(kind: ChangeKind) -> Change {
        Change {
            customer_id: "c-1".into(),
            segment: "vip".into(),
            kind,
            at: 1_000,
            seq: 2,
            cause: Cause::Timer,
            segment_version: "v".into(),
        }
    }

    #[test]
    fn records_round_trip() {
        let source = SourceRef {
            topic: "clicks",
            partition: 3,
            offset: 42,
            key: None,
            payload: Some(b"not json"),
        };
        for record in [
            OutboxRecord::change(&topics(), &change(ChangeKind::Entered)),
            OutboxRecord::membership(&topics(), &change(ChangeKind::Exited)),
            OutboxRecord::dead_letter(&topics(), &source, "not_json", "expected value"),
        ] {
            assert_eq!(OutboxRecord::decode(&record.encode()), Some(record.clone()));
        }
        assert_eq!(OutboxRecord::decode(b"\x00\x00"), None);
    }

    #[test]
    fn exit_is_a_membership_tombstone() {
        let exit = OutboxRecord::membership(&topics(), &change(ChangeKind::Exited));
        assert_eq!(exit.key.as_deref(), Some(&b"c-1/vip"[..]));
        assert_eq!(exit.payload, None);
        let enter = OutboxRecord::membership(&topics(), &change(ChangeKind::Entered));
        let value: serde_json::Value =
            serde_json::from_slice(enter.payload.as_deref().unwrap_or_default()).expect("json");
        assert_eq!(value["since"], "1970-01-01T00:00:01.000Z");
    }
}
