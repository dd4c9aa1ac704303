//! The exactly-once mode's [`RecordSink`]: one transactional producer per owned input partition
//! (EOS-v1 style). Its `transactional.id` is a stable function of the group, the input topics and
//! the partition, so the next owner's `init_transactions` fences this one — the strongest fencing
//! librdkafka offers without KIP-447's generation checks, and it needs no group metadata from the
//! consumer's current generation: the offsets go into each transaction under a metadata-only
//! handle of the group (generation -1, which brokers accept for this style). A fenced producer
//! stops its partition's worker; it never retries or publishes again.
//!
//! Each transaction's offsets carry a *witness* as their commit metadata (this store's writer
//! id and the outbox position after the batch), which is how a restart — or a commit whose
//! outcome is unknown — learns whether the open transaction committed (see
//! `pipeline::relay`).
//!
//! Error handling follows librdkafka's classes (and Jepsen's Kafka analyses): a retriable
//! commit error is retried, never followed by an abort (the commit may have landed); an error
//! that requires an abort aborts and the batch is sent again; a fatal error re-creates the
//! producer (whose `init_transactions` aborts what was open) and the outcome is read back from
//! the group. Every call here blocks: the workers run on their own threads.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer as _;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::{
    base_config, client, producer_config, send, AckBoard, ClientHealth, DeliveryContext, Enqueued,
    KafkaSetupError, Producer,
};
use crate::metrics::Metrics;
use crate::outbox::Publish;
use crate::pipeline::relay::{Ack, Committed, RecordSink, SinkError, Witness};
use crate::settings::KafkaSettings;

/// How long one transactional call may block before it is classified and retried.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between retries of a retriable call.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// The `transactional.id` of partition `partition`'s producer: the same on every instance, so a
/// new owner fences the previous one.
pub fn transactional_id(group: &str, input_topics: &[String], partition: i32) -> String {
    format!("{group}-{}-{partition}", input_topics.join(","))
}

/// What to do after a failed transactional call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Try the same call again (a commit's outcome is still open).
    Retry,
    /// Abort the transaction and send its records again.
    Abort,
    /// Another producer with this transactional id took over.
    Fenced,
    /// The producer is unusable: re-create it.
    Fatal,
    /// The broker does not implement transactions.
    Unsupported,
}

/// What librdkafka says of a transactional error (`rd_kafka_error_t`'s flags).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    pub fatal: bool,
    pub requires_abort: bool,
    pub retriable: bool,
}

/// librdkafka's classification of a transactional error.
pub fn classify(error: &KafkaError) -> Class {
    let flags = match error {
        KafkaError::Transaction(txn) => Some(Flags {
            fatal: txn.is_fatal(),
            requires_abort: txn.txn_requires_abort(),
            retriable: txn.is_retriable(),
        }),
        _ => None,
    };
    class_of(error.rdkafka_error_code(), flags)
}

/// The class of an error code with its transactional flags (`None`: not a transactional error).
pub fn class_of(code: Option<RDKafkaErrorCode>, flags: Option<Flags>) -> Class {
    if matches!(
        code,
        Some(
            RDKafkaErrorCode::UnsupportedVersion
                | RDKafkaErrorCode::UnsupportedFeature
                | RDKafkaErrorCode::UnsupportedForMessageFormat
        )
    ) {
        return Class::Unsupported;
    }
    if matches!(
        code,
        Some(
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                // librdkafka's own code once it has seen the fencing (`_FENCED`, raised
                // fatal): re-creating the producer would fence the new owner in turn.
                | RDKafkaErrorCode::Fenced
        )
    ) {
        return Class::Fenced;
    }
    match flags {
        Some(flags) if flags.fatal => Class::Fatal,
        Some(flags) if flags.requires_abort => Class::Abort,
        Some(flags) if flags.retriable => Class::Retry,
        Some(_) => Class::Abort,
        None if code == Some(RDKafkaErrorCode::Fatal) => Class::Fatal,
        None => Class::Retry,
    }
}

/// The error the service refuses to start with when the broker lacks transactions.
fn unsupported(error: &KafkaError) -> KafkaSetupError {
    KafkaSetupError::Create {
        topic: "(transactions)".into(),
        reason: format!(
            "processing.guarantee = \"exactly_once\" needs Kafka transactions, which the broker \
             does not support ({error}); use \"at_least_once\" or a broker with transactions"
        ),
    }
}

