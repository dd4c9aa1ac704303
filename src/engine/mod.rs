//! The synchronous heart of segmenter: one [`PartitionEngine`] per input partition applies
//! events and due timers to per-customer state, re-evaluates the segments and decides the
//! `entered` / `exited` changes.
//!
//! Deterministic and I/O-free except through the [`Store`] trait: given the same inputs it makes
//! the same decisions, which is what makes replay, tests against a naive reference evaluator, and
//! crash recovery (re-processing after a restart yields the same change ids) possible.
//!
//! State is cached in memory and written back in batches ([`PartitionEngine::take_writes`]), so
//! the caller decides what else (outbox, input offsets) lands in the same atomic write. Timers
//! are read from the store in due order, a window at a time (`timers.rs`); memory for them does
//! not grow with the number of customers.

use std::collections::HashMap;

use rustc_hash::FxHashMap;
use std::sync::Arc;

use crate::features::{CustomerState, Limits, Touched};
use crate::model::{Cause, Change, ChangeKind, Event, Millis};
use crate::rules::{evaluate_dirty, next_change, Program};
use crate::store::codec::{self, StateLayout};
use crate::store::{keys, Store, StoreError, Table, WriteSet};

mod timers;
use timers::TimerQueue;

/// Where `now` comes from (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockMode {
    /// `now` is the highest event time seen on the partition.
    Event,
    /// `now` is the wall clock, supplied by the caller through [`PartitionEngine::advance`].
    Wall,
}

/// Engine tuning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineConfig {
    pub clock: ClockMode,
    pub limits: Limits,
    /// How many future candidate instants to evaluate when looking for a customer's next change
    /// before settling for a re-check timer.
    pub lookahead_steps: usize,
    /// Clean customer states kept in memory after a write-back.
    pub max_cached_customers: usize,
    /// Earliest timers kept in memory (later ones are read from the store as these fire).
    pub timer_window: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            clock: ClockMode::Event,
            limits: Limits::default(),
            lookahead_steps: 16,
            max_cached_customers: 200_000,
            timer_window: 10_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("partition {partition}: customer {customer:?}: {reason}")]
    CorruptState {
        partition: u32,
        customer: String,
        reason: String,
    },
}

/// What happened to one input event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Duplicate,
}

/// Running counts, for the replay summary and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineStats {
    pub applied: u64,
    pub duplicates: u64,
    pub timers_fired: u64,
    pub changes: u64,
}

struct Cached {
    state: CustomerState,
    /// The timer due time currently persisted for this customer.
    persisted_timer: Option<Millis>,
    dirty: bool,
}

/// The state and decisions of one partition.
pub struct PartitionEngine<S: Store> {
    partition: u32,
    program: Arc<Program>,
    layout: StateLayout,
    old_layouts: HashMap<u64, StateLayout>,
    store: Arc<S>,
    config: EngineConfig,
    now: Option<Millis>,
    clock_dirty: bool,
    cache: FxHashMap<String, Cached>,
    /// Customers changed since the last write-back.
    dirty: Vec<String>,
    timers: TimerQueue,
    stats: EngineStats,
    /// Customers erased since the last write-back, with their persisted timer.
    erased: Vec<(String, Option<Millis>)>,
    /// Due times of the timers fired since the last [`Self::take_fired`] (wall mode only).
    fired: Vec<Millis>,
}

impl<S: Store> PartitionEngine<S> {
    /// Opens a partition: restores its clock and timers and records the current layout.
    pub fn open(
        partition: u32,
        program: Arc<Program>,
        store: Arc<S>,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        let layout = StateLayout::of(&program);
        let layout_json = serde_json::to_vec(&layout).unwrap_or_default();
        let mut writes = WriteSet::default();
        writes.put(Table::Meta, keys::layout(layout.id), layout_json);
        store.write(writes)?;
        let now = match store.get(Table::Meta, &keys::clock(partition))? {
            Some(bytes) => Some(
                codec::decode_i64(&bytes).map_err(|err| StoreError::Corrupt {
                    key: format!("clock of partition {partition}"),
                    reason: err.0,
                })?,
            ),
            None => None,
        };
        let timers = TimerQueue::open(store.as_ref(), partition, config.timer_window)?;
        Ok(PartitionEngine {
            partition,
            program,
            layout,
            old_layouts: HashMap::new(),
            store,
            config,
            now,
            clock_dirty: false,
            cache: FxHashMap::default(),
            dirty: Vec::new(),
            timers,
            stats: EngineStats::default(),
            erased: Vec::new(),
            fired: Vec::new(),
        })
    }

