//! One partition worker: a thread owning the [`PartitionEngine`] of one input partition number
//! (partition p of every co-partitioned input topic). Per micro-batch it decodes, applies,
//! and commits state + outbox + input offsets in one RocksDB write, then hands the outbox records
//! to the producer; acknowledged records are deleted in a later write. Between batches it fires
//! due wall-clock timers in bounded slices. The same write keeps the partition's members index
//! (segment → customers) in step with the memberships, which gives exact member counts after a
//! restart and paged member lists without scanning states. Erasure requests are executed here,
//! by the partition's owner, in order with its input.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prometheus::IntGauge;

use crate::changelog::{self, Checkpoint, Offsets};
use crate::engine::{ClockMode, EngineError, Outcome, PartitionEngine};
use crate::kafka::consumer::{InputMessage, PartitionInput};
use crate::kafka::sink::{KafkaSink, PartitionSink};
use crate::kafka::txn::TxnSink;
use crate::metrics::{self, Metrics, SegmentSeries, TopicCounters};
use crate::model::{time, Change, ChangeKind, Millis};
use crate::outbox::{ChangelogRecord, OutboxEntry, OutboxRecord, SourceRef};
use crate::rules::Program;
use crate::settings::Guarantee;
use crate::store::codec::StateLayout;
use crate::store::{codec, keys, RocksStore, Store, StoreError, Table, WriteSet};

use super::merge::Merger;
use super::relay::{change_origin, Decided, Output, Pending, Relay, RelayError};
use super::Shared;

