//! Per-customer behavioural state: exactly the aggregates the compiled rules need (see
//! [`FeatureLayout`]), plus memberships, de-duplication memory and the pending timer.
//!
//! Pure data and arithmetic — no I/O. Bounded: windowed series keep at most
//! `Limits::max_entries_per_series` entries (older ones are coalesced, see [`Series::push`]),
//! all-time aggregates are O(1), de-duplication memory holds at most `Limits::max_dedup_ids`.

use serde_json::Value;

use crate::model::{Event, EventKind, Millis};
use crate::rules::ast::{BinOp, Condition, Literal};
use crate::rules::program::{CMatcher, FeatureLayout};

mod series;

pub use series::{Entry, Series, WindowStats};

/// Size bounds for one customer's state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_entries_per_series: usize,
    pub max_dedup_ids: usize,
    /// How long (event time) a `messageId` is remembered.
    pub dedup_window: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries_per_series: 512,
            max_dedup_ids: 256,
            dedup_window: 86_400_000,
        }
    }
}

/// All-time running totals over one matcher.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Total {
    pub count: u64,
    /// How many matching events had a numeric property value.
    pub values: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

/// First and last event time of one matcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Extreme {
    pub first: Option<Millis>,
    pub last: Option<Millis>,
}

/// A stored trait value and the event time that set it.
#[derive(Debug, Clone, PartialEq)]
pub struct TraitValue {
    pub value: Value,
    pub at: Millis,
}

/// A customer's membership in one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Membership {
    pub member: bool,
    /// When the current value began (the `at` of the last change); meaningless while `seq == 0`.
    pub since: Millis,
    /// Transitions so far.
    pub seq: u64,
    /// No change of this segment can happen before this instant without a new event reaching
    /// its features (`None`: never). Segments untouched by an event keep their value and this.
    pub next_check: Option<Millis>,
}

/// The matchers and traits one event changed: only segments reading them need re-evaluation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Touched {
    pub matchers: Vec<usize>,
    pub traits: Vec<usize>,
}

/// Everything segmenter keeps about one customer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CustomerState {
    pub series: Vec<Series>,
    pub totals: Vec<Total>,
    pub extremes: Vec<Extreme>,
    pub traits: Vec<Option<TraitValue>>,
    /// One per segment, in definition order.
    pub memberships: Vec<Membership>,
    /// Recently seen message ids: (hash, clock time when first seen), oldest first.
    pub seen: Vec<(u64, Millis)>,
    /// When this customer's timer is due, if one is pending.
    pub timer: Option<Millis>,
    /// The last time this customer was evaluated.
    pub evaluated_at: Option<Millis>,
}

impl CustomerState {
    /// An empty state shaped for `layout` and `segments` segments.
    pub fn new(layout: &FeatureLayout, segments: usize) -> Self {
        CustomerState {
            series: vec![Series::default(); layout.series.len()],
            totals: vec![Total::default(); layout.totals.len()],
            extremes: vec![Extreme::default(); layout.extremes.len()],
            traits: vec![None; layout.traits.len()],
            memberships: vec![Membership::default(); segments],
            seen: Vec::new(),
            timer: None,
            evaluated_at: None,
        }
    }

    /// Records `message_id`, first seen when the clock read `now`, and tells whether it was
    /// already seen within `limits.dedup_window` of clock time. Remembering the clock (not the
    /// event's own time) makes redeliveries of a late event duplicates too.
    pub fn is_duplicate(&mut self, message_id: &str, now: Millis, limits: &Limits) -> bool {
        let horizon = now.saturating_sub(limits.dedup_window);
        self.seen.retain(|(_, seen_at)| *seen_at > horizon);
        let hash = fnv1a_64(message_id.as_bytes());
        if self.seen.iter().any(|(seen, _)| *seen == hash) {
            return true;
        }
        self.seen.push((hash, now));
        if self.seen.len() > limits.max_dedup_ids {
            let excess = self.seen.len() - limits.max_dedup_ids;
            self.seen.drain(..excess);
        }
        false
    }

    /// Folds one event into the aggregates and tells which matchers / traits it touched. `now`
    /// is the evaluation time the event is applied at (≥ the event's time unless it is late).
    pub fn apply(
        &mut self,
        layout: &FeatureLayout,
        event: &Event,
        now: Millis,
        limits: &Limits,
    ) -> Touched {
        let mut touched = Touched::default();
        match &event.kind {
            EventKind::Identify => self.apply_traits(layout, event, &mut touched),
            EventKind::Activity { name } => {
                self.apply_activity(layout, name, event, now, limits, &mut touched);
            }
        }
        touched
    }

    fn apply_traits(&mut self, layout: &FeatureLayout, event: &Event, touched: &mut Touched) {
        for (slot, key) in layout.traits.iter().enumerate() {
            let Some(value) = event.traits.get(key) else {
                continue;
            };
            let newer = match &self.traits[slot] {
                Some(stored) => event.timestamp >= stored.at,
                None => true,
            };
            if newer {
                self.traits[slot] = Some(TraitValue {
                    value: value.clone(),
                    at: event.timestamp,
                });
                touched.traits.push(slot);
            }
        }
    }

