//! One partition worker: a thread owning the [`PartitionEngine`] of one input partition number
//! (partition p of every co-partitioned input topic). Per micro-batch it decodes, applies,
//! and commits state + outbox + input offsets in one RocksDB write, then hands the outbox records
//! to the producer; acknowledged records are deleted in a later write. Between batches it fires
//! due wall-clock timers in bounded slices.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{ClockMode, EngineError, PartitionEngine};
use crate::kafka::consumer::{InputMessage, PartitionInput};
use crate::kafka::{self, AckBoard, Producer};
use crate::model::{Change, Millis};
use crate::outbox::{OutboxRecord, SourceRef};
use crate::store::{keys, RocksStore, Store, StoreError, Table, WriteSet};

use super::merge::Merger;
use super::Shared;

/// What the dispatcher sends a worker.
pub enum WorkerInput {
    Batch(Vec<InputMessage>),
    /// Messages arrived on one of the worker's own input queues.
    Wake,
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
    #[error("producing to kafka: {0}")]
    Produce(String),
    #[error("outbox record {0} is corrupt")]
    CorruptOutbox(u64),
}

/// How often an idle worker checks timers and acknowledgements.
const TICK: Duration = Duration::from_millis(20);

pub struct Worker {
    partition: i32,
    shared: Arc<Shared>,
    engine: PartitionEngine<RocksStore>,
    store: Arc<RocksStore>,
    producer: Arc<Producer>,
    board: Arc<AckBoard>,
    next_seq: u64,
    unacked: BTreeSet<u64>,
    acked: Vec<u64>,
    /// (first outbox seq *not* covered, input offsets reached) per committed batch.
    commit_points: VecDeque<(u64, Vec<(String, i64)>)>,
    offsets: HashMap<String, i64>,
    changes: Vec<Change>,
    merger: Merger,
    /// This partition's queue of each input topic.
    inputs: Vec<PartitionInput>,
}

impl Worker {
    pub fn open(
        partition: i32,
        shared: Arc<Shared>,
        inputs: Vec<PartitionInput>,
    ) -> Result<Worker, WorkerError> {
        let p = partition as u32;
        let store = shared.store.clone();
        let engine =
            PartitionEngine::open(p, shared.program.clone(), store.clone(), shared.engine)?;
        let next_seq = match store.get(Table::Meta, &keys::outbox_next(p))? {
            Some(bytes) => bytes
                .as_slice()
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(0),
            None => 0,
        };
        let merger = Merger::new(
            &shared.input_topics,
            shared.max_merge_wait,
            shared.pipeline.batch_size * super::QUEUED_BATCHES,
        );
        Ok(Worker {
            partition,
            merger,
            producer: shared.producer.clone(),
            board: shared.board.clone(),
            shared,
            engine,
            store,
            next_seq,
            unacked: BTreeSet::new(),
            acked: Vec::new(),
            commit_points: VecDeque::new(),
            offsets: HashMap::new(),
            changes: Vec::new(),
            inputs,
        })
    }

    /// Runs until stopped; a failure is reported to the shared state (which stops intake).
    pub fn run(mut self, inputs: Receiver<WorkerInput>) {
        let partition = self.partition;
        if let Err(error) = self.serve(inputs) {
            tracing::error!(partition, %error, "partition worker failed");
            self.shared.fail(format!("partition {partition}: {error}"));
        }
    }

    fn serve(&mut self, inputs: Receiver<WorkerInput>) -> Result<(), WorkerError> {
        self.resend_outbox()?;
        loop {
            self.collect_acks();
            if self.unacked.len() >= self.shared.pipeline.max_outbox_backlog {
                // Kafka is slower than intake: stop taking input until the backlog drains.
                std::thread::sleep(TICK);
                self.tick()?;
                continue;
            }
            let polled = self.poll_inputs();
            if !polled.is_empty() {
                self.process(polled, false)?;
                self.tick()?;
                continue;
            }
            match inputs.recv_timeout(TICK) {
                Ok(WorkerInput::Batch(batch)) => self.process(batch, false)?,
                Ok(WorkerInput::Wake) => {}
                Ok(WorkerInput::Stop { deadline, reply }) => {
                    self.process(Vec::new(), true)?;
                    self.drain(deadline)?;
                    let _ = reply.send(());
                    return Ok(());
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.process(Vec::new(), true)?;
                    let deadline = Instant::now() + self.shared.pipeline.shutdown_timeout;
                    return self.drain(deadline);
                }
            }
            self.tick()?;
        }
    }

