//! Dead letters on Kafka: `<topic>.dlq`, created at start-up unless present (with the source
//! topic's partition count), each letter on its source record's partition with key
//! `<partition>:<offset>` and the reason, error and position as headers.
//!
//! Published before any other sink of the batch commits: the dead-letter topic keeps no
//! positions of its own, it resumes where the sink that stores the letters does (PostgreSQL's
//! raw sink, else the archive's), so a crash between publishing and that sink's commit
//! publishes the letter again with the same key (at least once), and never loses one.

use async_trait::async_trait;
use futures::FutureExt;
use primespark_schemas::flow::{RawBatch, SinkId};
use primespark_schemas::rows::PartitionOffset;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::FutureProducer;

use super::{
    create_topics, dlq_topic, producer, publish_dead_letters, DeadLetterMessage, KafkaError,
};
use crate::postgres::StoredState;
use crate::sink::registry::{Built, RawSinkKind, SinkContext, SinkSettings};
use crate::sink::{BoxRawSink, Classify, Domain, ErrorClass, Flush, Sink, SinkError, Target};

/// Its name in logs.
pub const NAME: &str = "dead_letter_topic";

/// The registry entry: wanted when `kafka.dead_letter_topics` is on (not for a backfill: the
/// archive holds no dead letters).
pub const DEAD_LETTER_TOPIC: RawSinkKind = RawSinkKind {
    name: NAME,
    wanted: |settings, scope| settings.kafka.dead_letter_topics && !scope.backfill,
    build: |settings, ctx, id| build(settings, ctx, id).boxed(),
};

async fn build(
    settings: &SinkSettings,
    ctx: &SinkContext,
    id: SinkId,
) -> Result<Built<BoxRawSink>, SinkError> {
    let dlq = dlq_topic(&ctx.topic);
    let partitions = i32::try_from(ctx.topic_partitions)
        .unwrap_or(i32::MAX)
        .max(1);
    let dlq_partitions = create_topics(&settings.kafka, &[(&dlq, partitions)])
        .await
        .map_err(Classify::into_sink_error)?
        .first()
        .copied()
        .unwrap_or(partitions);
    // The letters' store: PostgreSQL when enabled, else the archive's file.
    let follows = if settings.postgres.is_some() {
        crate::postgres::RAW_ROWS.name
    } else {
        crate::nas::RAW_ROLLS.name
    };
    let sink = DeadLetterTopicSink {
        id,
        topic: ctx.topic.clone(),
        producer: producer(&settings.kafka).map_err(Classify::into_sink_error)?,
        stored: ctx.stored.clone(),
        follows,
        dlq_partitions,
    };
    Ok((Box::new(sink), crate::sink::healthy()))
}

/// One worker's dead-letter topic publisher.
pub struct DeadLetterTopicSink {
    id: SinkId,
    topic: String,
    producer: FutureProducer,
    stored: std::sync::Arc<StoredState>,
    /// The sink whose positions this one resumes from.
    follows: &'static str,
    /// Partitions of the dead-letter topic.
    dlq_partitions: i32,
}

#[async_trait]
impl Sink for DeadLetterTopicSink {
    type Input = RawBatch;

    fn id(&self) -> SinkId {
        self.id
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn target(&self) -> Target<'static> {
        Target {
            sink: "kafka",
            table: "dead_letter_topic",
        }
    }

    fn resume(&self, partition: i32) -> Option<PartitionOffset> {
        self.stored.offset(self.follows, partition)
    }

    fn relays_letters(&self) -> bool {
        true
    }

    async fn recover(&mut self) -> Result<usize, SinkError> {
        // Repeats carry the same key; nothing to remove.
        Ok(0)
    }

    async fn write(&mut self, batch: &RawBatch) -> Result<(), SinkError> {
        let letters: Vec<DeadLetterMessage<'_>> = batch
            .letters_for(self.id)
            .map(|d| DeadLetterMessage {
                topic: &self.topic,
                partition: d.partition,
                offset: d.offset,
                reason: &d.reason,
                error: &d.error,
                payload: &d.payload,
            })
            .collect();
        if letters.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        match publish_dead_letters(&self.producer, &letters, self.dlq_partitions).await {
            Ok(()) => {
                crate::metrics::SinkRowsWritten {
                    sink: "kafka",
                    table: "dead_letter_topic",
                    rows: letters.len() as u64,
                    duration: started.elapsed(),
                }
                .emit();
                // Published; the sink the letters' offsets are stored by has not committed.
                crate::failpoint::hit("kafka.dlq_published")
            }
            Err(e) if too_large(&e) => {
                // The broker will never take it; the letter is still stored by its sink.
                tracing::error!(topic = %self.topic, error = %e, "a dead letter is too large for the dead-letter topic; it is stored but not published");
                Ok(())
            }
            Err(e) => Err(e.into_sink_error()),
        }
    }

    async fn commit(&mut self, _flush: Flush) -> Result<(), SinkError> {
        Ok(())
    }
}

fn too_large(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Client { source, .. }
        if source.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge))
}

impl Classify for KafkaError {
    fn class(&self) -> ErrorClass {
        use RDKafkaErrorCode as C;
        match self {
            KafkaError::Client { source, .. } => match source.rdkafka_error_code() {
                Some(
                    C::SaslAuthenticationFailed
                    | C::TopicAuthorizationFailed
                    | C::ClusterAuthorizationFailed
                    | C::Authentication
                    | C::InvalidConfig
                    | C::UnsupportedSASLMechanism,
                ) => ErrorClass::Fatal(Domain::User),
                _ => ErrorClass::Retry,
            },
            KafkaError::UnknownTopic(_) => ErrorClass::Fatal(Domain::External),
            KafkaError::Thread(_) => ErrorClass::Fatal(Domain::Internal),
            KafkaError::CreateTopic { code, .. } => match code {
                C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed => {
                    ErrorClass::Fatal(Domain::User)
                }
                _ => ErrorClass::Retry,
            },
        }
    }
}
