//! The RocksDB [`Store`]: one column family per [`Table`], partitioned index/filters held in a
//! bounded block cache (an unbounded filter block was measured to fall out of cache and cost
//! 30× throughput), LZ4 compression. Writes go through the WAL; `sync_writes` adds an fsync
//! per batch for machine-crash (not just process-crash) durability.

use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard};

use rocksdb::{
    BlockBasedIndexType, BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType,
    Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};

use super::{Entries, Store, StoreError, Table, WriteSet};

/// Tuning knobs for the RocksDB store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RocksOptions {
    pub block_cache_bytes: usize,
    pub sync_writes: bool,
}

impl Default for RocksOptions {
    fn default() -> Self {
        RocksOptions {
            block_cache_bytes: 128 << 20,
            sync_writes: false,
        }
    }
}

pub struct RocksStore {
    /// `None` only between a failed [`RocksStore::reopen`] and the next successful one.
    db: RwLock<Option<DB>>,
    path: PathBuf,
    options: RocksOptions,
}

fn io(err: rocksdb::Error) -> StoreError {
    StoreError::Io(err.to_string())
}

impl RocksStore {
    /// Opens (creating if needed) the store at `path`. A directory that holds RocksDB files
    /// but no `CURRENT` is refused: RocksDB would create a new, empty database over it and
    /// delete the old files as obsolete — state silently gone.
    pub fn open(path: &Path, options: RocksOptions) -> Result<RocksStore, StoreError> {
        refuse_headless_state(path)?;
        let db = open_db(path, options)?;
        Ok(RocksStore {
            db: RwLock::new(Some(db)),
            path: path.to_path_buf(),
            options,
        })
    }

    /// Closes and reopens the database. After a failed WAL write (the disk was full) RocksDB
    /// refuses every further write, even once space is back, until it is reopened (the crate
    /// does not expose `DB::Resume`); reopening replays the WAL, so nothing written before is
    /// lost. Fails while the disk is still full; the store then answers errors until a later
    /// reopen succeeds.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut slot = self
            .db
            .write()
            .map_err(|_| StoreError::Io("state store lock poisoned".into()))?;
        // The old instance must release the directory's lock before the new one takes it.
        drop(slot.take());
        *slot = Some(open_db(&self.path, self.options)?);
        Ok(())
    }

    fn db(&self) -> Result<RwLockReadGuard<'_, Option<DB>>, StoreError> {
        let guard = self
            .db
            .read()
            .map_err(|_| StoreError::Io("state store lock poisoned".into()))?;
        if guard.is_none() {
            return Err(StoreError::Io(
                "state store closed: reopening it failed (see the log)".into(),
            ));
        }
        Ok(guard)
    }

    fn family(db: &DB, table: Table) -> Result<&rocksdb::ColumnFamily, StoreError> {
        db.cf_handle(table.name())
            .ok_or_else(|| StoreError::Io(format!("missing column family {}", table.name())))
    }

    /// A RocksDB integer property (e.g. `rocksdb.estimate-live-data-size`), summed over tables.
    pub fn property_sum(&self, name: &str) -> u64 {
        let Ok(guard) = self.db() else {
            return 0;
        };
        let Some(db) = guard.as_ref() else {
            return 0;
        };
        Table::ALL
            .iter()
            .filter_map(|table| Self::family(db, *table).ok())
            .filter_map(|cf| db.property_int_value_cf(cf, name).ok().flatten())
            .sum()
    }

    /// Flushes memtables to SST files (used before measuring on-disk size).
    pub fn flush(&self) -> Result<(), StoreError> {
        let guard = self.db()?;
        let db = guard.as_ref().ok_or_else(closed)?;
        for table in Table::ALL {
            db.flush_cf(Self::family(db, table)?).map_err(io)?;
        }
        Ok(())
    }
}

fn closed() -> StoreError {
    StoreError::Io("state store closed".into())
}