    /// Publishes what a previous run left in the outbox, in order, before anything new.
    fn resend_outbox(&mut self) -> Result<(), WorkerError> {
        let p = self.partition as u32;
        let pending = self
            .store
            .scan_prefix(Table::Outbox, &keys::partition_prefix(p))?;
        if !pending.is_empty() {
            tracing::info!(
                partition = self.partition,
                records = pending.len(),
                "re-publishing outbox"
            );
        }
        for (key, value) in pending {
            let seq = keys::parse_outbox(&key).ok_or(WorkerError::CorruptOutbox(0))?;
            let record = OutboxRecord::decode(&value).ok_or(WorkerError::CorruptOutbox(seq))?;
            self.next_seq = self.next_seq.max(seq + 1);
            kafka::send(&self.producer, self.partition, seq, &record)
                .map_err(|e| WorkerError::Produce(e.to_string()))?;
            self.unacked.insert(seq);
        }
        Ok(())
    }

    /// Takes already-fetched messages from the input queues without waiting: up to a batch per
    /// topic, never more than the merge buffer can hold.
    fn poll_inputs(&mut self) -> Vec<InputMessage> {
        let mut room = self.merger.capacity();
        let mut batch = Vec::new();
        for input in &mut self.inputs {
            // Up to a batch from each topic, so the merge has every topic's next messages.
            room -= input.poll_into(room.min(self.shared.pipeline.batch_size), &mut batch);
        }
        batch
    }

    fn wall_clock(&self) -> Millis {
        (self.shared.clock)()
    }

    /// Buffers a batch and applies what the cross-topic merge releases.
    fn process(&mut self, batch: Vec<InputMessage>, flush: bool) -> Result<(), WorkerError> {
        self.merger.push(batch, Instant::now());
        let wall = self.wall_clock();
        let inputs = &self.inputs;
        let ready = self
            .merger
            .ready_with(Instant::now(), wall, flush, |topic| {
                inputs
                    .iter()
                    .any(|input| input.topic == topic && input.caught_up())
            });
        if ready.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let size = ready.len();
        let oldest = ready.iter().filter_map(|m| m.timestamp).min();
        let intake_lag_ms = oldest.map_or(0, |ts| self.wall_clock() - ts);
        let mut records = Vec::new();
        self.fire_wall_timers(&mut records)?;
        for message in ready {
            self.offsets
                .insert(message.topic.clone(), message.offset + 1);
            let source = SourceRef {
                topic: &message.topic,
                partition: message.partition,
                offset: message.offset,
                key: message.key.as_deref(),
                payload: message.payload.as_deref(),
            };
            let decoded = self
                .shared
                .decoder
                .decode(message.payload.as_deref().unwrap_or_default());
            let event = match decoded {
                Ok(event) => event,
                Err(error) => {
                    tracing::debug!(partition = message.partition, offset = message.offset, %error, "dead-lettered");
                    records.push(OutboxRecord::dead_letter(
                        &self.shared.topics,
                        &source,
                        error.reason(),
                        &error.to_string(),
                    ));
                    continue;
                }
            };
            if self.shared.engine.clock == ClockMode::Wall {
                let now = self.engine.now().unwrap_or_else(|| self.wall_clock());
                let ahead = event.timestamp - now;
                if ahead > self.shared.max_future_skew {
                    let error = crate::decode::DecodeError::TooFarInFuture { ahead_ms: ahead };
                    records.push(OutboxRecord::dead_letter(
                        &self.shared.topics,
                        &source,
                        error.reason(),
                        &error.to_string(),
                    ));
                    continue;
                }
            }
            self.engine.apply_event(&event, &mut self.changes)?;
            self.drain_changes(&mut records);
        }
        let applied = started.elapsed();
        let produced = records.len();
        self.commit(records)?;
        tracing::debug!(
            partition = self.partition,
            size,
            produced,
            intake_lag_ms,
            apply_us = applied.as_micros() as u64,
            total_us = started.elapsed().as_micros() as u64,
            unacked = self.unacked.len(),
            "batch"
        );
        Ok(())
    }

