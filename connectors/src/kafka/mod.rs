//! Kafka: consumers with explicit partition assignment (no consumer-group join: Tansu's is slow
//! and we own offsets ourselves), producers, and topic creation.

mod client;
mod config;

pub use client::{
    create_topics, partition_ids, producer, reader, watch_paused_lag, KafkaError, PartitionReader,
};
pub use config::{KafkaConfig, StartFrom, TopicsConfig};
