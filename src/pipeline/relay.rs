//! The outbox relay of one partition: hands committed outbox entries to Kafka, in outbox order,
//! remembers them until every record is acknowledged, and says which input offsets may then be
//! committed. Changelog entries are *barriers*: one is handed over only once every earlier
//! non-barrier entry is acknowledged, so the changelog never holds a customer state whose
//! changes Kafka has not taken (a new owner restoring it would otherwise skip re-deriving them).
//!
//! In the exactly-once mode (a [`RecordSink::transactional`] sink) there are no barriers: each
//! batch's entries go out in one Kafka transaction together with the input offsets they reach
//! (and the outbox position, the *witness*), committed before the next batch is decided. The
//! outbox then only ever holds the entries of the one transaction whose outcome is open, and
//! [`Relay::recover`] settles it after a crash: the group's committed offsets say whether it
//! committed (the entries are dropped) or not (the same entries, same ids and `seq`, go out in a
//! new transaction). A commit whose outcome is unknown is retried, never aborted.
//!
//! Kafka stays behind [`RecordSink`] (implemented for the service's producer in
//! `kafka::sink`), so the ordering, barrier and commit-point rules are unit-tested here without a
//! broker.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter, IntGauge};

use crate::metrics::Metrics;
use crate::model::{time, Cause, Millis};
use crate::outbox::{OutboxEntry, OutboxRecord, Publish, PublishBuffers, Topics};
use crate::store::{codec, keys, Store, StoreError, Table, WriteSet};

/// One acknowledged Kafka record: part `part` of outbox entry `seq`, stored at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub seq: u64,
    pub part: u8,
    pub offset: i64,
}

/// Why a record could not be handed over.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The producer failed as a whole: the record waits for its replacement
    /// ([`RecordSink::renewed`]).
    #[error("the producer failed as a whole")]
    Fatal,
    /// The open transaction was aborted (the broker asked for it): send its records again.
    #[error("the transaction was aborted")]
    Aborted,
    /// The producer failed during a commit and was re-created (which aborted the transaction
    /// if it was still open): whether it committed is read from [`RecordSink::committed`].
    #[error("the transaction's outcome is unknown")]
    Unknown,
    /// Another producer with this partition's transactional id took over.
    #[error("fenced: another instance owns this partition")]
    Fenced,
    #[error("{0}")]
    Other(String),
}

/// Where the relay's records go: Kafka's producer in the service.
pub trait RecordSink {
    /// Hands part `part` of outbox entry `seq` over; its acknowledgement comes back from
    /// [`RecordSink::take_acks`]. Waiting on a full queue ends when `give_up` returns true: the
    /// record then stays in the outbox (`Ok(false)`).
    fn send(
        &mut self,
        seq: u64,
        part: u8,
        record: Publish<'_>,
        give_up: &dyn Fn() -> bool,
    ) -> Result<bool, SinkError>;

    /// Acknowledgements since the last call.
    fn take_acks(&mut self) -> Vec<Ack>;

    /// Replaces a producer that failed as a whole; true when it was replaced since the last
    /// call, so everything unacknowledged must be handed to the new one.
    fn renewed(&mut self) -> Result<bool, SinkError>;

    /// Exactly-once mode: records go out in transactions ([`RecordSink::begin`],
    /// [`RecordSink::commit`]).
    fn transactional(&self) -> bool {
        false
    }

    /// Opens a transaction for the records sent next.
    fn begin(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    /// Commits the open transaction with the input offsets it reaches and the witness (this
    /// store's writer id and the outbox position after the batch); blocks until Kafka decided.
    fn commit(&mut self, _offsets: &[(String, i64)], _witness: Witness) -> Result<(), SinkError> {
        Ok(())
    }

    /// What the consumer group has committed for this partition.
    fn committed(&mut self) -> Result<Committed, SinkError> {
        Ok(Committed::default())
    }
}

/// Stored with a transaction's offsets (as their metadata): who committed it and up to where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Witness {
    pub writer: [u8; 8],
    /// The outbox sequence number after the transaction's entries.
    pub next_seq: u64,
}

impl Witness {
    pub fn encode(&self) -> String {
        format!(
            "segmenter:{}:{}",
            crate::model::change::hex(&self.writer),
            self.next_seq
        )
    }

