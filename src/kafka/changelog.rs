//! Reading a changelog partition for a restore: a consumer outside the group, assigned to one
//! partition at an offset, read until librdkafka reports the partition's end
//! (`enable.partition.eof`) — not until a record at the end offset, since compaction and
//! transaction markers leave offset gaps and the record just before the end may not exist.
//!
//! The end offset itself is read, not trusted: tansu 0.6.0 reports the start of a partition's
//! last batch as its high watermark (seen by `bench_restore`: 19,144 for 20,002 records), so the
//! last batch — often holding the last checkpoint — would be missed.
//!
//! In exactly-once mode records are read `read_committed`, but the end is asked for
//! `read_uncommitted`: the restore runs after this instance's transactional producer has fenced
//! the partition's previous owner (so no transaction is open on it and the stable end is the
//! end), and tansu 0.6.0 answers a `read_committed` ListOffsets with 0 for a partition whose
//! last transaction was aborted by that fencing — which read as an empty changelog. An end of
//! partition reported before the end offset is not taken as the end either.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::config::ClientConfig;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::{base_config, client, KafkaSetupError};
use crate::outbox::WRITER_HEADER;
use crate::pipeline::restore::{ChangelogMessage, ChangelogSource};
use crate::pipeline::standby::ChangelogFeed;
use crate::settings::KafkaSettings;

/// How long one poll waits before checking whether to stop.
const POLL: Duration = Duration::from_millis(100);

/// A read that gets neither a record nor the partition's end for this long gives up (the
/// caller retries): the broker is unreachable.
const STALL: Duration = Duration::from_secs(30);

/// The reader's client context: the partition's end is what a restore waits for, not an error
/// (librdkafka reports it through the error callback too).
pub struct ReaderContext;

impl rdkafka::ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(
            error,
            KafkaError::PartitionEOF(_)
                | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        ) {
            tracing::warn!(%error, reason, "changelog reader: kafka client error (retrying)");
        }
    }
}

impl ConsumerContext for ReaderContext {}

pub struct ChangelogReader {
    consumer: BaseConsumer<ReaderContext>,
    /// Asks for the end offsets, `read_uncommitted` (see the module doc); `None` when the
    /// reader itself reads uncommitted.
    ends: Option<BaseConsumer<ReaderContext>>,
    topic: String,
    timeout: Duration,
}

/// The changelog consumers' common configuration (outside the group, no commits, the end of a
/// partition reported), with `isolation.level` as `read_committed` says.
fn reader_config(settings: &KafkaSettings, read_committed: bool) -> ClientConfig {
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
        .set("queued.max.messages.kbytes", "65536")
        .set(
            "isolation.level",
            if read_committed {
                // Aborted transactions' changelog records are not state (on a broker that
                // hides them).
                "read_committed"
            } else {
                "read_uncommitted"
            },
        );
    config
}

impl ChangelogReader {
    pub fn new(
        settings: &KafkaSettings,
        topic: &str,
        timeout: Duration,
    ) -> Result<ChangelogReader, KafkaSetupError> {
        let ends = if settings.read_committed {
            Some(
                reader_config(settings, false)
                    .create_with_context(ReaderContext)
                    .map_err(client("creating the changelog end reader"))?,
            )
        } else {
            None
        };
        let consumer: BaseConsumer<ReaderContext> =
            reader_config(settings, settings.read_committed)
                .create_with_context(ReaderContext)
                .map_err(client("creating the changelog reader"))?;
        Ok(ChangelogReader {
            consumer,
            ends,
            topic: topic.to_string(),
            timeout,
        })
    }
}

/// The standby's consumer (`pipeline::standby`): assigned to every followed changelog
/// partition at once and polled continuously, so following costs no assignment or end-offset
/// round trip per read.
pub struct ChangelogFollower {
    consumer: BaseConsumer<ReaderContext>,
    /// Asks for the end offsets, `read_uncommitted` (as [`ChangelogReader`]'s).
    ends: BaseConsumer<ReaderContext>,
    topic: String,
    timeout: Duration,
}