/// Opens (creating if needed) the database at `path` with one column family per table.
fn open_db(path: &Path, options: RocksOptions) -> Result<DB, StoreError> {
    let cache = Cache::new_lru_cache(options.block_cache_bytes);
    let mut table_options = BlockBasedOptions::default();
    table_options.set_block_cache(&cache);
    table_options.set_bloom_filter(10.0, false);
    table_options.set_partition_filters(true);
    table_options.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
    table_options.set_cache_index_and_filter_blocks(true);
    table_options.set_pin_top_level_index_and_filter(true);
    table_options.set_pin_l0_filter_and_index_blocks_in_cache(true);
    let mut cf_options = Options::default();
    cf_options.set_block_based_table_factory(&table_options);
    cf_options.set_compression_type(DBCompressionType::Lz4);
    cf_options.set_write_buffer_size(32 << 20);
    let families = Table::ALL
        .iter()
        .map(|table| ColumnFamilyDescriptor::new(table.name(), cf_options.clone()));
    let mut db_options = Options::default();
    db_options.create_if_missing(true);
    db_options.create_missing_column_families(true);
    db_options.set_max_background_jobs(2);
    db_options.set_keep_log_file_num(3);
    db_options.set_enable_pipelined_write(true);
    DB::open_cf_descriptors(&db_options, path, families).map_err(io)
}

/// Whether a file name is one RocksDB writes into its directory.
fn is_rocksdb_file(name: &str) -> bool {
    name.starts_with("MANIFEST-")
        || name.starts_with("OPTIONS-")
        || name == "IDENTITY"
        || name.ends_with(".sst")
        || (name.ends_with(".log") && name.chars().next().is_some_and(|c| c.is_ascii_digit()))
}

/// Refuses a state directory with RocksDB files but no `CURRENT` (see [`RocksStore::open`]).
fn refuse_headless_state(path: &Path) -> Result<(), StoreError> {
    let Ok(entries) = std::fs::read_dir(path) else {
        // Missing (created by the open) or unreadable (the open reports it).
        return Ok(());
    };
    let mut found = Vec::new();
    let mut current = false;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "CURRENT" {
            current = true;
        } else if is_rocksdb_file(&name) {
            found.push(name);
        }
    }
    if current || found.is_empty() {
        return Ok(());
    }
    found.sort();
    found.truncate(3);
    Err(StoreError::Corrupt {
        key: path.display().to_string(),
        reason: format!(
            "the directory holds RocksDB files ({}…) but no CURRENT file; refusing to start \
             over with empty state (restore CURRENT or the directory from a backup, or remove \
             the directory to rebuild from the changelog)",
            found.join(", ")
        ),
    })
}