    pub fn decode(text: &str) -> Option<Witness> {
        let rest = text.strip_prefix("segmenter:")?;
        let (writer, seq) = rest.split_once(':')?;
        if writer.len() != 16 {
            return None;
        }
        let mut bytes = [0u8; 8];
        for (at, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(writer.get(at * 2..at * 2 + 2)?, 16).ok()?;
        }
        Some(Witness {
            writer: bytes,
            next_seq: seq.parse().ok()?,
        })
    }
}

/// The group's committed position of a partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    pub offsets: HashMap<String, i64>,
    /// The witness of the last transaction, if the broker kept it.
    pub witness: Option<Witness>,
}

impl Committed {
    /// Whether the transaction that reached `offsets` with `witness` is committed (or no
    /// longer needed: another writer committed after it, having re-done its input from the
    /// changelog). Without a stored witness the offsets decide.
    pub fn covers(&self, offsets: &[(String, i64)], witness: Witness) -> bool {
        match self.witness {
            Some(stored) if stored.writer != witness.writer => true,
            Some(stored) => stored.next_seq >= witness.next_seq,
            None => {
                !offsets.is_empty()
                    && offsets
                        .iter()
                        .all(|(topic, offset)| self.offsets.get(topic).is_some_and(|c| c >= offset))
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("producing to kafka: {0}")]
    Produce(String),
    #[error("corrupt {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// Exactly-once mode: another instance's producer took this partition over.
    #[error("fenced: another instance owns this partition now")]
    Fenced,
}

/// Which output an outbox record goes to, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Changes,
    Membership,
    DeadLetters,
    Changelog,
}

impl Output {
    const ALL: [Output; 4] = [
        Output::Changes,
        Output::Membership,
        Output::DeadLetters,
        Output::Changelog,
    ];

    fn label(self) -> &'static str {
        match self {
            Output::Changes => "changes",
            Output::Membership => "membership",
            Output::DeadLetters => "dlq",
            Output::Changelog => "changelog",
        }
    }
}

/// What the relay remembers about an outbox entry until Kafka acknowledges all its records.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    /// The output of each part (a change: the change event, then the membership update).
    outputs: [Output; 2],
    parts: u8,
    /// Bit `i` is set once part `i` is acknowledged.
    acked: u8,
    /// For changes: when the cause happened (the event's Kafka timestamp, the timer's due time,
    /// the erasure request) and the cause's label — for the latency histogram, observed when
    /// the change event (part 0) is acknowledged.
    origin: Option<(Millis, &'static str)>,
}

impl Pending {
    pub fn change(origin: Option<(Millis, &'static str)>) -> Pending {
        Pending {
            outputs: [Output::Changes, Output::Membership],
            parts: 2,
            acked: 0,
            origin,
        }
    }

    pub fn record(output: Output) -> Pending {
        Pending {
            outputs: [output, output],
            parts: 1,
            acked: 0,
            origin: None,
        }
    }

    /// The pending form of an entry read back from the outbox.
    fn of(entry: &OutboxEntry, topics: &Topics) -> Pending {
        match entry {
            OutboxEntry::Change(_) => Pending::change(None),
            OutboxEntry::Changelog(_) => Pending::record(Output::Changelog),
            OutboxEntry::Record(record) => Pending::record(output_of(record, topics)),
        }
    }

    /// Notes part `part` as acknowledged; its output if that is news (not a repeat, not a
    /// part the entry does not have).
    fn ack(&mut self, part: u8) -> Option<Output> {
        let bit = 1u8.checked_shl(u32::from(part))?;
        if part >= self.parts || self.acked & bit != 0 {
            return None;
        }
        self.acked |= bit;
        Some(self.outputs[usize::from(part)])
    }

    fn complete(&self) -> bool {
        self.acked.count_ones() == u32::from(self.parts)
    }
}

/// The output a stored record goes to (entries of earlier versions hold every kind).
fn output_of(record: &OutboxRecord, topics: &Topics) -> Output {
    if record.topic == topics.changes {
        Output::Changes
    } else if record.topic == topics.membership {
        Output::Membership
    } else {
        Output::DeadLetters
    }
}

/// An outbox entry decided in a batch, with its metadata.
pub type Decided = (OutboxEntry, Pending);

/// The relay's metric series, resolved once (acknowledgements arrive per record).
struct RelaySeries {
    outbox_pending: IntGauge,
    /// Indexed by [`Output`].
    published: [IntCounter; 4],
    /// Event → publish latency per cause label, resolved as causes appear.
    latency: Vec<(&'static str, Histogram)>,
}

impl RelaySeries {
    fn of(metrics: &Metrics, partition: i32) -> RelaySeries {
        RelaySeries {
            outbox_pending: metrics
                .outbox_pending
                .with_label_values(&[&partition.to_string()]),
            published: Output::ALL
                .map(|output| metrics.published.with_label_values(&[output.label()])),
            latency: Vec::new(),
        }
    }