/// What the dispatcher sends a worker.
pub enum WorkerInput {
    Batch(Vec<InputMessage>),
    /// Messages arrived on one of the worker's own input queues.
    Wake,
    /// Erase a customer (GDPR); replies with the exits published for it, `None` if unknown.
    Erase {
        customer: String,
        reply: SyncSender<Result<Option<Vec<Change>>, String>>,
    },
    /// Publish everything outstanding (until the deadline), then stop and reply.
    Stop {
        deadline: Instant,
        reply: SyncSender<()>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Relay(#[from] RelayError),
    /// A stored value that does not decode: the worker stops with this error (its caller names
    /// the partition) rather than skip the value or start from empty state.
    #[error("corrupt {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// Asked to stop while a batch could not be written (disk full…): nothing of it was
    /// published or committed, so its input is simply read again at the next start.
    #[error("stopped with an unwritten batch: {0}")]
    Unwritten(StoreError),
    #[error(transparent)]
    Kafka(#[from] crate::kafka::KafkaSetupError),
}

/// How often an idle worker checks timers and acknowledgements.
const TICK: Duration = Duration::from_millis(20);

/// Time between attempts to write a batch after a failed write (disk full, read-only…).
const WRITE_RETRY: Duration = Duration::from_secs(1);

/// Failed write attempts between attempts to reopen the state store.
const REOPEN_EVERY: u64 = 5;

/// Batches' worth of messages the cross-topic merge may hold before it must release them.
const MERGE_BATCHES: usize = 8;

/// The partition's metric series that batches update, resolved once (a label lookup hashes the
/// labels and takes a lock).
struct PartitionSeries {
    timers_pending: IntGauge,
    timers_overdue: IntGauge,
}

impl PartitionSeries {
    fn of(metrics: &Metrics, partition: i32) -> PartitionSeries {
        let label = partition.to_string();
        PartitionSeries {
            timers_pending: metrics.timers_pending.with_label_values(&[&label]),
            timers_overdue: metrics.timers_overdue.with_label_values(&[&label]),
        }
    }
}

/// What the worker keeps to mirror its state to the changelog (see `crate::changelog`).
struct ChangelogWriter {
    /// This store's id, in the `writer` header of every record.
    writer: [u8; 8],
    /// The current state layout's descriptor, published once per open.
    layout: Option<(u64, Vec<u8>)>,
    /// The last checkpoint written: another is written only when the position moved.
    last: Option<Checkpoint>,
    /// Customers restored ahead of where the input resumed, with the offsets below which their
    /// events are already in their state.
    skip: HashMap<String, Offsets>,
}

pub struct Worker {
    partition: i32,
    shared: Arc<Shared>,
    engine: PartitionEngine<RocksStore>,
    store: Arc<RocksStore>,
    /// The outbox on its way to Kafka.
    relay: Relay<PartitionSink>,
    /// `processing.guarantee = "exactly_once"`: the relay commits transactions, which carry
    /// the input offsets themselves.
    exactly_once: bool,
    changelog: ChangelogWriter,
    metrics: Arc<Metrics>,
    offsets: HashMap<String, i64>,
    changes: Vec<Change>,
    merger: Merger,
    /// This partition's queue of each input topic.
    inputs: Vec<PartitionInput>,
    /// Members per segment (definition order) in this partition, mirrored in the gauge.
    members: Vec<i64>,
    /// Segments whose count changed since the last commit (stored with the index entries).
    members_changed: Vec<bool>,
    /// Metric series resolved once: per segment (definition order) and per input topic.
    segment_series: Vec<SegmentSeries>,
    topic_counters: Vec<TopicCounters>,
    series: PartitionSeries,
    /// Members-index updates decided since the last commit.
    index_writes: WriteSet,
    /// Per-batch buffers, cleared and reused so a batch neither grows fresh vectors nor touches
    /// fresh memory: input on its way into the merge, what the merge released, the records
    /// decided, the write set.
    intake: Vec<InputMessage>,
    ready: Vec<InputMessage>,
    records: Vec<Decided>,
    writes: WriteSet,
    /// The engine's fired-timer count already added to `segmenter_timers_fired_total`.
    timers_counted: u64,
    /// Set (to the stop deadline) by the dispatcher *before* it sends [`WorkerInput::Stop`]:
    /// a worker blocked on a full producer queue, paused on a full backlog, or retrying a
    /// failed state write cannot read its channel, so this is how it learns to stop waiting.
    stop_at: Arc<OnceLock<Instant>>,
}

impl Worker {
    /// The sink a partition's records go out through. In exactly-once mode this is the
    /// partition's own transactional producer, and opening it (`init_transactions` under the
    /// partition's `transactional.id`) fences the previous owner and aborts its open
    /// transaction — so it is opened *before* the changelog restore: afterwards nothing more
    /// can be committed to the changelog behind the restore's back (a frozen owner coming back
    /// is refused), and a `read_committed` reader's end is not held back by a dead owner's
    /// open transaction (tansu 0.6.0 even answers 0 for it then, which looked like an empty
    /// changelog and the takeover started from empty state).
    pub fn open_sink(
        partition: i32,
        shared: &Shared,
        stop_at: &Arc<OnceLock<Instant>>,
    ) -> Result<PartitionSink, WorkerError> {
        Ok(if shared.kafka.guarantee == Guarantee::ExactlyOnce {
            PartitionSink::Transactional(Box::new(TxnSink::open(
                partition,
                &shared.kafka,
                &shared.input_topics,
                shared.metrics.clone(),
                shared.publisher.health(),
                stop_at.clone(),
            )?))
        } else {
            PartitionSink::Shared(KafkaSink::new(
                partition,
                shared.publisher.clone(),
                shared.board.clone(),
            ))
        })
    }

    /// Opens a partition whose local copy is up to date with its changelog (see
    /// `pipeline::restore`): its engine, members index, skip marks and outbox relay, with the
    /// sink from [`Worker::open_sink`].
    pub fn open(
        partition: i32,
        shared: Arc<Shared>,
        inputs: Vec<PartitionInput>,
        sink: PartitionSink,
        stop_at: Arc<OnceLock<Instant>>,
    ) -> Result<Worker, WorkerError> {
        let p = partition as u32;
        let store = shared.store.clone();
        let engine =
            PartitionEngine::open(p, shared.program.clone(), store.clone(), shared.engine)?;
        let exactly_once = crate::pipeline::relay::RecordSink::transactional(&sink);
        let relay = Relay::open(
            partition,
            store.as_ref(),
            sink,
            shared.topics.clone(),
            shared.metrics.clone(),
            stop_at.clone(),
        )?
        .with_writer(shared.writer);
        let merger = Merger::new(
            &shared.input_topics,
            shared.max_merge_wait,
            shared.pipeline.batch_size * MERGE_BATCHES,
        );
        let members = open_members_index(p, &shared, &store)?;
        let segment_series: Vec<SegmentSeries> = shared
            .program
            .segments
            .iter()
            .map(|segment| shared.metrics.segment_series(&segment.id))
            .collect();
        for (series, count) in segment_series.iter().zip(&members) {
            series.members.add(*count);
        }
        let topic_counters = shared
            .input_topics
            .iter()
            .map(|topic| shared.metrics.topic_counters(topic))
            .collect();
        let mut offsets = HashMap::new();
        for topic in &shared.input_topics {
            if let Some(bytes) = store.get(Table::Meta, &keys::input_offset(p, topic))? {
                let offset = codec::decode_i64(&bytes).map_err(|err| WorkerError::Corrupt {
                    key: format!("input offset of {topic}"),
                    reason: err.0,
                })?;
                offsets.insert(topic.clone(), offset);
            }
        }
        let layout = StateLayout::of(&shared.program);
        let changelog = ChangelogWriter {
            writer: shared.writer,
            layout: serde_json::to_vec(&layout)
                .ok()
                .map(|descriptor| (layout.id, descriptor)),
            last: None,
            skip: load_skip_marks(p, &store)?,
        };
        Ok(Worker {
            series: PartitionSeries::of(&shared.metrics, partition),
            segment_series,
            topic_counters,
            partition,
            merger,
            members_changed: vec![false; members.len()],
            members,
            index_writes: WriteSet::default(),
            intake: Vec::new(),
            ready: Vec::new(),
            records: Vec::new(),
            writes: WriteSet::default(),
            metrics: shared.metrics.clone(),
            relay,
            exactly_once,
            changelog,
            shared,
            engine,
            store,
            offsets,
            changes: Vec::new(),
            inputs,
            timers_counted: 0,
            stop_at,
        })
    }

    /// A stop was requested (the Stop message may still be queued behind other input).
    fn stop_requested(&self) -> bool {
        self.stop_at.get().is_some()
    }

    /// Runs until stopped; a failure is reported to the shared state (which stops intake).
    pub fn run(mut self, inputs: Receiver<WorkerInput>) {
        let partition = self.partition;
        match self.serve(inputs) {
            Ok(()) => {}
            Err(WorkerError::Relay(RelayError::Fenced)) => {
                // A zombie: the partition went to another instance while this one was away.
                // Nothing more is published from here; the group's rebalance takes the
                // partition from this instance.
                tracing::error!(
                    partition,
                    "fenced by a newer owner of the partition; its worker stopped"
                );
            }
            Err(WorkerError::Unwritten(error)) => {
                tracing::warn!(partition, %error, "stopped with a batch that could not be written; its input is read again at the next start");
            }
            Err(error) => {
                tracing::error!(partition, %error, "partition worker failed");
                self.shared.fail(format!("partition {partition}: {error}"));
            }
        }
        self.release_metrics();
    }

    /// This partition's share of the gauges leaves with it.
    fn release_metrics(&self) {
        let label = self.partition.to_string();
        for (series, count) in self.segment_series.iter().zip(&self.members) {
            series.members.sub(*count);
        }
        let _ = self.metrics.timers_pending.remove_label_values(&[&label]);
        let _ = self.metrics.timers_overdue.remove_label_values(&[&label]);
        self.relay.release_metrics();
    }

    fn serve(&mut self, inputs: Receiver<WorkerInput>) -> Result<(), WorkerError> {
        if self.exactly_once {
            self.relay.recover(self.store.as_ref(), &self.offsets)?;
        } else {
            self.relay.resend(self.store.as_ref())?;
        }
        self.shared.consuming(self.partition);
        loop {
            self.relay.follow_producer(self.store.as_ref())?;
            self.collect_acks()?;
            if self.relay.backlog() >= self.shared.pipeline.max_outbox_backlog
                && !self.stop_requested()
            {
                // Kafka is slower than intake: stop taking input until the backlog drains.
                std::thread::sleep(TICK);
                self.tick()?;
                continue;
            }
            if self.poll_inputs() > 0 {
                self.process(false)?;
                self.tick()?;
                continue;
            }
            match inputs.recv_timeout(TICK) {
                Ok(WorkerInput::Batch(batch)) => {
                    self.merger.push(batch, Instant::now());
                    self.process(false)?;
                }
                Ok(WorkerInput::Wake) => {}
                Ok(WorkerInput::Erase { customer, reply }) => {
                    let outcome = self.erase(&customer);
                    let answer = match &outcome {
                        Ok(exits) => Ok(exits.clone()),
                        Err(error) => Err(error.to_string()),
                    };
                    let _ = reply.send(answer);
                    outcome?;
                }
                Ok(WorkerInput::Stop { deadline, reply }) => {
                    self.process(true)?;
                    self.drain(deadline)?;
                    let _ = reply.send(());
                    return Ok(());
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.process(true)?;
                    let deadline = Instant::now() + self.shared.pipeline.shutdown_timeout;
                    return self.drain(deadline);
                }
            }
            self.tick()?;
        }
    }

    /// Erases a customer: exits (cause `deleted`) and tombstones are committed with the state
    /// deletion in one write, then published like any change.
    fn erase(&mut self, customer: &str) -> Result<Option<Vec<Change>>, WorkerError> {
        let wall = self.wall_clock();
        let at = match self.shared.engine.clock {
            ClockMode::Wall => wall,
            ClockMode::Event => self.engine.now().unwrap_or(wall),
        };
        if !self.engine.erase(customer, at, &mut self.changes)? {
            return Ok(None);
        }
        self.changelog.skip.remove(customer);
        let exits = self.changes.clone();
        let mut records = Vec::new();
        self.drain_changes(&mut records, Some(wall));
        self.commit(&mut records)?;
        tracing::info!(
            partition = self.partition,
            customer,
            exits = exits.len(),
            "customer erased"
        );
        Ok(Some(exits))
    }

    /// Applies what the cross-topic merge releases.
    fn process(&mut self, flush: bool) -> Result<(), WorkerError> {
        let wall = self.wall_clock();
        let inputs = &self.inputs;
        let mut ready = std::mem::take(&mut self.ready);
        self.merger.ready_into(
            Instant::now(),
            wall,
            flush,
            |topic| {
                inputs
                    .iter()
                    .any(|input| &*input.topic == topic && input.caught_up())
            },
            &mut ready,
        );
        if ready.is_empty() {
            self.ready = ready;
            return Ok(());
        }
        let started = Instant::now();
        let size = ready.len();
        let oldest = ready.iter().filter_map(|m| m.timestamp).min();
        let intake_lag_ms = oldest.map_or(0, |ts| time::millis_since(ts, self.wall_clock()));
        let mut records = std::mem::take(&mut self.records);
        self.fire_wall_timers(&mut records)?;
        for message in ready.drain(..) {
            // Per message: update in place rather than allocate a key.
            match self.offsets.get_mut(&*message.topic) {
                Some(offset) => *offset = message.offset + 1,
                None => {
                    self.offsets
                        .insert(message.topic.to_string(), message.offset + 1);
                }
            }
            let source = SourceRef {
                topic: &message.topic,
                partition: message.partition,
                offset: message.offset,
                key: message.key.as_deref(),
                payload: message.payload.as_deref(),
                payload_bytes: message.payload_bytes,
            };
            let decoded = self
                .shared
                .decoder
                .decode_sized(source.payload.unwrap_or_default(), source.payload_bytes);
            let event = match decoded {
                Ok(event) => event,
                Err(error) => {
                    tracing::debug!(partition = message.partition, offset = message.offset, %error, "dead-lettered");
                    records.push(self.dead_letter(&source, error.reason(), &error.to_string()));
                    continue;
                }
            };
            if self.shared.engine.clock == ClockMode::Wall {
                // Against the wall clock, not the engine's: while a timer backlog is worked off
                // in slices the engine's clock lags, and live events are not from the future.
                let now = self.wall_clock();
                let ahead = time::millis_since(now, event.timestamp);
                if ahead > self.shared.max_future_skew {
                    let error = crate::decode::DecodeError::TooFarInFuture { ahead_ms: ahead };
                    records.push(self.dead_letter(&source, error.reason(), &error.to_string()));
                    continue;
                }
            }
            // Empty but for a while after a restore: no lookup (and no hashing) otherwise.
            let restored_ahead = !self.changelog.skip.is_empty()
                && self
                    .changelog
                    .skip
                    .get(&event.customer_id)
                    .is_some_and(|mark| {
                        changelog::is_skipped(mark, &message.topic, message.offset)
                    });
            if restored_ahead {
                // Already in the customer's restored state, its changes already published.
                self.engine.skip_event(&event, &mut self.changes)?;
                self.count_consumed(&message.topic, metrics::Outcome::Duplicate);
                self.drain_changes(&mut records, message.timestamp);
                continue;
            }
            let outcome = match self.engine.apply_event(&event, &mut self.changes)? {
                Outcome::Applied => metrics::Outcome::Ok,
                Outcome::Duplicate => metrics::Outcome::Duplicate,
            };
            self.count_consumed(&message.topic, outcome);
            let origin = message.timestamp.unwrap_or(event.timestamp);
            self.drain_changes(&mut records, Some(origin));
        }
        self.ready = ready;
        self.count_fired_timers();
        let applied = started.elapsed();
        let produced = records.len();
        self.commit(&mut records)?;
        self.records = records;
        self.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(
            partition = self.partition,
            size,
            produced,
            intake_lag_ms,
            apply_us = applied.as_micros() as u64,
            total_us = started.elapsed().as_micros() as u64,
            unacked = self.relay.backlog(),
            "batch"
        );
        Ok(())
    }

    fn count_consumed(&self, topic: &str, outcome: metrics::Outcome) {
        match self.topic_counters.iter().find(|c| c.topic == topic) {
            Some(counters) => counters.count(outcome),
            None => self.metrics.consumed(topic, outcome),
        }
    }

    fn dead_letter(&self, source: &SourceRef<'_>, reason: &'static str, detail: &str) -> Decided {
        self.count_consumed(source.topic, metrics::Outcome::DeadLettered);
        self.metrics.dead_letters.with_label_values(&[reason]).inc();
        let record = OutboxRecord::dead_letter(&self.shared.topics, source, reason, detail);
        (
            OutboxEntry::Record(record),
            Pending::record(Output::DeadLetters),
        )
    }

    /// Turns the engine's changes into outbox entries, members-index updates and metrics.
    /// `origin` is when the triggering input happened (the event's Kafka timestamp, the erasure
    /// request); changes caused by time passing — also those fired just before an event, when
    /// the customer's own timer was due — are measured from their due time (`at`).
    fn drain_changes(&mut self, records: &mut Vec<Decided>, origin: Option<Millis>) {
        let p = self.partition as u32;
        for change in self.changes.drain(..) {
            let idx = self.shared.program.segment_index(&change.segment);
            let member_key = keys::member(p, &change.segment, &change.customer_id);
            let delta = match change.kind {
                ChangeKind::Entered => {
                    self.index_writes.put(
                        Table::Members,
                        member_key,
                        change.at.to_be_bytes().to_vec(),
                    );
                    1
                }
                ChangeKind::Exited => {
                    self.index_writes.delete(Table::Members, member_key);
                    -1
                }
            };
            if let Some(idx) = idx {
                self.members[idx] += delta;
                self.members_changed[idx] = true;
                let series = &self.segment_series[idx];
                series.members.add(delta);
                match change.kind {
                    ChangeKind::Entered => series.entered.inc(),
                    ChangeKind::Exited => series.exited.inc(),
                }
            }
            let origin = change_origin(&change.cause, change.at, origin);
            records.push((OutboxEntry::Change(change), Pending::change(Some(origin))));
        }
    }

    /// In wall-clock mode, fires one bounded slice of due timers.
    fn fire_wall_timers(&mut self, records: &mut Vec<Decided>) -> Result<(), WorkerError> {
        if self.shared.engine.clock != ClockMode::Wall {
            return Ok(());
        }
        let now = self.wall_clock();
        self.engine
            .advance_bounded(now, self.shared.pipeline.timer_slice, &mut self.changes)?;
        let overdue = self.engine.due_timers(now, 100_000)?;
        self.series.timers_overdue.set(overdue as i64);
        for due in self.engine.take_fired() {
            self.metrics
                .timer_lateness_seconds
                .observe(time::seconds_since(due, now));
        }
        self.count_fired_timers();
        self.drain_changes(records, None);
        Ok(())
    }

    /// Adds the timers the engine fired since the last call to `segmenter_timers_fired_total`:
    /// every firing in either clock — a wall-clock slice, the event clock moving past due
    /// timers, and a customer's own due timer fired just before its event.
    fn count_fired_timers(&mut self) {
        let fired = self.engine.stats().timers_fired;
        self.metrics
            .timers_fired
            .inc_by(fired.saturating_sub(self.timers_counted));
        self.timers_counted = fired;
    }

    /// Writes a batch, retrying until it succeeds: a full disk or a read-only remount stops
    /// this partition's intake (nothing of the batch is published, no offset moves), is counted
    /// in `segmenter_state_write_errors_total` and logged, and the same batch is written once
    /// space returns. Only a stop request ends the wait ([`WorkerError::Unwritten`]).
    fn write_durably(&mut self, writes: &WriteSet) -> Result<(), WorkerError> {
        let partition = self.partition;
        let mut failing_since: Option<Instant> = None;
        let mut attempts: u64 = 0;
        loop {
            let error = match self.store.write_ref(writes) {
                Ok(()) => {
                    if let Some(since) = failing_since {
                        tracing::info!(
                            partition,
                            attempts,
                            stalled_ms = since.elapsed().as_millis() as u64,
                            "state write succeeded again; intake resumes"
                        );
                    }
                    return Ok(());
                }
                Err(error) => error,
            };
            attempts += 1;
            let kind = write_error_kind(&error);
            self.metrics
                .state_write_errors
                .with_label_values(&[kind])
                .inc();
            match failing_since {
                None => {
                    tracing::error!(partition, kind, %error, "state write failed; intake stopped until it succeeds");
                    failing_since = Some(Instant::now());
                }
                Some(since) if attempts.is_multiple_of(60) => {
                    tracing::warn!(
                        partition,
                        kind,
                        attempts,
                        stalled_ms = since.elapsed().as_millis() as u64,
                        %error,
                        "state write still failing"
                    );
                }
                Some(_) => {}
            }
            // A failed WAL append leaves RocksDB refusing writes until it is reopened (see
            // `RocksStore::reopen`); while the disk is still full the reopen fails too.
            if attempts.is_multiple_of(REOPEN_EVERY) {
                match self.store.reopen() {
                    Ok(()) => tracing::info!(partition, attempts, "state store reopened"),
                    Err(error) => {
                        tracing::debug!(partition, %error, "reopening the state store failed")
                    }
                }
            }
            // Earlier batches' records may still be acknowledged meanwhile.
            let retry_at = Instant::now() + WRITE_RETRY;
            while Instant::now() < retry_at {
                if self.stop_requested() {
                    return Err(WorkerError::Unwritten(error));
                }
                self.collect_acks()?;
                std::thread::sleep(TICK);
            }
        }
    }

    /// Moves already-fetched messages from the input queues into the merge without waiting: up
    /// to a batch per topic, never more than the topic's share of the merge buffer. Returns how
    /// many.
    fn poll_inputs(&mut self) -> usize {
        let mut polled = 0;
        for input in &mut self.inputs {
            // Up to a batch from each topic, so the merge has every topic's next messages.
            let max = self
                .merger
                .capacity_for(&input.topic)
                .min(self.shared.pipeline.batch_size);
            let taken = input.poll_into(max, &mut self.intake);
            polled += taken;
            self.merger.push(self.intake.drain(..), Instant::now());
        }
        polled
    }

    fn wall_clock(&self) -> Millis {
        (self.shared.clock)()
    }

    /// Wall-clock timers (one bounded slice) and housekeeping of acknowledged records.
    fn tick(&mut self) -> Result<(), WorkerError> {
        if self.merger.buffered() > 0 {
            self.process(false)?;
        }
        self.collect_acks()?;
        let mut records = Vec::new();
        self.fire_wall_timers(&mut records)?;
        if !records.is_empty() || self.relay.has_deletions() || !self.index_writes.is_empty() {
            self.commit(&mut records)?;
        }
        Ok(())
    }

    /// One atomic write: engine state, new outbox entries (the batch's changes and dead letters,
    /// then its changelog records), input offsets, deletion of acknowledged entries. Only then
    /// are the new entries handed to the relay; `records` is left empty.
    fn commit(&mut self, records: &mut Vec<Decided>) -> Result<(), WorkerError> {
        let p = self.partition as u32;
        let mut writes = std::mem::take(&mut self.writes);
        writes.clear();
        self.engine.take_writes_into(&mut writes);
        writes.append(&mut self.index_writes);
        for ((segment, count), changed) in self
            .shared
            .program
            .segments
            .iter()
            .zip(&self.members)
            .zip(&mut self.members_changed)
        {
            if std::mem::take(changed) {
                writes.put(
                    Table::Meta,
                    keys::members_count(p, &segment.id),
                    count.to_be_bytes().to_vec(),
                );
            }
        }
        self.changelog_records(&mut writes, records);
        if let Some(offset) = self.relay.take_changelog_acked() {
            writes.put(
                Table::Meta,
                keys::changelog_next(p),
                (offset + 1).to_be_bytes().to_vec(),
            );
        }
        let staged = self.relay.stage(&mut writes, records, &self.offsets);
        self.write_durably(&writes)?;
        writes.clear();
        self.writes = writes;
        self.relay.release(staged, records)?;
        self.collect_acks()?;
        self.series
            .timers_pending
            .set(self.engine.pending_timers() as i64);
        Ok(())
    }

    /// Appends this commit's changelog records to `records`: one per customer whose state the
    /// write set changes (its new state, or a tombstone), the layout descriptor once per open,
    /// and a checkpoint when the partition's position moved. Skip marks the input has passed
    /// are deleted in the same write.
    fn changelog_records(&mut self, writes: &mut WriteSet, records: &mut Vec<Decided>) {
        let p = self.partition as u32;
        let writer = self.changelog.writer;
        let mut offsets: Offsets = self
            .offsets
            .iter()
            .map(|(topic, offset)| (topic.clone(), *offset))
            .collect();
        offsets.sort();
        let record = |key: Vec<u8>, value: Option<Vec<u8>>| -> Decided {
            (
                OutboxEntry::Changelog(ChangelogRecord { key, value, writer }),
                Pending::record(Output::Changelog),
            )
        };
        if let Some((id, descriptor)) = self.changelog.layout.take() {
            records.push(record(changelog::layout_key(id), Some(descriptor)));
        }
        // The last write of each customer wins (an erasure followed by new events is a put).
        let mut last: HashMap<&[u8], usize> = HashMap::new();
        for (at, (table, key, _)) in writes.ops.iter().enumerate() {
            if *table == Table::Customers {
                last.insert(key.as_slice(), at);
            }
        }
        let mut customers: Vec<usize> = last.into_values().collect();
        customers.sort_unstable();
        let mut wrote = false;
        for at in customers {
            let (_, key, value) = &writes.ops[at];
            let Some(customer) = keys::parse_customer(key) else {
                continue;
            };
            let value = value
                .as_deref()
                .map(|state| changelog::encode_customer(&offsets, state));
            records.push(record(changelog::customer_key(customer), value));
            wrote = true;
        }
        let checkpoint = Checkpoint {
            clock: self.engine.now(),
            offsets,
        };
        // The clock alone does not call for one: in wall mode it moves with every tick, and in
        // event mode only input (which moves the offsets) moves it.
        let moved = self
            .changelog
            .last
            .as_ref()
            .is_none_or(|last| last.offsets != checkpoint.offsets);
        if wrote || moved {
            records.push(record(
                changelog::checkpoint_key(),
                Some(changelog::encode_checkpoint(&checkpoint)),
            ));
            self.changelog.last = Some(checkpoint);
        }
        if !self.changelog.skip.is_empty() {
            let position = |topic: &str| self.offsets.get(topic).copied();
            let passed: Vec<String> = self
                .changelog
                .skip
                .iter()
                .filter(|(_, mark)| changelog::is_passed(mark, &position))
                .map(|(customer, _)| customer.clone())
                .collect();
            for customer in passed {
                self.changelog.skip.remove(&customer);
                writes.delete(Table::Meta, keys::skip(p, &customer));
            }
        }
    }

    /// Collects acknowledgements; input offsets whose outbox records are all acknowledged may
    /// be committed to Kafka.
    fn collect_acks(&mut self) -> Result<(), WorkerError> {
        let reached = self.relay.collect_acks(self.wall_clock())?;
        // Exactly-once: each transaction committed the offsets (with their witness, which a
        // plain commit would overwrite).
        if !reached.is_empty() && !self.exactly_once {
            self.shared.publishable(self.partition, reached);
        }
        Ok(())
    }

    /// Commits what is pending (so its changelog records exist), waits for every outstanding
    /// record to be acknowledged (or the deadline), then records the deletions and the
    /// changelog position — a planned handover leaves nothing the changelog lacks.
    fn drain(&mut self, deadline: Instant) -> Result<(), WorkerError> {
        self.commit(&mut Vec::new())?;
        let clock = &self.shared.clock;
        let reached = self
            .relay
            .drain(self.store.as_ref(), deadline, &|| clock())?;
        if !reached.is_empty() && !self.exactly_once {
            self.shared.publishable(self.partition, reached);
        }
        self.commit(&mut Vec::new())
    }
}

/// The partition's skip marks (see `crate::changelog`), left by a restore.
fn load_skip_marks(p: u32, store: &RocksStore) -> Result<HashMap<String, Offsets>, WorkerError> {
    let prefix = keys::skip_prefix(p);
    let mut marks = HashMap::new();
    for (key, value) in store.scan_prefix(Table::Meta, &prefix)? {
        let customer =
            std::str::from_utf8(&key[prefix.len()..]).map_err(|_| WorkerError::Corrupt {
                key: "skip mark".into(),
                reason: "customer id is not UTF-8".into(),
            })?;
        let offsets = changelog::decode_offsets(&value).map_err(|err| WorkerError::Corrupt {
            key: format!("skip mark of {customer}"),
            reason: err.0,
        })?;
        marks.insert(customer.to_string(), offsets);
    }
    Ok(marks)
}

/// The `kind` label of a failed state write.
fn write_error_kind(error: &StoreError) -> &'static str {
    let text = error.to_string();
    if text.contains("No space left on device") || text.contains("NoSpace") {
        "no_space"
    } else if text.contains("Read-only file system") {
        "read_only"
    } else {
        "io"
    }
}

/// Members-index entries written per batch while rebuilding it.
const REBUILD_CHUNK: usize = 50_000;

/// Opens the partition's members index: rebuilt from the stored states when it was built for
/// other definitions (or never). Returns the members per segment: stored with the index (or, for
/// an index written before counts were stored, counted once and stored).
fn open_members_index(
    partition: u32,
    shared: &Shared,
    store: &RocksStore,
) -> Result<Vec<i64>, WorkerError> {
    members_at_open(partition, &shared.program, store)
}

/// What [`open_members_index`] does, for `program` (public for `bench_restore`, which times a
/// partition's opening after a restore).
pub fn members_at_open(
    partition: u32,
    program: &Program,
    store: &RocksStore,
) -> Result<Vec<i64>, WorkerError> {
    let version_key = keys::members_version(partition);
    let built_for = store.get(Table::Meta, &version_key)?;
    if built_for.as_deref() != Some(program.version.as_bytes()) {
        rebuild_members_index(partition, program, store)?;
    }
    let mut counts = Vec::with_capacity(program.segments.len());
    let mut counted = WriteSet::default();
    for segment in &program.segments {
        let key = keys::members_count(partition, &segment.id);
        let stored = match store.get(Table::Meta, &key)? {
            Some(bytes) => match codec::decode_i64(&bytes) {
                Ok(count) => Some(count),
                Err(error) => {
                    // Derived data: counted again from the index below, not trusted or fatal.
                    tracing::warn!(partition, segment = %segment.id, %error, "corrupt member count, recounting");
                    None
                }
            },
            None => None,
        };
        let count = match stored {
            Some(count) => count,
            None => {
                let prefix = keys::members_prefix(partition, &segment.id);
                let count = store.count_prefix(Table::Members, &prefix)? as i64;
                counted.put(Table::Meta, key, count.to_be_bytes().to_vec());
                count
            }
        };
        counts.push(count);
    }
    if !counted.is_empty() {
        // An index written before counts were stored: counted once, from now on kept.
        tracing::info!(
            partition,
            "members counted by scanning the index; counts stored"
        );
        store.write(counted)?;
    }
    Ok(counts)
}

/// Rebuilds a partition's members index (and its counts) from the stored states, for the
/// current definitions: after a restore dropped it, or when the definitions changed. Written in
/// chunks (a partition can hold millions of memberships); the version key comes last, so an
/// interrupted rebuild simply starts over at the next open. Returns the members per segment.
pub fn rebuild_members_index(
    partition: u32,
    program: &Program,
    store: &RocksStore,
) -> Result<Vec<i64>, WorkerError> {
    let version_key = keys::members_version(partition);
    let started = Instant::now();
    let prefix = keys::partition_prefix(partition);
    let mut writes = WriteSet::default();
    writes.delete_range(
        Table::Members,
        prefix.clone(),
        keys::partition_prefix(partition + 1),
    );
    let mut counts = vec![0_i64; program.segments.len()];
    let mut write_failure = None;
    let layout = crate::store::codec::StateLayout::of(program);
    let mut old_layouts = HashMap::new();
    let mut customers = 0;
    let mut failure = None;
    store.for_each_prefix(Table::Customers, &prefix, &mut |key, bytes| {
        let Some(customer) = keys::parse_customer(key) else {
            return true;
        };
        let state = match crate::engine::decode_stored(
            store,
            &layout,
            &mut old_layouts,
            partition,
            customer,
            bytes,
        ) {
            Ok(state) => state,
            Err(error) => {
                failure = Some(error);
                return false;
            }
        };
        customers += 1;
        for ((segment, membership), count) in program
            .segments
            .iter()
            .zip(&state.memberships)
            .zip(&mut counts)
        {
            if membership.member {
                *count += 1;
                writes.put(
                    Table::Members,
                    keys::member(partition, &segment.id, customer),
                    membership.since.to_be_bytes().to_vec(),
                );
            }
        }
        if writes.ops.len() >= REBUILD_CHUNK {
            if let Err(error) = store.write(std::mem::take(&mut writes)) {
                write_failure = Some(error);
                return false;
            }
        }
        true
    })?;
    if let Some(error) = failure {
        return Err(error.into());
    }
    if let Some(error) = write_failure {
        return Err(error.into());
    }
    // The counts and the version key come last, in one write.
    let count_prefix = keys::members_count_prefix(partition);
    let mut count_end = count_prefix.clone();
    if let Some(last) = count_end.last_mut() {
        *last += 1;
    }
    writes.delete_range(Table::Meta, count_prefix, count_end);
    for (segment, count) in program.segments.iter().zip(&counts) {
        writes.put(
            Table::Meta,
            keys::members_count(partition, &segment.id),
            count.to_be_bytes().to_vec(),
        );
    }
    writes.put(
        Table::Meta,
        version_key,
        program.version.as_bytes().to_vec(),
    );
    store.write(writes)?;
    tracing::info!(
        partition,
        customers,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "members index rebuilt for the current definitions"
    );
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::{self, AckBoard};
    use crate::model::Cause;
    use crate::outbox::Topics;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::Producer as _;
    use rdkafka::{ClientConfig, Message};

    /// The at-least-once sink the tests' workers publish through.
    fn test_sink(shared: &Arc<Shared>) -> PartitionSink {
        Worker::open_sink(0, shared, &Arc::default()).expect("opening the sink")
    }

    fn change(customer: &str, seq: u64) -> Change {
        Change {
            customer_id: customer.into(),
            segment: "buyer".into(),
            kind: ChangeKind::Entered,
            at: 1_000 + seq as i64,
            seq: 1,
            cause: Cause::Timer,
            segment_version: "v1".into(),
        }
    }

    /// A worker's surroundings: a mock Kafka cluster with the output topics, a RocksDB store in a
    /// temp dir, and the shared state for one `buyer` segment.
    struct Fixture {
        _cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        brokers: String,
        _dir: tempfile::TempDir,
        store: Arc<RocksStore>,
        shared: Arc<Shared>,
    }

    impl Fixture {
        fn new() -> Fixture {
            Fixture::with(
                "",
                "count(\"Order Completed\", 7d) >= 1",
                Box::new(crate::pipeline::wall_clock_ms),
            )
        }

        /// `engine`: extra `[engine]` settings (TOML lines); `rule`: the `buyer` segment's rule;
        /// `clock`: the workers' wall clock.
        fn with(engine: &str, rule: &str, clock: Box<dyn Fn() -> Millis + Send + Sync>) -> Fixture {
            let cluster = MockCluster::new(1).expect("mock cluster");
            let brokers = cluster.bootstrap_servers();
            for topic in [
                "segment-changes",
                "segment-membership",
                "segmenter-dlq",
                "segmenter-changelog",
            ] {
                cluster.create_topic(topic, 1, 1).expect("creating a topic");
            }
            Fixture::build(cluster, &brokers, engine, rule, clock, "")
        }

        /// A fixture whose service settings point at `brokers`, with `extra` TOML appended
        /// (e.g. `[kafka.producer]` settings).
        fn with_kafka(
            cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
            brokers: &str,
            extra: &str,
        ) -> Fixture {
            Fixture::build(
                cluster,
                brokers,
                "",
                "count(\"Order Completed\", 7d) >= 1",
                Box::new(crate::pipeline::wall_clock_ms),
                extra,
            )
        }

        /// The fixture: `engine` lines go in an `[engine]` table (none when empty), `extra`
        /// TOML is appended as it is.
        fn build(
            cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
            brokers: &str,
            engine: &str,
            rule: &str,
            clock: Box<dyn Fn() -> Millis + Send + Sync>,
            extra: &str,
        ) -> Fixture {
            let engine_table = if engine.is_empty() {
                String::new()
            } else {
                format!("[engine]\n{engine}\n\n")
            };
            let brokers = brokers.to_string();
            let dir = tempfile::tempdir().expect("temp dir");
            let config = dir.path().join("segmenter.toml");
            std::fs::write(
                &config,
                format!(
                    "{engine_table}[input]\ntopics = [\"events\"]\n\n[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"g\"\n\n\
                     [state]\ndir = \"{}\"\n\n[[segment]]\nid = \"buyer\"\nrule = '{rule}'\n{extra}",
                    dir.path().join("state").display()
                ),
            )
            .expect("writing the config");
            let settings = crate::settings::load(&config, &[]).expect("valid config");
            let store = Arc::new(
                RocksStore::open(&settings.state.dir, Default::default())
                    .expect("opening the store"),
            );
            let metrics = Metrics::new(&settings.program.version, &["buyer".to_string()]);
            let board = Arc::new(AckBoard::default());
            let publisher = Arc::new(
                kafka::Publisher::new(&settings.kafka, board.clone(), metrics.clone())
                    .expect("producer"),
            );
            let topics = Topics {
                changes: "segment-changes".into(),
                membership: "segment-membership".into(),
                dlq: "segmenter-dlq".into(),
                changelog: "segmenter-changelog".into(),
            };
            let mut shared = Shared::new(
                settings.program.clone(),
                settings.engine,
                store.clone(),
                settings.input_decoder(),
                publisher,
                board,
                topics,
                settings.pipeline,
                settings.max_future_skew,
                settings.input.topics.clone(),
                metrics,
                settings.kafka.clone(),
            )
            .expect("shared");
            shared.clock = clock;
            let shared = Arc::new(shared);
            Fixture {
                _cluster: cluster,
                brokers,
                _dir: dir,
                store,
                shared,
            }
        }
    }

    /// A members index written before counts were stored is counted once; afterwards the
    /// stored count is what a partition opens with.
    #[test]
    fn member_counts_are_stored_and_an_index_without_them_is_counted_once() {
        let fx = Fixture::new();
        let (store, shared) = (&fx.store, &fx.shared);
        let mut writes = WriteSet::default();
        writes.put(
            Table::Meta,
            keys::members_version(0),
            shared.program.version.as_bytes().to_vec(),
        );
        for customer in ["a", "b", "c"] {
            writes.put(
                Table::Members,
                keys::member(0, "buyer", customer),
                1_000_i64.to_be_bytes().to_vec(),
            );
        }
        store
            .write(writes)
            .expect("writing an index without counts");
        assert_eq!(open_members_index(0, shared, store).expect("open"), vec![3]);
        let stored = store
            .get(Table::Meta, &keys::members_count(0, "buyer"))
            .expect("reading the count");
        assert_eq!(stored, Some(3_i64.to_be_bytes().to_vec()));

        // From now on the stored count is read, not the index: a count written with the
        // index entries (as every commit does) is what the next open returns.
        let mut writes = WriteSet::default();
        writes.put(
            Table::Members,
            keys::member(0, "buyer", "d"),
            1_000_i64.to_be_bytes().to_vec(),
        );
        writes.put(
            Table::Meta,
            keys::members_count(0, "buyer"),
            4_i64.to_be_bytes().to_vec(),
        );
        store.write(writes).expect("a commit");
        assert_eq!(open_members_index(0, shared, store).expect("open"), vec![4]);

        // New definitions rebuild the index from the states (none here) and their counts.
        let mut writes = WriteSet::default();
        writes.put(Table::Meta, keys::members_version(0), b"older".to_vec());
        store.write(writes).expect("older definitions");
        assert_eq!(open_members_index(0, shared, store).expect("open"), vec![0]);
        assert_eq!(
            store
                .count_prefix(Table::Members, &keys::members_prefix(0, "buyer"))
                .expect("count"),
            0
        );
    }

    /// A page view of `customer` at `at`, as the consumer hands it over.
    fn page_view(customer: &str, offset: i64, at: Millis) -> InputMessage {
        let payload = format!(
            r#"{{"type":"page","userId":"{customer}","messageId":"m-{offset}","timestamp":{at}}}"#
        );
        InputMessage {
            topic: Arc::from("events"),
            partition: 0,
            offset,
            timestamp: Some(at),
            key: Some(customer.as_bytes().to_vec()),
            payload_bytes: payload.len(),
            payload: Some(payload.into_bytes()),
        }
    }

    /// One micro-batch through the worker, as `serve` runs it.
    fn feed(worker: &mut Worker, batch: Vec<InputMessage>) {
        worker.merger.push(batch, Instant::now());
        worker.process(true).expect("processing a batch");
    }

    /// `idle` customers (no activity for an hour) enter only when their timer fires, and leave
    /// only on an event: so the `entered` count is the number of timers fired.
    const IDLE: &str = "since(last(any)) >= 1h";
    const T0: Millis = 1_793_491_200_000;
    const HOUR: Millis = 3_600_000;

    /// Event clock: timers fire when an event moves the partition's clock past them, and every
    /// such firing is counted.
    #[test]
    fn event_clock_timer_firings_are_counted() {
        let fx = Fixture::with(
            "clock = \"event\"",
            IDLE,
            Box::new(crate::pipeline::wall_clock_ms),
        );
        let mut worker = Worker::open(
            0,
            fx.shared.clone(),
            Vec::new(),
            test_sink(&fx.shared),
            Arc::default(),
        )
        .expect("opening");
        let metrics = fx.shared.metrics.clone();
        feed(
            &mut worker,
            vec![
                page_view("a", 0, T0),
                page_view("b", 1, T0 + 60_000),
                page_view("c", 2, T0 + 120_000),
            ],
        );
        assert_eq!(metrics.timers_fired.get(), 0, "nothing is due yet");
        // d's event moves the clock 5 h on: a, b and c's timers fire before it.
        feed(&mut worker, vec![page_view("d", 3, T0 + 5 * HOUR)]);
        assert_eq!(metrics.timers_fired.get(), 3);
        // a comes back (exits); then e's event fires d's and a's new timers.
        feed(&mut worker, vec![page_view("a", 4, T0 + 5 * HOUR + 1)]);
        feed(&mut worker, vec![page_view("e", 5, T0 + 8 * HOUR)]);
        let entered = fx.shared.metrics.segment_series("buyer").entered.get();
        assert_eq!(entered, 5, "a, b, c, d and a again became idle");
        assert_eq!(metrics.timers_fired.get(), entered);
        assert_eq!(worker.engine.stats().timers_fired, entered);
    }

    /// Wall clock: timers fire in bounded slices between batches and on ticks; every firing is
    /// counted once, and each has its lateness observed.
    #[test]
    fn wall_clock_timer_firings_are_counted() {
        let wall = Arc::new(std::sync::atomic::AtomicI64::new(T0));
        let clock = wall.clone();
        let fx = Fixture::with(
            "clock = \"wall\"\ntimer_slice = 1",
            IDLE,
            Box::new(move || clock.load(std::sync::atomic::Ordering::SeqCst)),
        );
        let mut worker = Worker::open(
            0,
            fx.shared.clone(),
            Vec::new(),
            test_sink(&fx.shared),
            Arc::default(),
        )
        .expect("opening");
        let metrics = fx.shared.metrics.clone();
        let batch = ["a", "b", "c", "d"]
            .iter()
            .enumerate()
            .map(|(i, customer)| page_view(customer, i as i64, T0))
            .collect();
        feed(&mut worker, batch);
        assert_eq!(metrics.timers_fired.get(), 0);
        wall.store(T0 + 2 * HOUR, std::sync::atomic::Ordering::SeqCst);
        // One timer per slice: one before e's batch, then one per tick.
        feed(&mut worker, vec![page_view("e", 4, T0 + 2 * HOUR)]);
        assert_eq!(metrics.timers_fired.get(), 1);
        assert_eq!(
            metrics
                .dead_letters
                .with_label_values(&["future_timestamp"])
                .get(),
            0,
            "a live event is not from the future while timers lag behind the wall clock"
        );
        for _ in 0..5 {
            worker.tick().expect("tick");
        }
        let entered = fx.shared.metrics.segment_series("buyer").entered.get();
        assert_eq!(entered, 4, "a, b, c and d became idle");
        assert_eq!(metrics.timers_fired.get(), entered);
        assert_eq!(metrics.timer_lateness_seconds.get_sample_count(), entered);
    }

    /// librdkafka's idempotent producer can fail as a whole (seen with tansu: "sequence
    /// desynchronization with broker"); it then accepts nothing. The worker must not stop: the
    /// publisher replaces the producer and the worker hands its outbox to the new one.
    #[test]
    fn after_the_producer_fails_as_a_whole_the_outbox_goes_out_through_a_new_one() {
        let fx = Fixture::new();
        let (brokers, store, shared) = (&fx.brokers, &fx.store, &fx.shared);
        let publisher = shared.publisher.clone();
        // What a previous run left in partition 0's outbox: three changes.
        let changes: Vec<Change> = (0..3).map(|i| change(&format!("c-{i}"), i)).collect();
        let mut writes = WriteSet::default();
        for (seq, change) in changes.iter().enumerate() {
            let entry = OutboxEntry::Change(change.clone());
            writes.put(Table::Outbox, keys::outbox(0, seq as u64), entry.encode());
        }
        store.write(writes).expect("writing the outbox");

        // The first producer fails before it delivers anything.
        let (generation, first) = publisher.current();
        assert_eq!(generation, 0);
        let reason = c"injected by the test";
        // SAFETY: a live client handle and a NUL-terminated string that outlives the call.
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                first.client().native_ptr(),
                rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            );
        }
        drop(first);
        let worker = Worker::open(
            0,
            shared.clone(),
            Vec::new(),
            test_sink(shared),
            Arc::default(),
        )
        .expect("opening the worker");
        let (to_worker, inputs) = std::sync::mpsc::sync_channel(4);
        let running = std::thread::spawn(move || worker.run(inputs));

        // Every entry acknowledged (and so deleted), through the second producer.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = store
                .scan_prefix(Table::Outbox, &keys::partition_prefix(0))
                .expect("scanning the outbox");
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} outbox entries left after 30 s (failure: {:?}): {:?}",
                left.len(),
                shared.failure.lock().ok().and_then(|f| f.clone()),
                left.iter()
                    .map(|(key, value)| (keys::parse_outbox(key), OutboxEntry::decode(value)))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let (reply, stopped) = std::sync::mpsc::sync_channel(1);
        to_worker
            .send(WorkerInput::Stop {
                deadline: Instant::now() + Duration::from_secs(5),
                reply,
            })
            .expect("worker alive");
        stopped
            .recv_timeout(Duration::from_secs(10))
            .expect("worker stopped");
        running.join().expect("worker thread");
        assert_eq!(shared.failure.lock().ok().and_then(|f| f.clone()), None);
        assert_eq!(
            publisher.generation(),
            1,
            "the failed producer was replaced once"
        );

