//! Kafka: consumers with explicit partition assignment (no consumer-group join: Tansu's is slow
//! and we own offsets ourselves), producers, and topic creation.

mod client;
mod config;

pub use client::{
    create_topics, dlq_topic, partition_ids, producer, publish_dead_letters, reader,
    watch_paused_lag, DeadLetterMessage, KafkaError, PartitionReader,
};
pub use config::{KafkaConfig, StartFrom, TopicsConfig};
