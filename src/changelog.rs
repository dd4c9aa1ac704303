//! The changelog: each input partition's durable state mirrored to partition p of a compacted
//! Kafka topic, so the partition's next owner — another instance, or this one after losing its
//! disk — can rebuild it (SPEC §1, §6). This module is the pure part: the record formats and the
//! restore step that turns records into store writes. Producing them goes through the outbox
//! (`pipeline::relay`), reading them through `kafka::changelog`.
//!
//! ## Records (key → value; compaction keeps the last value per key)
//! - `c` + customer id → [`CustomerRecord`]: the customer's encoded state (`store::codec`, with
//!   its layout id) and the input offsets of the batch it was written in; a tombstone when the
//!   customer was erased.
//! - `m` → [`Checkpoint`]: the partition's event-clock `now` and input offsets at the end of a
//!   batch. Written after that batch's customer records.
//! - `l` + layout id → the JSON descriptor of a state layout, so states written under older
//!   definitions can still be decoded.
//!
//! ## Why a restore is exact
//! A record is produced only after every change and dead letter decided before it is
//! acknowledged (a barrier in the relay), so a customer state in the changelog never has changes
//! Kafka does not hold. A restore reads to the end and resumes the input at the last checkpoint:
//! every customer record before it reflects input before the checkpoint. Customer records after
//! the last checkpoint (a batch whose checkpoint never came: the writer died) are *ahead*: their
//! own input offsets are kept as skip marks, and those customers' events below the marks are not
//! applied again (they are in the state, and their changes were published). Everything else after
//! the checkpoint is processed again and yields the same changes, ids and `seq`.

use std::collections::BTreeMap;

use crate::model::Millis;
use crate::store::codec::CorruptValue;
use crate::store::{keys, Table, WriteSet};

const CUSTOMER: u8 = b'c';
const CHECKPOINT: u8 = b'm';
const LAYOUT: u8 = b'l';
const FORMAT: u8 = 1;

/// Next input offset to consume, per input topic.
pub type Offsets = Vec<(String, i64)>;

/// The key of a customer's record.
pub fn customer_key(customer: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + customer.len());
    key.push(CUSTOMER);
    key.extend_from_slice(customer.as_bytes());
    key
}

/// The key of the partition's checkpoint record.
pub fn checkpoint_key() -> Vec<u8> {
    vec![CHECKPOINT]
}

/// The key of a layout descriptor.
pub fn layout_key(layout_id: u64) -> Vec<u8> {
    let mut key = vec![LAYOUT];
    key.extend_from_slice(&layout_id.to_be_bytes());
    key
}

/// A customer's state as of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerRecord<'a> {
    /// The input offsets at the end of the batch that wrote it: the customer's events below
    /// them are in `state`.
    pub offsets: Offsets,
    /// `store::codec` bytes.
    pub state: &'a [u8],
}

/// The partition's position at the end of a batch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    pub clock: Option<Millis>,
    pub offsets: Offsets,
}

/// One changelog record, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// `None`: erased.
    Customer {
        id: &'a str,
        value: Option<CustomerRecord<'a>>,
    },
    Checkpoint(Checkpoint),
    Layout {
        id: u64,
        descriptor: &'a [u8],
    },
}

fn put_offsets(out: &mut Vec<u8>, offsets: &[(String, i64)]) {
    out.push(offsets.len().min(255) as u8);
    for (topic, offset) in offsets.iter().take(255) {
        let name = &topic.as_bytes()[..topic.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&offset.to_be_bytes());
    }
}

fn take_offsets(bytes: &[u8], pos: &mut usize) -> Option<Offsets> {
    let count = *bytes.get(*pos)?;
    *pos += 1;
    let mut offsets = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let len = u16::from_be_bytes(bytes.get(*pos..*pos + 2)?.try_into().ok()?) as usize;
        *pos += 2;
        let topic = std::str::from_utf8(bytes.get(*pos..pos.checked_add(len)?)?).ok()?;
        *pos += len;
        let offset = i64::from_be_bytes(bytes.get(*pos..*pos + 8)?.try_into().ok()?);
        *pos += 8;
        offsets.push((topic.to_string(), offset));
    }
    Some(offsets)
}

/// A customer record's value.
pub fn encode_customer(offsets: &[(String, i64)], state: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + offsets.len() * 24 + state.len());
    out.push(FORMAT);
    put_offsets(&mut out, offsets);
    out.extend_from_slice(state);
    out
}

