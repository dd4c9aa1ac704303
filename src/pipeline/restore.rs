//! Bringing a newly assigned partition's local copy up to its changelog before its worker
//! starts: decide what is missing ([`changelog::plan`]), read only that, write it in batches
//! with the progress (so a rebalance or crash in the middle continues, never starts over), with
//! the timers and the members index kept in step in the same writes ([`Indexer`]). Runs on the partition's own thread; the partition
//! is paused on the consumer meanwhile and `/readyz` reports the progress.
//!
//! Kafka stays behind [`ChangelogSource`] (`kafka::changelog` in the service).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use crate::changelog::{self, LocalCopy, Plan, Record, Restore};
use crate::outbox::OutboxEntry;
use crate::rules::Program;
use crate::store::codec::{IndexFields, StateLayout};
use crate::store::{codec, keys, Store, StoreError, Table, WriteSet};

/// One changelog record as read.
pub struct ChangelogMessage<'a> {
    pub offset: i64,
    pub key: &'a [u8],
    pub value: Option<&'a [u8]>,
    pub writer: Option<&'a [u8]>,
}

/// Where changelog records come from.
pub trait ChangelogSource {
    /// The (log start, high watermark) offsets of changelog partition `partition`.
    fn watermarks(&self, partition: i32) -> Result<(i64, i64), String>;

    /// Calls `visit` with every record from `from` to the partition's end (at least `until`,
    /// the end read at the start) in offset order; `Ok(false)` if `stop` said stop first.
    fn read(
        &self,
        partition: i32,
        from: i64,
        until: i64,
        stop: &dyn Fn() -> bool,
        visit: &mut dyn FnMut(ChangelogMessage<'_>) -> Result<(), String>,
    ) -> Result<bool, String>;
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading the changelog: {0}")]
    Changelog(String),
    #[error("corrupt changelog record at offset {offset}: {reason}")]
    Corrupt { offset: i64, reason: String },
    #[error("corrupt local state: {0}")]
    Local(String),
    /// Asked to stop (the partition was revoked): the progress is saved.
    #[error("interrupted")]
    Interrupted,
}

/// Records written per batch: ~14 MB of states plus their index entries, under RocksDB's
/// 32 MiB write buffer (100,000 states, ~57 MB, switched memtables within every write;
/// bench_restore: 17–21 s → 11.1–11.6 s for 1 M customers).
pub(crate) const BATCH: usize = 25_000;

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub plan: Plan,
    /// Records applied, counting those of the interrupted restore or standby it continued.
    pub records: u64,
    /// Records read by this call only.
    pub read: u64,
    pub elapsed: Duration,
}

/// Restore progress as it goes: records applied, records (offsets) still to read.
pub type Progress<'a> = &'a dyn Fn(u64, i64);

