//! The consumer side: a group consumer whose partitions resume from the offsets segmenter
//! stored with its state (not Kafka's committed offsets). On assignment every topic-partition's
//! messages are split into their own librdkafka queue ([`PartitionInput`]) *before* the
//! partition is assigned, so nothing is ever fetched into the shared queue and each partition
//! worker reads its own input without a dispatching thread in between. The blocking poll loop
//! serves rebalances and callbacks, and hands the (normally no) messages that still arrive on
//! the shared queue to the [`InputSink`]. A payload over the size limit is cut while it is
//! copied out of librdkafka's buffer ([`PayloadLimit`]): a 10 MB poison message costs the copy
//! its dead letter needs, not 10 MB.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Statistics};

use super::{client, consumer_config, ClientHealth, KafkaSetupError};
use crate::metrics::Metrics;
use crate::settings::KafkaSettings;

/// How much of a payload is copied out of librdkafka's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadLimit {
    /// A payload longer than this is not decoded at all (`input.max_event_bytes`)…
    pub max_bytes: usize,
    /// …so only its first `kept_bytes` are copied: what its dead letter forwards.
    pub kept_bytes: usize,
}

impl PayloadLimit {
    /// The part of `payload` that is kept: all of it within the limit, else its head.
    fn kept<'a>(&self, payload: &'a [u8]) -> &'a [u8] {
        if payload.len() <= self.max_bytes {
            return payload;
        }
        &payload[..payload.len().min(self.kept_bytes)]
    }
}

/// An input message, copied out of librdkafka's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputMessage {
    /// Shared with every message of the topic-partition (no allocation per message).
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Kafka timestamp (create or log-append time), ms.
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    /// The payload, or only its head if it is over the [`PayloadLimit`].
    pub payload: Option<Vec<u8>>,
    /// The payload's size in Kafka: more than `payload` holds when only its head was kept.
    pub payload_bytes: usize,
}

impl InputMessage {
    fn copied<M: Message>(message: &M, topic: Arc<str>, limit: PayloadLimit) -> InputMessage {
        let payload = message.payload();
        InputMessage {
            topic,
            partition: message.partition(),
            offset: message.offset(),
            timestamp: message.timestamp().to_millis(),
            key: message.key().map(<[u8]>::to_vec),
            payload: payload.map(|bytes| limit.kept(bytes).to_vec()),
            payload_bytes: payload.map_or(0, <[u8]>::len),
        }
    }
}

/// One assigned topic-partition's own message queue, read by the partition's worker.
pub struct PartitionInput {
    pub topic: Arc<str>,
    pub partition: i32,
    queue: PartitionQueue<SinkContext>,
    consumer: Arc<GroupConsumer>,
    limit: PayloadLimit,
    /// The next offset to read, when known (stored offset, then the last message read + 1).
    next_offset: Option<i64>,
    /// Messages below this offset are already reflected in the state (set where a restore
    /// resumed the input): dropped if librdkafka still hands any over.
    floor: i64,
}

impl PartitionInput {
    /// Moves up to `max` already-fetched messages into `out` without waiting; returns how many.
    pub fn poll_into(&mut self, max: usize, out: &mut Vec<InputMessage>) -> usize {
        let mut taken = 0;
        while taken < max {
            match self.queue.poll(Duration::ZERO) {
                Some(Ok(message)) => {
                    if message.offset() < self.floor {
                        continue;
                    }
                    self.next_offset = Some(message.offset() + 1);
                    out.push(InputMessage::copied(
                        &message,
                        self.topic.clone(),
                        self.limit,
                    ));
                    taken += 1;
                }
                Some(Err(error)) => {
                    tracing::warn!(topic = %self.topic, partition = self.partition, %error, "consumer error");
                }
                None => break,
            }
        }
        taken
    }