    fn latency(&mut self, metrics: &Metrics, cause: &'static str) -> &Histogram {
        let at = match self.latency.iter().position(|(label, _)| *label == cause) {
            Some(at) => at,
            None => {
                let histogram = metrics.event_to_publish_seconds.with_label_values(&[cause]);
                self.latency.push((cause, histogram));
                self.latency.len() - 1
            }
        };
        &self.latency[at].1
    }
}

/// What [`Relay::stage`] put into a write set, for [`Relay::release`] once it is durable.
#[derive(Debug, Default)]
pub struct Staged {
    first: u64,
    seqs: Vec<u64>,
    reached: Vec<(String, i64)>,
}

pub struct Relay<S: RecordSink> {
    partition: i32,
    sink: S,
    topics: Topics,
    metrics: Arc<Metrics>,
    series: RelaySeries,
    next_seq: u64,
    /// Entries handed to the sink and not yet acknowledged in full.
    unacked: BTreeMap<u64, Pending>,
    /// The non-barrier entries among `unacked` and `held`'s predecessors: a barrier waits until
    /// none is below it.
    plain: BTreeSet<u64>,
    /// Barrier entries not yet handed over, in outbox order.
    held: VecDeque<(u64, OutboxEntry, Pending)>,
    /// Kafka records of `unacked` and `held` not yet acknowledged (what the backlog counts).
    unacked_records: usize,
    /// Entries whose records are all acknowledged, to delete at the next commit.
    acked: Vec<u64>,
    /// Outbox entries below this sequence number are deleted.
    outbox_floor: u64,
    /// (first outbox seq *not* covered, input offsets reached) per committed batch.
    commit_points: VecDeque<(u64, Vec<(String, i64)>)>,
    /// The highest changelog offset acknowledged since the last call of
    /// [`Relay::take_changelog_acked`].
    changelog_acked: Option<i64>,
    buffers: PublishBuffers,
    /// The stop deadline (see `Worker`): a wait on a full producer queue ends there.
    stop_at: Arc<OnceLock<Instant>>,
    /// Exactly-once mode: this store's writer id (for the witness) and the input offsets of
    /// the last committed transaction (a batch with no entries that reaches no further needs
    /// none).
    writer: [u8; 8],
    last_committed: Option<Vec<(String, i64)>>,
}

impl<S: RecordSink> Relay<S> {
    /// A relay for `partition`, continuing the outbox's sequence numbers.
    pub fn open<St: Store + ?Sized>(
        partition: i32,
        store: &St,
        sink: S,
        topics: Topics,
        metrics: Arc<Metrics>,
        stop_at: Arc<OnceLock<Instant>>,
    ) -> Result<Relay<S>, RelayError> {
        let next_seq = match store.get(Table::Meta, &keys::outbox_next(partition as u32))? {
            Some(bytes) => codec::decode_u64(&bytes).map_err(|err| RelayError::Corrupt {
                key: "outbox_next".into(),
                reason: err.0,
            })?,
            None => 0,
        };
        Ok(Relay {
            partition,
            sink,
            topics,
            series: RelaySeries::of(&metrics, partition),
            metrics,
            next_seq,
            unacked: BTreeMap::new(),
            plain: BTreeSet::new(),
            held: VecDeque::new(),
            unacked_records: 0,
            acked: Vec::new(),
            outbox_floor: 0,
            commit_points: VecDeque::new(),
            changelog_acked: None,
            buffers: PublishBuffers::default(),
            stop_at,
            writer: [0; 8],
            last_committed: None,
        })
    }

    /// Exactly-once mode: the id of this store, which the witness of each transaction names.
    pub fn with_writer(mut self, writer: [u8; 8]) -> Relay<S> {
        self.writer = writer;
        self
    }