/// A checkpoint record's value.
pub fn encode_checkpoint(checkpoint: &Checkpoint) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + checkpoint.offsets.len() * 24);
    out.push(FORMAT);
    match checkpoint.clock {
        Some(clock) => {
            out.push(1);
            out.extend_from_slice(&clock.to_be_bytes());
        }
        None => out.push(0),
    }
    put_offsets(&mut out, &checkpoint.offsets);
    out
}

/// Parses a record, or says why it is not one.
pub fn parse<'a>(key: &'a [u8], value: Option<&'a [u8]>) -> Result<Record<'a>, CorruptValue> {
    let corrupt = |what: &str| CorruptValue(format!("changelog {what}"));
    match key.first() {
        Some(&CUSTOMER) => {
            let id = std::str::from_utf8(&key[1..]).map_err(|_| corrupt("key is not UTF-8"))?;
            let Some(value) = value else {
                return Ok(Record::Customer { id, value: None });
            };
            if value.first() != Some(&FORMAT) {
                return Err(corrupt("customer record of an unknown format"));
            }
            let mut pos = 1;
            let offsets = take_offsets(value, &mut pos)
                .ok_or_else(|| corrupt("customer record truncated"))?;
            Ok(Record::Customer {
                id,
                value: Some(CustomerRecord {
                    offsets,
                    state: &value[pos..],
                }),
            })
        }
        Some(&CHECKPOINT) if key.len() == 1 => {
            let value = value.ok_or_else(|| corrupt("checkpoint without a value"))?;
            if value.first() != Some(&FORMAT) {
                return Err(corrupt("checkpoint of an unknown format"));
            }
            let mut pos = 1;
            let clock = match value.get(pos) {
                Some(0) => {
                    pos += 1;
                    None
                }
                Some(1) => {
                    let bytes = value
                        .get(pos + 1..pos + 9)
                        .ok_or_else(|| corrupt("checkpoint truncated"))?;
                    pos += 9;
                    Some(i64::from_be_bytes(
                        bytes
                            .try_into()
                            .map_err(|_| corrupt("checkpoint truncated"))?,
                    ))
                }
                _ => return Err(corrupt("checkpoint clock malformed")),
            };
            let offsets =
                take_offsets(value, &mut pos).ok_or_else(|| corrupt("checkpoint truncated"))?;
            if pos != value.len() {
                return Err(corrupt("checkpoint with trailing bytes"));
            }
            Ok(Record::Checkpoint(Checkpoint { clock, offsets }))
        }
        Some(&LAYOUT) if key.len() == 9 => {
            let id = u64::from_be_bytes(
                key[1..9]
                    .try_into()
                    .map_err(|_| corrupt("layout key malformed"))?,
            );
            let descriptor = value.ok_or_else(|| corrupt("layout without a value"))?;
            Ok(Record::Layout { id, descriptor })
        }
        _ => Err(corrupt("key of an unknown kind")),
    }
}

/// How a partition's local state relates to its changelog, decided at assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The local state is current: nothing to read.
    UpToDate,
    /// Read `[from, to)` and apply it over the local state.
    Tail { from: i64, to: i64 },
    /// Drop the local state of the partition and rebuild it from `[from, to)`.
    Full { from: i64, to: i64 },
}

/// What the planner knows about the local copy of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalCopy {
    /// The next changelog offset the local state reflects (recorded from acknowledgements and
    /// restores); `None` if never recorded.
    pub next_offset: Option<i64>,
    /// The partition holds any local state at all (customers, offsets, outbox).
    pub has_state: bool,
    /// The local outbox still holds changelog records: the local state is ahead of the
    /// changelog for the customers they name.
    pub ahead: bool,
}

