//! The binary encoding of a [`CustomerState`] (versioned), and carrying state across changed
//! segment definitions.
//!
//! A value starts with a format version byte and the id of the [`StateLayout`] it was written
//! with. A state written under another layout is decoded in that layout's shape and re-slotted by
//! feature descriptor and segment id, so editing the rules never loses memberships or aggregates
//! the new rules still read.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::features::{CustomerState, Entry, Extreme, Membership, Series, Total, TraitValue};
use crate::rules::program::{FeatureDescriptors, Program};

const FORMAT_VERSION: u8 = 1;

/// What each slot of an encoded state means.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateLayout {
    pub id: u64,
    pub series: Vec<String>,
    pub totals: Vec<String>,
    pub extremes: Vec<String>,
    pub traits: Vec<String>,
    pub segments: Vec<String>,
}

impl StateLayout {
    pub fn of(program: &Program) -> StateLayout {
        let FeatureDescriptors {
            series,
            totals,
            extremes,
            traits,
        } = program.layout.descriptors();
        let segments: Vec<String> = program.segments.iter().map(|s| s.id.clone()).collect();
        let mut hasher = Sha256::new();
        for group in [&series, &totals, &extremes, &traits, &segments] {
            hasher.update((group.len() as u64).to_be_bytes());
            for name in group {
                hasher.update((name.len() as u64).to_be_bytes());
                hasher.update(name.as_bytes());
            }
        }
        let digest = hasher.finalize();
        let mut id_bytes = [0u8; 8];
        id_bytes.copy_from_slice(&digest[..8]);
        StateLayout {
            id: u64::from_be_bytes(id_bytes),
            series,
            totals,
            extremes,
            traits,
            segments,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeStateError(pub String);

/// A fixed-width or framed stored value (clock, counts, offsets, outbox entries) that does not
/// decode: what was wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CorruptValue(pub String);

/// An 8-byte big-endian `i64` (a clock, a member's since, a member count, an input offset).
pub fn decode_i64(bytes: &[u8]) -> Result<i64, CorruptValue> {
    let array: [u8; 8] = bytes
        .try_into()
        .map_err(|_| CorruptValue(format!("expected 8 bytes, found {}", bytes.len())))?;
    Ok(i64::from_be_bytes(array))
}

/// An 8-byte big-endian `u64` (the next outbox sequence number).
pub fn decode_u64(bytes: &[u8]) -> Result<u64, CorruptValue> {
    decode_i64(bytes).map(|value| value as u64)
}

/// Encodes `state` (shaped for `layout`).
pub fn encode(state: &CustomerState, layout: &StateLayout) -> Vec<u8> {
    // Most states encode to 200–600 bytes (BENCHMARKS.md): start there rather than grow.
    let mut out = Vec::with_capacity(512);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&layout.id.to_be_bytes());
    put_opt_time(&mut out, state.timer);
    put_opt_time(&mut out, state.evaluated_at);
    put_varint(&mut out, state.memberships.len() as u64);
    for membership in &state.memberships {
        put_varint(&mut out, membership.seq << 1 | u64::from(membership.member));
        if membership.seq > 0 {
            put_varint(&mut out, membership.since as u64);
        }
        put_opt_time(&mut out, membership.next_check);
    }
    put_varint(&mut out, state.series.len() as u64);
    for series in &state.series {
        put_varint(&mut out, series.entries.len() as u64);
        let mut previous = 0i64;
        for entry in &series.entries {
            put_varint(&mut out, zigzag(entry.ts.wrapping_sub(previous)));
            previous = entry.ts;
            let single = entry.count == 1 && entry.values <= 1;
            let tag = u64::from(!single) | u64::from(entry.values > 0) << 1;
            put_varint(&mut out, tag);
            if single {
                if entry.values == 1 {
                    out.extend_from_slice(&entry.sum.to_le_bytes());
                }
            } else {
                put_varint(&mut out, u64::from(entry.count));
                put_varint(&mut out, u64::from(entry.values));
                if entry.values > 0 {
                    for value in [entry.sum, entry.min, entry.max] {
                        out.extend_from_slice(&value.to_le_bytes());
                    }
                }
            }
        }
    }
    put_varint(&mut out, state.totals.len() as u64);
    for total in &state.totals {
        put_varint(&mut out, total.count);
        put_varint(&mut out, total.values);
        if total.values > 0 {
            for value in [total.sum, total.min, total.max] {
                out.extend_from_slice(&value.to_le_bytes());
            }
        }
    }
    put_varint(&mut out, state.extremes.len() as u64);
    for extreme in &state.extremes {
        put_opt_time(&mut out, extreme.first);
        put_opt_time(&mut out, extreme.last);
    }
    put_varint(&mut out, state.traits.len() as u64);
    for stored in &state.traits {
        match stored {
            None => put_varint(&mut out, 0),
            Some(TraitValue { value, at }) => {
                let text = value.to_string();
                put_varint(&mut out, text.len() as u64 + 1);
                out.extend_from_slice(text.as_bytes());
                put_varint(&mut out, *at as u64);
            }
        }
    }
    put_varint(&mut out, state.seen.len() as u64);
    let mut previous = 0i64;
    for (hash, at) in &state.seen {
        out.extend_from_slice(&hash.to_le_bytes());
        put_varint(&mut out, zigzag(at.wrapping_sub(previous)));
        previous = *at;
    }
    out
}

/// The layout id a stored value was written with.
pub fn layout_id(bytes: &[u8]) -> Result<u64, DecodeStateError> {
    match bytes.first() {
        Some(&FORMAT_VERSION) => {}
        Some(other) => {
            return Err(DecodeStateError(format!(
                "unknown state format version {other}"
            )))
        }
        None => return Err(DecodeStateError("empty state value".into())),
    }
    let id: [u8; 8] = bytes
        .get(1..9)
        .and_then(|slice| slice.try_into().ok())
        .ok_or_else(|| DecodeStateError("truncated state header".into()))?;
    Ok(u64::from_be_bytes(id))
}

/// Decodes a value written under `stored` and re-slots it for `current`. The value must have
/// exactly the shape of `stored` (one slot per feature and segment): the engine and the rules
/// index the slots unchecked, so a short vector is an error here, not a panic later.
pub fn decode(
    bytes: &[u8],
    stored: &StateLayout,
    current: &StateLayout,
) -> Result<CustomerState, DecodeStateError> {
    let raw = decode_raw(bytes)?;
    check_shape(&raw, stored)?;
    if stored.id == current.id {
        return Ok(raw);
    }
    Ok(reslot(raw, stored, current))
}

/// Every slot vector of `state` has the length `layout` gives it.
fn check_shape(state: &CustomerState, layout: &StateLayout) -> Result<(), DecodeStateError> {
    let slots = [
        ("series", state.series.len(), layout.series.len()),
        ("totals", state.totals.len(), layout.totals.len()),
        ("extremes", state.extremes.len(), layout.extremes.len()),
        ("traits", state.traits.len(), layout.traits.len()),
        (
            "memberships",
            state.memberships.len(),
            layout.segments.len(),
        ),
    ];
    for (what, found, expected) in slots {
        if found != expected {
            return Err(DecodeStateError(format!(
                "{found} {what} where layout {:016x} has {expected}",
                layout.id
            )));
        }
    }
    Ok(())
}

/// Carries state into a changed layout. Every segment is due for re-evaluation afterwards
/// (`next_check` = the epoch), since its rule or the features it reads may have changed.
fn reslot(raw: CustomerState, stored: &StateLayout, current: &StateLayout) -> CustomerState {
    fn pick<T: Clone + Default>(old: &[T], old_names: &[String], new_names: &[String]) -> Vec<T> {
        new_names
            .iter()
            .map(|name| {
                old_names
                    .iter()
                    .position(|old_name| old_name == name)
                    .and_then(|idx| old.get(idx).cloned())
                    .unwrap_or_default()
            })
            .collect()
    }
    CustomerState {
        series: pick(&raw.series, &stored.series, &current.series),
        totals: pick(&raw.totals, &stored.totals, &current.totals),
        extremes: pick(&raw.extremes, &stored.extremes, &current.extremes),
        traits: pick(&raw.traits, &stored.traits, &current.traits),
        memberships: pick(&raw.memberships, &stored.segments, &current.segments)
            .into_iter()
            .map(|membership| Membership {
                next_check: Some(0),
                ..membership
            })
            .collect(),
        seen: raw.seen,
        timer: raw.timer,
        evaluated_at: raw.evaluated_at,
    }
}

/// What the derived indexes (timers, members) need of an encoded state: its layout, its due
/// time and which of its membership slots are members since when. Read from the head of the
/// value (the memberships follow the timer), so indexing a state costs a few varints, not a
/// decode — a restore indexes every state it writes with this.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexFields {
    pub layout_id: u64,
    pub timer: Option<i64>,
    /// Per membership slot (in the stored layout's order): `Some(since)` for a member.
    pub members: Vec<Option<i64>>,
}

/// The [`IndexFields`] of an encoded state.
pub fn decode_index_fields(bytes: &[u8]) -> Result<IndexFields, DecodeStateError> {
    let layout_id = layout_id(bytes)?;
    let mut reader = Reader { bytes, pos: 9 };
    let timer = reader.opt_time()?;
    reader.opt_time()?;
    let slots = reader.len()?;
    let mut members = Vec::with_capacity(slots);
    for _ in 0..slots {
        let packed = reader.varint()?;
        let seq = packed >> 1;
        let since = if seq > 0 { reader.varint()? as i64 } else { 0 };
        reader.opt_time()?;
        members.push((packed & 1 == 1).then_some(since));
    }
    Ok(IndexFields {
        layout_id,
        timer,
        members,
    })
}

fn decode_raw(bytes: &[u8]) -> Result<CustomerState, DecodeStateError> {
    layout_id(bytes)?;
    let mut reader = Reader { bytes, pos: 9 };
    let timer = reader.opt_time()?;
    let evaluated_at = reader.opt_time()?;
    let mut state = CustomerState {
        timer,
        evaluated_at,
        ..CustomerState::default()
    };
    for _ in 0..reader.len()? {
        let packed = reader.varint()?;
        let seq = packed >> 1;
        let since = if seq > 0 { reader.varint()? as i64 } else { 0 };
        let next_check = reader.opt_time()?;
        state.memberships.push(Membership {
            member: packed & 1 == 1,
            since,
            seq,
            next_check,
        });
    }
    for _ in 0..reader.len()? {
        let count = reader.len()?;
        let mut entries = Vec::with_capacity(count);
        let mut previous = 0i64;
        for _ in 0..count {
            let ts = previous.wrapping_add(unzigzag(reader.varint()?));
            previous = ts;
            let tag = reader.varint()?;
            let coalesced = tag & 1 == 1;
            let has_values = tag & 2 == 2;
            let entry = if !coalesced {
                let value = if has_values {
                    Some(reader.f64()?)
                } else {
                    None
                };
                Entry::single(ts, value)
            } else {
                let count = reader.varint()? as u32;
                let values = reader.varint()? as u32;
                let (sum, min, max) = if values > 0 {
                    (reader.f64()?, reader.f64()?, reader.f64()?)
                } else {
                    (0.0, f64::INFINITY, f64::NEG_INFINITY)
                };
                Entry {
                    ts,
                    count,
                    values,
                    sum,
                    min,
                    max,
                }
            };
            entries.push(entry);
        }
        state.series.push(Series { entries });
    }
    for _ in 0..reader.len()? {
        let count = reader.varint()?;
        let values = reader.varint()?;
        let (sum, min, max) = if values > 0 {
            (reader.f64()?, reader.f64()?, reader.f64()?)
        } else {
            (0.0, 0.0, 0.0)
        };
        state.totals.push(Total {
            count,
            values,
            sum,
            min,
            max,
        });
    }
    for _ in 0..reader.len()? {
        let first = reader.opt_time()?;
        let last = reader.opt_time()?;
        state.extremes.push(Extreme { first, last });
    }
    for _ in 0..reader.len()? {
        let len = reader.len()?;
        if len == 0 {
            state.traits.push(None);
            continue;
        }
        let text = reader.take(len - 1)?;
        let value = serde_json::from_slice(text)
            .map_err(|err| DecodeStateError(format!("bad trait value: {err}")))?;
        let at = reader.varint()? as i64;
        state.traits.push(Some(TraitValue { value, at }));
    }
    let mut previous = 0i64;
    for _ in 0..reader.len()? {
        let hash = u64::from_le_bytes(reader.array()?);
        let at = previous.wrapping_add(unzigzag(reader.varint()?));
        previous = at;
        state.seen.push((hash, at));
    }
    if reader.pos != bytes.len() {
        return Err(DecodeStateError("trailing bytes after state".into()));
    }
    Ok(state)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_opt_time(out: &mut Vec<u8>, value: Option<i64>) {
    put_varint(out, value.map_or(0, |at| zigzag(at).wrapping_add(1)));
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, DecodeStateError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .bytes
                .get(self.pos)
                .ok_or_else(|| DecodeStateError("truncated varint".into()))?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeStateError("varint too long".into()))
    }