    /// Exactly-once mode, at open: settles the transaction a previous run left open (its
    /// entries are all the outbox holds). Committed — or superseded by another writer — its
    /// entries are dropped (at the next commit); otherwise they go out again, the same entries,
    /// in a new transaction with the offsets the store reached. `offsets` are those stored.
    pub fn recover<St: Store + ?Sized>(
        &mut self,
        store: &St,
        offsets: &HashMap<String, i64>,
    ) -> Result<usize, RelayError> {
        let p = self.partition as u32;
        let stored = store.scan_prefix(Table::Outbox, &keys::partition_prefix(p))?;
        let mut batch = Vec::with_capacity(stored.len());
        for (key, value) in stored {
            let seq = outbox_seq(&key)?;
            let entry = outbox_entry(seq, &value)?;
            self.next_seq = self.next_seq.max(seq + 1);
            let pending = Pending::of(&entry, &self.topics);
            batch.push((seq, entry, pending));
        }
        let mut reached: Vec<(String, i64)> =
            offsets.iter().map(|(t, o)| (t.clone(), *o)).collect();
        reached.sort();
        if batch.is_empty() {
            self.last_committed = Some(reached);
            return Ok(0);
        }
        let count = batch.len();
        let witness = self.witness();
        let committed = self.sink.committed().map_err(sink_error)?;
        if committed.covers(&reached, witness) {
            tracing::info!(
                partition = self.partition,
                entries = count,
                "the previous run's last transaction is committed; its outbox entries are dropped"
            );
            self.acked.extend(batch.iter().map(|(seq, _, _)| *seq));
            self.last_committed = Some(reached);
            return Ok(0);
        }
        tracing::info!(
            partition = self.partition,
            entries = count,
            "the previous run's last transaction did not commit; sending it again"
        );
        self.transact(batch, reached)?;
        Ok(count)
    }

    fn witness(&self) -> Witness {
        Witness {
            writer: self.writer,
            next_seq: self.next_seq,
        }
    }

    /// One transaction holding `batch` and the input offsets `reached`, retried until Kafka
    /// committed it: aborted by the broker → the same records again; outcome unknown after a
    /// fatal error → the group's committed offsets decide; fenced → [`RelayError::Fenced`].
    fn transact(
        &mut self,
        batch: Vec<(u64, OutboxEntry, Pending)>,
        reached: Vec<(String, i64)>,
    ) -> Result<(), RelayError> {
        let witness = self.witness();
        loop {
            match self.try_transaction(&batch, &reached, witness) {
                Ok(()) => break,
                Err(SinkError::Aborted) => {
                    self.count_transaction("aborted");
                    tracing::warn!(
                        partition = self.partition,
                        entries = batch.len(),
                        "transaction aborted; sending its records again"
                    );
                }
                Err(SinkError::Unknown) | Err(SinkError::Fatal) => {
                    self.count_transaction("unknown");
                    let committed = self.sink.committed().map_err(sink_error)?;
                    if committed.covers(&reached, witness) {
                        tracing::info!(
                            partition = self.partition,
                            "the transaction of unknown outcome is committed"
                        );
                        break;
                    }
                    tracing::warn!(
                        partition = self.partition,
                        entries = batch.len(),
                        "the transaction of unknown outcome did not commit; sending it again"
                    );
                }
                Err(SinkError::Fenced) => {
                    self.count_transaction("fenced");
                    return Err(RelayError::Fenced);
                }
                Err(SinkError::Other(error)) => return Err(RelayError::Produce(error)),
            }
            if self.stopping() {
                return Err(RelayError::Produce(
                    "stopped before the transaction committed; it stays in the outbox".into(),
                ));
            }
        }
        self.count_transaction("committed");
        // Every record is in Kafka now; acknowledgements that arrived name the changelog's
        // position (later ones are ignored: their entries are no longer pending).
        let outputs: HashMap<u64, Pending> = batch
            .iter()
            .map(|(seq, _, pending)| (*seq, *pending))
            .collect();
        for Ack { seq, part, offset } in self.sink.take_acks() {
            let Some(pending) = outputs.get(&seq) else {
                continue;
            };
            if pending.outputs[usize::from(part.min(1))] == Output::Changelog {
                self.changelog_acked = Some(self.changelog_acked.map_or(offset, |o| o.max(offset)));
            }
        }
        for (seq, _, pending) in &batch {
            for part in 0..pending.parts {
                self.series.published[pending.outputs[usize::from(part)] as usize].inc();
            }
            self.acked.push(*seq);
        }
        self.last_committed = Some(reached);
        Ok(())
    }