/// Decides how to bring a partition's local copy up to the changelog `[low, high)`.
/// `tail_is_own` tells whether every record of `[next_offset, high)` was written by this store
/// (read only when the answer depends on it).
pub fn plan(
    local: LocalCopy,
    low: i64,
    high: i64,
    tail_is_own: impl FnOnce(i64, i64) -> bool,
) -> Plan {
    if high <= low {
        // An empty changelog (new, or every record compacted away): nothing to read.
        return Plan::UpToDate;
    }
    let Some(next) = local.next_offset.filter(|_| local.has_state) else {
        if local.has_state && !local.ahead {
            // State from before the changelog existed, or never acknowledged: applying the
            // whole changelog over it ends at each customer's newest record.
            return Plan::Tail {
                from: low,
                to: high,
            };
        }
        return Plan::Full {
            from: low,
            to: high,
        };
    };
    if next >= high {
        return Plan::UpToDate;
    }
    // Compaction may have removed records below `next` and above `low`; what the local copy
    // lacks starts at `next` (or at `low` if the log was truncated past it).
    let from = next.max(low);
    if !local.ahead {
        return Plan::Tail { from, to: high };
    }
    if tail_is_own(from, high) {
        // Records this store wrote whose acknowledgement it had not recorded: the local state
        // already holds them, and more.
        return Plan::UpToDate;
    }
    // The partition was processed elsewhere while this copy held states the changelog does not
    // (its outbox was not published): which of them the other owner overwrote is unknowable
    // without the older records, so the copy is rebuilt whole.
    Plan::Full {
        from: low,
        to: high,
    }
}

/// A restore in progress: what has been read, persisted with every batch of writes so an
/// interrupted restore (a rebalance, a crash) continues where it stopped.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Restore {
    /// Where the restore started.
    pub start_offset: i64,
    /// The next changelog offset to read.
    pub next_offset: i64,
    /// The offset of the last checkpoint read.
    pub checkpoint_offset: Option<i64>,
    /// Where the restore ends (the high watermark read when it started).
    pub end_offset: i64,
    /// The last checkpoint read.
    pub checkpoint: Option<Checkpoint>,
    /// Customers whose records came after the last checkpoint, with their records' offsets.
    pub ahead: BTreeMap<String, Offsets>,
    /// Records applied so far.
    pub records: u64,
    /// The timer and members indexes are kept in step with the states as they are written
    /// (`pipeline::restore`); a progress record from before that (false) has its timers
    /// rebuilt by a scan at the end and its members index dropped.
    pub indexed: bool,
}

impl Restore {
    pub fn new(from: i64, to: i64) -> Restore {
        Restore {
            start_offset: from,
            next_offset: from,
            end_offset: to,
            indexed: true,
            ..Restore::default()
        }
    }

    /// Adds the writes of the record at `offset` to `writes`.
    pub fn apply(
        &mut self,
        partition: u32,
        offset: i64,
        key: &[u8],
        value: Option<&[u8]>,
        writes: &mut WriteSet,
    ) -> Result<(), CorruptValue> {
        self.apply_record(partition, offset, parse(key, value)?, writes);
        Ok(())
    }

    /// [`Restore::apply`] of a record already parsed.
    pub fn apply_record(
        &mut self,
        partition: u32,
        offset: i64,
        record: Record<'_>,
        writes: &mut WriteSet,
    ) {
        match record {
            Record::Customer { id, value } => {
                let local = keys::customer(partition, id);
                match value {
                    Some(record) => {
                        writes.put(Table::Customers, local, record.state.to_vec());
                        self.ahead.insert(id.to_string(), record.offsets);
                    }
                    None => {
                        writes.delete(Table::Customers, local);
                        self.ahead.remove(id);
                    }
                }
            }
            Record::Checkpoint(checkpoint) => {
                self.ahead.clear();
                self.checkpoint = Some(checkpoint);
                self.checkpoint_offset = Some(offset);
            }
            Record::Layout { id, descriptor } => {
                writes.put(Table::Meta, keys::layout(id), descriptor.to_vec());
            }
        }
        self.records += 1;
        self.next_offset = self.next_offset.max(offset + 1);
    }

    /// The progress record to store with a batch of writes. The customers ahead of the last
    /// checkpoint are stored with it while they are few; in a compacted changelog the only
    /// checkpoint may be the last record, and storing them all with every batch would make a
    /// restore quadratic (`bench_restore`), so beyond [`SAVED_AHEAD`] the record says instead to
    /// read again from after the last checkpoint, which finds them again.
    pub fn save(&self, partition: u32, writes: &mut WriteSet) {
        let json = if self.ahead.len() <= SAVED_AHEAD {
            serde_json::to_vec(self)
        } else {
            serde_json::to_vec(&Restore {
                start_offset: self.start_offset,
                next_offset: self
                    .checkpoint_offset
                    .map_or(self.start_offset, |at| at + 1),
                checkpoint_offset: self.checkpoint_offset,
                end_offset: self.end_offset,
                checkpoint: self.checkpoint.clone(),
                ahead: BTreeMap::new(),
                records: self.records,
                indexed: self.indexed,
            })
        };
        writes.put(
            Table::Meta,
            keys::restore(partition),
            json.unwrap_or_default(),
        );
    }

