//! An in-memory [`Store`] for unit tests of the engine (integration tests use RocksDB).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Mutex;

use super::{Entries, Store, StoreError, Table, WriteSet};

type Tables = BTreeMap<(Table, Vec<u8>), Vec<u8>>;

#[derive(Default)]
pub struct MemoryStore {
    tables: Mutex<Tables>,
}

impl MemoryStore {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Tables>, StoreError> {
        self.tables
            .lock()
            .map_err(|_| StoreError::Io("memory store lock poisoned".into()))
    }
}

impl Store for MemoryStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock()?.get(&(table, key.to_vec())).cloned())
    }

    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Entries, StoreError> {
        let tables = self.lock()?;
        Ok(tables
            .range((table, prefix.to_vec())..)
            .take_while(|((t, key), _)| *t == table && key.starts_with(prefix))
            .map(|((_, key), value)| (key.clone(), value.clone()))
            .collect())
    }

    fn for_each_after(
        &self,
        table: Table,
        prefix: &[u8],
        after: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        // In chunks, so the lock is not held while visiting and a long scan copies little.
        const CHUNK: usize = 256;
        let mut cursor = after.to_vec();
        loop {
            let chunk: Entries = {
                let tables = self.lock()?;
                let from = if cursor.as_slice() < prefix {
                    Bound::Included((table, prefix.to_vec()))
                } else {
                    Bound::Excluded((table, cursor))
                };
                tables
                    .range((from, Bound::Unbounded))
                    .take_while(|((t, key), _)| *t == table && key.starts_with(prefix))
                    .take(CHUNK)
                    .map(|((_, key), value)| (key.clone(), value.clone()))
                    .collect()
            };
            let Some((last, _)) = chunk.last() else {
                return Ok(());
            };
            let resume = last.clone();
            for (key, value) in &chunk {
                if !visit(key, value) {
                    return Ok(());
                }
            }
            if chunk.len() < CHUNK {
                return Ok(());
            }
            cursor = resume;
        }
    }

    fn write(&self, writes: WriteSet) -> Result<(), StoreError> {
        let mut tables = self.lock()?;
        for (table, from, to) in writes.ranges {
            tables.retain(|(t, key), _| !(*t == table && *key >= from && *key < to));
        }
        for (table, key, value) in writes.ops {
            match value {
                Some(value) => tables.insert((table, key), value),
                None => tables.remove(&(table, key)),
            };
        }
        Ok(())
    }
}