        // What reached Kafka: every change event (a record the first producer had delivered
        // could be there twice, with the same id), and every membership update.
        let read = |topic: &str| -> Vec<Vec<u8>> {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .set("group.id", format!("reader-{topic}"))
                .set("auto.offset.reset", "earliest")
                .create()
                .expect("reader");
            consumer.subscribe(&[topic]).expect("subscribing");
            let mut keys = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(15);
            while keys.len() < changes.len() && Instant::now() < deadline {
                if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                    keys.push(message.key().unwrap_or_default().to_vec());
                }
            }
            keys.sort();
            keys.dedup();
            keys
        };
        let expected: Vec<Vec<u8>> = changes
            .iter()
            .map(|c| c.customer_id.as_bytes().to_vec())
            .collect();
        assert_eq!(read("segment-changes"), expected);
        let expected: Vec<Vec<u8>> = changes
            .iter()
            .map(|c| format!("{}/buyer", c.customer_id).into_bytes())
            .collect();
        assert_eq!(read("segment-membership"), expected);
    }

    /// A corrupt value in the partition's outbox, or a corrupt next sequence number, stops the
    /// partition with an error naming the partition and the key (never a panic, never skipped:
    /// a skipped entry is a change nobody hears of, a sequence reset overwrites the outbox).
    #[test]
    fn a_corrupt_outbox_stops_the_partition_with_an_error_naming_it() {
        let fx = Fixture::new();
        let (store, shared) = (&fx.store, &fx.shared);
        let mut writes = WriteSet::default();
        writes.put(Table::Meta, keys::outbox_next(0), vec![0, 1]);
        store.write(writes).expect("writing");
        let opened = Worker::open(
            0,
            shared.clone(),
            Vec::new(),
            test_sink(shared),
            Arc::default(),
        );
        let message = opened.err().map(|err| err.to_string()).unwrap_or_default();
        assert_eq!(message, "corrupt outbox_next: expected 8 bytes, found 2");

        let mut writes = WriteSet::default();
        writes.delete(Table::Meta, keys::outbox_next(0));
        writes.put(Table::Outbox, keys::outbox(0, 5), vec![1, 0, 0]);
        store.write(writes).expect("writing");
        let worker = Worker::open(
            0,
            shared.clone(),
            Vec::new(),
            test_sink(shared),
            Arc::default(),
        )
        .expect("opening the worker");
        let (_to_worker, inputs) = std::sync::mpsc::sync_channel(4);
        let running = std::thread::spawn(move || worker.run(inputs));
        running
            .join()
            .expect("the worker returns, it does not panic");
        let failure = shared.failure.lock().ok().and_then(|f| f.clone());
        let failure = failure.unwrap_or_default();
        assert!(
            failure.contains("partition 0: corrupt outbox entry 5: outbox entry of 3 bytes"),
            "{failure}"
        );
    }

    /// With Kafka unreachable and the producer's queue full, a worker re-publishing its outbox
    /// is stuck waiting for room; a stop must still end it by its deadline (it used to wait
    /// forever, so shutdown hung), and nothing leaves the outbox that Kafka did not take.
    #[test]
    fn a_stop_ends_a_wait_on_a_full_producer_queue_with_kafka_unreachable() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        // Nothing listens on port 1: every record stays queued, and the queue holds one.
        let fx = Fixture::with_kafka(
            cluster,
            "127.0.0.1:1",
            "\n[kafka.producer]\n\"queue.buffering.max.messages\" = \"1\"\n",
        );
        let (store, shared) = (&fx.store, &fx.shared);
        let mut writes = WriteSet::default();
        for seq in 0..5 {
            let entry = OutboxEntry::Change(change(&format!("c-{seq}"), seq));
            writes.put(Table::Outbox, keys::outbox(0, seq), entry.encode());
        }
        store.write(writes).expect("writing the outbox");

        let stop_at: Arc<OnceLock<Instant>> = Arc::default();
        let worker = Worker::open(
            0,
            shared.clone(),
            Vec::new(),
            test_sink(shared),
            stop_at.clone(),
        )
        .expect("opening the worker");
        let (to_worker, inputs) = std::sync::mpsc::sync_channel(4);
        let running = std::thread::spawn(move || worker.run(inputs));
        // Re-publishing the outbox fills the queue at the first entry's second record.
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !running.is_finished(),
            "the worker waits for room in the queue"
        );

        // What the dispatcher does on shutdown or revocation.
        let deadline = Instant::now() + Duration::from_millis(500);
        stop_at
            .set(deadline)
            .expect("the stop deadline is set once");
        let (reply, stopped) = std::sync::mpsc::sync_channel(1);
        to_worker
            .send(WorkerInput::Stop { deadline, reply })
            .expect("the worker's channel has room");
        stopped
            .recv_timeout(Duration::from_secs(10))
            .expect("the worker stopped within 10 s of a 500 ms deadline");
        running.join().expect("worker thread");
        assert_eq!(shared.failure.lock().ok().and_then(|f| f.clone()), None);
        let left = store
            .scan_prefix(Table::Outbox, &keys::partition_prefix(0))
            .expect("scanning the outbox");
        let changes = left
            .iter()
            .filter(|(_, value)| matches!(OutboxEntry::decode(value), Ok(OutboxEntry::Change(_))))
            .count();
        assert_eq!(changes, 5, "every unpublished change stays in the outbox");
    }

    /// The same through the dispatcher, as `segmenter run` shuts down: the worker of an
    /// assigned partition is stuck on a full queue with Kafka unreachable, and shutdown still
    /// returns soon after `engine.shutdown_timeout` (it used to wait forever).
    #[test]
    fn shutdown_returns_by_its_deadline_with_kafka_unreachable_and_the_queue_full() {
        use crate::kafka::consumer::InputSink;
        let cluster = MockCluster::new(1).expect("mock cluster");
        let fx = Fixture::with_kafka(
            cluster,
            "127.0.0.1:1",
            "\n[kafka.producer]\n\"queue.buffering.max.messages\" = \"1\"\n\n[engine]\nshutdown_timeout = \"1s\"\n",
        );
        let mut writes = WriteSet::default();
        for seq in 0..5 {
            let entry = OutboxEntry::Change(change(&format!("c-{seq}"), seq));
            writes.put(Table::Outbox, keys::outbox(0, seq), entry.encode());
        }
        fx.store.write(writes).expect("writing the outbox");
        let dispatcher = Arc::new(super::super::Dispatcher::new(fx.shared.clone()));
        dispatcher.assigned(&[0], Vec::new());
        std::thread::sleep(Duration::from_millis(300));

        let (done, stopped) = std::sync::mpsc::sync_channel(1);
        let stopping = dispatcher.clone();
        let started = Instant::now();
        std::thread::spawn(move || {
            stopping.shutdown();
            let _ = done.send(());
        });
        stopped
            .recv_timeout(Duration::from_secs(10))
            .expect("shutdown returned within 10 s of a 1 s shutdown timeout");
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "it waited for the deadline"
        );
        let left = fx
            .store
            .scan_prefix(Table::Outbox, &keys::partition_prefix(0))
            .expect("scanning the outbox");
        assert_eq!(left.len(), 5, "every unpublished entry stays in the outbox");
    }
}