    fn drain_changes(&mut self, records: &mut Vec<OutboxRecord>) {
        for change in self.changes.drain(..) {
            records.push(OutboxRecord::change(&self.shared.topics, &change));
            records.push(OutboxRecord::membership(&self.shared.topics, &change));
        }
    }

    /// In wall-clock mode, fires one bounded slice of due timers.
    fn fire_wall_timers(&mut self, records: &mut Vec<OutboxRecord>) -> Result<(), WorkerError> {
        if self.shared.engine.clock != ClockMode::Wall {
            return Ok(());
        }
        let now = self.wall_clock();
        self.engine
            .advance_bounded(now, self.shared.pipeline.timer_slice, &mut self.changes)?;
        self.drain_changes(records);
        Ok(())
    }

    /// Wall-clock timers (one bounded slice) and housekeeping of acknowledged records.
    fn tick(&mut self) -> Result<(), WorkerError> {
        if self.merger.buffered() > 0 {
            self.process(Vec::new(), false)?;
        }
        self.collect_acks();
        let mut records = Vec::new();
        self.fire_wall_timers(&mut records)?;
        if !records.is_empty() || !self.acked.is_empty() {
            self.commit(records)?;
        }
        Ok(())
    }

    /// One atomic write: engine state, new outbox records, input offsets, deletion of
    /// acknowledged records. Only then are the new records handed to the producer.
    fn commit(&mut self, records: Vec<OutboxRecord>) -> Result<(), WorkerError> {
        let p = self.partition as u32;
        let mut writes: WriteSet = self.engine.take_writes();
        let first = self.next_seq;
        let mut encoded = Vec::with_capacity(records.len());
        for record in &records {
            let seq = self.next_seq;
            self.next_seq += 1;
            writes.put(Table::Outbox, keys::outbox(p, seq), record.encode());
            encoded.push(seq);
        }
        writes.put(
            Table::Meta,
            keys::outbox_next(p),
            self.next_seq.to_be_bytes().to_vec(),
        );
        let mut reached = Vec::with_capacity(self.offsets.len());
        for (topic, offset) in &self.offsets {
            writes.put(
                Table::Meta,
                keys::input_offset(p, topic),
                offset.to_be_bytes().to_vec(),
            );
            reached.push((topic.clone(), *offset));
        }
        for seq in self.acked.drain(..) {
            writes.delete(Table::Outbox, keys::outbox(p, seq));
        }
        self.store.write(writes)?;
        for (seq, record) in encoded.into_iter().zip(&records) {
            kafka::send(&self.producer, self.partition, seq, record)
                .map_err(|e| WorkerError::Produce(e.to_string()))?;
            self.unacked.insert(seq);
        }
        if self.next_seq > first || !reached.is_empty() {
            self.commit_points.push_back((self.next_seq, reached));
        }
        self.publish_offsets();
        Ok(())
    }

    fn collect_acks(&mut self) {
        for seq in self.board.take(self.partition) {
            if self.unacked.remove(&seq) {
                self.acked.push(seq);
            }
        }
        self.publish_offsets();
    }

    /// Input offsets whose outbox records are all acknowledged may be committed to Kafka.
    fn publish_offsets(&mut self) {
        let first_unacked = self.unacked.first().copied().unwrap_or(self.next_seq);
        let mut reached = Vec::new();
        while let Some((end, _)) = self.commit_points.front() {
            if *end > first_unacked {
                break;
            }
            if let Some((_, offsets)) = self.commit_points.pop_front() {
                reached = offsets;
            }
        }
        if !reached.is_empty() {
            self.shared.publishable(self.partition, reached);
        }
    }

    /// Waits for every outstanding record to be acknowledged (or the deadline), then records
    /// the deletions.
    fn drain(&mut self, deadline: Instant) -> Result<(), WorkerError> {
        while !self.unacked.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            self.collect_acks();
        }
        if !self.unacked.is_empty() {
            tracing::warn!(
                partition = self.partition,
                unpublished = self.unacked.len(),
                "stopping with unpublished records; they stay in the outbox"
            );
        }
        self.commit(Vec::new())
    }
}