/// Brings partition `partition`'s local copy up to its changelog. `writer` is this store's id
/// (records it wrote itself need not be read back). Returns what was done, `None` if nothing
/// was missing.
pub fn bring_up_to_date<St: Store + ?Sized>(
    partition: i32,
    store: &St,
    source: &dyn ChangelogSource,
    writer: &[u8; 8],
    program: &Program,
    stop: &dyn Fn() -> bool,
    progress: Progress<'_>,
) -> Result<Option<Restored>, RestoreError> {
    let started = Instant::now();
    let p = partition as u32;
    let (restore, plan, first_writes) = match store.get(Table::Meta, &keys::restore(p))? {
        Some(saved) => {
            let restore: Restore = serde_json::from_slice(&saved)
                .map_err(|e| RestoreError::Local(format!("restore progress: {e}")))?;
            tracing::info!(
                partition,
                next_offset = restore.next_offset,
                end_offset = restore.end_offset,
                "continuing an interrupted restore"
            );
            let mut restore = restore;
            // A standby's copy (`pipeline::standby`) is a restore that never finished, and the
            // changelog may have grown since any interruption: read to its current end.
            if let Ok((_, high)) = source.watermarks(partition) {
                restore.end_offset = restore.end_offset.max(high);
            }
            let plan = Plan::Tail {
                from: restore.next_offset,
                to: restore.end_offset,
            };
            (restore, plan, WriteSet::default())
        }
        None => {
            let local = local_copy(p, store)?;
            let (low, high) = source
                .watermarks(partition)
                .map_err(RestoreError::Changelog)?;
            let mut own_tail = None;
            let plan = changelog::plan(local, low, high, |from, to| {
                let own = tail_is_own(partition, source, from, to, writer, stop);
                own_tail = Some(own.is_ok());
                own.unwrap_or(false)
            });
            if own_tail == Some(false) && stop() {
                return Err(RestoreError::Interrupted);
            }
            tracing::info!(partition, ?plan, ?local, low, high, "changelog checked");
            let mut writes = WriteSet::default();
            let restore = match plan {
                Plan::UpToDate => {
                    if high > local.next_offset.unwrap_or(0) && local.has_state {
                        writes.put(
                            Table::Meta,
                            keys::changelog_next(p),
                            high.to_be_bytes().to_vec(),
                        );
                        store.write(writes)?;
                    }
                    return Ok(None);
                }
                Plan::Tail { from, to } => Restore::new(from, to),
                Plan::Full { from, to } => {
                    changelog::wipe(p, &mut writes);
                    Restore::new(from, to)
                }
            };
            (restore, plan, writes)
        }
    };
    let mut restore = restore;
    let records_before = restore.records;
    let mut writes = first_writes;
    let wiped = matches!(plan, Plan::Full { .. }) && restore.records == 0;
    let mut indexer = Indexer::new(p, program, store, restore.indexed, wiped)?;
    indexer.save(&mut writes);
    restore.save(p, &mut writes);
    store.write(std::mem::take(&mut writes))?;
    let mut pending = 0usize;
    let mut failure: Option<RestoreError> = None;
    let end = restore.end_offset;
    let completed = source.read(partition, restore.next_offset, end, stop, &mut |message| {
        let offset = message.offset;
        let record = match changelog::parse(message.key, message.value) {
            Ok(record) => record,
            Err(error) => {
                failure = Some(RestoreError::Corrupt {
                    offset,
                    reason: error.0,
                });
                return Err("corrupt record".into());
            }
        };
        if let Record::Customer { id, value } = &record {
            let state = value.as_ref().map(|record| record.state);
            if let Err(error) = indexer.index(store, id, state, offset, &mut writes) {
                failure = Some(error);
                return Err("indexing failed".into());
            }
        }
        restore.apply_record(p, offset, record, &mut writes);
        pending += 1;
        if pending >= BATCH {
            indexer.save(&mut writes);
            restore.save(p, &mut writes);
            sort_for_memtable(&mut writes);
            if let Err(error) = store.write(std::mem::take(&mut writes)) {
                failure = Some(error.into());
                return Err("write failed".into());
            }
            indexer.written();
            pending = 0;
            progress(restore.records, (end - restore.next_offset).max(0));
        }
        Ok(())
    });
    if let Some(error) = failure {
        return Err(error);
    }
    let completed = completed.map_err(RestoreError::Changelog)?;
    indexer.save(&mut writes);
    if !completed {
        restore.save(p, &mut writes);
        store.write(writes)?;
        return Err(RestoreError::Interrupted);
    }
    let records = restore.records;
    let read = records - records_before;
    progress(records, 0);
    let indexed = restore.indexed;
    restore.finish(p, &mut writes);
    indexer.finish(&mut writes);
    store.write(writes)?;
    if !indexed {
        // Continuing a restore that an older build started without keeping the timers.
        rebuild_timers(p, store, program)?;
    }
    Ok(Some(Restored {
        plan,
        records,
        read,
        elapsed: started.elapsed(),
    }))
}