    fn apply_activity(
        &mut self,
        layout: &FeatureLayout,
        name: &str,
        event: &Event,
        now: Millis,
        limits: &Limits,
        touched: &mut Touched,
    ) {
        let matched: Vec<bool> = layout
            .matchers
            .iter()
            .map(|matcher| matches(matcher, name, &event.properties))
            .collect();
        touched.matchers.extend(
            matched
                .iter()
                .enumerate()
                .filter(|(_, hit)| **hit)
                .map(|(idx, _)| idx),
        );
        let ts = event.timestamp;
        for (spec, series) in layout.series.iter().zip(&mut self.series) {
            if !matched[spec.matcher] || ts <= now.saturating_sub(spec.retention) {
                continue;
            }
            let value = spec
                .property
                .as_deref()
                .and_then(|path| number_at(&event.properties, path));
            series.push(ts, value, limits.max_entries_per_series);
        }
        for (spec, total) in layout.totals.iter().zip(&mut self.totals) {
            if !matched[spec.matcher] {
                continue;
            }
            total.count += 1;
            let value = spec
                .property
                .as_deref()
                .and_then(|path| number_at(&event.properties, path));
            if let Some(value) = value {
                if total.values == 0 {
                    total.min = value;
                    total.max = value;
                } else {
                    total.min = total.min.min(value);
                    total.max = total.max.max(value);
                }
                total.values += 1;
                total.sum += value;
            }
        }
        for (matcher, extreme) in layout.extremes.iter().zip(&mut self.extremes) {
            if !matched[*matcher] {
                continue;
            }
            extreme.first = Some(extreme.first.map_or(ts, |first| first.min(ts)));
            extreme.last = Some(extreme.last.map_or(ts, |last| last.max(ts)));
        }
    }

    /// Drops series entries that no window can see at or after `now`.
    pub fn prune(&mut self, layout: &FeatureLayout, now: Millis) {
        for (spec, series) in layout.series.iter().zip(&mut self.series) {
            series.prune(now.saturating_sub(spec.retention));
        }
    }

    /// True if nothing worth keeping is left (no aggregates, no memberships, no timer).
    pub fn is_empty(&self) -> bool {
        self.series.iter().all(|s| s.entries.is_empty())
            && self.totals.iter().all(|t| t.count == 0)
            && self.extremes.iter().all(|e| e.last.is_none())
            && self.traits.iter().all(Option::is_none)
            && self.memberships.iter().all(|m| m.seq == 0)
            && self.seen.is_empty()
            && self.timer.is_none()
    }
}

/// FNV-1a, 64-bit: used by `bucket(N)` and for remembering message ids.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The value at `path` inside `properties`.
pub fn value_at<'a>(
    properties: &'a serde_json::Map<String, Value>,
    path: &[String],
) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut value = properties.get(first)?;
    for key in rest {
        value = value.as_object()?.get(key)?;
    }
    Some(value)
}

fn number_at(properties: &serde_json::Map<String, Value>, path: &[String]) -> Option<f64> {
    value_at(properties, path)?
        .as_f64()
        .filter(|value| value.is_finite())
}

/// Does an activity named `name` with `properties` match?
pub fn matches(
    matcher: &CMatcher,
    name: &str,
    properties: &serde_json::Map<String, Value>,
) -> bool {
    if let Some(event) = &matcher.event {
        if event != name {
            return false;
        }
    }
    matcher.conditions.iter().all(|condition| match condition {
        Condition::Compare { path, op, value } => {
            value_at(properties, path).is_some_and(|actual| compare_literal(actual, *op, value))
        }
        Condition::In { path, values } => value_at(properties, path).is_some_and(|actual| {
            values
                .iter()
                .any(|value| compare_literal(actual, BinOp::Eq, value))
        }),
        Condition::IsNull { path, negated } => {
            let is_null = value_at(properties, path).is_none_or(Value::is_null);
            is_null != *negated
        }
    })
}

/// `actual OP literal`; null and mismatched types are false.
fn compare_literal(actual: &Value, op: BinOp, literal: &Literal) -> bool {
    let ordering = match (actual, literal) {
        (Value::Number(number), Literal::Number(expected)) => {
            number.as_f64().and_then(|n| n.partial_cmp(expected))
        }
        (Value::String(text), Literal::Str(expected)) => Some(text.as_str().cmp(expected.as_str())),
        (Value::Bool(flag), Literal::Bool(expected)) if matches!(op, BinOp::Eq | BinOp::Ne) => {
            Some(flag.cmp(expected))
        }
        _ => None,
    };
    ordering.is_some_and(|ordering| op_holds(op, ordering))
}

/// Does `op` hold for an ordering of its operands?
pub fn op_holds(op: BinOp, ordering: std::cmp::Ordering) -> bool {
    use std::cmp::Ordering::{Equal, Greater, Less};
    match op {
        BinOp::Eq => ordering == Equal,
        BinOp::Ne => ordering != Equal,
        BinOp::Lt => ordering == Less,
        BinOp::Le => ordering != Greater,
        BinOp::Gt => ordering == Greater,
        BinOp::Ge => ordering != Less,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_vectors() {
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn dedup_forgets_after_the_window() {
        let limits = Limits {
            dedup_window: 1000,
            ..Limits::default()
        };
        let mut state = CustomerState::default();
        assert!(!state.is_duplicate("m1", 10, &limits));
        assert!(state.is_duplicate("m1", 500, &limits));
        assert!(
            !state.is_duplicate("m1", 1010, &limits),
            "forgotten at 10 + window"
        );
        assert!(!state.is_duplicate("m2", 1100, &limits));
        assert!(state.is_duplicate("m2", 1100, &limits));
    }
}