    /// A count of items (or bytes) that follow: each takes at least one byte, so a count
    /// beyond what is left is corrupt — and is refused before anything is allocated for it.
    fn len(&mut self) -> Result<usize, DecodeStateError> {
        let len = self.varint()?;
        let left = self.bytes.len().saturating_sub(self.pos);
        if len > left as u64 {
            return Err(DecodeStateError(format!(
                "length {len} with {left} bytes left"
            )));
        }
        Ok(len as usize)
    }

    fn opt_time(&mut self) -> Result<Option<i64>, DecodeStateError> {
        let raw = self.varint()?;
        Ok((raw != 0).then(|| unzigzag(raw - 1)))
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeStateError> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len());
        let end = end.ok_or_else(|| DecodeStateError("truncated state".into()))?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn array(&mut self) -> Result<[u8; 8], DecodeStateError> {
        let slice = self.take(8)?;
        let mut out = [0u8; 8];
        out.copy_from_slice(slice);
        Ok(out)
    }

    fn f64(&mut self) -> Result<f64, DecodeStateError> {
        Ok(f64::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::compile_rules;
    use proptest::prelude::*;

    fn layout(rules: &[(&str, &str)]) -> (Program, StateLayout) {
        let program = compile_rules(rules);
        let layout = StateLayout::of(&program);
        (program, layout)
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        (0i64..1 << 42, 1u32..4, any::<bool>(), -1e6f64..1e6).prop_map(|(ts, count, has, v)| {
            let values = if has { count } else { 0 };
            let spread = if count > 1 { 1.0 } else { 0.0 };
            Entry {
                ts,
                count,
                values,
                sum: if has { v * f64::from(count) } else { 0.0 },
                min: if has { v } else { f64::INFINITY },
                max: if has { v + spread } else { f64::NEG_INFINITY },
            }
        })
    }

    proptest! {
        #[test]
        fn round_trips(
            mut entries in proptest::collection::vec(arb_entry(), 0..20),
            count in 0u64..1000,
            seq in 0u64..50,
            member in any::<bool>(),
            seen in proptest::collection::vec((any::<u64>(), 0i64..1 << 42), 0..5),
            timer in proptest::option::of(0i64..1 << 42),
            trait_value in proptest::option::of("[a-z]{0,8}"),
        ) {
            entries.sort_by_key(|e| e.ts);
            let (_, layout) = layout(&[("a", r#"count("X", 7d) > 1 and count("X") > 0 and since(last("X")) > 1h and trait.plan == "pro""#)]);
            let state = CustomerState {
                series: vec![Series { entries }],
                totals: vec![Total { count, values: count / 2, sum: 3.5, min: -1.0, max: 9.0 }],
                extremes: vec![Extreme { first: Some(5), last: timer }],
                traits: vec![trait_value.map(|v| TraitValue { value: serde_json::Value::String(v), at: 77 })],
                memberships: vec![Membership { member, since: if seq > 0 { 1234 } else { 0 }, seq, next_check: timer }],
                seen,
                timer,
                evaluated_at: Some(99),
            };
            let bytes = encode(&state, &layout);
            let mut expected = state.clone();
            for total in &mut expected.totals {
                if total.values == 0 { total.sum = 0.0; total.min = 0.0; total.max = 0.0; }
            }
            prop_assert_eq!(decode(&bytes, &layout, &layout).expect("decodes"), expected);
            let fields = decode_index_fields(&bytes).expect("head decodes");
            prop_assert_eq!(fields.layout_id, layout.id);
            prop_assert_eq!(fields.timer, state.timer);
            let members: Vec<Option<i64>> = state
                .memberships
                .iter()
                .map(|m| m.member.then_some(m.since))
                .collect();
            prop_assert_eq!(fields.members, members);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let (_, layout) = layout(&[("a", r#"count("X") > 1"#)]);
            let _ = decode(&bytes, &layout, &layout);
        }

        /// Random bodies behind a valid header (the header alone is what random bytes rarely
        /// get right): an error or a state of exactly the layout's shape, never a panic.
        #[test]
        fn random_bodies_decode_to_the_layouts_shape_or_fail(
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let (program, layout) = layout(FULL);
            let mut bytes = vec![FORMAT_VERSION];
            bytes.extend_from_slice(&layout.id.to_be_bytes());
            bytes.extend_from_slice(&body);
            if let Ok(state) = decode(&bytes, &layout, &layout) {
                prop_assert_eq!(state.series.len(), program.layout.series.len());
                prop_assert_eq!(state.memberships.len(), program.segments.len());
            }
        }
    }

    /// Rules reading every kind of feature slot.
    const FULL: &[(&str, &str)] = &[
        (
            "a",
            r#"count("X", 7d) > 1 and count("X") > 0 and since(last("X")) > 1h"#,
        ),
        ("b", r#"trait.plan == "pro" and first(any) < last("X")"#),
    ];

    /// A state with something in every slot, and its encoding.
    fn full_state() -> (Program, StateLayout, Vec<u8>) {
        let (program, layout) = layout(FULL);
        let mut state = CustomerState::new(&program.layout, program.segments.len());
        state.series[0].push(10, None, 8);
        state.series[0].push(20, Some(2.5), 8);
        state.totals[0].count = 3;
        state.extremes[0] = Extreme {
            first: Some(5),
            last: Some(20),
        };
        state.traits[0] = Some(TraitValue {
            value: serde_json::json!("pro"),
            at: 7,
        });
        state.memberships[1] = Membership {
            member: true,
            since: 10,
            seq: 1,
            next_check: Some(99),
        };
        state.seen.push((42, 20));
        state.timer = Some(99);
        let bytes = encode(&state, &layout);
        (program, layout, bytes)
    }

    /// A value whose layout id matches but whose slot vectors are short used to decode, and the
    /// engine then indexed the missing slots and panicked the worker.
    #[test]
    fn short_vectors_under_a_matching_layout_id_are_an_error() {
        let (program, layout, _) = full_state();
        let empty = encode(&CustomerState::default(), &layout);
        let err = decode(&empty, &layout, &layout).expect_err("no slots at all");
        assert!(err.0.contains("series where layout"), "{err}");
        for drop_one in 0..5 {
            let mut state = CustomerState::new(&program.layout, program.segments.len());
            match drop_one {
                0 => drop(state.series.pop()),
                1 => drop(state.totals.pop()),
                2 => drop(state.extremes.pop()),
                3 => drop(state.traits.pop()),
                _ => drop(state.memberships.pop()),
            }
            let bytes = encode(&state, &layout);
            assert!(
                decode(&bytes, &layout, &layout).is_err(),
                "slot kind {drop_one}"
            );
        }
        let mut longer = CustomerState::new(&program.layout, program.segments.len());
        longer.totals.push(Total::default());
        assert!(decode(&encode(&longer, &layout), &layout, &layout).is_err());
    }

    #[test]
    fn every_truncation_of_a_state_is_an_error() {
        let (_, layout, bytes) = full_state();
        assert!(decode(&bytes, &layout, &layout).is_ok());
        for end in 0..bytes.len() {
            assert!(
                decode(&bytes[..end], &layout, &layout).is_err(),
                "prefix of {end} bytes"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer, &layout, &layout).is_err());
    }

    /// A count claiming more items than there are bytes left is refused before anything is
    /// allocated for it (the bound used to be 8× the whole value, ~40× that in memory).
    #[test]
    fn counts_beyond_the_value_are_refused_before_allocating() {
        let (_, layout) = layout(FULL);
        let mut bytes = vec![FORMAT_VERSION];
        bytes.extend_from_slice(&layout.id.to_be_bytes());
        bytes.extend_from_slice(&[0, 0]); // no timer, never evaluated
        bytes.push(0); // no memberships
        bytes.push(1); // one series …
        put_varint(&mut bytes, 100); // … of 100 entries, with 0 bytes left
        let err = decode(&bytes, &layout, &layout).expect_err("claims too much");
        assert!(err.0.contains("length 100 with 0 bytes left"), "{err}");
    }

    #[test]
    fn fixed_width_values_need_exactly_eight_bytes() {
        for len in 0..=16usize {
            let bytes: Vec<u8> = (0..len as u8).collect();
            assert_eq!(decode_i64(&bytes).is_ok(), len == 8, "{len} bytes");
            assert_eq!(decode_u64(&bytes).is_ok(), len == 8, "{len} bytes");
        }
        assert_eq!(decode_i64(&(-5i64).to_be_bytes()), Ok(-5));
        assert_eq!(decode_u64(&u64::MAX.to_be_bytes()), Ok(u64::MAX));
    }

    #[test]
    fn reslots_across_a_changed_definition() {
        let (old_program, old) =
            layout(&[("a", r#"count("X") > 1"#), ("b", r#"count("Y", 1d) > 1"#)]);
        let (_, new) = layout(&[("b", r#"count("Y", 7d) > 1"#), ("c", r#"count("X") > 5"#)]);
        let mut state = CustomerState::new(&old_program.layout, 2);
        state.totals[0].count = 4;
        state.series[0].push(10, None, 8);
        state.memberships[1] = Membership {
            member: true,
            since: 10,
            seq: 1,
            next_check: None,
        };
        let bytes = encode(&state, &old);
        let moved = decode(&bytes, &old, &new).expect("decodes");
        assert_eq!(moved.totals[0].count, 4, "count(\"X\") carried over");
        assert_eq!(moved.series[0].entries.len(), 1, "series of Y carried over");
        assert_eq!(
            moved.memberships[0],
            Membership {
                member: true,
                since: 10,
                seq: 1,
                next_check: Some(0),
            },
            "b carried over, due for re-evaluation"
        );
        assert_eq!(moved.memberships[1].seq, 0, "c is new");
    }
}
