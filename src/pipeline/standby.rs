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
//! A [`Follower`] is a [`Restore`] kept open: it applies the changelog in batches exactly as a
//! restore does, saving its progress (`keys::restore`) with every batch, and never calls
//! `finish`. When the partition is assigned here, the partition's thread first [`Handoff::claim`]s
//! it (waiting for a step in progress to stop and save), and `restore::bring_up_to_date` then
//! continues that saved restore to the changelog's current end: only the tail is read, and the
//! finish (input offsets, clock and skip marks of the last checkpoint, timers, members index) is
//! the ordinary one. A copy no longer followed (the partition became ours, or standbys were
//! turned off) is kept, with its progress, for a later assignment or follow. Nothing is ever
//! published from a copy: a standby only writes to the local store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::changelog::{self, Plan, Restore};
use crate::pipeline::restore::{self, ChangelogSource, RestoreError};
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
    /// The partition is to be restored and run here: waits until no standby step writes it;
    /// from then on the standby leaves it alone until [`Handoff::release`].
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

    /// A standby step may write the partition (`false`: it is claimed).
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
}

/// A warm copy of one partition, following its changelog.
pub struct Follower {
    partition: i32,
    restore: Restore,
    /// The copy was wiped by [`Follower::start`] and nothing is written to it yet (the first
    /// step's indexes start from empty).
    wiped: bool,
}

impl Follower {
    /// Starts (or continues) following: the saved progress of an earlier follow or interrupted
    /// restore if any, else what [`changelog::plan`] says the local copy lacks (the whole
    /// changelog over a wiped copy if it cannot be trusted).
    pub fn start<St: Store + ?Sized>(
        partition: i32,
        store: &St,
        source: &dyn ChangelogSource,
        writer: &[u8; 8],
        stop: &dyn Fn() -> bool,
    ) -> Result<Follower, RestoreError> {
        let p = partition as u32;
        if let Some(saved) = store.get(Table::Meta, &keys::restore(p))? {
            let restore: Restore = serde_json::from_slice(&saved)
                .map_err(|e| RestoreError::Local(format!("restore progress: {e}")))?;
            return Ok(Follower {
                partition,
                restore,
                wiped: false,
            });
        }
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
        let mut writes = WriteSet::default();
        let wiped = matches!(plan, Plan::Full { .. });
        let restore = match plan {
            Plan::UpToDate => Restore::new(high, high),
            Plan::Tail { from, to } => Restore::new(from, to),
            Plan::Full { from, to } => {
                changelog::wipe(p, &mut writes);
                Restore::new(from, to)
            }
        };
        tracing::info!(
            partition,
            ?plan,
            low,
            high,
            "standby: following the changelog"
        );
        restore.save(p, &mut writes);
        store.write(writes)?;
        Ok(Follower {
            partition,
            restore,
            wiped,
        })
    }

    /// Applies what the changelog holds beyond the copy, in batches with the progress. Returns
    /// how many offsets the copy was behind the changelog's end when the step began.
    pub fn step<St: Store + ?Sized>(
        &mut self,
        store: &St,
        source: &dyn ChangelogSource,
        program: &Program,
        stop: &dyn Fn() -> bool,
    ) -> Result<i64, RestoreError> {
        let p = self.partition as u32;
        let (_, high) = source
            .watermarks(self.partition)
            .map_err(RestoreError::Changelog)?;
        let behind = (high - self.restore.next_offset).max(0);
        self.restore.end_offset = self.restore.end_offset.max(high);
        if behind == 0 {
            return Ok(0);
        }
        let wiped = std::mem::take(&mut self.wiped);
        let applied = restore::apply_changelog(
            self.partition,
            store,
            source,
            program,
            &mut self.restore,
            wiped,
            WriteSet::default(),
            stop,
            &|_, _| {},
        )?;
        // What was applied is saved whether the read completed or stopped.
        let mut writes = applied.into_writes();
        self.restore.save(p, &mut writes);
        store.write(writes)?;
        Ok(behind)
    }
}

/// How often the standby looks at the changelogs it follows.
const INTERVAL: Duration = Duration::from_millis(500);

/// What the standby thread needs from the service.
pub struct StandbyContext<'a, St: Store + ?Sized> {
    pub store: &'a St,
    pub source: &'a dyn ChangelogSource,
    pub writer: [u8; 8],
    pub handoff: &'a Handoff,
    pub program: &'a Program,
    pub partitions: i32,
    pub replicas: u32,
    /// The partitions assigned here now.
    pub owned: &'a dyn Fn() -> BTreeSet<i32>,
    /// Called with each followed partition's lag (`None`: no longer followed).
    pub lag: &'a dyn Fn(i32, Option<i64>),
}

/// The standby loop (its own thread): until `shutdown`, steps every followed partition in turn,
/// then waits [`INTERVAL`].
pub fn run<St: Store + ?Sized>(context: &StandbyContext<'_, St>, shutdown: &AtomicBool) {
    let mut followers: BTreeMap<i32, Follower> = BTreeMap::new();
    while !shutdown.load(Ordering::Relaxed) {
        let wanted = followed(context.partitions, &(context.owned)(), context.replicas);
        followers.retain(|p, _| {
            let keep = wanted.contains(p);
            if !keep {
                (context.lag)(*p, None);
                tracing::info!(partition = *p, "standby: no longer following");
            }
            keep
        });
        for &partition in &wanted {
            if shutdown.load(Ordering::Relaxed) {
                break;
            }
            if !context.handoff.begin(partition) {
                // Assigned here: the owner continues from the copy; a later follow starts
                // afresh from the store.
                if followers.remove(&partition).is_some() {
                    (context.lag)(partition, None);
                }
                continue;
            }
            let stop = || shutdown.load(Ordering::Relaxed) || context.handoff.is_claimed(partition);
            let outcome = match followers.remove(&partition) {
                Some(follower) => Ok(follower),
                None => Follower::start(
                    partition,
                    context.store,
                    context.source,
                    &context.writer,
                    &stop,
                ),
            }
            .and_then(|mut follower| {
                let behind =
                    follower.step(context.store, context.source, context.program, &stop)?;
                Ok((follower, behind))
            });
            context.handoff.end();
            match outcome {
                Ok((follower, behind)) => {
                    (context.lag)(partition, Some(behind));
                    followers.insert(partition, follower);
                }
                Err(RestoreError::Interrupted) => {}
                Err(error) => {
                    // Tried again from the saved progress at the next round.
                    tracing::warn!(partition, %error, "standby: following the changelog failed");
                }
            }
        }
        let until = Instant::now() + INTERVAL;
        while Instant::now() < until && !shutdown.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
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
            let reader = loop {
                match crate::kafka::changelog::ChangelogReader::new(
                    &shared.kafka,
                    &shared.topics.changelog,
                    Duration::from_secs(5),
                ) {
                    Ok(reader) => break reader,
                    Err(error) => {
                        tracing::warn!(%error, "standby: no changelog reader; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                        if shutdown.load(Ordering::Relaxed) {
                            return;
                        }
                    }
                }
            };
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
            run(&context, &shutdown);
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
