//! The service's data path: one [`worker::Worker`] thread per assigned input partition number
//! reads its topic-partitions' own librdkafka queues (woken when messages arrive). The
//! [`Dispatcher`] starts and stops workers on rebalances — a revoked partition is flushed (state,
//! outbox, offsets) before it is released — and batches the messages that still reach the shared
//! queue (only if a queue could not be split) for their worker.

pub mod merge;
pub mod relay;
pub mod restore;
pub mod standby;
pub mod worker;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::decode::Decoder;
use crate::engine::EngineConfig;
use crate::kafka::consumer::{InputMessage, InputSink, PartitionInput};
use crate::kafka::{AckBoard, Publisher};
use crate::metrics::Metrics;
use crate::model::{Change, Millis};
use crate::outbox::Topics;
use crate::rules::Program;
use crate::settings::{KafkaSettings, PipelineSettings};
use crate::store::{keys, RocksStore, Store, StoreError, Table, WriteSet};

use worker::{Worker, WorkerInput};

/// Everything the workers share.
pub struct Shared {
    pub program: Arc<Program>,
    pub engine: EngineConfig,
    pub store: Arc<RocksStore>,
    pub decoder: Decoder,
    pub publisher: Arc<Publisher>,
    pub board: Arc<AckBoard>,
    pub topics: Topics,
    pub pipeline: PipelineSettings,
    pub max_future_skew: i64,
    /// The input topics (co-partitioned), and how long a worker waits for a quiet one when
    /// ordering across them.
    pub input_topics: Vec<String>,
    pub max_merge_wait: std::time::Duration,
    /// The wall clock (injectable for tests).
    pub clock: Box<dyn Fn() -> Millis + Send + Sync>,
    pub metrics: Arc<Metrics>,
    /// For the changelog readers of restores.
    pub kafka: KafkaSettings,
    /// This store's id, written into every changelog record it produces.
    pub writer: [u8; 8],
    /// Keeps the standby (`standby`) off the partitions owned here.
    pub standby: standby::Handoff,
    publishable: Mutex<HashMap<(String, i32), i64>>,
    failure: Mutex<Option<String>>,
    readiness: Mutex<Readiness>,
}

/// What `/readyz` reports.
#[derive(Debug, Default)]
struct Readiness {
    /// A group assignment has been received (possibly empty).
    assigned_once: bool,
    /// Assigned partitions whose worker has not yet restored and started consuming, with the
    /// restore's progress.
    restoring: BTreeMap<i32, RestoreProgress>,
    /// Assigned partitions.
    owned: BTreeSet<i32>,
}

/// How far a partition's restore has come.
#[derive(Debug, Clone, Copy)]
struct RestoreProgress {
    started: Instant,
    restored: u64,
    remaining: i64,
}