    pub fn now(&self) -> Option<Millis> {
        self.now
    }

    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Timers not fired yet (in memory or only in the store): exact.
    pub fn pending_timers(&self) -> usize {
        self.timers.len()
    }

    /// Timer entries held in memory: at most the window plus the timers changed since the last
    /// write-back, however many are pending.
    pub fn timers_in_memory(&self) -> usize {
        self.timers.in_memory()
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Moves the clock forward to `now` (never back), firing every timer due at or before it in
    /// (due time, customer) order; each fires at its own due time.
    pub fn advance(&mut self, now: Millis, out: &mut Vec<Change>) -> Result<(), EngineError> {
        self.advance_bounded(now, usize::MAX, out).map(|_| ())
    }

    /// Like [`Self::advance`] but fires at most `max_timers`; if more are due the clock stops
    /// just before the next unfired one and `true` is returned. This lets a burst of due timers
    /// be interleaved with live traffic in slices; a customer whose own timer is still due when
    /// one of its events arrives has that timer fired first (see [`Self::apply_event`]).
    pub fn advance_bounded(
        &mut self,
        now: Millis,
        max_timers: usize,
        out: &mut Vec<Change>,
    ) -> Result<bool, EngineError> {
        let mut fired = 0;
        let mut reached = now;
        while let Some(due) = self.timers.first_due(self.store.as_ref())? {
            if due > now {
                break;
            }
            if fired == max_timers {
                reached = self.now.unwrap_or(due).max(due - 1);
                break;
            }
            let Some((due, customer)) = self.timers.pop_first(self.store.as_ref())? else {
                break;
            };
            self.fire(due, customer, out)?;
            fired += 1;
        }
        if self.now.is_none_or(|current| current < reached) {
            self.now = Some(reached);
            self.clock_dirty = true;
        }
        Ok(reached < now)
    }

    /// Timers due at or before `now`, counted up to `cap` (a burst can be millions; beyond the
    /// in-memory window this reads up to `cap` keys from the store).
    pub fn due_timers(&self, now: Millis, cap: usize) -> Result<usize, EngineError> {
        Ok(self.timers.count_due(self.store.as_ref(), now, cap)?)
    }

    fn fire(
        &mut self,
        due: Millis,
        customer: String,
        out: &mut Vec<Change>,
    ) -> Result<(), EngineError> {
        let mut state = self.check_out(&customer)?;
        if state.timer != Some(due) {
            self.check_in(&customer, state, false);
            return Ok(());
        }
        self.fire_state(&customer, &mut state, due, out);
        self.check_in(&customer, state, true);
        Ok(())
    }

    /// Evaluates a customer whose timer is due at `due` (already removed from the index).
    fn fire_state(
        &mut self,
        customer: &str,
        state: &mut CustomerState,
        due: Millis,
        out: &mut Vec<Change>,
    ) {
        state.timer = None;
        self.stats.timers_fired += 1;
        if self.config.clock == ClockMode::Wall {
            self.fired.push(due);
        }
        let dirty = vec![false; self.program.segments.len()];
        self.evaluate_customer(customer, state, due, &Cause::Timer, dirty, out);
    }

    /// Applies one decoded event. In event-clock mode the clock first moves to the event's time
    /// (firing due timers); in wall mode the caller has advanced it. Either way the customer's
    /// own timer, if due, fires before the event is applied.
    pub fn apply_event(
        &mut self,
        event: &Event,
        out: &mut Vec<Change>,
    ) -> Result<Outcome, EngineError> {
        let now = match (self.config.clock, self.now) {
            (ClockMode::Event, Some(current)) => current.max(event.timestamp),
            (ClockMode::Event, None) => event.timestamp,
            (ClockMode::Wall, Some(current)) => current,
            (ClockMode::Wall, None) => event.timestamp,
        };
        self.advance(now, out)?;
        let customer = event.customer_id.as_str();
        let mut state = self.check_out(customer)?;
        if let Some(due) = state.timer.filter(|due| *due <= now) {
            self.timers.remove(due, customer);
            self.fire_state(customer, &mut state, due, out);
        }
        if let Some(message_id) = &event.message_id {
            if state.is_duplicate(message_id, now, &self.config.limits) {
                self.stats.duplicates += 1;
                self.check_in(customer, state, false);
                return Ok(Outcome::Duplicate);
            }
        }
        let touched = state.apply(&self.program.layout, event, now, &self.config.limits);
        let cause = Cause::Event {
            message_id: event.message_id.clone(),
        };
        let dirty = self.dirty_for(&touched);
        self.evaluate_customer(customer, &mut state, now, &cause, dirty, out);
        self.check_in(customer, state, true);
        self.stats.applied += 1;
        Ok(Outcome::Applied)
    }

    /// An event already reflected in its customer's state (restored from the changelog ahead of
    /// where the input resumed, see `crate::changelog`): the clock moves as
    /// [`Self::apply_event`] would move it, firing other customers' due timers, and the event
    /// counts as a duplicate.
    pub fn skip_event(&mut self, event: &Event, out: &mut Vec<Change>) -> Result<(), EngineError> {
        let now = match (self.config.clock, self.now) {
            (ClockMode::Event, Some(current)) => current.max(event.timestamp),
            (ClockMode::Event, None) => event.timestamp,
            (ClockMode::Wall, Some(current)) => current,
            (ClockMode::Wall, None) => event.timestamp,
        };
        self.advance(now, out)?;
        self.stats.duplicates += 1;
        Ok(())
    }

    /// Re-evaluates the `dirty` segments of a customer at `t` (plus any whose check is due),
    /// records changes, and reschedules the customer's timer at the earliest pending check.
    fn evaluate_customer(
        &mut self,
        customer: &str,
        state: &mut CustomerState,
        t: Millis,
        cause: &Cause,
        mut dirty: Vec<bool>,
        out: &mut Vec<Change>,
    ) {
        let program = &self.program;
        state.prune(&program.layout, t);
        let never_evaluated = state.evaluated_at.is_none();
        for (flag, membership) in dirty.iter_mut().zip(&state.memberships) {
            *flag |= never_evaluated || membership.next_check.is_some_and(|check| check <= t);
        }
        let evaluation = evaluate_dirty(program, state, customer, t, dirty);
        let pending = state
            .memberships
            .iter()
            .zip(&evaluation.evaluated)
            .filter(|(_, evaluated)| !**evaluated)
            .filter_map(|(membership, _)| membership.next_check)
            .min();
        let checks = next_change(
            program,
            state,
            customer,
            &evaluation,
            pending,
            self.config.lookahead_steps,
        );
        for (idx, segment) in program.segments.iter().enumerate() {
            let membership = &mut state.memberships[idx];
            if evaluation.evaluated[idx] {
                membership.next_check = checks[idx];
            }
            let member = evaluation.members[idx];
            if membership.member == member {
                continue;
            }
            membership.member = member;
            membership.seq += 1;
            membership.since = t;
            out.push(Change {
                customer_id: customer.to_string(),
                segment: segment.id.clone(),
                kind: if member {
                    ChangeKind::Entered
                } else {
                    ChangeKind::Exited
                },
                at: t,
                seq: membership.seq,
                cause: cause.clone(),
                segment_version: segment.version.clone(),
            });
            self.stats.changes += 1;
        }
        let next = state.memberships.iter().filter_map(|m| m.next_check).min();
        state.evaluated_at = Some(t);
        if state.timer != next {
            if let Some(old) = state.timer {
                self.timers.remove(old, customer);
            }
            if let Some(due) = next {
                self.timers.insert(due, customer);
            }
            state.timer = next;
        }
    }

    /// The segments an event's touched features can affect.
    fn dirty_for(&self, touched: &Touched) -> Vec<bool> {
        let program = &self.program;
        let mut dirty = vec![false; program.segments.len()];
        let readers = touched
            .matchers
            .iter()
            .flat_map(|m| &program.matcher_readers[*m])
            .chain(
                touched
                    .traits
                    .iter()
                    .flat_map(|t| &program.trait_readers[*t]),
            );
        for &idx in readers {
            dirty[idx] = true;
        }
        dirty
    }

    /// Takes a customer's state out of the cache (loading it first if needed); the cache entry
    /// stays, empty, until [`Self::check_in`] puts the state back.
    fn check_out(&mut self, customer: &str) -> Result<CustomerState, EngineError> {
        if let Some(cached) = self.cache.get_mut(customer) {
            return Ok(std::mem::take(&mut cached.state));
        }
        let key = keys::customer(self.partition, customer);
        let stored = if self.erased.iter().any(|(erased, _)| erased == customer) {
            // Erased in this write-back period: the stored state is about to be deleted.
            None
        } else {
            self.store.get(Table::Customers, &key)?
        };
        let state = match stored {
            Some(bytes) => self.decode_state(customer, &bytes)?,
            None => CustomerState::new(&self.program.layout, self.program.segments.len()),
        };
        let placeholder = Cached {
            persisted_timer: state.timer,
            state: CustomerState::default(),
            dirty: false,
        };
        self.cache.insert(customer.to_string(), placeholder);
        Ok(state)
    }

    fn check_in(&mut self, customer: &str, state: CustomerState, changed: bool) {
        if let Some(cached) = self.cache.get_mut(customer) {
            cached.state = state;
            if changed && !cached.dirty {
                cached.dirty = true;
                self.dirty.push(customer.to_string());
            }
        }
    }

    fn decode_state(&mut self, customer: &str, bytes: &[u8]) -> Result<CustomerState, EngineError> {
        decode_stored(
            self.store.as_ref(),
            &self.layout,
            &mut self.old_layouts,
            self.partition,
            customer,
            bytes,
        )
    }

    /// Everything changed since the last call, as one write set (customer states, timers, the
    /// clock). The caller adds its own records (outbox, offsets) and commits it atomically,
    /// before calling the engine again: afterwards the in-memory cache is trimmed to
    /// `max_cached_customers` and the timers to `timer_window`, and what was dropped is read
    /// back from the store.
    pub fn take_writes(&mut self) -> WriteSet {
        let mut writes = WriteSet::default();
        self.take_writes_into(&mut writes);
        writes
    }

    /// [`PartitionEngine::take_writes`] appended to `writes` (a buffer the caller reuses).
    pub fn take_writes_into(&mut self, writes: &mut WriteSet) {
        // Deletions first: a customer erased and then seen again in the same period is written
        // afresh by the puts below (a write set applies in order).
        for (customer, timer) in std::mem::take(&mut self.erased) {
            writes.delete(Table::Customers, keys::customer(self.partition, &customer));
            if let Some(due) = timer {
                writes.delete(Table::Timers, keys::timer(self.partition, due, &customer));
            }
        }
        for customer in std::mem::take(&mut self.dirty) {
            let Some(cached) = self.cache.get_mut(&customer) else {
                continue;
            };
            if !cached.dirty {
                continue;
            }
            let customer = customer.as_str();
            let key = keys::customer(self.partition, customer);
            writes.put(
                Table::Customers,
                key,
                codec::encode(&cached.state, &self.layout),
            );
            if cached.persisted_timer != cached.state.timer {
                if let Some(old) = cached.persisted_timer {
                    writes.delete(Table::Timers, keys::timer(self.partition, old, customer));
                }
                if let Some(due) = cached.state.timer {
                    writes.put(
                        Table::Timers,
                        keys::timer(self.partition, due, customer),
                        Vec::new(),
                    );
                }
                cached.persisted_timer = cached.state.timer;
            }
            cached.dirty = false;
        }
        self.timers.written_back();
        if self.clock_dirty {
            if let Some(now) = self.now {
                writes.put(
                    Table::Meta,
                    keys::clock(self.partition),
                    now.to_be_bytes().to_vec(),
                );
            }
            self.clock_dirty = false;
        }
        if self.cache.len() > self.config.max_cached_customers {
            // Everything is clean now; drop down to 90 % of the bound so this scan is rare.
            let mut excess = self.cache.len() - self.config.max_cached_customers * 9 / 10;
            self.cache.retain(|_, _| {
                if excess == 0 {
                    return true;
                }
                excess -= 1;
                false
            });
        }
    }

    /// Writes everything pending straight to the store.
    pub fn flush(&mut self) -> Result<(), EngineError> {
        let writes = self.take_writes();
        if !writes.is_empty() {
            self.store.write(writes)?;
        }
        Ok(())
    }

    /// Erases a customer (GDPR): an `exited` change with cause `deleted` for each current
    /// membership, at `at` (never before a membership's `since`), then the state and its timer
    /// are gone. Returns false if the customer is unknown.
    pub fn erase(
        &mut self,
        customer: &str,
        at: Millis,
        out: &mut Vec<Change>,
    ) -> Result<bool, EngineError> {
        let known = self.cache.contains_key(customer)
            || self
                .store
                .get(Table::Customers, &keys::customer(self.partition, customer))?
                .is_some();
        if !known || self.erased.iter().any(|(erased, _)| erased == customer) {
            return Ok(false);
        }
        let persisted = self.cache.get(customer).map(|c| c.persisted_timer);
        let mut state = self.check_out(customer)?;
        let persisted_timer = persisted.unwrap_or(state.timer);
        if let Some(due) = state.timer {
            self.timers.remove(due, customer);
        }
        let at = state
            .memberships
            .iter()
            .filter(|m| m.member)
            .map(|m| m.since)
            .fold(at, Millis::max);
        for (idx, membership) in state.memberships.iter_mut().enumerate() {
            if !membership.member {
                continue;
            }
            let segment = &self.program.segments[idx];
            membership.member = false;
            membership.seq += 1;
            out.push(Change {
                customer_id: customer.to_string(),
                segment: segment.id.clone(),
                kind: ChangeKind::Exited,
                at,
                seq: membership.seq,
                cause: Cause::Deleted,
                segment_version: segment.version.clone(),
            });
            self.stats.changes += 1;
        }
        self.cache.remove(customer);
        self.dirty.retain(|dirty| dirty != customer);
        self.erased.push((customer.to_string(), persisted_timer));
        Ok(true)
    }

    /// Due times of the wall-clock timers fired since the last call (for lateness metrics).
    pub fn take_fired(&mut self) -> Vec<Millis> {
        std::mem::take(&mut self.fired)
    }

    /// The current state of a customer (cached or stored), if known.
    pub fn customer_state(&mut self, customer: &str) -> Result<Option<CustomerState>, EngineError> {
        if let Some(cached) = self.cache.get(customer) {
            return Ok(Some(cached.state.clone()));
        }
        let key = keys::customer(self.partition, customer);
        match self.store.get(Table::Customers, &key)? {
            Some(bytes) => Ok(Some(self.decode_state(customer, &bytes)?)),
            None => Ok(None),
        }
    }
}

/// Decodes a stored customer state into `layout`, re-slotting it if it was written under
/// another layout (whose description is kept in the meta table; `old_layouts` caches them).
pub fn decode_stored<S: Store + ?Sized>(
    store: &S,
    layout: &StateLayout,
    old_layouts: &mut HashMap<u64, StateLayout>,
    partition: u32,
    customer: &str,
    bytes: &[u8],
) -> Result<CustomerState, EngineError> {
    let corrupt = |reason: String| EngineError::CorruptState {
        partition,
        customer: customer.to_string(),
        reason,
    };
    let stored_id = codec::layout_id(bytes).map_err(|err| corrupt(err.0))?;
    if stored_id == layout.id {
        return codec::decode(bytes, layout, layout).map_err(|err| corrupt(err.0));
    }
    let old = match old_layouts.entry(stored_id) {
        std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
        std::collections::hash_map::Entry::Vacant(slot) => {
            let raw = store
                .get(Table::Meta, &keys::layout(stored_id))?
                .ok_or_else(|| corrupt(format!("unknown state layout {stored_id:016x}")))?;
            let parsed: StateLayout =
                serde_json::from_slice(&raw).map_err(|err| corrupt(err.to_string()))?;
            slot.insert(parsed)
        }
    };
    codec::decode(bytes, old, layout).map_err(|err| corrupt(err.0))
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod window_tests;
