//! Ordering a partition's input across its co-partitioned topics by Kafka timestamp (SPEC §2:
//! "where it can"). Messages are buffered per topic; the earliest head is taken while every
//! input topic has something buffered, so a backlog on several topics is applied in timestamp
//! order. A topic with nothing buffered whose consumer has read up to the partition's high
//! watermark (as of librdkafka's last fetch) has nothing older on its way, so nobody waits for
//! it. Otherwise the others wait at most `max_wait` for it (a quiet topic must not stall a busy
//! one) — ten times as long while catching up on messages more than
//! `CATCH_UP_LAG` old, when the other topic's backlog is most likely just a fetch behind and
//! latency matters less — and at most `max_buffered` messages are held, each topic at most its
//! share of them: a backlog on one topic must not fill the buffer before the other topic's first
//! fetch has answered, or that topic could not be read in until the wait ran out and the whole
//! backlog went out unmerged.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::kafka::consumer::InputMessage;
use crate::model::time;

/// Messages older than this (Kafka timestamp vs wall clock) are being caught up on.
const CATCH_UP_LAG_MS: i64 = 10_000;

pub struct Merger {
    /// One queue per configured input topic, in configuration order (ties go to the first).
    queues: Vec<(String, VecDeque<(InputMessage, Instant)>)>,
    max_wait: Duration,
    max_buffered: usize,
    buffered: usize,
}

impl Merger {
    pub fn new(topics: &[String], max_wait: Duration, max_buffered: usize) -> Merger {
        Merger {
            queues: topics
                .iter()
                .map(|t| (t.clone(), VecDeque::new()))
                .collect(),
            max_wait,
            max_buffered: max_buffered.max(1),
            buffered: 0,
        }
    }

    pub fn push(&mut self, batch: impl IntoIterator<Item = InputMessage>, arrived: Instant) {
        for message in batch {
            let idx = match self
                .queues
                .iter()
                .position(|(topic, _)| topic.as_str() == &*message.topic)
            {
                Some(idx) => idx,
                None => {
                    self.queues
                        .push((message.topic.to_string(), VecDeque::new()));
                    self.queues.len() - 1
                }
            };
            self.queues[idx].1.push_back((message, arrived));
            self.buffered += 1;
        }
    }

    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// How many more messages may be pushed before the bound forces them out unordered.
    pub fn capacity(&self) -> usize {
        self.max_buffered.saturating_sub(self.buffered)
    }

    /// How many more messages of `topic` may be pushed: what is left of its share of the bound
    /// (an equal part per configured topic, so every topic can always be read in).
    pub fn capacity_for(&self, topic: &str) -> usize {
        let share = (self.max_buffered / self.queues.len().max(1)).max(1);
        let held = self
            .queues
            .iter()
            .find(|(t, _)| t.as_str() == topic)
            .map_or(0, |(_, q)| q.len());
        share.saturating_sub(held).min(self.capacity())
    }

    /// The messages that can be applied now, in order. `flush` takes everything (shutdown).
    /// `wall_ms` is the wall clock, to tell catching up from live traffic.
    pub fn ready(&mut self, now: Instant, wall_ms: i64, flush: bool) -> Vec<InputMessage> {
        self.ready_with(now, wall_ms, flush, |_| false)
    }

    /// As [`Merger::ready`], asking `caught_up(topic)` whether an empty topic has anything
    /// older on its way (asked at most once per topic and call).
    pub fn ready_with(
        &mut self,
        now: Instant,
        wall_ms: i64,
        flush: bool,
        caught_up: impl FnMut(&str) -> bool,
    ) -> Vec<InputMessage> {
        let mut out = Vec::new();
        self.ready_into(now, wall_ms, flush, caught_up, &mut out);
        out
    }