/// What the planner needs to know about the local copy.
pub(crate) fn local_copy<St: Store + ?Sized>(
    p: u32,
    store: &St,
) -> Result<LocalCopy, RestoreError> {
    let next_offset = match store.get(Table::Meta, &keys::changelog_next(p))? {
        Some(bytes) => Some(
            codec::decode_i64(&bytes)
                .map_err(|e| RestoreError::Local(format!("changelog position: {}", e.0)))?,
        ),
        None => None,
    };
    let prefix = keys::partition_prefix(p);
    let has_customers = !store
        .scan_page(Table::Customers, &prefix, None, 1)?
        .is_empty();
    let has_offsets = !store
        .scan_page(Table::Meta, &keys::input_offset_prefix(p), None, 1)?
        .is_empty();
    let has_outbox = store.get(Table::Meta, &keys::outbox_next(p))?.is_some();
    let mut ahead = false;
    store.for_each_prefix(Table::Outbox, &prefix, &mut |_, value| {
        // An entry that does not decode is reported by the relay when it re-publishes it.
        ahead = OutboxEntry::decode(value).is_ok_and(|entry| entry.is_barrier());
        !ahead
    })?;
    Ok(LocalCopy {
        next_offset,
        has_state: has_customers || has_offsets || has_outbox,
        ahead,
    })
}

/// Whether every record of `[from, to)` was written by `writer`.
pub(crate) fn tail_is_own(
    partition: i32,
    source: &dyn ChangelogSource,
    from: i64,
    to: i64,
    writer: &[u8; 8],
    stop: &dyn Fn() -> bool,
) -> Result<bool, String> {
    let mut own = true;
    let completed = source.read(partition, from, to, stop, &mut |message| {
        own &= message.writer == Some(writer.as_slice());
        Ok(())
    })?;
    if !completed {
        return Err("interrupted".into());
    }
    Ok(own)
}

/// Keeps a partition's derived indexes — the timers (due time → customer) and the members index
/// with its per-segment counts — in step with the customer states a restore writes, in the same
/// writes, so a restored partition opens without rescanning its states (a 1 M-customer
/// partition took 4.3 s for the timers and 7.3 s for the members index that way,
/// BENCHMARKS.md). Each restored customer's index entries are adjusted by the difference
/// between its old state (in this batch, in the store, or none) and its new one: a tail restore
/// touches only the customers it restores, and the counts stay exact. Only the head of each
/// state is read ([`codec::decode_index_fields`]).
///
/// The members index is kept only while it is trusted: built for the current definitions
/// (its version key) with every count stored, or wiped by this restore; and every state in the
/// current layout (a state in an older layout needs re-slotting: rare, after a definitions
/// change). Otherwise its version key is dropped and the worker rebuilds it at open. A
/// standby's copy (`pipeline::standby`) is indexed by the same type, across its writes.
pub(crate) struct Indexer<'a> {
    p: u32,
    program: &'a Program,
    layout_id: u64,
    /// The member count per segment, while the members index is kept.
    members: Option<Vec<i64>>,
    /// The version key must go (the index stopped being kept).
    drop_version: bool,
    /// The timers index is kept (not for a progress record of an older build).
    timers: bool,
    /// A restore over a wiped partition: hashes of the customers written by earlier batches
    /// (one not in it has no old state; a hash collision only costs a lookup).
    earlier: Option<HashSet<u64>>,
    /// This batch's states, by customer: what the store does not hold yet.
    batch: HashMap<String, Option<IndexFields>>,
}

