//! The partition relay's [`RecordSink`] on the service's [`Publisher`]: records go to the
//! current idempotent producer, acknowledgements come back through the [`AckBoard`], and a
//! producer that failed as a whole is replaced (the relay then hands everything unacknowledged
//! to the new one).

use std::sync::Arc;

use super::txn::TxnSink;
use super::{is_fatal, send, AckBoard, Enqueued, Producer, Publisher};
use crate::outbox::Publish;
use crate::pipeline::relay::{Ack, Committed, RecordSink, SinkError, Witness};

/// A partition's sink in either guarantee: the shared idempotent producer (at-least-once) or
/// the partition's own transactional producer (exactly-once, `kafka::txn`).
pub enum PartitionSink {
    Shared(KafkaSink),
    Transactional(Box<TxnSink>),
}

impl RecordSink for PartitionSink {
    fn send(
        &mut self,
        seq: u64,
        part: u8,
        record: Publish<'_>,
        give_up: &dyn Fn() -> bool,
    ) -> Result<bool, SinkError> {
        match self {
            PartitionSink::Shared(sink) => sink.send(seq, part, record, give_up),
            PartitionSink::Transactional(sink) => sink.send(seq, part, record, give_up),
        }
    }

    fn take_acks(&mut self) -> Vec<Ack> {
        match self {
            PartitionSink::Shared(sink) => sink.take_acks(),
            PartitionSink::Transactional(sink) => sink.take_acks(),
        }
    }

    fn renewed(&mut self) -> Result<bool, SinkError> {
        match self {
            PartitionSink::Shared(sink) => sink.renewed(),
            PartitionSink::Transactional(sink) => sink.renewed(),
        }
    }

    fn transactional(&self) -> bool {
        matches!(self, PartitionSink::Transactional(_))
    }

    fn begin(&mut self) -> Result<(), SinkError> {
        match self {
            PartitionSink::Shared(sink) => sink.begin(),
            PartitionSink::Transactional(sink) => sink.begin(),
        }
    }

    fn commit(&mut self, offsets: &[(String, i64)], witness: Witness) -> Result<(), SinkError> {
        match self {
            PartitionSink::Shared(sink) => sink.commit(offsets, witness),
            PartitionSink::Transactional(sink) => sink.commit(offsets, witness),
        }
    }

    fn committed(&mut self) -> Result<Committed, SinkError> {
        match self {
            PartitionSink::Shared(sink) => sink.committed(),
            PartitionSink::Transactional(sink) => sink.committed(),
        }
    }
}

pub struct KafkaSink {
    partition: i32,
    publisher: Arc<Publisher>,
    board: Arc<AckBoard>,
    producer: Arc<Producer>,
    generation: u64,
}

impl KafkaSink {
    pub fn new(partition: i32, publisher: Arc<Publisher>, board: Arc<AckBoard>) -> KafkaSink {
        let (generation, producer) = publisher.current();
        KafkaSink {
            partition,
            publisher,
            board,
            producer,
            generation,
        }
    }
}

impl RecordSink for KafkaSink {
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
            Err(error) if is_fatal(&error) => {
                self.board.report_fatal(self.generation);
                Err(SinkError::Fatal)
            }
            Err(error) => Err(SinkError::Other(error.to_string())),
        }
    }

    fn take_acks(&mut self) -> Vec<Ack> {
        self.board.take(self.partition)
    }

    fn renewed(&mut self) -> Result<bool, SinkError> {
        self.publisher
            .renew_if_failed()
            .map_err(|e| SinkError::Other(e.to_string()))?;
        if self.publisher.generation() == self.generation {
            return Ok(false);
        }
        let (generation, producer) = self.publisher.current();
        self.producer = producer;
        self.generation = generation;
        tracing::info!(
            partition = self.partition,
            generation,
            "following the new producer"
        );
        Ok(true)
    }
}
