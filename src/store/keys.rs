//! The one key layout. Integers are big-endian so byte order is logical order; every key starts
//! with the partition so a partition's state can be scanned, moved or dropped as a range.

use crate::model::Millis;

/// `partition(4) customer_id` in [`super::Table::Customers`].
pub fn customer(partition: u32, customer_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(4 + customer_id.len());
    key.extend_from_slice(&partition.to_be_bytes());
    key.extend_from_slice(customer_id.as_bytes());
    key
}

/// `partition(4) segment 0x00` in [`super::Table::Members`]: one segment's members in a
/// partition (segment ids never contain a NUL byte).
pub fn members_prefix(partition: u32, segment: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(5 + segment.len());
    key.extend_from_slice(&partition.to_be_bytes());
    key.extend_from_slice(segment.as_bytes());
    key.push(0);
    key
}

/// `partition(4) segment 0x00 customer_id` in [`super::Table::Members`].
pub fn member(partition: u32, segment: &str, customer_id: &str) -> Vec<u8> {
    let mut key = members_prefix(partition, segment);
    key.extend_from_slice(customer_id.as_bytes());
    key
}

/// The customer id of a member key, given its prefix length.
pub fn parse_member(key: &[u8], prefix_len: usize) -> Option<&str> {
    std::str::from_utf8(key.get(prefix_len..)?).ok()
}

