//! A partition's timers in (due, customer) order without holding them all: a window of the
//! earliest is in memory, later ones are read from [`Table::Timers`] (whose keys sort in the
//! same order) as the window runs dry. Knows keys and the [`Store`] trait, nothing of states.
//!
//! The queue stands for the *live* set: every `(due, customer)` whose customer's current state
//! says `timer == Some(due)`. That set is kept as three parts, split at the *frontier* (the last
//! key read from the store, or [`Frontier::End`] once there is nothing more to read):
//! - `loaded`: every live timer at or before the frontier;
//! - the store after the frontier, minus `removed`: persisted timers removed since the last
//!   write-back, whose deletions are not in the store yet;
//! - `added`: timers after the frontier inserted since the last write-back, not in the store yet.
//!
//! Everything in `loaded` sorts before everything else, so the earliest live timer is the first
//! of `loaded`; when it is empty the next page is read from the store after the frontier, minus
//! `removed`, and `added` joins up to the new frontier. At a write-back
//! ([`TimerQueue::written_back`]) the write set carries every insertion and deletion, so
//! `added` and `removed` empty and `loaded` is cut back to the window (moving the frontier back:
//! what was cut is in the store). That needs the write set committed before the engine next
//! reads the store — the contract the customer cache already relies on.
//!
//! It relies on what the engine guarantees: a customer has at most one live timer, the one its
//! state names. So an insertion is always of a timer not live, and a removal always of a live
//! one — beyond the frontier and not in `added`, that one is in the store.
//!
//! Memory: O(window + timers changed since the last write-back), whatever the number of
//! customers. Opening reads every key once (to count them and refuse a corrupt one) but keeps
//! only the window.

use std::collections::BTreeSet;

use crate::model::Millis;
use crate::store::{keys, Store, StoreError, Table};

/// `(due, customer)`: ordered as the timer keys of one partition are.
pub type Timer = (Millis, String);

/// How far the store's timers have been read into memory.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Frontier {
    /// Every persisted timer up to and including this one is in `loaded` (unless fired or
    /// removed since).
    At(Timer),
    /// Every persisted timer is: nothing more to read.
    End,
}

pub struct TimerQueue {
    partition: u32,
    /// How many timers a read from the store brings in, and how many `loaded` keeps after a
    /// write-back (at least 1).
    window: usize,
    loaded: BTreeSet<Timer>,
    frontier: Frontier,
    added: BTreeSet<Timer>,
    removed: BTreeSet<Timer>,
    /// Size of the live set.
    pending: usize,
}

impl TimerQueue {
    /// Counts the partition's stored timers and loads the first `window` of them. A key that
    /// does not parse is [`StoreError::Corrupt`]: skipped, it would be a customer never
    /// re-evaluated.
    pub fn open<S: Store + ?Sized>(
        store: &S,
        partition: u32,
        window: usize,
    ) -> Result<Self, StoreError> {
        let window = window.max(1);
        let mut loaded = BTreeSet::new();
        let mut pending = 0;
        visit_timers(store, partition, None, &mut |due, customer| {
            pending += 1;
            if loaded.len() < window {
                loaded.insert((due, customer.to_string()));
            }
            true
        })?;
        let frontier = match loaded.last() {
            Some(last) if pending > loaded.len() => Frontier::At(last.clone()),
            _ => Frontier::End,
        };
        Ok(TimerQueue {
            partition,
            window,
            loaded,
            frontier,
            added: BTreeSet::new(),
            removed: BTreeSet::new(),
            pending,
        })
    }

    /// How many timers are live (in memory or only in the store).
    pub fn len(&self) -> usize {
        self.pending
    }

    /// How many timer entries are held in memory (the window plus the changes not yet written
    /// back).
    pub fn in_memory(&self) -> usize {
        self.loaded.len() + self.added.len() + self.removed.len()
    }

    fn after_frontier(&self, timer: &Timer) -> bool {
        match &self.frontier {
            Frontier::At(last) => timer > last,
            Frontier::End => false,
        }
    }

    /// Adds a customer's new timer (the customer has no other live timer).
    pub fn insert(&mut self, due: Millis, customer: &str) {
        let timer = (due, customer.to_string());
        let new = if self.after_frontier(&timer) {
            // Removed and re-added before a write-back: the stored key is live again.
            self.removed.remove(&timer) || self.added.insert(timer)
        } else {
            self.loaded.insert(timer)
        };
        if new {
            self.pending += 1;
        }
    }

    /// Removes a customer's live timer.
    pub fn remove(&mut self, due: Millis, customer: &str) {
        let timer = (due, customer.to_string());
        let was_live = if self.after_frontier(&timer) {
            // Not added since the write-back, so it is in the store until the next one.
            self.added.remove(&timer) || self.removed.insert(timer)
        } else {
            self.loaded.remove(&timer)
        };
        if was_live {
            self.pending = self.pending.saturating_sub(1);
        }
    }

