//! A decoded input event, independent of the wire schema it came from.

use serde_json::{Map, Value};

use super::Millis;

/// What an event does to a customer.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// An activity (`track`, `page`, `screen`) with its event name.
    Activity { name: String },
    /// An `identify`: sets traits, is not an activity.
    Identify,
}

/// One customer event after decoding and validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub customer_id: String,
    pub kind: EventKind,
    pub timestamp: Millis,
    pub message_id: Option<String>,
    /// The event's `properties` (empty when absent).
    pub properties: Map<String, Value>,
    /// The `identify` traits (empty for activities).
    pub traits: Map<String, Value>,
}

impl Event {
    /// The activity name, or `None` for `identify`.
    pub fn activity_name(&self) -> Option<&str> {
        match &self.kind {
            EventKind::Activity { name } => Some(name),
            EventKind::Identify => None,
        }
    }
}
