//! `[kafka]` configuration.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::InvalidConfig;

/// Where a partition with no stored offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// The oldest retained record.
    #[default]
    Earliest,
    /// Only records published after start-up.
    Latest,
}

/// Topic names of the three streams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    /// Device telemetry. Default `edge.telemetry`.
    pub telemetry: String,
    /// AI inference events. Default `edge.ai.inference`.
    pub inference: String,
    /// Task and API events. Default `analytics.events`.
    pub events: String,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        use primespark_schemas::streams::StreamKind;
        Self {
            telemetry: StreamKind::Telemetry.def().default_topic.into(),
            inference: StreamKind::Inference.def().default_topic.into(),
            events: StreamKind::Analytics.def().default_topic.into(),
        }
    }
}

impl TopicsConfig {
    /// The topic of `kind` (its key in this section is the stream's `topic_key`).
    pub fn of(&self, kind: primespark_schemas::streams::StreamKind) -> &str {
        use primespark_schemas::streams::StreamKind;
        match kind {
            StreamKind::Telemetry => &self.telemetry,
            StreamKind::Inference => &self.inference,
            StreamKind::Analytics => &self.events,
        }
    }
}

/// `[kafka]`: the broker and topics.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated `host:port`. Default `127.0.0.1:9092`.
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Topic names.
    #[serde(default)]
    pub topics: TopicsConfig,
    /// Start of partitions with no stored offset: `earliest` (default) or `latest`.
    #[serde(default)]
    pub start: StartFrom,
    /// Timeout of metadata requests at start-up, in milliseconds. Default 10000.
    #[serde(default = "default_metadata_timeout_ms")]
    pub metadata_timeout_ms: u64,
    /// Extra librdkafka properties (e.g. `security.protocol`), passed through unchanged.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Also publish every dead letter to `<topic>.dlq` (created at start-up, same partition
    /// as the record, original bytes, reason and position in headers). Default true.
    #[serde(default = "default_true")]
    pub dead_letter_topics: bool,
    /// The consumer group whose offsets show the pipeline's progress to Kafka's tooling
    /// (kafka-consumer-groups, kafka-exporter, Burrow). Default `primespark`; give each
    /// pipeline on one cluster its own.
    #[serde(default = "default_group")]
    pub consumer_group: String,
    /// Commit the sinks' positions to `consumer_group` after they commit (monitoring only:
    /// resume positions stay with the data). Default true.
    #[serde(default = "default_true")]
    pub commit_group_offsets: bool,
    /// How often a running pipeline asks the broker for each topic's partitions and ends: a
    /// partition added since start-up, or a partition whose end went backwards (the topic was
    /// deleted and recreated), makes the dataflows drain, commit and start again on the new
    /// layout within this time, without a restart of the process. Default `30s`; `0s` turns it
    /// off (then only a restart reads an added partition).
    #[serde(
        default = "default_partition_discovery",
        with = "crate::config::duration"
    )]
    pub partition_discovery_interval: std::time::Duration,
    /// Most bytes one fetch response may carry (librdkafka's `fetch.max.bytes`; a larger
    /// single record still arrives, alone). With the local queue below, this bounds what each
    /// reader holds while catching up a backlog. A response is compressed: what it holds in
    /// memory is about ten times this for small JSON events, plus librdkafka's ~200 bytes per
    /// record, and a broker that ignores per-partition limits (Tansu 0.6) sends about this
    /// much per partition. Default 1048576 (1 MiB: peak RSS catching up 1M events measured
    /// 290 MB against 440 MB with 4 MiB, README "Speed"). Below 1,000,000 the reader lowers
    /// `message.max.bytes` with it, which librdkafka requires.
    #[serde(default = "default_fetch_max_bytes")]
    pub fetch_max_bytes: usize,
    /// Most kilobytes of fetched records a reader queues before the pipeline takes them
    /// (`queued.max.messages.kbytes`). Default 1024 (1 MiB).
    #[serde(default = "default_queue_max_kbytes")]
    pub queue_max_kbytes: usize,
}

