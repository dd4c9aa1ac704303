//! Standby replicas (`state.standby_replicas`): warm local copies of partitions this instance
//! does not own, kept by following their changelog partitions, so that when one of them is
//! assigned here (its owner died) the restore reads only the seconds of tail the copy lacks.
//!
//! ## Placement
//! librdkafka has no custom assignor, and the group's assignment is not something an instance
//! can steer; nor can it cheaply learn which member owns what. So the placement is the simplest
//! one that needs no knowledge of the group: with `standby_replicas ≥ 1` every instance follows
//! every partition it does not own ([`followed`]). Every partition then has M − 1 warm copies in
//! a group of M, which is at least N whenever M ≤ N + 1 and more than asked for beyond that (the
//! cost: each instance stores and reads the changelog of every partition).
//!
//! ## A copy is a restore that never finishes
//! A [`Follower`] is a [`Restore`] kept open: it applies the changelog exactly as a restore
//! does, timers and members index kept in step by the restore's own [`Indexer`], saving its
//! progress (`keys::restore`) with every batch write, and never calls `finish`. One consumer
//! ([`ChangelogFeed`]) stays assigned to every followed partition and streams their records;
//! each follower's writes go out at least every [`INTERVAL`] (or every [`restore::BATCH`]
//! records), so a copy is at most about that far behind its owner.
//!
//! When the partition is assigned here, the partition's thread first [`Handoff::claim`]s it
//! (waiting for a standby write in progress to end; records applied but not yet written are
//! dropped with the follower), and `restore::bring_up_to_date` then continues the written
//! progress to the changelog's current end: only the tail is read, and the finish (input
//! offsets, clock and skip marks of the last checkpoint) is the ordinary one. A copy no longer followed (the partition became ours, or standbys were
//! turned off) is kept, with its progress, for a later assignment or follow. Nothing is ever
//! published from a copy: a standby only writes to the local store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::changelog::{self, Plan, Record, Restore};
use crate::pipeline::restore::{self, ChangelogMessage, ChangelogSource, Indexer, RestoreError};
use crate::rules::Program;
use crate::store::{keys, Store, Table, WriteSet};

/// The partitions an instance follows: with `replicas ≥ 1`, every partition in
/// `0..partitions` it does not own (see the module doc for why all of them).
pub fn followed(partitions: i32, owned: &BTreeSet<i32>, replicas: u32) -> Vec<i32> {
    if replicas == 0 {
        return Vec::new();
    }
    (0..partitions).filter(|p| !owned.contains(p)).collect()
}

/// A stream of the records of several changelog partitions at once (the standby's consumer,
/// `kafka::changelog` in the service): assigned once, not per read.
pub trait ChangelogFeed {
    /// From now on streams exactly these partitions, each from its offset.
    fn follow(&mut self, from: &BTreeMap<i32, i64>) -> Result<(), String>;

    /// Calls `visit` with each record (and its partition) that arrives within `wait`.
    fn poll(
        &mut self,
        wait: Duration,
        visit: &mut dyn FnMut(i32, ChangelogMessage<'_>),
    ) -> Result<(), String>;

    /// The partition's end offset (for the lag; may be a round trip).
    fn end(&self, partition: i32) -> Result<i64, String>;
}

/// Who writes a partition's local copy: the standby or the partition's owner, never both.
#[derive(Default)]
pub struct Handoff {
    inner: Mutex<HandoffState>,
    changed: Condvar,
}

#[derive(Default)]
struct HandoffState {
    /// Partitions whose owner thread runs here.
    claimed: BTreeSet<i32>,
    /// The partition a standby step is writing.
    busy: Option<i32>,
}

impl Handoff {
    /// The partition is to be restored and run here: waits until no standby write is in
    /// progress on it; from then on the standby leaves it alone until [`Handoff::release`].
    pub fn claim(&self, partition: i32) {
        let Ok(mut state) = self.inner.lock() else {
            return;
        };
        state.claimed.insert(partition);
        while state.busy == Some(partition) {
            state = match self.changed.wait(state) {
                Ok(state) => state,
                Err(_) => return,
            };
        }
    }