/// At start: a transactional producer of the group initialises, or the service refuses to run.
pub fn probe(settings: &KafkaSettings, timeout: Duration) -> Result<(), KafkaSetupError> {
    let mut config = txn_config(settings, &format!("{}-probe", settings.group_id));
    config.set("client.id", "segmenter-txn-probe");
    let producer: rdkafka::producer::BaseProducer = config
        .create()
        .map_err(client("creating the transactional probe"))?;
    match producer.init_transactions(timeout) {
        Ok(()) => Ok(()),
        Err(error) if classify(&error) == Class::Unsupported => Err(unsupported(&error)),
        Err(error) => Err(KafkaSetupError::Client {
            what: "initialising a transactional producer (processing.guarantee = \"exactly_once\")"
                .into(),
            source: error,
        }),
    }
}

/// The producer config with a transactional id: a record may wait at most as long as a
/// transaction may stay open (librdkafka requires `message.timeout.ms` ≤
/// `transaction.timeout.ms`; a record that times out aborts its transaction, which is sent again).
fn txn_config(settings: &KafkaSettings, transactional_id: &str) -> ClientConfig {
    let mut config = producer_config(settings);
    if config.get("transaction.timeout.ms").is_none() {
        config.set("transaction.timeout.ms", "60000");
    }
    let txn_timeout = config
        .get("transaction.timeout.ms")
        .unwrap_or("60000")
        .to_string();
    config
        .set("transactional.id", transactional_id)
        .set("message.timeout.ms", txn_timeout);
    config
}

pub struct TxnSink {
    partition: i32,
    settings: KafkaSettings,
    transactional_id: String,
    input_topics: Vec<String>,
    /// This sink's own board: acknowledgements of its records only.
    board: Arc<AckBoard>,
    metrics: Arc<Metrics>,
    health: Arc<ClientHealth>,
    producer: Producer,
    /// A non-member client of the group: its metadata handle and committed offsets.
    group: BaseConsumer,
    metadata: ConsumerGroupMetadata,
    stop_at: Arc<OnceLock<Instant>>,
}

impl TxnSink {
    /// Creates and initialises partition `partition`'s transactional producer (fencing any
    /// previous owner's).
    pub fn open(
        partition: i32,
        settings: &KafkaSettings,
        input_topics: &[String],
        metrics: Arc<Metrics>,
        health: Arc<ClientHealth>,
        stop_at: Arc<OnceLock<Instant>>,
    ) -> Result<TxnSink, KafkaSetupError> {
        let transactional_id = transactional_id(&settings.group_id, input_topics, partition);
        let board = Arc::new(AckBoard::default());
        let producer = init_producer(
            settings,
            &transactional_id,
            board.clone(),
            metrics.clone(),
            health.clone(),
            &stop_at,
        )?;
        let group: BaseConsumer = base_config(settings)
            .set("group.id", &settings.group_id)
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .create()
            .map_err(client("creating the group offsets client"))?;
        let metadata = group
            .group_metadata()
            .ok_or_else(|| KafkaSetupError::Create {
                topic: "(transactions)".into(),
                reason: "no consumer group metadata".into(),
            })?;
        tracing::info!(partition, transactional_id, "transactional producer ready");
        Ok(TxnSink {
            partition,
            settings: settings.clone(),
            transactional_id,
            input_topics: input_topics.to_vec(),
            board,
            metrics,
            health,
            producer,
            group,
            metadata,
            stop_at,
        })
    }

    fn stopping(&self) -> bool {
        self.stop_at
            .get()
            .is_some_and(|deadline| Instant::now() >= *deadline)
    }

    /// Whether the producer has failed fatally because a newer owner fenced it (logged).
    fn fatal_because_fenced(&self) -> bool {
        let Some((code, reason)) = self.producer.client().fatal_error() else {
            return false;
        };
        let fatal = Flags {
            fatal: true,
            ..Flags::default()
        };
        let fenced = class_of(Some(code), Some(fatal)) == Class::Fenced;
        if fenced {
            tracing::error!(partition = self.partition, reason, "producer fenced");
        }
        fenced
    }

    /// Replaces a producer that failed fatally; the new one's `init_transactions` aborts the
    /// transaction the old one left open (or fences nothing if it committed).
    fn recreate(&mut self) -> Result<(), SinkError> {
        // Fatal because fenced: a new producer would fence the partition's new owner in turn.
        if self.fatal_because_fenced() {
            return Err(SinkError::Fenced);
        }
        self.metrics
            .publish_errors
            .with_label_values(&["producer_reset"])
            .inc();
        tracing::warn!(
            partition = self.partition,
            "transactional producer failed fatally; re-creating it"
        );
        self.board = Arc::new(AckBoard::default());
        self.producer = init_producer(
            &self.settings,
            &self.transactional_id,
            self.board.clone(),
            self.metrics.clone(),
            self.health.clone(),
            &self.stop_at,
        )
        .map_err(|error| match error {
            KafkaSetupError::Client { source, .. } if classify(&source) == Class::Fenced => {
                SinkError::Fenced
            }
            other => SinkError::Other(other.to_string()),
        })?;
        Ok(())
    }

