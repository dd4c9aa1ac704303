//! Plain data types shared by every layer: decoded events, change events, time. No I/O here.

pub mod change;
pub mod event;
pub mod time;

pub use change::{Cause, Change, ChangeKind};
pub use event::{Event, EventKind};
pub use time::Millis;
