//! Time-ordered per-event entries for windowed aggregates.

use crate::model::Millis;

/// One event (or, past the size bound, several coalesced events) in a series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Entry {
    pub ts: Millis,
    /// Events in this entry (1 unless coalesced).
    pub count: u32,
    /// Events with a numeric property value.
    pub values: u32,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

/// Aggregates over the entries of a window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WindowStats {
    pub count: u64,
    pub values: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// When the window's content next changes by itself: the first entry leaving, or a future
    /// entry arriving.
    pub next_change: Option<Millis>,
}

/// Entries sorted by time (ties in arrival order).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    pub entries: Vec<Entry>,
}

impl Entry {
    /// One event at `ts`, with its property value if it had a numeric one.
    pub fn single(ts: Millis, value: Option<f64>) -> Entry {
        Entry {
            ts,
            count: 1,
            values: u32::from(value.is_some()),
            sum: value.unwrap_or(0.0),
            min: value.unwrap_or(f64::INFINITY),
            max: value.unwrap_or(f64::NEG_INFINITY),
        }
    }
}

impl Series {
    /// Inserts an event in time order. Past `max_entries` the two oldest entries are coalesced
    /// into one stamped with the later time: the oldest events then leave windows up to that
    /// gap late — never early — and every count, sum, min and max stays exact while they are in.
    pub fn push(&mut self, ts: Millis, value: Option<f64>, max_entries: usize) {
        let entry = Entry::single(ts, value);
        if self.entries.last().is_none_or(|newest| newest.ts <= ts) {
            self.entries.push(entry);
        } else {
            let at = self.entries.partition_point(|e| e.ts <= ts);
            self.entries.insert(at, entry);
        }
        if self.entries.len() > max_entries.max(2) {
            let oldest = self.entries.remove(0);
            let next = &mut self.entries[0];
            next.count += oldest.count;
            next.values += oldest.values;
            next.sum += oldest.sum;
            next.min = next.min.min(oldest.min);
            next.max = next.max.max(oldest.max);
        }
    }

    /// Removes entries with `ts <= horizon`.
    pub fn prune(&mut self, horizon: Millis) {
        if self
            .entries
            .first()
            .is_none_or(|oldest| oldest.ts > horizon)
        {
            return;
        }
        let keep_from = self.entries.partition_point(|e| e.ts <= horizon);
        if keep_from > 0 {
            self.entries.drain(..keep_from);
        }
    }

    /// Aggregates the entries in `(now - window, now]`.
    pub fn window(&self, now: Millis, window: i64) -> WindowStats {
        let from = self
            .entries
            .partition_point(|e| e.ts <= now.saturating_sub(window));
        let to = self.entries.partition_point(|e| e.ts <= now);
        let mut stats = WindowStats {
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            ..WindowStats::default()
        };
        for entry in &self.entries[from..to] {
            stats.count += u64::from(entry.count);
            stats.values += u64::from(entry.values);
            stats.sum += entry.sum;
            stats.min = stats.min.min(entry.min);
            stats.max = stats.max.max(entry.max);
        }
        let leaving = self.entries[from..to]
            .first()
            .map(|e| e.ts.saturating_add(window));
        let arriving = self.entries.get(to).map(|e| e.ts);
        stats.next_change = match (leaving, arriving) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_is_half_open_on_the_left() {
        let mut series = Series::default();
        for ts in [100, 200, 300] {
            series.push(ts, Some(ts as f64), 16);
        }
        let stats = series.window(300, 200);
        assert_eq!(stats.count, 2, "100 is out at exactly 100 + 200");
        assert_eq!(stats.sum, 500.0);
        assert_eq!(stats.next_change, Some(400));
        assert_eq!(series.window(299, 200).count, 2);
        assert_eq!(series.window(299, 200).next_change, Some(300));
    }

    #[test]
    fn late_entries_are_sorted_in() {
        let mut series = Series::default();
        for ts in [100, 300, 200] {
            series.push(ts, None, 16);
        }
        let times: Vec<_> = series.entries.iter().map(|e| e.ts).collect();
        assert_eq!(times, vec![100, 200, 300]);
    }

    #[test]
    fn coalescing_keeps_totals_and_only_delays_exits() {
        let mut series = Series::default();
        for ts in 1..=10 {
            series.push(ts * 10, Some(1.0), 4);
        }
        assert_eq!(series.entries.len(), 4);
        let stats = series.window(100, 1000);
        assert_eq!(stats.count, 10);
        assert_eq!(stats.sum, 10.0);
        assert_eq!(series.entries[0].ts, 70, "coalesced into the later time");
    }
}