    /// Starts fetching this partition (paused since its assignment, while its state was
    /// restored) at `offset`, where its state ends (`None`: where the assignment put it). Gives
    /// up when `stop` says so (the partition is being revoked: the rebalance callback waits for
    /// this thread, so it must not block).
    pub fn resume_at(
        &mut self,
        offset: Option<i64>,
        stop: &dyn Fn() -> bool,
    ) -> Result<(), String> {
        if let Some(offset) = offset.filter(|o| self.next_offset != Some(*o)) {
            // Right after an assignment librdkafka may refuse a seek ("erroneous state") until
            // the partition's fetcher is set up: retried for a while.
            let deadline = std::time::Instant::now() + SEEK_PATIENCE;
            loop {
                match self.consumer.seek(
                    &self.topic,
                    self.partition,
                    Offset::Offset(offset),
                    Duration::from_millis(500),
                ) {
                    Ok(()) => break,
                    Err(error) if std::time::Instant::now() < deadline && !stop() => {
                        tracing::debug!(topic = %self.topic, partition = self.partition, %error, "seek refused; retrying");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(error) => return Err(format!("seeking to {offset}: {error}")),
                }
            }
            tracing::info!(topic = %self.topic, partition = self.partition, offset, "input resumes where the restored state ends");
            self.next_offset = Some(offset);
            self.floor = offset;
        }
        let mut list = TopicPartitionList::new();
        list.add_partition(&self.topic, self.partition);
        self.consumer
            .resume(&list)
            .map_err(|error| format!("resuming: {error}"))
    }

    /// Calls `wake` (from a librdkafka thread; it must not block) when messages arrive.
    pub fn on_arrival(&mut self, wake: impl Fn() + Send + Sync + 'static) {
        self.queue.set_nonempty_callback(wake);
    }

    /// Whether everything the broker had at the last fetch has been read: the high watermark
    /// librdkafka cached from its last fetch response is not ahead of our position. Nothing
    /// older can still be on its way from this topic-partition, so a cross-topic merge need not
    /// wait for it.
    pub fn caught_up(&self) -> bool {
        let Some((low, high)) = cached_watermarks(&self.consumer, &self.topic, self.partition)
        else {
            return false;
        };
        match self.next_offset {
            Some(next) => next >= high,
            None => low == high,
        }
    }
}

/// The low and high watermarks librdkafka cached from its last fetch response for this
/// topic-partition (no broker round trip); `None` until a fetch has answered. The rdkafka crate
/// wraps only the querying variant, so this calls librdkafka directly.
fn cached_watermarks(consumer: &GroupConsumer, topic: &str, partition: i32) -> Option<(i64, i64)> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1_i64, -1_i64);
    // SAFETY: the client pointer is valid for the lifetime of `consumer`; `topic` is a
    // NUL-terminated string that outlives the call; librdkafka only writes the two i64s.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some((low, high))
}

/// How long a resume retries a refused seek.
const SEEK_PATIENCE: Duration = Duration::from_secs(10);

/// What the poll loop feeds: messages, idle moments, and partition (re)assignments.
pub trait InputSink: Send + Sync {
    /// The next offset to consume for a topic-partition, as stored with the state.
    fn stored_offset(&self, topic: &str, partition: i32) -> Option<i64>;
    /// Partitions newly assigned to this instance, with each topic-partition's own queue.
    fn assigned(&self, partitions: &[i32], inputs: Vec<PartitionInput>);
    /// Partitions taken away: must be flushed and released before this returns.
    fn revoked(&self, partitions: &[i32]);
    fn push(&self, message: InputMessage);
    /// Nothing arrived for a moment: hand over partial batches.
    fn idle(&self);
    /// Offsets whose effects are durable *and* published: safe to commit to Kafka (for lag
    /// monitoring; segmenter itself resumes from its stored offsets).
    fn publishable_offsets(&self) -> Vec<(String, i32, i64)>;
    /// Drops what is known about partitions handed over to another instance (their offsets
    /// must no longer be committed from here).
    fn forget(&self, partitions: &[i32]);
    /// A fatal condition (e.g. a worker failed): the loop stops.
    fn failure(&self) -> Option<String>;
}

/// Routes rebalances to the sink, seeking each assigned partition to its stored offset.
pub struct SinkContext {
    pub sink: Arc<dyn InputSink>,
    metrics: Arc<Metrics>,
    /// How much of each payload is copied out of librdkafka.
    limit: PayloadLimit,
    /// The consumer this context belongs to (set right after creation), to split queues.
    consumer: OnceLock<Weak<GroupConsumer>>,
    /// Where connection problems (TLS, SASL, unreachable brokers) are reported.
    health: Arc<ClientHealth>,
}