    fn try_transaction(
        &mut self,
        batch: &[(u64, OutboxEntry, Pending)],
        reached: &[(String, i64)],
        witness: Witness,
    ) -> Result<(), SinkError> {
        self.sink.begin()?;
        let stop_at = &self.stop_at;
        let give_up = || {
            stop_at
                .get()
                .is_some_and(|deadline| Instant::now() >= *deadline)
        };
        for (seq, entry, _) in batch {
            let sink = &mut self.sink;
            entry.publish(
                &self.topics,
                self.partition,
                &mut self.buffers,
                |part, record| match sink.send(*seq, part, record, &give_up)? {
                    true => Ok(()),
                    false => Err(SinkError::Other(
                        "stopped while the producer queue was full".into(),
                    )),
                },
            )?;
        }
        self.sink.commit(reached, witness)
    }

    fn stopping(&self) -> bool {
        self.stop_at
            .get()
            .is_some_and(|deadline| Instant::now() >= *deadline)
    }

    fn count_transaction(&self, outcome: &str) {
        self.metrics
            .transactions
            .with_label_values(&[outcome])
            .inc();
    }

    /// Kafka records handed over or held and not yet acknowledged.
    pub fn backlog(&self) -> usize {
        self.unacked_records
    }

    /// Nothing is waiting for Kafka.
    pub fn is_idle(&self) -> bool {
        self.unacked.is_empty() && self.held.is_empty()
    }

    /// Acknowledged entries wait to be deleted by the next commit.
    pub fn has_deletions(&self) -> bool {
        !self.acked.is_empty()
    }

    /// Publishes what a previous run left in the outbox, in order, before anything new.
    pub fn resend<St: Store + ?Sized>(&mut self, store: &St) -> Result<usize, RelayError> {
        let p = self.partition as u32;
        let stored = store.scan_prefix(Table::Outbox, &keys::partition_prefix(p))?;
        let count = stored.len();
        if count > 0 {
            tracing::info!(
                partition = self.partition,
                records = count,
                "re-publishing outbox"
            );
        }
        for (key, value) in stored {
            let seq = outbox_seq(&key)?;
            let entry = outbox_entry(seq, &value)?;
            self.next_seq = self.next_seq.max(seq + 1);
            let pending = Pending::of(&entry, &self.topics);
            self.enqueue(seq, entry, pending)?;
        }
        Ok(count)
    }

    /// Adds to `writes` what commits `records` and the input `offsets` reached: the new outbox
    /// entries, the next sequence number, the offsets, and the deletion of acknowledged
    /// entries. Once `writes` is durable, [`Relay::release`] hands the entries over.
    pub fn stage(
        &mut self,
        writes: &mut WriteSet,
        records: &[Decided],
        offsets: &HashMap<String, i64>,
    ) -> Staged {
        let p = self.partition as u32;
        let first = self.next_seq;
        // Everything below the first unacknowledged entry is acknowledged: one range deletion
        // (acknowledgements arrive out of order across output partitions; the few beyond the
        // prefix are deleted one by one).
        let first_unacked = self.first_unacked();
        if first_unacked > self.outbox_floor {
            writes.delete_range(
                Table::Outbox,
                keys::outbox(p, self.outbox_floor),
                keys::outbox(p, first_unacked),
            );
            self.outbox_floor = first_unacked;
        }
        let mut seqs = Vec::with_capacity(records.len());
        for (entry, _) in records {
            let seq = self.next_seq;
            self.next_seq += 1;
            writes.put(Table::Outbox, keys::outbox(p, seq), entry.encode());
            seqs.push(seq);
        }
        writes.put(
            Table::Meta,
            keys::outbox_next(p),
            self.next_seq.to_be_bytes().to_vec(),
        );
        let mut reached = Vec::with_capacity(offsets.len());
        for (topic, offset) in offsets {
            writes.put(
                Table::Meta,
                keys::input_offset(p, topic),
                offset.to_be_bytes().to_vec(),
            );
            reached.push((topic.clone(), *offset));
        }
        for seq in self.acked.drain(..) {
            if seq >= first_unacked {
                writes.delete(Table::Outbox, keys::outbox(p, seq));
            }
        }
        Staged {
            first,
            seqs,
            reached,
        }
    }