impl<'a> Indexer<'a> {
    pub(crate) fn new<St: Store + ?Sized>(
        p: u32,
        program: &'a Program,
        store: &St,
        indexed: bool,
        wiped: bool,
    ) -> Result<Indexer<'a>, RestoreError> {
        let members = if !indexed {
            None
        } else if wiped {
            Some(vec![0; program.segments.len()])
        } else {
            stored_member_counts(p, program, store)?
        };
        Ok(Indexer {
            p,
            program,
            layout_id: StateLayout::of(program).id,
            drop_version: members.is_none(),
            members,
            timers: indexed,
            earlier: (indexed && wiped).then(HashSet::new),
            batch: HashMap::new(),
        })
    }

    /// Adds to `writes` the index changes of customer `id`'s new state (`None`: erased).
    pub(crate) fn index<St: Store + ?Sized>(
        &mut self,
        store: &St,
        id: &str,
        state: Option<&[u8]>,
        offset: i64,
        writes: &mut WriteSet,
    ) -> Result<(), RestoreError> {
        if !self.timers {
            return Ok(());
        }
        let new =
            match state {
                Some(bytes) => Some(codec::decode_index_fields(bytes).map_err(|error| {
                    RestoreError::Corrupt {
                        offset,
                        reason: format!("customer {id}: {}", error.0),
                    }
                })?),
                None => None,
            };
        let old = self.old(store, id)?;
        let (old_timer, new_timer) = (
            old.as_ref().and_then(|f| f.timer),
            new.as_ref().and_then(|f| f.timer),
        );
        if old_timer != new_timer {
            if let Some(due) = old_timer {
                writes.delete(Table::Timers, keys::timer(self.p, due, id));
            }
            if let Some(due) = new_timer {
                writes.put(Table::Timers, keys::timer(self.p, due, id), Vec::new());
            }
        }
        self.index_members(id, old.as_ref(), new.as_ref(), writes);
        self.batch.insert(id.to_string(), new);
        Ok(())
    }

    fn index_members(
        &mut self,
        id: &str,
        old: Option<&IndexFields>,
        new: Option<&IndexFields>,
        writes: &mut WriteSet,
    ) {
        let Some(counts) = self.members.as_mut() else {
            return;
        };
        let current = |fields: Option<&IndexFields>| {
            fields.is_none_or(|f| f.layout_id == self.layout_id && f.members.len() == counts.len())
        };
        if !current(old) || !current(new) {
            tracing::info!(
                partition = self.p,
                customer = id,
                "a restored state in another layout: the members index is rebuilt at open"
            );
            self.members = None;
            self.drop_version = true;
            return;
        }
        for (slot, (segment, count)) in self.program.segments.iter().zip(counts).enumerate() {
            let was = old.and_then(|f| f.members[slot]);
            let is = new.and_then(|f| f.members[slot]);
            if was == is {
                continue;
            }
            let key = keys::member(self.p, &segment.id, id);
            match is {
                Some(since) => writes.put(Table::Members, key, since.to_be_bytes().to_vec()),
                None => writes.delete(Table::Members, key),
            }
            *count += i64::from(is.is_some()) - i64::from(was.is_some());
        }
    }

    /// The index fields of customer `id`'s state before this record.
    fn old<St: Store + ?Sized>(
        &self,
        store: &St,
        id: &str,
    ) -> Result<Option<IndexFields>, RestoreError> {
        if let Some(fields) = self.batch.get(id) {
            return Ok(fields.clone());
        }
        if let Some(earlier) = &self.earlier {
            if !earlier.contains(&hash(id)) {
                return Ok(None);
            }
        }
        match store.get(Table::Customers, &keys::customer(self.p, id))? {
            Some(bytes) => codec::decode_index_fields(&bytes)
                .map(Some)
                .map_err(|error| {
                    RestoreError::Local(format!("stored state of customer {id}: {}", error.0))
                }),
            None => Ok(None),
        }
    }

    /// The batch was written: the store holds its states now.
    pub(crate) fn written(&mut self) {
        if let Some(earlier) = self.earlier.as_mut() {
            earlier.extend(self.batch.keys().map(|id| hash(id)));
        }
        self.batch.clear();
    }

    /// Adds the counts (and the version key) to a batch's writes, or drops the version key of
    /// an index no longer kept.
    pub(crate) fn save(&mut self, writes: &mut WriteSet) {
        let version = keys::members_version(self.p);
        match &self.members {
            Some(counts) => {
                for (segment, count) in self.program.segments.iter().zip(counts) {
                    writes.put(
                        Table::Meta,
                        keys::members_count(self.p, &segment.id),
                        count.to_be_bytes().to_vec(),
                    );
                }
                writes.put(
                    Table::Meta,
                    version,
                    self.program.version.as_bytes().to_vec(),
                );
            }
            None if self.drop_version => {
                writes.delete(Table::Meta, version);
                self.drop_version = false;
            }
            None => {}
        }
    }

    pub(crate) fn finish(mut self, writes: &mut WriteSet) {
        self.save(writes);
    }
}