    /// The partition's owner thread here has ended (revoked).
    pub fn release(&self, partition: i32) {
        if let Ok(mut state) = self.inner.lock() {
            state.claimed.remove(&partition);
        }
    }

    /// Whether the partition's owner thread runs here.
    pub fn is_claimed(&self, partition: i32) -> bool {
        self.inner
            .lock()
            .map_or(true, |state| state.claimed.contains(&partition))
    }

    /// A standby write to the partition may start (`false`: it is claimed).
    fn begin(&self, partition: i32) -> bool {
        let Ok(mut state) = self.inner.lock() else {
            return false;
        };
        if state.claimed.contains(&partition) {
            return false;
        }
        state.busy = Some(partition);
        true
    }

    fn end(&self) {
        if let Ok(mut state) = self.inner.lock() {
            state.busy = None;
        }
        self.changed.notify_all();
    }

    /// Runs `write` unless the partition is claimed (`None` then).
    fn write<T>(&self, partition: i32, write: impl FnOnce() -> T) -> Option<T> {
        if !self.begin(partition) {
            return None;
        }
        let outcome = write();
        self.end();
        Some(outcome)
    }
}

/// A warm copy of one partition, following its changelog: the records applied since its last
/// write are held in `writes` until [`Follower::flush`].
pub struct Follower<'a> {
    partition: i32,
    restore: Restore,
    indexer: Indexer<'a>,
    writes: WriteSet,
    pending: usize,
}

impl<'a> Follower<'a> {
    /// Starts (or continues) following: the saved progress of an earlier follow or interrupted
    /// restore if any, else what [`changelog::plan`] says the local copy lacks (the whole
    /// changelog over a wiped copy if it cannot be trusted, or if there is none).
    pub fn start<St: Store + ?Sized>(
        partition: i32,
        store: &St,
        source: &dyn ChangelogSource,
        writer: &[u8; 8],
        program: &'a Program,
        stop: &dyn Fn() -> bool,
    ) -> Result<Follower<'a>, RestoreError> {
        let p = partition as u32;
        let mut writes = WriteSet::default();
        let (restore, wiped) = match store.get(Table::Meta, &keys::restore(p))? {
            Some(saved) => {
                let restore: Restore = serde_json::from_slice(&saved)
                    .map_err(|e| RestoreError::Local(format!("restore progress: {e}")))?;
                (restore, false)
            }
            None => {
                let local = restore::local_copy(p, store)?;
                let (low, high) = source
                    .watermarks(partition)
                    .map_err(RestoreError::Changelog)?;
                let plan = changelog::plan(local, low, high, |from, to| {
                    restore::tail_is_own(partition, source, from, to, writer, stop).unwrap_or(false)
                });
                if stop() {
                    return Err(RestoreError::Interrupted);
                }
                tracing::info!(
                    partition,
                    ?plan,
                    low,
                    high,
                    "standby: following the changelog"
                );
                // Without local state the copy starts from nothing: wiped (of any stray
                // index entries), so its indexes are kept from empty.
                let wiped = matches!(plan, Plan::Full { .. }) || !local.has_state;
                if wiped {
                    changelog::wipe(p, &mut writes);
                }
                let restore = match plan {
                    Plan::UpToDate => Restore::new(high, high),
                    Plan::Tail { from, to } | Plan::Full { from, to } => Restore::new(from, to),
                };
                (restore, wiped)
            }
        };
        let mut indexer = Indexer::new(p, program, store, restore.indexed, wiped)?;
        indexer.save(&mut writes);
        restore.save(p, &mut writes);
        store.write(writes)?;
        Ok(Follower {
            partition,
            restore,
            indexer,
            writes: WriteSet::default(),
            pending: 0,
        })
    }

    /// The next changelog offset this copy needs.
    pub fn next_offset(&self) -> i64 {
        self.restore.next_offset
    }

    /// Records applied but not written yet.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Applies one changelog record to the pending writes (a record below the copy's position,
    /// re-sent after a re-assignment, is skipped).
    pub fn apply<St: Store + ?Sized>(
        &mut self,
        store: &St,
        message: &ChangelogMessage<'_>,
    ) -> Result<(), RestoreError> {
        let offset = message.offset;
        if offset < self.restore.next_offset {
            return Ok(());
        }
        let record = changelog::parse(message.key, message.value).map_err(|error| {
            RestoreError::Corrupt {
                offset,
                reason: error.0,
            }
        })?;
        if let Record::Customer { id, value } = &record {
            let state = value.as_ref().map(|record| record.state);
            self.indexer
                .index(store, id, state, offset, &mut self.writes)?;
        }
        self.restore
            .apply_record(self.partition as u32, offset, record, &mut self.writes);
        self.restore.end_offset = self.restore.end_offset.max(self.restore.next_offset);
        self.pending += 1;
        Ok(())
    }

    /// Writes what was applied, with the indexes and the progress, in one batch.
    pub fn flush<St: Store + ?Sized>(&mut self, store: &St) -> Result<(), RestoreError> {
        if self.pending == 0 {
            return Ok(());
        }
        let p = self.partition as u32;
        let mut writes = std::mem::take(&mut self.writes);
        self.indexer.save(&mut writes);
        self.restore.save(p, &mut writes);
        restore::sort_for_memtable(&mut writes);
        store.write(writes)?;
        self.indexer.written();
        self.pending = 0;
        Ok(())
    }
}