impl RestoreProgress {
    fn new() -> RestoreProgress {
        RestoreProgress {
            started: Instant::now(),
            restored: 0,
            remaining: 0,
        }
    }
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        program: Arc<Program>,
        engine: EngineConfig,
        store: Arc<RocksStore>,
        decoder: Decoder,
        publisher: Arc<Publisher>,
        board: Arc<AckBoard>,
        topics: Topics,
        pipeline: PipelineSettings,
        max_future_skew: i64,
        input_topics: Vec<String>,
        metrics: Arc<Metrics>,
        kafka: KafkaSettings,
    ) -> Result<Shared, StoreError> {
        let writer = store_id(&store)?;
        Ok(Shared {
            program,
            engine,
            store,
            decoder,
            publisher,
            board,
            topics,
            pipeline,
            max_future_skew,
            input_topics,
            max_merge_wait: pipeline.max_merge_wait,
            clock: Box::new(wall_clock_ms),
            metrics,
            kafka,
            writer,
            standby: standby::Handoff::default(),
            publishable: Mutex::new(HashMap::new()),
            failure: Mutex::new(None),
            readiness: Mutex::new(Readiness::default()),
        })
    }

    /// A partition's restore moved on.
    fn restore_progress(&self, partition: i32, restored: u64, remaining: i64) {
        if let Ok(mut readiness) = self.readiness.lock() {
            if let Some(progress) = readiness.restoring.get_mut(&partition) {
                progress.restored = restored;
                progress.remaining = remaining;
            }
        }
        self.metrics
            .restore_remaining
            .with_label_values(&[&partition.to_string()])
            .set(remaining);
    }

    /// A partition's worker has restored its state and outbox and is consuming.
    fn consuming(&self, partition: i32) {
        if let Ok(mut readiness) = self.readiness.lock() {
            readiness.restoring.remove(&partition);
        }
        let _ = self
            .metrics
            .restore_remaining
            .remove_label_values(&[&partition.to_string()]);
    }

    /// `Ok(())` when ready to serve (assigned, every partition restored, no failure), else why
    /// not — with what the Kafka clients last reported (a refused certificate, a failed login)
    /// when that is why.
    pub fn ready(&self) -> Result<(), String> {
        self.ready_without_kafka_detail().map_err(|reason| {
            match self.publisher.health().problem() {
                Some(problem) => format!("{reason}; kafka: {problem}"),
                None => reason,
            }
        })
    }

    fn ready_without_kafka_detail(&self) -> Result<(), String> {
        if let Some(reason) = self.failure.lock().ok().and_then(|f| f.clone()) {
            return Err(format!("failed: {reason}"));
        }
        let Ok(readiness) = self.readiness.lock() else {
            return Err("internal lock poisoned".into());
        };
        if !readiness.assigned_once {
            return Err("waiting for a partition assignment from the consumer group".into());
        }
        if !readiness.restoring.is_empty() {
            let detail: Vec<String> = readiness
                .restoring
                .iter()
                .map(|(partition, progress)| {
                    format!(
                        "{partition} ({} records restored, {} remaining, {:.1} s)",
                        progress.restored,
                        progress.remaining,
                        progress.started.elapsed().as_secs_f64()
                    )
                })
                .collect();
            return Err(format!("restoring partitions {}", detail.join(", ")));
        }
        Ok(())
    }

    /// The input partitions this instance owns now.
    pub fn owned_partitions(&self) -> Vec<i32> {
        self.readiness
            .lock()
            .map(|r| r.owned.iter().copied().collect())
            .unwrap_or_default()
    }

    fn publishable(&self, partition: i32, offsets: Vec<(String, i64)>) {
        if let Ok(mut map) = self.publishable.lock() {
            for (topic, offset) in offsets {
                map.insert((topic, partition), offset);
            }
        }
    }

    fn fail(&self, reason: String) {
        if let Ok(mut failure) = self.failure.lock() {
            failure.get_or_insert(reason);
        }
    }
}

/// How long a restore waits between attempts to reach the changelog.
const RESTORE_RETRY: Duration = Duration::from_secs(1);