impl Store for RocksStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let guard = self.db()?;
        let db = guard.as_ref().ok_or_else(closed)?;
        db.get_cf(Self::family(db, table)?, key).map_err(io)
    }

    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Entries, StoreError> {
        let guard = self.db()?;
        let db = guard.as_ref().ok_or_else(closed)?;
        let family = Self::family(db, table)?;
        let mut out = Vec::new();
        for item in db.iterator_cf(family, IteratorMode::From(prefix, Direction::Forward)) {
            let (key, value) = item.map_err(io)?;
            if !key.starts_with(prefix) {
                break;
            }
            out.push((key.into_vec(), value.into_vec()));
        }
        Ok(out)
    }

    fn scan_page(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Entries, StoreError> {
        let guard = self.db()?;
        let db = guard.as_ref().ok_or_else(closed)?;
        let family = Self::family(db, table)?;
        let start = after.filter(|after| *after > prefix).unwrap_or(prefix);
        let mut out = Vec::new();
        for item in db.iterator_cf(family, IteratorMode::From(start, Direction::Forward)) {
            if out.len() == limit {
                break;
            }
            let (key, value) = item.map_err(io)?;
            if !key.starts_with(prefix) {
                break;
            }
            if after.is_some_and(|after| &*key <= after) {
                continue;
            }
            out.push((key.into_vec(), value.into_vec()));
        }
        Ok(out)
    }

    fn for_each_prefix(
        &self,
        table: Table,
        prefix: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let guard = self.db()?;
        let db = guard.as_ref().ok_or_else(closed)?;
        let family = Self::family(db, table)?;
        let mut iter = db.raw_iterator_cf(family);
        iter.seek(prefix);
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            if !key.starts_with(prefix) || !visit(key, value) {
                break;
            }
            iter.next();
        }
        iter.status().map_err(io)
    }

    fn for_each_after(
        &self,
        table: Table,
        prefix: &[u8],
        after: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let guard = self.db()?;
        let db = guard.as_ref().ok_or_else(closed)?;
        let family = Self::family(db, table)?;
        let mut iter = db.raw_iterator_cf(family);
        iter.seek(after.max(prefix));
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            if !key.starts_with(prefix) {
                break;
            }
            if key > after && !visit(key, value) {
                break;
            }
            iter.next();
        }
        iter.status().map_err(io)
    }

    fn count_prefix(&self, table: Table, prefix: &[u8]) -> Result<u64, StoreError> {
        let guard = self.db()?;
        let db = guard.as_ref().ok_or_else(closed)?;
        let family = Self::family(db, table)?;
        let mut count = 0;
        let mut iter = db.raw_iterator_cf(family);
        iter.seek(prefix);
        while let Some(key) = iter.key() {
            if !key.starts_with(prefix) {
                break;
            }
            count += 1;
            iter.next();
        }
        iter.status().map_err(io)?;
        Ok(count)
    }

    fn write(&self, writes: WriteSet) -> Result<(), StoreError> {
        self.write_ref(&writes)
    }
}