    /// Aborts the open transaction (retrying while retriable); the batch is then sent again.
    fn abort(&mut self) -> SinkError {
        loop {
            match self.producer.abort_transaction(CALL_TIMEOUT) {
                Ok(()) => break,
                Err(error) => match classify(&error) {
                    Class::Retry if !self.stopping() => std::thread::sleep(RETRY_PAUSE),
                    Class::Fenced => return SinkError::Fenced,
                    _ => {
                        return match self.recreate() {
                            Ok(()) => SinkError::Aborted,
                            Err(error) => error,
                        }
                    }
                },
            }
        }
        if let Some(reason) = self.board.failure() {
            return SinkError::Other(reason);
        }
        SinkError::Aborted
    }

    /// After a failed call that has not reached the commit (nothing can have committed).
    fn before_commit(&mut self, error: &KafkaError) -> SinkError {
        tracing::warn!(partition = self.partition, %error, "transaction failed before its commit");
        match classify(error) {
            Class::Fenced => SinkError::Fenced,
            Class::Fatal | Class::Unsupported => match self.recreate() {
                Ok(()) => SinkError::Aborted,
                Err(error) => error,
            },
            Class::Abort | Class::Retry => self.abort(),
        }
    }
}

fn init_producer(
    settings: &KafkaSettings,
    transactional_id: &str,
    board: Arc<AckBoard>,
    metrics: Arc<Metrics>,
    health: Arc<ClientHealth>,
    stop_at: &OnceLock<Instant>,
) -> Result<Producer, KafkaSetupError> {
    let producer: Producer = txn_config(settings, transactional_id)
        .create_with_context(DeliveryContext {
            board,
            metrics,
            generation: 0,
            health,
        })
        .map_err(client("creating a transactional producer"))?;
    loop {
        match producer.init_transactions(CALL_TIMEOUT) {
            Ok(()) => return Ok(producer),
            Err(error) => match classify(&error) {
                Class::Unsupported => return Err(unsupported(&error)),
                Class::Retry if stop_at.get().is_none() => {
                    tracing::warn!(transactional_id, %error, "init_transactions; retrying");
                    std::thread::sleep(RETRY_PAUSE);
                }
                _ => {
                    return Err(KafkaSetupError::Client {
                        what: format!("init_transactions of {transactional_id}"),
                        source: error,
                    })
                }
            },
        }
    }
}