    /// After the write of [`Relay::stage`] is durable: hands its entries over (barriers when
    /// their turn comes) and records the batch's commit point. `records` is left empty.
    pub fn release(
        &mut self,
        staged: Staged,
        records: &mut Vec<Decided>,
    ) -> Result<(), RelayError> {
        let Staged {
            first,
            seqs,
            reached,
        } = staged;
        if self.sink.transactional() {
            let mut reached = reached;
            reached.sort();
            let batch: Vec<(u64, OutboxEntry, Pending)> = seqs
                .into_iter()
                .zip(records.drain(..))
                .map(|(seq, (entry, pending))| (seq, entry, pending))
                .collect();
            if batch.is_empty() && self.last_committed.as_ref() == Some(&reached) {
                return Ok(());
            }
            return self.transact(batch, reached);
        }
        for (seq, (entry, pending)) in seqs.into_iter().zip(records.drain(..)) {
            self.enqueue(seq, entry, pending)?;
        }
        if self.next_seq > first || !reached.is_empty() {
            self.commit_points.push_back((self.next_seq, reached));
        }
        self.series.outbox_pending.set(self.unacked_records as i64);
        Ok(())
    }

    /// Takes the sink's acknowledgements, hands over the barriers they unblocked, and returns
    /// the input offsets that may now be committed to Kafka (every outbox record of the batches
    /// before them acknowledged), if they moved. `now` is the wall clock, for latencies.
    pub fn collect_acks(&mut self, now: Millis) -> Result<Vec<(String, i64)>, RelayError> {
        let acked = self.sink.take_acks();
        for Ack { seq, part, offset } in acked {
            let Some(pending) = self.unacked.get_mut(&seq) else {
                continue;
            };
            let Some(output) = pending.ack(part) else {
                continue;
            };
            self.unacked_records -= 1;
            self.series.published[output as usize].inc();
            if output == Output::Changelog {
                self.changelog_acked = Some(self.changelog_acked.map_or(offset, |o| o.max(offset)));
            }
            if let (0, Some((origin, cause))) = (part, pending.origin) {
                self.series
                    .latency(&self.metrics, cause)
                    .observe(time::seconds_since(origin, now));
            }
            if pending.complete() {
                self.unacked.remove(&seq);
                self.plain.remove(&seq);
                self.acked.push(seq);
            }
        }
        self.release_barriers()?;
        self.series.outbox_pending.set(self.unacked_records as i64);
        Ok(self.reached_offsets())
    }

    /// The highest changelog offset acknowledged since the last call.
    pub fn take_changelog_acked(&mut self) -> Option<i64> {
        self.changelog_acked.take()
    }

    /// After the producer failed as a whole and was replaced: hands every unacknowledged
    /// record of this partition to the new producer, in outbox order.
    pub fn follow_producer<St: Store + ?Sized>(&mut self, store: &St) -> Result<(), RelayError> {
        if !self
            .sink
            .renewed()
            .map_err(|e| RelayError::Produce(e.to_string()))?
        {
            return Ok(());
        }
        let p = self.partition as u32;
        let stored = store.scan_prefix(Table::Outbox, &keys::partition_prefix(p))?;
        let mut republished = 0;
        for (key, value) in stored {
            let seq = outbox_seq(&key)?;
            let Some(acked) = self.unacked.get(&seq).map(|pending| pending.acked) else {
                continue;
            };
            let entry = outbox_entry(seq, &value)?;
            self.publish(seq, &entry, acked)?;
            republished += 1;
        }
        tracing::info!(
            partition = self.partition,
            entries = republished,
            "outbox handed to the new producer"
        );
        Ok(())
    }

    /// Waits for every outstanding record to be acknowledged, or the deadline.
    pub fn drain<St: Store + ?Sized>(
        &mut self,
        store: &St,
        deadline: Instant,
        now: &dyn Fn() -> Millis,
    ) -> Result<Vec<(String, i64)>, RelayError> {
        let mut reached = Vec::new();
        while !self.is_idle() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            self.follow_producer(store)?;
            let moved = self.collect_acks(now())?;
            if !moved.is_empty() {
                reached = moved;
            }
        }
        if !self.is_idle() {
            tracing::warn!(
                partition = self.partition,
                unpublished = self.unacked_records,
                "stopping with unpublished records; they stay in the outbox"
            );
        }
        Ok(reached)
    }

    fn first_unacked(&self) -> u64 {
        let unacked = self.unacked.first_key_value().map(|(seq, _)| *seq);
        let held = self.held.front().map(|(seq, _, _)| *seq);
        match (unacked, held) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => self.next_seq,
        }
    }