    /// [`Merger::ready_with`] appending to `out` (a buffer the caller reuses).
    pub fn ready_into(
        &mut self,
        now: Instant,
        wall_ms: i64,
        flush: bool,
        mut caught_up: impl FnMut(&str) -> bool,
        out: &mut Vec<InputMessage>,
    ) {
        let mut known: Vec<Option<bool>> = vec![None; self.queues.len()];
        loop {
            let earliest = self
                .queues
                .iter()
                .enumerate()
                .filter_map(|(idx, (_, q))| {
                    q.front()
                        .map(|(m, arrived)| (m.timestamp.unwrap_or(0), idx, *arrived))
                })
                .min_by_key(|(ts, idx, _)| (*ts, *idx));
            let Some((timestamp, idx, arrived)) = earliest else {
                break;
            };
            let complete = self.queues.iter().enumerate().all(|(idx, (topic, q))| {
                !q.is_empty() || *known[idx].get_or_insert_with(|| caught_up(topic))
            });
            let patience = if time::millis_since(timestamp, wall_ms) > CATCH_UP_LAG_MS {
                self.max_wait * 10
            } else {
                self.max_wait
            };
            let waited = now.saturating_duration_since(arrived) >= patience;
            if !(complete || flush || waited || self.buffered > self.max_buffered) {
                break;
            }
            if let Some((message, _)) = self.queues[idx].1.pop_front() {
                self.buffered -= 1;
                out.push(message);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(topic: &str, offset: i64, timestamp: i64) -> InputMessage {
        InputMessage {
            topic: topic.into(),
            partition: 0,
            offset,
            timestamp: Some(timestamp),
            key: None,
            payload: None,
            payload_bytes: 0,
        }
    }

    fn order(messages: Vec<InputMessage>) -> Vec<(String, i64)> {
        messages
            .into_iter()
            .map(|m| (m.topic.to_string(), m.offset))
            .collect()
    }

    /// A wall clock right after the test messages' timestamps: live traffic.
    const LIVE: i64 = 100;

    #[test]
    fn catching_up_waits_longer_for_the_other_topic() {
        let mut merger = merger();
        let start = Instant::now();
        merger.push(vec![message("clicks", 0, 10)], start);
        let hours_later = 3_600_000;
        assert!(merger
            .ready(start + Duration::from_millis(50), hours_later, false)
            .is_empty());
        assert_eq!(
            merger
                .ready(start + Duration::from_millis(500), hours_later, false)
                .len(),
            1
        );
    }

    /// Producer-set timestamps at the ends of `i64`: the lag saturates instead of wrapping
    /// (which made the oldest possible message look live, or panicked with overflow checks).
    #[test]
    fn extreme_producer_timestamps_do_not_overflow_the_lag() {
        let mut merger = merger();
        let start = Instant::now();
        merger.push(vec![message("clicks", 0, i64::MIN)], start);
        assert!(
            merger
                .ready(start + Duration::from_millis(50), LIVE, false)
                .is_empty(),
            "a message stamped at the beginning of time is caught up on: waits longer"
        );
        assert_eq!(
            merger
                .ready(start + Duration::from_millis(500), LIVE, false)
                .len(),
            1
        );
        merger.push(vec![message("clicks", 1, i64::MAX)], start);
        assert_eq!(
            merger
                .ready(start + Duration::from_millis(50), i64::MIN, false)
                .len(),
            1,
            "a message from the far future against any clock: live, max_wait"
        );
    }

    fn merger() -> Merger {
        Merger::new(
            &["clicks".into(), "orders".into()],
            Duration::from_millis(50),
            1000,
        )
    }

    #[test]
    fn merges_by_timestamp_keeping_each_topics_order() {
        let mut merger = merger();
        let start = Instant::now();
        merger.push(
            vec![
                message("clicks", 0, 10),
                message("clicks", 1, 30),
                message("clicks", 2, 25),
            ],
            start,
        );
        assert!(
            merger.ready(start, LIVE, false).is_empty(),
            "waits for orders"
        );
        merger.push(
            vec![message("orders", 0, 20), message("orders", 1, 40)],
            start,
        );
        assert_eq!(
            order(merger.ready(start, LIVE, false)),
            vec![
                ("clicks".into(), 0),
                ("orders".into(), 0),
                ("clicks".into(), 1),
                ("clicks".into(), 2)
            ]
        );
        assert_eq!(merger.buffered(), 1, "orders 1 waits for the next clicks");
        assert_eq!(
            order(merger.ready(start + Duration::from_millis(50), LIVE, false)),
            vec![("orders".into(), 1)]
        );
    }

    #[test]
    fn a_caught_up_topic_is_not_waited_for() {
        let mut merger = merger();
        let start = Instant::now();
        merger.push(vec![message("clicks", 0, 10)], start);
        let mut asked = Vec::new();
        let ready = merger.ready_with(start, LIVE, false, |topic| {
            asked.push(topic.to_string());
            topic == "orders"
        });
        assert_eq!(order(ready), vec![("clicks".into(), 0)]);
        assert_eq!(
            asked,
            vec!["orders".to_string()],
            "asked once, only for the empty topic"
        );
        merger.push(vec![message("clicks", 1, 20)], start);
        assert!(
            merger.ready_with(start, LIVE, false, |_| false).is_empty(),
            "orders may still have something older"
        );
    }

    #[test]
    fn a_quiet_topic_delays_the_others_at_most_max_wait() {
        let mut merger = merger();
        let start = Instant::now();
        merger.push(vec![message("clicks", 0, 10)], start);
        assert!(merger
            .ready(start + Duration::from_millis(49), LIVE, false)
            .is_empty());
        assert_eq!(
            merger
                .ready(start + Duration::from_millis(50), LIVE, false)
                .len(),
            1
        );
    }

    /// The stop-16 CI failure: a 4000-message backlog on `clicks` arrived one fetch before
    /// `orders`' and filled the whole buffer, so `orders` could not be read in, the wait ran
    /// out and every click went out before the first order.
    #[test]
    fn a_backlog_on_one_topic_leaves_room_for_the_others() {
        let mut merger = Merger::new(
            &["clicks".into(), "orders".into()],
            Duration::from_secs(60),
            4,
        );
        let start = Instant::now();
        assert_eq!(merger.capacity_for("clicks"), 2);
        merger.push((0..2).map(|i| message("clicks", i, 10 + i)), start);
        assert_eq!(merger.capacity_for("clicks"), 0, "clicks used its share");
        assert_eq!(merger.capacity_for("orders"), 2, "orders can still come in");
        assert!(
            merger.ready(start, LIVE, false).is_empty(),
            "waits for orders"
        );
        merger.push(vec![message("orders", 0, 5)], start);
        assert_eq!(
            order(merger.ready(start, LIVE, false)),
            vec![("orders".into(), 0)],
            "the earlier order first, then waits for the next order"
        );
    }

    #[test]
    fn flush_and_the_buffer_bound_release_everything() {
        let mut merger = Merger::new(
            &["clicks".into(), "orders".into()],
            Duration::from_secs(60),
            2,
        );
        let start = Instant::now();
        merger.push((0..3).map(|i| message("clicks", i, i)), start);
        assert_eq!(
            merger.ready(start, LIVE, false).len(),
            1,
            "over the bound by one"
        );
        assert_eq!(merger.ready(start, LIVE, true).len(), 2);
    }
}
