//! Reading a changelog partition for a restore: a consumer outside the group, assigned to one
//! partition at an offset, read until the end offset taken at the start. The end is reached when
//! a record at or past it arrives, or librdkafka reports the partition's end (`enable.partition.eof`)
//! — compaction and transaction markers leave offset gaps, so the record just before the end may
//! not exist.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::{base_config, client, KafkaSetupError};
use crate::outbox::WRITER_HEADER;
use crate::pipeline::restore::{ChangelogMessage, ChangelogSource};
use crate::settings::KafkaSettings;

/// How long one poll waits before checking whether to stop.
const POLL: Duration = Duration::from_millis(100);

pub struct ChangelogReader {
    consumer: BaseConsumer,
    topic: String,
    timeout: Duration,
}

impl ChangelogReader {
    pub fn new(
        settings: &KafkaSettings,
        topic: &str,
        timeout: Duration,
    ) -> Result<ChangelogReader, KafkaSetupError> {
        let mut config = base_config(settings);
        config
            // Never joins or commits to a group; librdkafka wants an id all the same.
            .set(
                "group.id",
                format!("{}-changelog-reader", settings.group_id),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            // Bigger fetches than the input's: a restore reads as fast as it can write.
            .set("fetch.max.bytes", "52428800")
            .set("max.partition.fetch.bytes", "16777216")
            .set("queued.max.messages.kbytes", "65536");
        let consumer: BaseConsumer = config
            .create()
            .map_err(client("creating the changelog reader"))?;
        Ok(ChangelogReader {
            consumer,
            topic: topic.to_string(),
            timeout,
        })
    }
}

impl ChangelogSource for ChangelogReader {
    fn watermarks(&self, partition: i32) -> Result<(i64, i64), String> {
        self.consumer
            .fetch_watermarks(&self.topic, partition, self.timeout)
            .map_err(|e| format!("reading the end offsets of {}/{partition}: {e}", self.topic))
    }

    fn read(
        &self,
        partition: i32,
        from: i64,
        until: i64,
        stop: &dyn Fn() -> bool,
        visit: &mut dyn FnMut(ChangelogMessage<'_>) -> Result<(), String>,
    ) -> Result<bool, String> {
        if from >= until {
            return Ok(true);
        }
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(&self.topic, partition, Offset::Offset(from))
            .map_err(|e| e.to_string())?;
        self.consumer
            .assign(&assignment)
            .map_err(|e| format!("assigning {}/{partition}: {e}", self.topic))?;
        let outcome = loop {
            if stop() {
                break Ok(false);
            }
            match self.consumer.poll(POLL) {
                None => continue,
                Some(Ok(message)) => {
                    let writer = message.headers().and_then(|headers| {
                        headers
                            .iter()
                            .find(|h| h.key == WRITER_HEADER)
                            .and_then(|h| h.value)
                    });
                    let offset = message.offset();
                    visit(ChangelogMessage {
                        offset,
                        key: message.key().unwrap_or_default(),
                        value: message.payload(),
                        writer,
                    })?;
                    if offset + 1 >= until {
                        break Ok(true);
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break Ok(true),
                Some(Err(error)) => {
                    tracing::warn!(topic = %self.topic, partition, %error, "changelog read error; retrying");
                }
            }
        };
        let _ = self.consumer.unassign();
        outcome
    }
}