    /// Hands an entry over now, or holds it if it is a barrier with unacknowledged entries
    /// before it (or barriers held before it).
    fn enqueue(
        &mut self,
        seq: u64,
        entry: OutboxEntry,
        pending: Pending,
    ) -> Result<(), RelayError> {
        self.unacked_records += usize::from(pending.parts);
        if entry.is_barrier() {
            self.held.push_back((seq, entry, pending));
            return self.release_barriers();
        }
        self.plain.insert(seq);
        self.publish(seq, &entry, 0)?;
        self.unacked.insert(seq, pending);
        Ok(())
    }

    /// Hands over the held barriers that no unacknowledged non-barrier entry precedes.
    fn release_barriers(&mut self) -> Result<(), RelayError> {
        while let Some((seq, _, _)) = self.held.front() {
            let blocked = self.plain.first().is_some_and(|first| first < seq);
            if blocked {
                break;
            }
            let Some((seq, entry, pending)) = self.held.pop_front() else {
                break;
            };
            self.publish(seq, &entry, 0)?;
            self.unacked.insert(seq, pending);
        }
        Ok(())
    }

    /// Hands every record of entry `seq` to the sink but those already acknowledged (`acked`:
    /// bit `i` for part `i`). If the producer has failed as a whole, the entry waits for its
    /// replacement ([`Relay::follow_producer`]).
    fn publish(&mut self, seq: u64, entry: &OutboxEntry, acked: u8) -> Result<(), RelayError> {
        let stop_at = &self.stop_at;
        // Waiting on a full queue ends at the stop deadline: what is not handed over by then
        // stays in the outbox (the drain reports it) and is published at the next start.
        let give_up = || {
            stop_at
                .get()
                .is_some_and(|deadline| Instant::now() >= *deadline)
        };
        let sink = &mut self.sink;
        let sent = entry.publish(
            &self.topics,
            self.partition,
            &mut self.buffers,
            |part, record| {
                if acked & 1u8.checked_shl(u32::from(part)).unwrap_or(0) != 0 {
                    return Ok(());
                }
                sink.send(seq, part, record, &give_up).map(|_| ())
            },
        );
        match sent {
            Ok(()) | Err(SinkError::Fatal) => Ok(()),
            Err(SinkError::Fenced) => Err(RelayError::Fenced),
            Err(error) => Err(RelayError::Produce(error.to_string())),
        }
    }

    /// Input offsets whose outbox records are all acknowledged (empty if none moved).
    fn reached_offsets(&mut self) -> Vec<(String, i64)> {
        let first_unacked = self.first_unacked();
        let mut reached = Vec::new();
        while let Some((end, _)) = self.commit_points.front() {
            if *end > first_unacked {
                break;
            }
            if let Some((_, offsets)) = self.commit_points.pop_front() {
                if !offsets.is_empty() {
                    reached = offsets;
                }
            }
        }
        reached
    }

    /// This partition's share of the gauges leaves with it.
    pub fn release_metrics(&self) {
        let _ = self
            .metrics
            .outbox_pending
            .remove_label_values(&[&self.partition.to_string()]);
    }
}

/// The latency label of a change's cause and when it happened.
pub fn change_origin(cause: &Cause, at: Millis, origin: Option<Millis>) -> (Millis, &'static str) {
    match cause {
        Cause::Timer | Cause::Definition => (at, cause.as_str()),
        Cause::Event { .. } | Cause::Deleted => (origin.unwrap_or(at), cause.as_str()),
    }
}

/// The sequence number of a stored outbox key.
fn outbox_seq(key: &[u8]) -> Result<u64, RelayError> {
    keys::parse_outbox(key).ok_or_else(|| RelayError::Corrupt {
        key: format!("outbox key {}", crate::model::change::hex(key)),
        reason: "not partition(4) seq(8)".into(),
    })
}

/// A stored outbox entry, decoded.
fn outbox_entry(seq: u64, value: &[u8]) -> Result<OutboxEntry, RelayError> {
    OutboxEntry::decode(value).map_err(|err| RelayError::Corrupt {
        key: format!("outbox entry {seq}"),
        reason: err.0,
    })
}

fn sink_error(error: SinkError) -> RelayError {
    match error {
        SinkError::Fenced => RelayError::Fenced,
        other => RelayError::Produce(other.to_string()),
    }
}

#[cfg(test)]
mod tests;