    /// The due time of the earliest live timer, reading the store if the window is empty.
    pub fn first_due<S: Store + ?Sized>(
        &mut self,
        store: &S,
    ) -> Result<Option<Millis>, StoreError> {
        self.fill(store)?;
        Ok(self.loaded.first().map(|(due, _)| *due))
    }

    /// Takes the earliest live timer out, reading the store if the window is empty.
    pub fn pop_first<S: Store + ?Sized>(&mut self, store: &S) -> Result<Option<Timer>, StoreError> {
        self.fill(store)?;
        let first = self.loaded.pop_first();
        if first.is_some() {
            self.pending = self.pending.saturating_sub(1);
        }
        Ok(first)
    }

    /// Reads pages from the store until `loaded` holds something or nothing is left to read.
    fn fill<S: Store + ?Sized>(&mut self, store: &S) -> Result<(), StoreError> {
        while self.loaded.is_empty() {
            let Frontier::At(last) = &self.frontier else {
                return Ok(());
            };
            let mut page = Vec::with_capacity(self.window.min(4096));
            visit_timers(store, self.partition, Some(last), &mut |due, customer| {
                page.push((due, customer.to_string()));
                page.len() < self.window
            })?;
            self.frontier = match page.last() {
                Some(last) if page.len() == self.window => Frontier::At(last.clone()),
                _ => Frontier::End,
            };
            for timer in page {
                // Every removed timer up to the new frontier is in this page: done with it.
                if !self.removed.remove(&timer) {
                    self.loaded.insert(timer);
                }
            }
            while let Some(first) = self.added.first() {
                if self.after_frontier(first) {
                    break;
                }
                if let Some(timer) = self.added.pop_first() {
                    self.loaded.insert(timer);
                }
            }
        }
        Ok(())
    }

    /// How many live timers are due at or before `now`, counted up to `cap`: beyond the window
    /// by reading the store (at most `cap` keys).
    pub fn count_due<S: Store + ?Sized>(
        &self,
        store: &S,
        now: Millis,
        cap: usize,
    ) -> Result<usize, StoreError> {
        let in_window = self
            .loaded
            .iter()
            .take_while(|(due, _)| *due <= now)
            .take(cap)
            .count();
        let Frontier::At(last) = &self.frontier else {
            return Ok(in_window);
        };
        if in_window == cap || last.0 > now {
            // Everything after the frontier is due after `now`.
            return Ok(in_window);
        }
        let added = self.added.iter().take_while(|(due, _)| *due <= now).count();
        let mut count = in_window + added;
        visit_timers(store, self.partition, Some(last), &mut |due, customer| {
            if due > now || count >= cap {
                return false;
            }
            let removed =
                !self.removed.is_empty() && self.removed.contains(&(due, customer.to_string()));
            if !removed {
                count += 1;
            }
            true
        })?;
        Ok(count.min(cap))
    }

    /// Called once a write set carrying every timer change so far has been taken: the store
    /// (once it is committed) holds exactly the live set, so the overlay empties and `loaded`
    /// is cut back to the window.
    pub fn written_back(&mut self) {
        self.added.clear();
        self.removed.clear();
        if self.loaded.len() <= self.window {
            return;
        }
        while self.loaded.len() > self.window {
            self.loaded.pop_last();
        }
        if let Some(last) = self.loaded.last() {
            self.frontier = Frontier::At(last.clone());
        }
    }
}

/// Calls `visit` with the (due, customer) of each of the partition's stored timers after
/// `after` (from the first if `None`), in order, until it returns false.
fn visit_timers<S: Store + ?Sized>(
    store: &S,
    partition: u32,
    after: Option<&Timer>,
    visit: &mut dyn FnMut(Millis, &str) -> bool,
) -> Result<(), StoreError> {
    let prefix = keys::partition_prefix(partition);
    let mut corrupt = None;
    let mut parse = |key: &[u8], _: &[u8]| match keys::parse_timer_ref(key) {
        Some((due, customer)) => visit(due, customer),
        None => {
            corrupt = Some(key.to_vec());
            false
        }
    };
    match after {
        Some((due, customer)) => {
            let from = keys::timer(partition, *due, customer);
            store.for_each_after(Table::Timers, &prefix, &from, &mut parse)?;
        }
        None => store.for_each_prefix(Table::Timers, &prefix, &mut parse)?,
    }
    match corrupt {
        Some(key) => Err(StoreError::Corrupt {
            key: format!(
                "timer of partition {partition} {}",
                crate::model::change::hex(&key)
            ),
            reason: "not partition(4) due(8) customer id (UTF-8)".into(),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