impl ClientContext for SinkContext {
    /// librdkafka retries connection errors itself; they are reported for `/readyz`.
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.health.report("consumer", &error, reason);
    }

    /// Consumer lag per owned partition, from librdkafka's periodic statistics: the partition's
    /// high watermark minus the offset committed for it (which segmenter commits only once the
    /// input's effects are durable and published), or minus the consumer's position before the
    /// first commit.
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                if *partition < 0 || !p.desired || p.fetch_state != "active" {
                    continue;
                }
                let lag = if p.consumer_lag >= 0 {
                    p.consumer_lag
                } else if p.hi_offset >= 0 && p.app_offset >= 0 {
                    (p.hi_offset - p.app_offset).max(0)
                } else {
                    continue;
                };
                self.metrics
                    .consumer_lag
                    .with_label_values(&[topic.as_str(), &partition.to_string()])
                    .set(lag);
            }
        }
    }
}

impl ConsumerContext for SinkContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let partitions: Vec<i32> = {
            let mut list: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            list.sort_unstable();
            list.dedup();
            list
        };
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let owner = self.consumer.get().and_then(Weak::upgrade);
                let mut positioned = TopicPartitionList::new();
                let mut inputs = Vec::new();
                for element in tpl.elements() {
                    let (topic, partition) = (element.topic(), element.partition());
                    let stored = self.sink.stored_offset(topic, partition);
                    if let Err(error) = positioned.add_partition_offset(
                        topic,
                        partition,
                        stored.map_or(Offset::Stored, Offset::Offset),
                    ) {
                        tracing::error!(%error, topic, partition, "bad offset");
                    }
                    // Split before assigning: librdkafka then never forwards this partition's
                    // fetched messages to the shared queue (an application-set forward survives
                    // the assignment), so there is one ordered path per partition.
                    let queue = owner
                        .as_ref()
                        .and_then(|c| c.split_partition_queue(topic, partition));
                    if let (Some(queue), Some(owner)) = (queue, owner.as_ref()) {
                        inputs.push(PartitionInput {
                            topic: topic.into(),
                            partition,
                            queue,
                            consumer: owner.clone(),
                            limit: self.limit,
                            next_offset: stored,
                            floor: i64::MIN,
                        });
                    }
                }
                self.health.clear();
                tracing::info!(?partitions, "partitions assigned");
                if let Err(error) = consumer.assign(&positioned) {
                    tracing::error!(%error, "assign failed");
                }
                // Paused until each partition's worker has brought its state up to the
                // changelog and says where to resume (`PartitionInput::resume_at`).
                if let Err(error) = consumer.pause(&positioned) {
                    tracing::error!(%error, "pausing the new partitions failed");
                }
                self.sink.assigned(&partitions, inputs);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(?partitions, "partitions revoked");
                for element in tpl.elements() {
                    let _ = self
                        .metrics
                        .consumer_lag
                        .remove_label_values(&[element.topic(), &element.partition().to_string()]);
                }
                self.sink.revoked(&partitions);
                // Hand over exactly where this instance stopped: the next owner (without a
                // stored offset of its own) starts from the committed offset.
                let handed_over: Vec<(String, i32, i64)> = self
                    .sink
                    .publishable_offsets()
                    .into_iter()
                    .filter(|(_, partition, _)| partitions.contains(partition))
                    .collect();
                // A lost assignment (session timed out, e.g. Kafka unreachable) may already
                // belong to another member, and a synchronous commit would block this thread on
                // a coordinator that is not there: the next owner then resumes from the last
                // periodic commit (duplicates possible, nothing skipped).
                if consumer.assignment_lost() {
                    tracing::warn!(?partitions, "assignment lost; offsets not handed over");
                } else {
                    commit(consumer, &handed_over, CommitMode::Sync);
                }
                self.sink.forget(&partitions);
                if let Err(error) = consumer.unassign() {
                    tracing::error!(%error, "unassign failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; releasing all partitions");
                self.sink.revoked(&partitions);
                let _ = consumer.unassign();
            }
        }
    }
}

pub type GroupConsumer = BaseConsumer<SinkContext>;

/// Longest time a message waits in a partial batch before it is handed to its worker.
const HANDOVER: Duration = Duration::from_millis(20);

/// Creates the group consumer (not yet subscribed); payloads are copied within `limit`.
pub fn group_consumer(
    settings: &KafkaSettings,
    sink: Arc<dyn InputSink>,
    metrics: Arc<Metrics>,
    health: Arc<ClientHealth>,
    limit: PayloadLimit,
) -> Result<Arc<GroupConsumer>, KafkaSetupError> {
    let consumer: GroupConsumer = consumer_config(settings)
        .create_with_context(SinkContext {
            sink,
            metrics,
            limit,
            consumer: OnceLock::new(),
            health,
        })
        .map_err(client("creating the consumer"))?;
    let consumer = Arc::new(consumer);
    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
    Ok(consumer)
}