impl RocksStore {
    /// [`Store::write`] without taking the set, so a caller can clear and reuse it (a partition
    /// worker keeps one per batch rather than growing a fresh one every time).
    pub fn write_ref(&self, writes: &WriteSet) -> Result<(), StoreError> {
        let guard = self.db()?;
        let db = guard.as_ref().ok_or_else(closed)?;
        // Sized up front, like the values: a batch holding a 900 KiB dead letter no longer
        // grows (and copies itself) by doubling. Per entry: a tag, the column family and two
        // lengths as varints (at most 16 bytes); 12 for the header.
        let bytes = writes
            .ops
            .iter()
            .map(|(_, key, value)| 16 + key.len() + value.as_ref().map_or(0, Vec::len))
            .chain(
                writes
                    .ranges
                    .iter()
                    .map(|(_, from, to)| 16 + from.len() + to.len()),
            )
            .sum::<usize>();
        let mut batch = WriteBatch::with_capacity_bytes(12 + bytes);
        for (table, from, to) in &writes.ranges {
            batch.delete_range_cf(Self::family(db, *table)?, from, to);
        }
        for (table, key, value) in &writes.ops {
            let family = Self::family(db, *table)?;
            match value {
                Some(value) => batch.put_cf(family, key, value),
                None => batch.delete_cf(family, key),
            }
        }
        let mut options = WriteOptions::default();
        options.set_sync(self.options.sync_writes);
        db.write_opt(batch, &options).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    /// The RocksDB overrides (paging, counting, visiting, range deletion) must agree with the
    /// in-memory store, whose versions are the trait's plain definitions.
    fn exercise(store: &dyn Store) -> Vec<String> {
        let mut writes = WriteSet::default();
        for key in ["a/1", "a/2", "a/3", "a/4", "b/1", "ab"] {
            writes.put(Table::Members, key.as_bytes().to_vec(), b"v".to_vec());
        }
        store.write(writes).expect("write");
        let keys = |entries: Entries| -> String {
            let names: Vec<String> = entries
                .into_iter()
                .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
                .collect();
            names.join(",")
        };
        let mut seen = Vec::new();
        let page = |after: Option<&[u8]>, limit| {
            keys(
                store
                    .scan_page(Table::Members, b"a/", after, limit)
                    .expect("page"),
            )
        };
        seen.push(page(None, 2));
        seen.push(page(Some(b"a/2"), 2));
        seen.push(page(Some(b"a/4"), 2));
        seen.push(page(Some(b"a/"), 10));
        seen.push(page(Some(b"0"), 1));
        seen.push(
            store
                .count_prefix(Table::Members, b"a/")
                .expect("count")
                .to_string(),
        );
        let mut visited = Vec::new();
        store
            .for_each_prefix(Table::Members, b"a", &mut |key, _| {
                visited.push(String::from_utf8_lossy(key).into_owned());
                visited.len() < 5
            })
            .expect("visit");
        seen.push(visited.join(","));
        for (prefix, after, stop) in [
            (&b"a"[..], &b"a/2"[..], 10),
            (b"a", b"a/2", 2),
            (b"a/", b"0", 10),
            (b"a/", b"a/", 10),
            (b"a/", b"a/4", 10),
            (b"a/", b"b", 10),
            (b"", b"a/4", 10),
            (b"ab", b"", 10),
        ] {
            let mut after_keys = Vec::new();
            store
                .for_each_after(Table::Members, prefix, after, &mut |key, _| {
                    after_keys.push(String::from_utf8_lossy(key).into_owned());
                    after_keys.len() < stop
                })
                .expect("visit after");
            seen.push(after_keys.join(","));
        }
        let mut writes = WriteSet::default();
        writes.delete_range(Table::Members, b"a/2".to_vec(), b"a/4".to_vec());
        writes.put(Table::Members, b"a/3".to_vec(), b"again".to_vec());
        writes.delete_range(Table::Members, b"z".to_vec(), b"a".to_vec()); // empty: ignored
        store.write(writes).expect("write");
        seen.push(keys(store.scan_prefix(Table::Members, b"").expect("scan")));
        seen
    }

    /// Without CURRENT RocksDB would silently create an empty database over the old files.
    #[test]
    fn a_state_dir_with_files_but_no_current_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let store = RocksStore::open(dir.path(), RocksOptions::default()).expect("open");
            let mut writes = WriteSet::default();
            writes.put(Table::Meta, b"k".to_vec(), b"v".to_vec());
            store.write(writes).expect("write");
            store.flush().expect("flush");
        }
        std::fs::remove_file(dir.path().join("CURRENT")).expect("removing CURRENT");
        let refused = RocksStore::open(dir.path(), RocksOptions::default())
            .err()
            .expect("refused");
        let message = refused.to_string();
        assert!(message.contains("no CURRENT file"), "{message}");
        assert!(message.contains("RocksDB files ("), "{message}");
        // An empty directory (or one with unrelated files) is a new store.
        let empty = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(empty.path().join("lost+found")).expect("mkdir");
        RocksStore::open(empty.path(), RocksOptions::default()).expect("a new store");
    }

    #[test]
    fn rocks_store_agrees_with_the_memory_store() {
        let dir = tempfile::tempdir().expect("temp dir");
        let rocks = RocksStore::open(dir.path(), RocksOptions::default()).expect("open");
        let memory = MemoryStore::default();
        let expected = vec![
            "a/1,a/2",
            "a/3,a/4",
            "",
            "a/1,a/2,a/3,a/4",
            "a/1",
            "4",
            "a/1,a/2,a/3,a/4,ab",
            "a/3,a/4,ab",
            "a/3,a/4",
            "a/1,a/2,a/3,a/4",
            "a/1,a/2,a/3,a/4",
            "",
            "",
            "ab,b/1",
            "ab",
            "a/1,a/3,a/4,ab,b/1",
        ];
        assert_eq!(exercise(&memory), expected, "memory store");
        assert_eq!(exercise(&rocks), expected, "rocks store");
    }
}