impl ChangelogFollower {
    pub fn new(
        settings: &KafkaSettings,
        topic: &str,
        timeout: Duration,
    ) -> Result<ChangelogFollower, KafkaSetupError> {
        Ok(ChangelogFollower {
            consumer: reader_config(settings, settings.read_committed)
                .create_with_context(ReaderContext)
                .map_err(client("creating the standby's changelog reader"))?,
            ends: reader_config(settings, false)
                .create_with_context(ReaderContext)
                .map_err(client("creating the standby's changelog end reader"))?,
            topic: topic.to_string(),
            timeout,
        })
    }
}

impl ChangelogFeed for ChangelogFollower {
    fn follow(&mut self, from: &BTreeMap<i32, i64>) -> Result<(), String> {
        let mut assignment = TopicPartitionList::new();
        for (&partition, &offset) in from {
            assignment
                .add_partition_offset(&self.topic, partition, Offset::Offset(offset))
                .map_err(|e| e.to_string())?;
        }
        self.consumer
            .assign(&assignment)
            .map_err(|e| format!("assigning {} for the standby: {e}", self.topic))
    }

    fn poll(
        &mut self,
        wait: Duration,
        visit: &mut dyn FnMut(i32, ChangelogMessage<'_>),
    ) -> Result<(), String> {
        let until = std::time::Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            match self.consumer.poll(left.min(POLL)) {
                None | Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Ok(message)) => {
                    let writer = message.headers().and_then(|headers| {
                        headers
                            .iter()
                            .find(|h| h.key == WRITER_HEADER)
                            .and_then(|h| h.value)
                    });
                    visit(
                        message.partition(),
                        ChangelogMessage {
                            offset: message.offset(),
                            key: message.key().unwrap_or_default(),
                            value: message.payload(),
                            writer,
                        },
                    );
                }
                // Transient (the broker away, a leader moving): librdkafka retries; the wait
                // goes on, so an outage costs a line per error, not a busy loop.
                Some(Err(error)) => {
                    tracing::warn!(topic = %self.topic, %error, "standby: changelog read error; retrying");
                }
            }
        }
    }

    fn end(&self, partition: i32) -> Result<i64, String> {
        self.ends
            .fetch_watermarks(&self.topic, partition, self.timeout)
            .map(|(_, high)| high)
            .map_err(|e| format!("reading the end offset of {}/{partition}: {e}", self.topic))
    }
}

impl ChangelogReader {
    /// The next offset this reader will read of `partition`, once known.
    fn position(&self, partition: i32) -> Option<i64> {
        let list = self.consumer.position().ok()?;
        match list.find_partition(&self.topic, partition)?.offset() {
            Offset::Offset(at) => Some(at),
            _ => None,
        }
    }
}

impl ChangelogSource for ChangelogReader {
    fn watermarks(&self, partition: i32) -> Result<(i64, i64), String> {
        let (low, high) = self
            .ends
            .as_ref()
            .unwrap_or(&self.consumer)
            .fetch_watermarks(&self.topic, partition, self.timeout)
            .map_err(|e| format!("reading the end offsets of {}/{partition}: {e}", self.topic))?;
        if high <= low {
            return Ok((low, high));
        }
        // What follows the reported end, if anything (see the module doc).
        let mut end = high;
        self.read(
            partition,
            (high - 1).max(low),
            high,
            &|| false,
            &mut |message| {
                end = end.max(message.offset + 1);
                Ok(())
            },
        )?;
        Ok((low, end))
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
        let mut progress = std::time::Instant::now();
        let outcome = loop {
            if stop() {
                break Ok(false);
            }
            if progress.elapsed() > STALL {
                break Err(format!(
                    "no record and no end of {}/{partition} for {STALL:?}",
                    self.topic
                ));
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
                    progress = std::time::Instant::now();
                    visit(ChangelogMessage {
                        offset: message.offset(),
                        key: message.key().unwrap_or_default(),
                        value: message.payload(),
                        writer,
                    })?;
                }
                // Everything the broker has, which is at least `until` — unless the end
                // came before it (a `read_committed` end held back or misreported), when
                // reading goes on.
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    if self.position(partition).is_none_or(|at| at >= until) {
                        break Ok(true);
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(topic = %self.topic, partition, %error, "changelog read error; retrying");
                }
            }
        };
        let _ = self.consumer.unassign();
        outcome
    }
}
