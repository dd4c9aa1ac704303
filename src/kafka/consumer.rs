//! The consumer side: a group consumer whose partitions resume from the offsets segmenter
//! stored with its state (not Kafka's committed offsets), and a blocking poll loop that hands
//! messages to an [`InputSink`] (the pipeline) and reports rebalances to it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;

use super::{client, consumer_config, KafkaSetupError};
use crate::settings::KafkaSettings;

/// An input message, copied out of librdkafka's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Kafka timestamp (create or log-append time), ms.
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
}

/// What the poll loop feeds: messages, idle moments, and partition (re)assignments.
pub trait InputSink: Send + Sync {
    /// The next offset to consume for a topic-partition, as stored with the state.
    fn stored_offset(&self, topic: &str, partition: i32) -> Option<i64>;
    /// Partitions newly assigned to this instance.
    fn assigned(&self, partitions: &[i32]);
    /// Partitions taken away: must be flushed and released before this returns.
    fn revoked(&self, partitions: &[i32]);
    fn push(&self, message: InputMessage);
    /// Nothing arrived for a moment: hand over partial batches.
    fn idle(&self);
    /// Offsets whose effects are durable *and* published: safe to commit to Kafka (for lag
    /// monitoring; segmenter itself resumes from its stored offsets).
    fn publishable_offsets(&self) -> Vec<(String, i32, i64)>;
    /// A fatal condition (e.g. a worker failed): the loop stops.
    fn failure(&self) -> Option<String>;
}

/// Routes rebalances to the sink, seeking each assigned partition to its stored offset.
pub struct SinkContext {
    pub sink: Arc<dyn InputSink>,
}

impl ClientContext for SinkContext {}

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
                let mut positioned = TopicPartitionList::new();
                for element in tpl.elements() {
                    let offset = self
                        .sink
                        .stored_offset(element.topic(), element.partition())
                        .map_or(Offset::Stored, Offset::Offset);
                    if let Err(error) = positioned.add_partition_offset(
                        element.topic(),
                        element.partition(),
                        offset,
                    ) {
                        tracing::error!(%error, topic = element.topic(), partition = element.partition(), "bad offset");
                    }
                }
                tracing::info!(?partitions, "partitions assigned");
                if let Err(error) = consumer.assign(&positioned) {
                    tracing::error!(%error, "assign failed");
                }
                self.sink.assigned(&partitions);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(?partitions, "partitions revoked");
                self.sink.revoked(&partitions);
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

/// Creates the group consumer (not yet subscribed).
pub fn group_consumer(
    settings: &KafkaSettings,
    sink: Arc<dyn InputSink>,
) -> Result<GroupConsumer, KafkaSetupError> {
    consumer_config(settings)
        .create_with_context(SinkContext { sink })
        .map_err(client("creating the consumer"))
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
            Some(Ok(message)) => sink.push(InputMessage {
                topic: message.topic().to_string(),
                partition: message.partition(),
                offset: message.offset(),
                timestamp: message.timestamp().to_millis(),
                key: message.key().map(<[u8]>::to_vec),
                payload: message.payload().map(<[u8]>::to_vec),
            }),
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