fn default_fetch_max_bytes() -> usize {
    1 << 20
}

fn default_queue_max_kbytes() -> usize {
    1024
}

fn default_partition_discovery() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}

fn default_group() -> String {
    "primespark".into()
}

fn default_true() -> bool {
    true
}

fn default_brokers() -> String {
    "127.0.0.1:9092".into()
}

fn default_metadata_timeout_ms() -> u64 {
    10_000
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: default_brokers(),
            topics: TopicsConfig::default(),
            start: StartFrom::default(),
            metadata_timeout_ms: default_metadata_timeout_ms(),
            properties: BTreeMap::new(),
            dead_letter_topics: true,
            consumer_group: default_group(),
            commit_group_offsets: true,
            partition_discovery_interval: default_partition_discovery(),
            fetch_max_bytes: default_fetch_max_bytes(),
            queue_max_kbytes: default_queue_max_kbytes(),
        }
    }
}

/// Whether librdkafka property `key` holds a secret (passwords, private keys, OAuth
/// secrets): shown as `***` wherever the configuration is printed.
pub fn is_secret_property(key: &str) -> bool {
    key.contains("password")
        || key.contains("secret")
        || key == "ssl.key.pem"
        || key == "sasl.oauthbearer.config"
}

// Properties may hold `sasl.password` and private keys.
impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_property(k) {
                    "***"
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topics", &self.topics)
            .field("start", &self.start)
            .field("metadata_timeout_ms", &self.metadata_timeout_ms)
            .field("properties", &properties)
            .field("dead_letter_topics", &self.dead_letter_topics)
            .field("consumer_group", &self.consumer_group)
            .field(
                "partition_discovery_interval",
                &self.partition_discovery_interval,
            )
            .field("fetch_max_bytes", &self.fetch_max_bytes)
            .field("queue_max_kbytes", &self.queue_max_kbytes)
            .finish()
    }
}

/// The SASL mechanisms this build of librdkafka speaks (SCRAM needs its OpenSSL, which the
/// `ssl` feature brings; GSSAPI needs Kerberos through cyrus-sasl, which is left out).
const SASL_MECHANISMS: [&str; 4] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"];