/// `members_version/partition(4)` in Meta: the definitions version the partition's members
/// index was built for (rebuilt from the states when it differs).
pub fn members_version(partition: u32) -> Vec<u8> {
    let mut key = b"members_version/".to_vec();
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

/// `members_count/partition(4)/segment` in Meta: how many members `segment` has in the
/// partition, written in the same batch as the index entries it counts, so a partition opens
/// without scanning its index.
pub fn members_count(partition: u32, segment: &str) -> Vec<u8> {
    let mut key = members_count_prefix(partition);
    key.extend_from_slice(segment.as_bytes());
    key
}

/// `members_count/partition(4)/`: the prefix of a partition's member counts.
pub fn members_count_prefix(partition: u32) -> Vec<u8> {
    let mut key = b"members_count/".to_vec();
    key.extend_from_slice(&partition.to_be_bytes());
    key.push(b'/');
    key
}

/// `partition(4)`: the prefix of all of a partition's keys.
pub fn partition_prefix(partition: u32) -> Vec<u8> {
    partition.to_be_bytes().to_vec()
}

/// `partition(4) due(8, sign-flipped) customer_id` in [`super::Table::Timers`].
pub fn timer(partition: u32, due: Millis, customer_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(12 + customer_id.len());
    key.extend_from_slice(&partition.to_be_bytes());
    key.extend_from_slice(&order_preserving(due));
    key.extend_from_slice(customer_id.as_bytes());
    key
}

/// Splits a timer key back into (due, customer id).
pub fn parse_timer(key: &[u8]) -> Option<(Millis, String)> {
    parse_timer_ref(key).map(|(due, customer)| (due, customer.to_string()))
}

/// [`parse_timer`] borrowing the customer id from the key (for scans that keep few of them).
pub fn parse_timer_ref(key: &[u8]) -> Option<(Millis, &str)> {
    let due_bytes: [u8; 8] = key.get(4..12)?.try_into().ok()?;
    let due = (u64::from_be_bytes(due_bytes) ^ (1 << 63)) as i64;
    let customer = std::str::from_utf8(key.get(12..)?).ok()?;
    Some((due, customer))
}

/// The customer id of a customer key.
pub fn parse_customer(key: &[u8]) -> Option<&str> {
    std::str::from_utf8(key.get(4..)?).ok()
}

/// `clock/partition(4)` in Meta: the partition's event-clock `now`.
pub fn clock(partition: u32) -> Vec<u8> {
    let mut key = b"clock/".to_vec();
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

/// `layout/<id>` in Meta: the feature descriptors of a stored layout id.
pub fn layout(layout_id: u64) -> Vec<u8> {
    let mut key = b"layout/".to_vec();
    key.extend_from_slice(&layout_id.to_be_bytes());
    key
}

/// `partition(4) seq(8)` in [`super::Table::Outbox`]: records in the order they were decided.
pub fn outbox(partition: u32, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(12);
    key.extend_from_slice(&partition.to_be_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The sequence number of an outbox key (exactly `partition(4) seq(8)`).
pub fn parse_outbox(key: &[u8]) -> Option<u64> {
    if key.len() != 12 {
        return None;
    }
    Some(u64::from_be_bytes(key.get(4..12)?.try_into().ok()?))
}

/// `outbox_next/partition(4)` in Meta: the next outbox sequence number of the partition.
pub fn outbox_next(partition: u32) -> Vec<u8> {
    let mut key = b"outbox_next/".to_vec();
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

/// `offset/partition(4)/topic` in Meta: the next input offset to consume (everything before it
/// is reflected in the state and the outbox).
pub fn input_offset(partition: u32, topic: &str) -> Vec<u8> {
    let mut key = b"offset/".to_vec();
    key.extend_from_slice(&partition.to_be_bytes());
    key.push(b'/');
    key.extend_from_slice(topic.as_bytes());
    key
}

/// `offset/partition(4)/`: the prefix of a partition's input offsets in Meta.
pub fn input_offset_prefix(partition: u32) -> Vec<u8> {
    let mut key = b"offset/".to_vec();
    key.extend_from_slice(&partition.to_be_bytes());
    key.push(b'/');
    key
}

/// `changelog_next/partition(4)` in Meta: the next changelog offset the partition's local state
/// reflects (see `crate::changelog`).
pub fn changelog_next(partition: u32) -> Vec<u8> {
    let mut key = b"changelog_next/".to_vec();
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

/// `restore/partition(4)` in Meta: a restore in progress (`changelog::Restore`, JSON).
pub fn restore(partition: u32) -> Vec<u8> {
    let mut key = b"restore/".to_vec();
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

/// `skip/partition(4)/`: the prefix of a partition's skip marks in Meta.
pub fn skip_prefix(partition: u32) -> Vec<u8> {
    let mut key = b"skip/".to_vec();
    key.extend_from_slice(&partition.to_be_bytes());
    key.push(b'/');
    key
}

/// `skip/partition(4)/customer_id` in Meta: input offsets below which the customer's events
/// are already in its restored state (see `crate::changelog`).
pub fn skip(partition: u32, customer_id: &str) -> Vec<u8> {
    let mut key = skip_prefix(partition);
    key.extend_from_slice(customer_id.as_bytes());
    key
}

/// `store_id` in Meta: this store's random id, written into the changelog records it produces.
pub fn store_id() -> Vec<u8> {
    b"store_id".to_vec()
}

/// The first key after every key that starts with `prefix` (for range deletions).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xFF (never one of ours): everything after.
    vec![u8::MAX; prefix.len() + 1]
}

/// Every Meta key of a partition that holds local per-partition state, as (exact key) and
/// (prefix) lists — what dropping a partition's local copy deletes.
pub fn partition_meta(partition: u32) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    (
        vec![
            clock(partition),
            members_version(partition),
            outbox_next(partition),
            changelog_next(partition),
            restore(partition),
        ],
        vec![
            members_count_prefix(partition),
            input_offset_prefix(partition),
            skip_prefix(partition),
        ],
    )
}

fn order_preserving(value: i64) -> [u8; 8] {
    ((value as u64) ^ (1 << 63)).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn timer_keys_sort_by_partition_then_due(a in any::<(u32, i64)>(), b in any::<(u32, i64)>()) {
            let ka = timer(a.0, a.1, "x");
            let kb = timer(b.0, b.1, "x");
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(parse_timer(&ka), Some((a.1, "x".to_string())));
        }
    }

    #[test]
    fn outbox_keys_parse_only_at_their_exact_length() {
        let key = outbox(2, 77);
        assert_eq!(parse_outbox(&key), Some(77));
        for end in 0..key.len() {
            assert_eq!(parse_outbox(&key[..end]), None, "prefix of {end}");
        }
        let mut longer = key.clone();
        longer.push(0);
        assert_eq!(parse_outbox(&longer), None, "trailing bytes");
    }

    proptest! {
        #[test]
        fn parsed_keys_rebuild_the_same_bytes(key in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Some((due, id)) = parse_timer(&key) {
                let p = u32::from_be_bytes([key[0], key[1], key[2], key[3]]);
                prop_assert_eq!(timer(p, due, &id), key.clone());
            }
            if let Some(id) = parse_customer(&key) {
                let p = u32::from_be_bytes([key[0], key[1], key[2], key[3]]);
                prop_assert_eq!(customer(p, id), key.clone());
            }
        }
    }
}