/// Orders a batch's writes by table and key (stably: writes of one key keep their order, and
/// only their order matters), so RocksDB inserts them into its memtables each after the
/// previous one instead of searching its skip list from the top for every key: the members
/// index and timer keys of a batch, in changelog order, are spread over the whole partition.
/// (bench_restore, 1 M customers: the batch writes took 19 s unsorted, 7.8 s sorted.)
pub(crate) fn sort_for_memtable(writes: &mut WriteSet) {
    writes
        .ops
        .sort_by(|(ta, ka, _), (tb, kb, _)| (*ta, ka).cmp(&(*tb, kb)));
}

fn hash(id: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    id.hash(&mut hasher);
    hasher.finish()
}

/// The member counts stored with a members index built for the current definitions; `None` if
/// it was built for others (or never), or a count is missing or corrupt.
fn stored_member_counts<St: Store + ?Sized>(
    p: u32,
    program: &Program,
    store: &St,
) -> Result<Option<Vec<i64>>, RestoreError> {
    let built_for = store.get(Table::Meta, &keys::members_version(p))?;
    if built_for.as_deref() != Some(program.version.as_bytes()) {
        return Ok(None);
    }
    let mut counts = Vec::with_capacity(program.segments.len());
    for segment in &program.segments {
        match store.get(Table::Meta, &keys::members_count(p, &segment.id))? {
            Some(bytes) => match codec::decode_i64(&bytes) {
                Ok(count) => counts.push(count),
                Err(_) => return Ok(None),
            },
            None => return Ok(None),
        }
    }
    Ok(Some(counts))
}

/// Timer entries written per batch while rebuilding.
const TIMER_CHUNK: usize = 50_000;

/// Rebuilds the partition's timer index from its stored states (restored states bring their
/// own due times; the index is derived).
pub fn rebuild_timers<St: Store + ?Sized>(
    p: u32,
    store: &St,
    program: &Program,
) -> Result<(), RestoreError> {
    let prefix = keys::partition_prefix(p);
    let layout = StateLayout::of(program);
    let mut old_layouts = HashMap::new();
    let mut writes = WriteSet::default();
    writes.delete_range(Table::Timers, prefix.clone(), keys::prefix_end(&prefix));
    let mut failure: Option<RestoreError> = None;
    store.for_each_prefix(Table::Customers, &prefix, &mut |key, bytes| {
        let Some(customer) = keys::parse_customer(key) else {
            return true;
        };
        let state = match crate::engine::decode_stored(
            store,
            &layout,
            &mut old_layouts,
            p,
            customer,
            bytes,
        ) {
            Ok(state) => state,
            Err(error) => {
                failure = Some(RestoreError::Local(error.to_string()));
                return false;
            }
        };
        if let Some(due) = state.timer {
            writes.put(Table::Timers, keys::timer(p, due, customer), Vec::new());
        }
        if writes.ops.len() >= TIMER_CHUNK {
            if let Err(error) = store.write(std::mem::take(&mut writes)) {
                failure = Some(error.into());
                return false;
            }
        }
        true
    })?;
    if let Some(error) = failure {
        return Err(error);
    }
    store.write(writes)?;
    Ok(())
}

#[cfg(test)]
mod tests;