impl KafkaConfig {
    /// Pure validation.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if self.brokers.trim().is_empty() {
            return Err(InvalidConfig::new(
                "kafka.brokers",
                "must list at least one host:port",
            ));
        }
        for b in self.brokers.split(',') {
            let b = b.trim();
            let ok = b
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(InvalidConfig::new(
                    "kafka.brokers",
                    format!("\"{b}\" is not host:port"),
                ));
            }
        }
        if !(64 << 10..=1 << 30).contains(&self.fetch_max_bytes) {
            return Err(InvalidConfig::new(
                "kafka.fetch_max_bytes",
                format!(
                    "{} is outside 65536..=1073741824 (bytes per fetch response)",
                    self.fetch_max_bytes
                ),
            ));
        }
        if !(64..=2_097_151).contains(&self.queue_max_kbytes) {
            return Err(InvalidConfig::new(
                "kafka.queue_max_kbytes",
                format!(
                    "{} is outside 64..=2097151 (kilobytes of queued records)",
                    self.queue_max_kbytes
                ),
            ));
        }
        for (key, topic) in [
            ("kafka.topics.telemetry", &self.topics.telemetry),
            ("kafka.topics.inference", &self.topics.inference),
            ("kafka.topics.events", &self.topics.events),
        ] {
            let valid = !topic.is_empty()
                && topic.len() <= 249
                && topic
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !valid {
                return Err(InvalidConfig::new(
                    key,
                    format!("\"{topic}\" is not a valid Kafka topic name"),
                ));
            }
        }
        // Kafka's group ids are strings of any length; tools and ACLs choke on blanks and
        // control characters, and the broker caps request sizes.
        if self.consumer_group.trim().is_empty()
            || self.consumer_group.len() > 255
            || self.consumer_group.chars().any(char::is_control)
        {
            return Err(InvalidConfig::new(
                "kafka.consumer_group",
                "must be 1 to 255 characters, not blank, without control characters",
            ));
        }
        let discovery = self.partition_discovery_interval;
        if !discovery.is_zero() && discovery < std::time::Duration::from_secs(1) {
            return Err(InvalidConfig::new(
                "kafka.partition_discovery_interval",
                "must be 0s (off) or at least 1s (each check asks the broker for every partition's ends)",
            ));
        }
        if self.metadata_timeout_ms == 0 {
            return Err(InvalidConfig::new(
                "kafka.metadata_timeout_ms",
                "must be positive",
            ));
        }
        if let Some(protocol) = self.properties.get("security.protocol") {
            let known = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];
            if !known.contains(&protocol.to_ascii_lowercase().as_str()) {
                return Err(InvalidConfig::new(
                    "kafka.properties.security.protocol",
                    format!(
                        "\"{protocol}\" is not one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"
                    ),
                ));
            }
        }
        for key in ["sasl.mechanism", "sasl.mechanisms"] {
            let Some(mechanism) = self.properties.get(key) else {
                continue;
            };
            if !SASL_MECHANISMS.contains(&mechanism.to_ascii_uppercase().as_str()) {
                let why = if mechanism.eq_ignore_ascii_case("GSSAPI") {
                    "GSSAPI (Kerberos) is not in this build; use SCRAM-SHA-512, SCRAM-SHA-256, PLAIN (over SSL) or OAUTHBEARER".to_owned()
                } else {
                    format!(
                        "\"{mechanism}\" is not one of {}",
                        SASL_MECHANISMS.join(", ")
                    )
                };
                return Err(InvalidConfig::new(format!("kafka.properties.{key}"), why));
            }
        }
        // Positions live with the sinks' data: the reader must neither store nor reset them.
        for key in [
            "bootstrap.servers",
            "enable.auto.commit",
            "group.id",
            "enable.auto.offset.store",
            "auto.offset.reset",
        ] {
            if self.properties.contains_key(key) {
                return Err(InvalidConfig::new(
                    format!("kafka.properties.{key}"),
                    "is managed by primespark and cannot be overridden",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let c: KafkaConfig = toml::from_str(
            "brokers = \"a:1,b:2\"\nstart = \"latest\"\n[topics]\ntelemetry = \"t\"",
        )
        .unwrap();
        assert_eq!(c.start, StartFrom::Latest);
        assert_eq!(c.topics.telemetry, "t");
        assert_eq!(c.topics.events, "analytics.events");
        c.validate().unwrap();
        let bad = KafkaConfig {
            brokers: "nohost".into(),
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().key, "kafka.brokers");
        assert!(toml::from_str::<KafkaConfig>("brokrs = \"a:1\"").is_err());
        assert_eq!(c.consumer_group, "primespark");
        assert!(c.commit_group_offsets);
        for group in ["", "  ", "a\nb", &"g".repeat(256)] {
            let bad = KafkaConfig {
                consumer_group: group.to_owned(),
                ..Default::default()
            };
            assert_eq!(
                bad.validate().unwrap_err().key,
                "kafka.consumer_group",
                "{group:?}"
            );
        }
    }

    #[test]
    fn secret_properties_never_print() {
        let mut c = KafkaConfig::default();
        c.properties.insert("sasl.username".into(), "reader".into());
        c.properties
            .insert("sasl.password".into(), "hunter2-kafka".into());
        c.properties
            .insert("ssl.key.password".into(), "hunter3-key".into());
        let shown = format!("{c:?}");
        assert!(shown.contains("reader") && shown.contains("***"), "{shown}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("hunter3"),
            "{shown}"
        );
    }

    #[test]
    fn protocols_and_mechanisms_are_checked_by_name() {
        let with = |k: &str, v: &str| {
            let mut c = KafkaConfig::default();
            c.properties.insert(k.into(), v.into());
            c.validate()
        };
        assert!(with("security.protocol", "SASL_SSL").is_ok());
        assert!(with("security.protocol", "ssl").is_ok());
        let e = with("security.protocol", "TLS").unwrap_err();
        assert_eq!(e.key, "kafka.properties.security.protocol");
        for m in ["PLAIN", "SCRAM-SHA-256", "scram-sha-512", "OAUTHBEARER"] {
            assert!(with("sasl.mechanism", m).is_ok(), "{m}");
        }
        let e = with("sasl.mechanisms", "GSSAPI").unwrap_err();
        assert_eq!(e.key, "kafka.properties.sasl.mechanisms");
        assert!(e.to_string().contains("Kerberos"), "{e}");
    }

    /// librdkafka refuses at creation what its build lacks ("libzstd not available at build
    /// time", "No provider for SASL mechanism"): these clients are created, so the build has
    /// SSL, SASL SCRAM and PLAIN, and zstd.
    #[test]
    fn the_build_speaks_sasl_ssl_and_zstd() {
        use rdkafka::consumer::BaseConsumer;
        use rdkafka::producer::BaseProducer;
        for mechanism in ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] {
            let mut c = KafkaConfig {
                brokers: "127.0.0.1:1".into(),
                ..KafkaConfig::default()
            };
            for (k, v) in [
                ("security.protocol", "SASL_SSL"),
                ("sasl.mechanism", mechanism),
                ("sasl.username", "u"),
                ("sasl.password", "p"),
            ] {
                c.properties.insert(k.into(), v.into());
            }
            c.validate().unwrap();
            let consumer: Result<BaseConsumer, _> = super::super::client::base_config(&c)
                .set("group.id", "g")
                .create();
            assert!(consumer.is_ok(), "{mechanism}: {:?}", consumer.err());
        }
        let producer: Result<BaseProducer, _> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("compression.type", "zstd")
            .create();
        assert!(producer.is_ok(), "{:?}", producer.err());
    }

    #[test]
    fn catch_up_bounds_are_checked() {
        let c: KafkaConfig =
            toml::from_str("fetch_max_bytes = 4194304\nqueue_max_kbytes = 2048").unwrap();
        assert_eq!((c.fetch_max_bytes, c.queue_max_kbytes), (4 << 20, 2048));
        c.validate().unwrap();
        let d = KafkaConfig::default();
        assert_eq!((d.fetch_max_bytes, d.queue_max_kbytes), (1 << 20, 1024));
        for (fetch, queue, key) in [
            (1024, 4096, "kafka.fetch_max_bytes"),
            (2 << 30, 4096, "kafka.fetch_max_bytes"),
            (4 << 20, 1, "kafka.queue_max_kbytes"),
        ] {
            let bad = KafkaConfig {
                fetch_max_bytes: fetch,
                queue_max_kbytes: queue,
                ..Default::default()
            };
            assert_eq!(bad.validate().unwrap_err().key, key);
        }
    }

    #[test]
    fn the_smallest_fetch_bound_makes_a_reader() {
        // librdkafka refuses `fetch.max.bytes` below `message.max.bytes` unless the reader
        // lowers the latter with it.
        for fetch in [64 << 10, 999_999, 1_000_000, 1 << 30] {
            let cfg = KafkaConfig {
                brokers: "127.0.0.1:1".into(),
                fetch_max_bytes: fetch,
                ..Default::default()
            };
            cfg.validate().unwrap();
            let made = crate::kafka::reader(&cfg, "t", "test");
            assert!(made.is_ok(), "fetch_max_bytes {fetch}: {:?}", made.err());
        }
    }
}