/// Subscribes and polls until `shutdown` is set or the sink reports a failure. Commits the
/// publishable offsets to Kafka about once a second and once more at the end.
pub fn poll_loop(
    consumer: &GroupConsumer,
    topics: &[String],
    shutdown: &AtomicBool,
) -> Result<(), KafkaSetupError> {
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names).map_err(client("subscribing"))?;
    let sink = consumer.context().sink.clone();
    let mut last_commit = Instant::now();
    let mut last_handover = Instant::now();
    while !shutdown.load(Ordering::Relaxed) {
        if let Some(reason) = sink.failure() {
            tracing::error!(%reason, "stopping intake");
            break;
        }
        // Partial batches are handed over at least every HANDOVER, so a trickle of input is not
        // held back waiting for a full batch.
        if last_handover.elapsed() >= HANDOVER {
            sink.idle();
            last_handover = Instant::now();
        }
        match consumer.poll(HANDOVER) {
            // Only if a partition's queue could not be split: the worker gets it via the sink.
            Some(Ok(message)) => {
                let topic = message.topic().into();
                let limit = consumer.context().limit;
                sink.push(InputMessage::copied(&message, topic, limit))
            }
            Some(Err(error)) => tracing::warn!(%error, "consumer error"),
            None => {
                sink.idle();
                last_handover = Instant::now();
            }
        }
        if last_commit.elapsed() >= Duration::from_secs(1) {
            commit(consumer, &sink.publishable_offsets(), CommitMode::Async);
            last_commit = Instant::now();
        }
    }
    Ok(())
}

/// Serves the consumer's callbacks (its connection errors, for `/readyz`) before it is
/// subscribed, while the service waits for Kafka; no message can arrive yet.
pub fn serve_callbacks(consumer: &GroupConsumer) {
    if let Some(Err(error)) = consumer.poll(Duration::ZERO) {
        tracing::debug!(%error, "consumer error before subscribing");
    }
}

/// Commits offsets to Kafka (best effort: they are informational).
pub fn commit(consumer: &GroupConsumer, offsets: &[(String, i32, i64)], mode: CommitMode) {
    if offsets.is_empty() {
        return;
    }
    let mut list = TopicPartitionList::new();
    for (topic, partition, offset) in offsets {
        let _ = list.add_partition_offset(topic, *partition, Offset::Offset(*offset));
    }
    if let Err(error) = consumer.commit(&list, mode) {
        tracing::debug!(%error, "offset commit failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{OwnedMessage, Timestamp};

    const LIMIT: PayloadLimit = PayloadLimit {
        max_bytes: 64 * 1024,
        kept_bytes: 900 * 1024,
    };

    fn copied(payload: Option<Vec<u8>>) -> InputMessage {
        let message = OwnedMessage::new(
            payload,
            Some(b"c-1".to_vec()),
            "events".into(),
            Timestamp::CreateTime(1_000),
            2,
            7,
            None,
        );
        InputMessage::copied(&message, Arc::from("events"), LIMIT)
    }

    /// Of a 10 MB payload only what its dead letter forwards leaves librdkafka's buffer, and the
    /// message still says how large it was.
    #[test]
    fn an_oversized_payload_is_cut_as_it_is_copied() {
        let huge = vec![b'x'; 10 << 20];
        let message = copied(Some(huge.clone()));
        assert_eq!(message.payload.as_deref(), Some(&huge[..900 * 1024]));
        assert_eq!(message.payload_bytes, 10 << 20);
        assert_eq!((message.partition, message.offset), (2, 7));
        assert_eq!(message.key.as_deref(), Some(&b"c-1"[..]));
    }

    /// Over the limit but under what a dead letter forwards: copied whole (the dead letter is
    /// the input unchanged); within the limit: copied whole, of course.
    #[test]
    fn payloads_a_dead_letter_forwards_whole_are_copied_whole() {
        for size in [
            0,
            10,
            LIMIT.max_bytes,
            LIMIT.max_bytes + 1,
            LIMIT.kept_bytes,
        ] {
            let payload = vec![b'y'; size];
            let message = copied(Some(payload.clone()));
            assert_eq!(
                message.payload.as_deref(),
                Some(&payload[..]),
                "{size} bytes"
            );
            assert_eq!(message.payload_bytes, size);
        }
        let empty = copied(None);
        assert_eq!((empty.payload, empty.payload_bytes), (None, 0));
    }
}