/// How long the standby reads before it writes what it applied and looks at the assignment.
const INTERVAL: Duration = Duration::from_millis(500);

/// How often the lag of each copy is read (a round trip per partition).
const LAG_EVERY: Duration = Duration::from_secs(2);

/// What the standby thread needs from the service.
pub struct StandbyContext<'a, St: Store + ?Sized> {
    pub store: &'a St,
    /// For planning a copy's start (watermarks, its own tail).
    pub source: &'a dyn ChangelogSource,
    pub writer: [u8; 8],
    pub program: &'a Program,
    pub handoff: &'a Handoff,
    pub partitions: i32,
    pub replicas: u32,
    /// The partitions assigned here now.
    pub owned: &'a dyn Fn() -> BTreeSet<i32>,
    /// Called with each followed partition's lag (`None`: no longer followed).
    pub lag: &'a dyn Fn(i32, Option<i64>),
}

/// The standby loop (its own thread), until `shutdown`: keeps one follower per followed
/// partition, the feed assigned to exactly those, and every [`INTERVAL`] writes what each
/// applied — unless its partition was claimed by an owner thread here meanwhile, when the
/// follower is dropped with its unwritten records (the store holds its last written progress,
/// which the owner's restore continues).
pub fn run<St: Store + ?Sized>(
    context: &StandbyContext<'_, St>,
    feed: &mut dyn ChangelogFeed,
    shutdown: &AtomicBool,
) {
    let mut followers: BTreeMap<i32, Follower<'_>> = BTreeMap::new();
    let mut assigned: Option<BTreeSet<i32>> = None;
    let mut lag_at = Instant::now();
    while !shutdown.load(Ordering::Relaxed) {
        let wanted = followed(context.partitions, &(context.owned)(), context.replicas);
        followers.retain(|p, _| {
            let keep = wanted.contains(p) && !context.handoff.is_claimed(*p);
            if !keep {
                (context.lag)(*p, None);
                tracing::info!(partition = *p, "standby: no longer following");
            }
            keep
        });
        for &partition in &wanted {
            if followers.contains_key(&partition) || shutdown.load(Ordering::Relaxed) {
                continue;
            }
            let stop = || shutdown.load(Ordering::Relaxed) || context.handoff.is_claimed(partition);
            let started = context.handoff.write(partition, || {
                Follower::start(
                    partition,
                    context.store,
                    context.source,
                    &context.writer,
                    context.program,
                    &stop,
                )
            });
            match started {
                None | Some(Err(RestoreError::Interrupted)) => {}
                Some(Ok(follower)) => {
                    followers.insert(partition, follower);
                }
                Some(Err(error)) => {
                    tracing::warn!(partition, %error, "standby: following the changelog failed");
                }
            }
        }
        let now: BTreeSet<i32> = followers.keys().copied().collect();
        if assigned.as_ref() != Some(&now) {
            let from = followers
                .iter()
                .map(|(p, f)| (*p, f.next_offset()))
                .collect();
            match feed.follow(&from) {
                Ok(()) => assigned = Some(now),
                Err(error) => {
                    tracing::warn!(%error, "standby: assigning the changelog partitions failed");
                    assigned = None;
                }
            }
        }
        let mut failed: Vec<(i32, RestoreError)> = Vec::new();
        let polled = feed.poll(INTERVAL, &mut |partition, message| {
            let Some(follower) = followers.get_mut(&partition) else {
                return;
            };
            let mut outcome = follower.apply(context.store, &message);
            if outcome.is_ok() && follower.pending() >= restore::BATCH {
                outcome = context
                    .handoff
                    .write(partition, || follower.flush(context.store))
                    .unwrap_or(Ok(()));
            }
            if let Err(error) = outcome {
                failed.push((partition, error));
            }
        });
        if let Err(error) = polled {
            tracing::warn!(%error, "standby: reading the changelog failed");
        }
        for (partition, error) in failed {
            // Started again from its written progress at the next round.
            tracing::warn!(partition, %error, "standby: following the changelog failed");
            followers.remove(&partition);
        }
        let mut dropped = Vec::new();
        for (&partition, follower) in followers.iter_mut() {
            match context
                .handoff
                .write(partition, || follower.flush(context.store))
            {
                Some(Ok(())) => {}
                // Claimed: the owner continues from the copy's last written progress.
                None => dropped.push(partition),
                Some(Err(error)) => {
                    tracing::warn!(partition, %error, "standby: writing the copy failed");
                    dropped.push(partition);
                }
            }
        }
        for partition in dropped {
            followers.remove(&partition);
            (context.lag)(partition, None);
        }
        if lag_at.elapsed() >= LAG_EVERY {
            lag_at = Instant::now();
            for (&partition, follower) in &followers {
                if let Ok(end) = feed.end(partition) {
                    (context.lag)(partition, Some((end - follower.next_offset()).max(0)));
                }
            }
        }
    }
}

