//! Bringing a newly assigned partition's local copy up to its changelog before its worker
//! starts: decide what is missing ([`changelog::plan`]), read only that, write it in batches
//! with the progress (so a rebalance or crash in the middle continues, never starts over), and
//! rebuild the timers of the restored states. Runs on the partition's own thread; the partition
//! is paused on the consumer meanwhile and `/readyz` reports the progress.
//!
//! Kafka stays behind [`ChangelogSource`] (`kafka::changelog` in the service).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::changelog::{self, LocalCopy, Plan, Restore};
use crate::outbox::OutboxEntry;
use crate::rules::Program;
use crate::store::codec::StateLayout;
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

/// Records written per batch.
const BATCH: usize = 100_000;

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub plan: Plan,
    pub records: u64,
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
    let mut writes = first_writes;
    restore.save(p, &mut writes);
    store.write(std::mem::take(&mut writes))?;
    let mut pending = 0usize;
    let mut failure: Option<RestoreError> = None;
    let end = restore.end_offset;
    let completed = source.read(partition, restore.next_offset, end, stop, &mut |message| {
        if let Err(error) =
            restore.apply(p, message.offset, message.key, message.value, &mut writes)
        {
            failure = Some(RestoreError::Corrupt {
                offset: message.offset,
                reason: error.0,
            });
            return Err("corrupt record".into());
        }
        pending += 1;
        if pending >= BATCH {
            restore.save(p, &mut writes);
            if let Err(error) = store.write(std::mem::take(&mut writes)) {
                failure = Some(error.into());
                return Err("write failed".into());
            }
            pending = 0;
            progress(restore.records, (end - restore.next_offset).max(0));
        }
        Ok(())
    });
    if let Some(error) = failure {
        return Err(error);
    }
    let completed = completed.map_err(RestoreError::Changelog)?;
    if !completed {
        restore.save(p, &mut writes);
        store.write(writes)?;
        return Err(RestoreError::Interrupted);
    }
    let records = restore.records;
    progress(records, 0);
    restore.finish(p, &mut writes);
    store.write(writes)?;
    rebuild_timers(p, store, program)?;
    Ok(Some(Restored {
        plan,
        records,
        elapsed: started.elapsed(),
    }))
}

/// What the planner needs to know about the local copy.
fn local_copy<St: Store + ?Sized>(p: u32, store: &St) -> Result<LocalCopy, RestoreError> {
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
fn tail_is_own(
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
