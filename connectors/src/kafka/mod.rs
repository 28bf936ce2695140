//! Kafka: consumers with explicit partition assignment (no consumer-group join: Tansu's is slow
//! and we own offsets ourselves), the consumer group's positions for Kafka's lag tooling
//! ([`GroupOffsets`]), producers, and topic creation. Its sink: [`DEAD_LETTER_TOPIC`]
//! (`<topic>.dlq`).

mod client;
mod config;
mod dlq_sink;
mod group;

pub use client::{
    create_topics, dlq_topic, partition_ids, producer, publish_dead_letters, reader,
    watch_paused_lag, DeadLetterMessage, KafkaError, PartitionReader,
};
pub use config::{KafkaConfig, StartFrom, TopicsConfig};
pub use dlq_sink::{DeadLetterTopicSink, DEAD_LETTER_TOPIC};
pub use group::{GroupOffsets, COMMIT_INTERVAL};