impl RecordSink for TxnSink {
    fn send(
        &mut self,
        seq: u64,
        part: u8,
        record: Publish<'_>,
        give_up: &dyn Fn() -> bool,
    ) -> Result<bool, SinkError> {
        match send(&self.producer, self.partition, seq, part, record, give_up) {
            Ok(Enqueued::Queued) => Ok(true),
            Ok(Enqueued::GaveUp) => Ok(false),
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)) => {
                Err(SinkError::Other(format!(
                    "part {part} of outbox entry {seq} is larger than the producer accepts"
                )))
            }
            Err(error) => {
                // A fatal `send` names only `_FATAL`; the producer knows the cause (fenced?).
                if self.fatal_because_fenced() {
                    return Err(SinkError::Fenced);
                }
                Err(self.before_commit(&error))
            }
        }
    }

    fn take_acks(&mut self) -> Vec<Ack> {
        self.board.take(self.partition)
    }

    fn renewed(&mut self) -> Result<bool, SinkError> {
        Ok(false)
    }

    fn transactional(&self) -> bool {
        true
    }

    fn begin(&mut self) -> Result<(), SinkError> {
        match self.producer.begin_transaction() {
            Ok(()) => Ok(()),
            Err(error) => Err(self.before_commit(&error)),
        }
    }

    fn commit(&mut self, offsets: &[(String, i64)], witness: Witness) -> Result<(), SinkError> {
        let mut list = TopicPartitionList::new();
        let metadata = witness.encode();
        for (topic, offset) in offsets {
            let mut element = list.add_partition(topic, self.partition);
            if element.set_offset(Offset::Offset(*offset)).is_ok() {
                element.set_metadata(metadata.clone());
            }
        }
        if list.count() > 0 {
            let mut attempts = 0_u64;
            loop {
                match self
                    .producer
                    .send_offsets_to_transaction(&list, &self.metadata, CALL_TIMEOUT)
                {
                    Ok(()) => break,
                    Err(error) if classify(&error) == Class::Retry && !self.stopping() => {
                        // A retry that never ends must show (the first, then one in 50).
                        if attempts.is_multiple_of(50) {
                            tracing::warn!(partition = self.partition, %error, attempts, "send_offsets_to_transaction; retrying");
                        }
                        attempts += 1;
                        std::thread::sleep(RETRY_PAUSE);
                    }
                    Err(error) => return Err(self.before_commit(&error)),
                }
            }
        }
        loop {
            let error = match self.producer.commit_transaction(CALL_TIMEOUT) {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            match classify(&error) {
                // The commit may have landed: never abort now, ask again.
                Class::Retry => {
                    if self.stopping() {
                        return Err(SinkError::Other(format!(
                            "stopped with a commit of unknown outcome ({error}); the next start \
                             settles it"
                        )));
                    }
                    tracing::warn!(partition = self.partition, %error, "commit_transaction; retrying");
                    std::thread::sleep(RETRY_PAUSE);
                }
                Class::Abort => return Err(self.abort()),
                Class::Fenced => return Err(SinkError::Fenced),
                Class::Fatal | Class::Unsupported => {
                    self.recreate()?;
                    return Err(SinkError::Unknown);
                }
            }
        }
    }

    fn committed(&mut self) -> Result<Committed, SinkError> {
        let mut list = TopicPartitionList::new();
        for topic in &self.input_topics {
            list.add_partition(topic, self.partition);
        }
        let fetched = loop {
            match self.group.committed_offsets(list.clone(), CALL_TIMEOUT) {
                Ok(fetched) => break fetched,
                Err(error) if !self.stopping() => {
                    tracing::warn!(partition = self.partition, %error, "reading the group's committed offsets; retrying");
                    std::thread::sleep(RETRY_PAUSE);
                }
                Err(error) => return Err(SinkError::Other(error.to_string())),
            }
        };
        let mut committed = Committed::default();
        for element in fetched.elements() {
            if let Offset::Offset(offset) = element.offset() {
                committed
                    .offsets
                    .insert(element.topic().to_string(), offset);
            }
            if committed.witness.is_none() {
                committed.witness = Witness::decode(element.metadata());
            }
        }
        Ok(committed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transactional_id_is_stable_per_group_topics_and_partition() {
        let topics = vec!["a".to_string(), "b".to_string()];
        assert_eq!(transactional_id("g", &topics, 3), "g-a,b-3");
        assert_ne!(
            transactional_id("g", &topics, 3),
            transactional_id("g", &topics, 4)
        );
    }

    #[test]
    fn a_broker_without_transactions_is_told_apart_from_other_failures() {
        use RDKafkaErrorCode as Code;
        let fatal = Some(Flags {
            fatal: true,
            ..Flags::default()
        });
        let abortable = Some(Flags {
            requires_abort: true,
            ..Flags::default()
        });
        let retriable = Some(Flags {
            retriable: true,
            ..Flags::default()
        });
        // init_transactions against a broker without InitProducerId v1+ / EndTxn.
        assert_eq!(
            class_of(Some(Code::UnsupportedVersion), fatal),
            Class::Unsupported
        );
        assert_eq!(
            classify(&KafkaError::MessageProduction(Code::UnsupportedFeature)),
            Class::Unsupported
        );
        assert_eq!(class_of(Some(Code::ProducerFenced), fatal), Class::Fenced);
        assert_eq!(
            class_of(Some(Code::Fenced), fatal),
            Class::Fenced,
            "librdkafka's local _FENCED is fatal, yet a new producer must not steal the id back"
        );
        assert_eq!(
            class_of(Some(Code::InvalidProducerEpoch), abortable),
            Class::Fenced
        );
        assert_eq!(
            class_of(Some(Code::OutOfOrderSequenceNumber), fatal),
            Class::Fatal
        );
        assert_eq!(
            class_of(Some(Code::InvalidTransactionalState), abortable),
            Class::Abort
        );
        // A commit that timed out may have landed: retried, never aborted.
        assert_eq!(
            class_of(Some(Code::OperationTimedOut), retriable),
            Class::Retry
        );
        assert_eq!(class_of(Some(Code::Fatal), None), Class::Fatal);
        assert!(unsupported_message_names_the_setting());
    }

    fn unsupported_message_names_the_setting() -> bool {
        let error = KafkaError::MessageProduction(RDKafkaErrorCode::UnsupportedVersion);
        unsupported(&error).to_string().contains("exactly_once")
    }
}
