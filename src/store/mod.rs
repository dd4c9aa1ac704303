//! Durable storage behind a narrow interface: point reads, ordered prefix scans and atomic
//! write batches over a few tables. `keys.rs` owns the key layout, `codec.rs` the value
//! encoding; `rocks.rs` is the only file that names RocksDB, `memory.rs` is for unit tests.

pub mod codec;
pub mod keys;
pub mod memory;
#[cfg(feature = "service")]
pub mod rocks;

pub use memory::MemoryStore;
#[cfg(feature = "service")]
pub use rocks::RocksStore;

/// The logical tables (RocksDB column families).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// partition + customer id → encoded `CustomerState`.
    Customers,
    /// partition + due time + customer id → empty: timers in due order.
    Timers,
    /// Small bookkeeping values: partition clocks, feature layouts, offsets.
    Meta,
    /// partition + sequence → an encoded record waiting to be published (see `outbox`).
    Outbox,
    /// partition + segment + customer id → since: the members of each segment, for paging
    /// and exact member counts (written in the same batch as the memberships they mirror).
    Members,
}

impl Table {
    pub const ALL: [Table; 5] = [
        Table::Customers,
        Table::Timers,
        Table::Meta,
        Table::Outbox,
        Table::Members,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Customers => "customers",
            Table::Timers => "timers",
            Table::Meta => "meta",
            Table::Outbox => "outbox",
            Table::Members => "members",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage i/o: {0}")]
    Io(String),
    #[error("corrupt value under {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

/// Key/value pairs returned by a scan, in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// Puts and deletes applied together or not at all. Range deletions apply first, then `ops`
/// in order.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WriteSet {
    pub ops: Vec<(Table, Vec<u8>, Option<Vec<u8>>)>,
    /// `[from, to)` key ranges to delete.
    pub ranges: Vec<(Table, Vec<u8>, Vec<u8>)>,
}

impl WriteSet {
    /// Deletes every key in `[from, to)`: one operation however many keys it covers.
    pub fn delete_range(&mut self, table: Table, from: Vec<u8>, to: Vec<u8>) {
        if from < to {
            self.ranges.push((table, from, to));
        }
    }

    /// Moves everything in `other` into this set (after what is already here).
    pub fn append(&mut self, other: &mut WriteSet) {
        self.ops.append(&mut other.ops);
        self.ranges.append(&mut other.ranges);
    }

    pub fn put(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push((table, key, Some(value)));
    }

    pub fn delete(&mut self, table: Table, key: Vec<u8>) {
        self.ops.push((table, key, None));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.ranges.is_empty()
    }

    /// Empties the set, keeping its capacity.
    pub fn clear(&mut self) {
        self.ops.clear();
        self.ranges.clear();
    }
}

/// What the engine needs from storage.
pub trait Store: Send + Sync {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every entry whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Entries, StoreError>;
    /// Applies `writes` atomically.
    fn write(&self, writes: WriteSet) -> Result<(), StoreError>;

    /// Up to `limit` entries whose key starts with `prefix` and sorts after `after` (from the
    /// start of the prefix if `None`), in key order.
    fn scan_page(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Entries, StoreError> {
        Ok(self
            .scan_prefix(table, prefix)?
            .into_iter()
            .filter(|(key, _)| after.is_none_or(|after| key.as_slice() > after))
            .take(limit)
            .collect())
    }

    /// Calls `visit` with every entry whose key starts with `prefix`, in key order, without
    /// holding them all in memory; stops early when `visit` returns false.
    fn for_each_prefix(
        &self,
        table: Table,
        prefix: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        for (key, value) in self.scan_prefix(table, prefix)? {
            if !visit(&key, &value) {
                break;
            }
        }
        Ok(())
    }

    /// Like [`Store::for_each_prefix`] but only the entries whose key sorts after `after`: a
    /// scan that resumes where an earlier one stopped (seeking, not reading from the start of
    /// the prefix). `visit` must not call the store.
    fn for_each_after(
        &self,
        table: Table,
        prefix: &[u8],
        after: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        self.for_each_prefix(table, prefix, &mut |key, value| {
            key <= after || visit(key, value)
        })
    }

    /// How many keys start with `prefix`.
    fn count_prefix(&self, table: Table, prefix: &[u8]) -> Result<u64, StoreError> {
        Ok(self.scan_prefix(table, prefix)?.len() as u64)
    }
}