/// Starts the standby thread of a service, if standbys are configured.
pub fn spawn(
    shared: Arc<super::Shared>,
    partitions: i32,
    replicas: u32,
    shutdown: Arc<AtomicBool>,
) -> Option<std::thread::JoinHandle<()>> {
    if replicas == 0 {
        return None;
    }
    let spawned = std::thread::Builder::new()
        .name("standby".into())
        .spawn(move || {
            let clients = loop {
                let reader = crate::kafka::changelog::ChangelogReader::new(
                    &shared.kafka,
                    &shared.topics.changelog,
                    Duration::from_secs(5),
                );
                let feed = crate::kafka::changelog::ChangelogFollower::new(
                    &shared.kafka,
                    &shared.topics.changelog,
                    Duration::from_secs(5),
                );
                match (reader, feed) {
                    (Ok(reader), Ok(feed)) => break (reader, feed),
                    (Err(error), _) | (_, Err(error)) => {
                        tracing::warn!(%error, "standby: no changelog reader; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                        if shutdown.load(Ordering::Relaxed) {
                            return;
                        }
                    }
                }
            };
            let (reader, mut feed) = clients;
            let owned = || shared.owned_partitions().into_iter().collect();
            let lag = |partition: i32, behind: Option<i64>| {
                let label = partition.to_string();
                match behind {
                    Some(behind) => shared
                        .metrics
                        .standby_lag
                        .with_label_values(&[&label])
                        .set(behind),
                    None => {
                        let _ = shared.metrics.standby_lag.remove_label_values(&[&label]);
                    }
                }
            };
            let context = StandbyContext {
                store: shared.store.as_ref(),
                source: &reader,
                writer: shared.writer,
                program: &shared.program,
                handoff: &shared.standby,
                partitions,
                replicas,
                owned: &owned,
                lag: &lag,
            };
            run(&context, &mut feed, &shutdown);
        });
    match spawned {
        Ok(thread) => Some(thread),
        Err(error) => {
            tracing::error!(%error, "standby thread could not start; no standby copies");
            None
        }
    }
}

#[cfg(test)]
mod tests;