/// A newly assigned partition, on its own thread: brings its local copy up to the changelog
/// (its input stays paused meanwhile, and `/readyz` shows the progress), resumes its input where
/// the restored state ends, and runs its worker. A revocation in the middle stops the restore
/// with its progress saved.
fn start_partition(
    partition: i32,
    shared: Arc<Shared>,
    mut inputs: Vec<PartitionInput>,
    stop_at: Arc<OnceLock<Instant>>,
    receiver: std::sync::mpsc::Receiver<WorkerInput>,
) {
    let stop = || stop_at.get().is_some();
    let started = Instant::now();
    // First the sink: in exactly-once mode this fences the previous owner (see `open_sink`).
    let sink = match Worker::open_sink(partition, &shared, &stop_at) {
        Ok(sink) => sink,
        Err(error) => {
            if !stop() {
                shared.fail(format!("opening partition {partition}: {error}"));
            }
            return;
        }
    };
    // A standby copy of the partition stops being written (its progress saved) before the
    // restore continues it.
    shared.standby.claim(partition);
    loop {
        match restore_partition(partition, &shared, &stop) {
            Ok(()) => break,
            Err(restore::RestoreError::Interrupted) => {
                tracing::info!(partition, "restore interrupted; its progress is saved");
                return;
            }
            Err(error @ restore::RestoreError::Changelog(_)) => {
                // Kafka unreachable or the topic not there yet: try again, paused meanwhile.
                tracing::warn!(partition, %error, "restore could not read the changelog; retrying");
                let until = Instant::now() + RESTORE_RETRY;
                while Instant::now() < until {
                    if stop() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Err(error) => {
                tracing::error!(partition, %error, "restore failed");
                shared.fail(format!("restoring partition {partition}: {error}"));
                return;
            }
        }
    }
    shared
        .metrics
        .restore_seconds
        .observe(started.elapsed().as_secs_f64());
    // Resume each input where the (possibly restored) state ends.
    let p = partition as u32;
    for input in &mut inputs {
        let key = keys::input_offset(p, &input.topic);
        let offset = match shared.store.get(Table::Meta, &key) {
            Ok(bytes) => bytes.and_then(|b| crate::store::codec::decode_i64(&b).ok()),
            Err(error) => {
                shared.fail(format!("partition {partition}: {error}"));
                return;
            }
        };
        if let Err(error) = input.resume_at(offset, &stop) {
            if !stop() {
                shared.fail(format!(
                    "partition {partition}: resuming its input: {error}"
                ));
            }
            return;
        }
    }
    let worker = match Worker::open(partition, shared.clone(), inputs, sink, stop_at.clone()) {
        Ok(worker) => worker,
        Err(error) => {
            shared.fail(format!("opening partition {partition}: {error}"));
            return;
        }
    };
    worker.run(receiver);
}

/// One attempt at bringing the partition's local copy up to its changelog.
fn restore_partition(
    partition: i32,
    shared: &Shared,
    stop: &dyn Fn() -> bool,
) -> Result<(), restore::RestoreError> {
    let reader = crate::kafka::changelog::ChangelogReader::new(
        &shared.kafka,
        &shared.topics.changelog,
        Duration::from_secs(5),
    )
    .map_err(|e| restore::RestoreError::Changelog(e.to_string()))?;
    let progress = |restored: u64, remaining: i64| {
        shared.restore_progress(partition, restored, remaining);
    };
    let restored = restore::bring_up_to_date(
        partition,
        shared.store.as_ref(),
        &reader,
        &shared.writer,
        &shared.program,
        stop,
        &progress,
    )?;
    if let Some(restored) = restored {
        shared.metrics.restore_records.inc_by(restored.read);
        tracing::info!(
            partition,
            plan = ?restored.plan,
            records = restored.read,
            records_with_standby = restored.records,
            elapsed_ms = restored.elapsed.as_millis() as u64,
            records_per_s = (restored.records as f64 / restored.elapsed.as_secs_f64().max(1e-6)) as u64,
            "partition restored from the changelog"
        );
    }
    Ok(())
}

/// This store's random id (made at its first open), which tells the changelog records it wrote
/// from another instance's.
fn store_id(store: &RocksStore) -> Result<[u8; 8], StoreError> {
    if let Some(bytes) = store.get(Table::Meta, &keys::store_id())? {
        if let Ok(id) = <[u8; 8]>::try_from(bytes.as_slice()) {
            return Ok(id);
        }
    }
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| StoreError::Io(format!("random store id: {e}")))?;
    let mut writes = WriteSet::default();
    writes.put(Table::Meta, keys::store_id(), id.to_vec());
    store.write(writes)?;
    Ok(id)
}

/// Milliseconds since the epoch, from the system clock.
pub fn wall_clock_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// Batches queued per partition worker.
pub(crate) const QUEUED_BATCHES: usize = 64;

struct WorkerHandle {
    inputs: SyncSender<WorkerInput>,
    thread: JoinHandle<()>,
    /// The worker's stop deadline, set before `Stop` is sent (see `Worker::stop_handle`).
    stop_at: Arc<OnceLock<Instant>>,
}

#[derive(Default)]
struct Routing {
    workers: HashMap<i32, WorkerHandle>,
    pending: HashMap<i32, Vec<InputMessage>>,
}

/// Batches input per partition and owns the partition workers.
pub struct Dispatcher {
    shared: Arc<Shared>,
    routing: Mutex<Routing>,
}

impl Dispatcher {
    pub fn new(shared: Arc<Shared>) -> Dispatcher {
        Dispatcher {
            shared,
            routing: Mutex::new(Routing::default()),
        }
    }

    /// Stops every worker (each publishes what it can before the deadline).
    pub fn shutdown(&self) {
        let partitions: Vec<i32> = match self.routing.lock() {
            Ok(routing) => routing.workers.keys().copied().collect(),
            Err(_) => Vec::new(),
        };
        self.revoked(&partitions);
    }

    /// Why the pipeline cannot go on: a worker failed, or Kafka permanently refused a record.
    pub fn failure_reason(&self) -> Option<String> {
        let worker = self.shared.failure.lock().ok().and_then(|f| f.clone());
        worker.or_else(|| self.shared.board.failure())
    }

    /// Erases a customer through the worker that owns `partition` (its state's home); `None`
    /// if the customer is unknown there.
    pub fn erase(
        &self,
        partition: i32,
        customer: &str,
        timeout: Duration,
    ) -> Result<Option<Vec<Change>>, String> {
        let inputs = match self.routing.lock() {
            Ok(routing) => routing.workers.get(&partition).map(|w| w.inputs.clone()),
            Err(_) => None,
        };
        let Some(inputs) = inputs else {
            return Err(format!(
                "partition {partition} is not owned by this instance"
            ));
        };
        let (reply, answer) = sync_channel(1);
        let request = WorkerInput::Erase {
            customer: customer.to_string(),
            reply,
        };
        let deadline = Instant::now() + timeout;
        let mut request = Some(request);
        while let Some(pending) = request.take() {
            match inputs.try_send(pending) {
                Ok(()) => {}
                Err(std::sync::mpsc::TrySendError::Full(returned)) if Instant::now() < deadline => {
                    request = Some(returned);
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return Err(format!("partition {partition} is busy or stopping")),
            }
        }
        answer
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| format!("partition {partition} did not answer in time"))?
    }

    fn send(&self, routing: &mut Routing, partition: i32) {
        let Some(batch) = routing.pending.remove(&partition).filter(|b| !b.is_empty()) else {
            return;
        };
        if let Some(worker) = routing.workers.get(&partition) {
            // Blocks while the worker is busy: that is the backpressure on intake.
            if worker.inputs.send(WorkerInput::Batch(batch)).is_err() {
                self.shared
                    .fail(format!("partition {partition}: worker stopped"));
            }
        }
    }
}

impl InputSink for Dispatcher {
    fn stored_offset(&self, topic: &str, partition: i32) -> Option<i64> {
        let key = keys::input_offset(partition as u32, topic);
        let bytes = self.shared.store.get(Table::Meta, &key).ok()??;
        match crate::store::codec::decode_i64(&bytes) {
            Ok(offset) => Some(offset),
            Err(error) => {
                // Falls back to the group's committed offset: input is re-read, not lost.
                tracing::error!(topic, partition, %error, "corrupt stored input offset");
                None
            }
        }
    }

    fn assigned(&self, partitions: &[i32], inputs: Vec<PartitionInput>) {
        let metrics = &self.shared.metrics;
        metrics.rebalances.with_label_values(&["assigned"]).inc();
        if let Ok(mut readiness) = self.shared.readiness.lock() {
            readiness.assigned_once = true;
            for partition in partitions {
                readiness
                    .restoring
                    .entry(*partition)
                    .or_insert_with(RestoreProgress::new);
            }
            readiness.owned.extend(partitions);
            metrics
                .assigned_partitions
                .set(readiness.owned.len() as i64);
        }
        let Ok(mut routing) = self.routing.lock() else {
            return;
        };
        let mut inputs_by_partition: HashMap<i32, Vec<PartitionInput>> = HashMap::new();
        for input in inputs {
            inputs_by_partition
                .entry(input.partition)
                .or_default()
                .push(input);
        }
        for &partition in partitions {
            if routing.workers.contains_key(&partition) {
                continue;
            }
            // Arrival wake-ups, control, and batches of the (normally no) messages that reach
            // the shared queue; bounded, so a slow worker still pushes back on the poll thread.
            let (sender, receiver) = sync_channel(QUEUED_BATCHES);
            let mut own_inputs = inputs_by_partition.remove(&partition).unwrap_or_default();
            for input in &mut own_inputs {
                let waker = sender.clone();
                // Runs on a librdkafka thread: never block it; a full channel means the worker
                // is awake anyway.
                input.on_arrival(move || {
                    let _ = waker.try_send(WorkerInput::Wake);
                });
            }
            let stop_at = Arc::new(OnceLock::new());
            let shared = self.shared.clone();
            let stop = stop_at.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("partition-{partition}"))
                .spawn(move || start_partition(partition, shared, own_inputs, stop, receiver));
            match spawned {
                Ok(thread) => {
                    routing.workers.insert(
                        partition,
                        WorkerHandle {
                            inputs: sender,
                            thread,
                            stop_at,
                        },
                    );
                }
                Err(error) => self
                    .shared
                    .fail(format!("starting partition {partition}: {error}")),
            }
        }
    }

    fn revoked(&self, partitions: &[i32]) {
        if !partitions.is_empty() {
            let metrics = &self.shared.metrics;
            metrics.rebalances.with_label_values(&["revoked"]).inc();
            if let Ok(mut readiness) = self.shared.readiness.lock() {
                for partition in partitions {
                    readiness.owned.remove(partition);
                    readiness.restoring.remove(partition);
                }
                metrics
                    .assigned_partitions
                    .set(readiness.owned.len() as i64);
            }
        }
        let handles: Vec<(i32, WorkerHandle)> = match self.routing.lock() {
            Ok(mut routing) => partitions
                .iter()
                .filter_map(|p| {
                    routing.pending.remove(p);
                    routing.workers.remove(p).map(|w| (*p, w))
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        let deadline = Instant::now() + self.shared.pipeline.shutdown_timeout;
        // Every worker learns the deadline at once, even one that cannot read its channel now.
        for (_, handle) in &handles {
            let _ = handle.stop_at.set(deadline);
        }
        for (partition, handle) in handles {
            let (reply, done) = sync_channel(1);
            if handle
                .inputs
                .send(WorkerInput::Stop { deadline, reply })
                .is_ok()
            {
                let _ = done.recv();
            }
            if handle.thread.join().is_err() {
                self.shared
                    .fail(format!("partition {partition}: worker panicked"));
            }
            self.shared.standby.release(partition);
            tracing::info!(partition, "partition released");
        }
    }

    fn push(&self, message: InputMessage) {
        let Ok(mut routing) = self.routing.lock() else {
            return;
        };
        let partition = message.partition;
        let batch = routing.pending.entry(partition).or_default();
        batch.push(message);
        if batch.len() >= self.shared.pipeline.batch_size {
            self.send(&mut routing, partition);
        }
    }

    fn idle(&self) {
        let Ok(mut routing) = self.routing.lock() else {
            return;
        };
        let partitions: Vec<i32> = routing.pending.keys().copied().collect();
        for partition in partitions {
            self.send(&mut routing, partition);
        }
    }

    fn publishable_offsets(&self) -> Vec<(String, i32, i64)> {
        match self.shared.publishable.lock() {
            Ok(map) => map.iter().map(|((t, p), o)| (t.clone(), *p, *o)).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn forget(&self, partitions: &[i32]) {
        if let Ok(mut map) = self.shared.publishable.lock() {
            map.retain(|(_, partition), _| !partitions.contains(partition));
        }
    }

    fn failure(&self) -> Option<String> {
        self.failure_reason()
    }
}