    /// The final writes: the clock and input offsets of the last checkpoint, the skip marks of
    /// the customers ahead of it, the changelog position and the end of the progress record.
    /// (The derived indexes are the caller's: `pipeline::restore` keeps them in step.)
    pub fn finish(self, partition: u32, writes: &mut WriteSet) {
        let p = partition;
        if let Some(checkpoint) = &self.checkpoint {
            writes.delete_range(
                Table::Meta,
                keys::input_offset_prefix(p),
                keys::prefix_end(&keys::input_offset_prefix(p)),
            );
            for (topic, offset) in &checkpoint.offsets {
                writes.put(
                    Table::Meta,
                    keys::input_offset(p, topic),
                    offset.to_be_bytes().to_vec(),
                );
            }
            match checkpoint.clock {
                Some(clock) => {
                    writes.put(Table::Meta, keys::clock(p), clock.to_be_bytes().to_vec())
                }
                None => writes.delete(Table::Meta, keys::clock(p)),
            }
        }
        // Marks of an earlier restore describe states this one may have replaced.
        writes.delete_range(
            Table::Meta,
            keys::skip_prefix(p),
            keys::prefix_end(&keys::skip_prefix(p)),
        );
        let resume = self.checkpoint.as_ref().map(|c| &c.offsets);
        for (customer, offsets) in &self.ahead {
            // Only marks above where the input resumes can skip anything.
            let above = offsets.iter().any(|(topic, offset)| {
                let from = resume
                    .and_then(|r| r.iter().find(|(t, _)| t == topic))
                    .map_or(i64::MIN, |(_, o)| *o);
                *offset > from
            });
            if above {
                writes.put(
                    Table::Meta,
                    keys::skip(p, customer),
                    encode_offsets(offsets),
                );
            }
        }
        writes.put(
            Table::Meta,
            keys::changelog_next(p),
            self.end_offset.max(self.next_offset).to_be_bytes().to_vec(),
        );
        writes.delete(Table::Meta, keys::restore(p));
    }
}

/// Customers ahead of the last checkpoint stored with a restore's progress, at most.
pub const SAVED_AHEAD: usize = 10_000;

/// Adds to `writes` the deletion of everything a partition holds locally (states, timers,
/// outbox, members index, and its Meta keys) — before a full restore.
pub fn wipe(partition: u32, writes: &mut WriteSet) {
    let prefix = keys::partition_prefix(partition);
    let end = keys::prefix_end(&prefix);
    for table in [
        Table::Customers,
        Table::Timers,
        Table::Outbox,
        Table::Members,
    ] {
        writes.delete_range(table, prefix.clone(), end.clone());
    }
    let (exact, prefixes) = keys::partition_meta(partition);
    for prefix in prefixes {
        let end = keys::prefix_end(&prefix);
        writes.delete_range(Table::Meta, prefix, end);
    }
    for key in exact {
        writes.delete(Table::Meta, key);
    }
}

/// Offsets as a skip mark's value.
pub fn encode_offsets(offsets: &[(String, i64)]) -> Vec<u8> {
    let mut out = Vec::new();
    put_offsets(&mut out, offsets);
    out
}

/// A skip mark's value back.
pub fn decode_offsets(bytes: &[u8]) -> Result<Offsets, CorruptValue> {
    let mut pos = 0;
    match take_offsets(bytes, &mut pos) {
        Some(offsets) if pos == bytes.len() => Ok(offsets),
        _ => Err(CorruptValue("skip mark malformed".into())),
    }
}

/// Whether an event at `offset` of `topic` is already in a state whose skip mark is `mark`.
pub fn is_skipped(mark: &[(String, i64)], topic: &str, offset: i64) -> bool {
    mark.iter().any(|(t, o)| t == topic && offset < *o)
}

/// Whether the input has passed every offset of `mark` (the mark can go).
pub fn is_passed(mark: &[(String, i64)], position: &dyn Fn(&str) -> Option<i64>) -> bool {
    mark.iter()
        .all(|(topic, offset)| position(topic).is_some_and(|at| at >= *offset))
}

#[cfg(test)]
mod tests;
