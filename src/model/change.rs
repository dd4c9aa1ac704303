//! The `entered` / `exited` change event (SPEC §5) and its wire form.

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::time::format_rfc3339;
use super::Millis;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Entered,
    Exited,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Entered => "entered",
            ChangeKind::Exited => "exited",
        }
    }
}

/// Why a membership changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// An input event; carries its `messageId` when it had one.
    Event { message_id: Option<String> },
    /// Time passing (a durable timer).
    Timer,
    /// A changed rule was re-evaluated.
    Definition,
    /// The customer was erased.
    Deleted,
}

impl Cause {
    pub fn as_str(&self) -> &'static str {
        match self {
            Cause::Event { .. } => "event",
            Cause::Timer => "timer",
            Cause::Definition => "definition",
            Cause::Deleted => "deleted",
        }
    }
}

/// A decided membership change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub customer_id: String,
    pub segment: String,
    pub kind: ChangeKind,
    pub at: Millis,
    pub seq: u64,
    pub cause: Cause,
    pub segment_version: String,
}

#[derive(Serialize)]
struct WireChange<'a> {
    id: String,
    customer_id: &'a str,
    segment: &'a str,
    change: ChangeKind,
    at: String,
    seq: u64,
    cause: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message_id: Option<&'a str>,
    segment_version: &'a str,
}

impl Change {
    /// Deterministic id: a hash of customer, segment, change, `at` and `seq`, so a change
    /// re-published after a crash carries the same id.
    pub fn id(&self) -> String {
        let mut hasher = Sha256::new();
        for part in [
            self.customer_id.as_bytes(),
            self.segment.as_bytes(),
            self.kind.as_str().as_bytes(),
        ] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        hasher.update(self.at.to_be_bytes());
        hasher.update(self.seq.to_be_bytes());
        let digest = hasher.finalize();
        hex(&digest[..16])
    }

    /// The SPEC §5 JSON payload.
    pub fn to_json(&self) -> String {
        String::from_utf8(self.to_json_bytes()).unwrap_or_default()
    }

    /// The change-topic payload as bytes.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        // Sized for a typical change (~250 bytes) so serialising does not reallocate.
        let mut out = Vec::with_capacity(320);
        self.write_json(&mut out);
        out
    }

    /// Appends the change-topic payload to `out` (a buffer the publisher reuses).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let message_id = match &self.cause {
            Cause::Event { message_id } => message_id.as_deref(),
            _ => None,
        };
        let wire = WireChange {
            id: self.id(),
            customer_id: &self.customer_id,
            segment: &self.segment,
            change: self.kind,
            at: format_rfc3339(self.at),
            seq: self.seq,
            cause: self.cause.as_str(),
            message_id,
            segment_version: &self.segment_version,
        };
        let _ = serde_json::to_writer(out, &wire);
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(DIGITS[usize::from(byte >> 4)] as char);
        out.push(DIGITS[usize::from(byte & 15)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(cause: Cause) -> Change {
        Change {
            customer_id: "c-42".into(),
            segment: "cart_abandoner".into(),
            kind: ChangeKind::Entered,
            at: 1_761_991_200_000,
            seq: 3,
            cause,
            segment_version: "9f2a".into(),
        }
    }

    #[test]
    fn payload_has_the_spec_fields() {
        let json: serde_json::Value =
            serde_json::from_str(&sample(Cause::Timer).to_json()).expect("json");
        assert_eq!(json["customer_id"], "c-42");
        assert_eq!(json["change"], "entered");
        assert_eq!(json["at"], "2025-11-01T10:00:00.000Z");
        assert_eq!(json["seq"], 3);
        assert_eq!(json["cause"], "timer");
        assert!(json.get("message_id").is_none());
        assert_eq!(json["id"].as_str().map(str::len), Some(32));
    }

    #[test]
    fn id_is_deterministic_and_depends_on_at() {
        let first = sample(Cause::Timer);
        let again = sample(Cause::Event {
            message_id: Some("m-1".into()),
        });
        assert_eq!(first.id(), again.id());
        let mut later = sample(Cause::Timer);
        later.at += 1;
        assert_ne!(first.id(), later.id());
    }
}
