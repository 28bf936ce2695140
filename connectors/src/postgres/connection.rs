//! A PostgreSQL client that reconnects after a failure, and the offset store of sinks whose
//! data lives outside PostgreSQL.

use primespark_schemas::rows::PartitionOffset;
use tokio_postgres::Client;

use super::{commit_offsets, connect, PostgresError};
use crate::sink::fence::Fence;
use crate::sink::{Classify, SinkError};

/// One connection, opened on first use and again after it broke.
pub struct Connection {
    url: String,
    client: Option<Client>,
}

impl Connection {
    /// A connection to `url` (never logged), not opened yet.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            client: None,
        }
    }

    /// The open client, connecting first if there is none or it closed.
    pub async fn client(&mut self) -> Result<&mut Client, PostgresError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(connect(&self.url).await?);
        }
        match self.client.as_mut() {
            Some(c) => Ok(c),
            None => unreachable!("client was just set"),
        }
    }

    /// Forgets the client: the next use reconnects (after a failure whose cause is unknown,
    /// the session may be in any state).
    pub fn reset(&mut self) {
        self.client = None;
    }
}

/// Where sinks that keep their data outside PostgreSQL (Parquet rolls, the dead-letter topic)
/// store their positions: `source_offsets`, after the data is durable.
pub struct OffsetStore {
    conn: Connection,
    dataflow: &'static str,
    topic: String,
    fence: Fence,
}

impl OffsetStore {
    /// The store of `dataflow` reading `topic`.
    pub fn new(url: &str, dataflow: &'static str, topic: &str) -> Self {
        Self {
            conn: Connection::new(url),
            dataflow,
            topic: topic.to_owned(),
            fence: Fence::unfenced(),
        }
    }

    /// Commits check the writer lease `fence` in their transaction.
    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.fence = fence;
        self
    }

    /// Stores `offsets` as `sink`'s positions (each only moves forward).
    pub async fn commit(
        &mut self,
        sink: &str,
        offsets: &[PartitionOffset],
    ) -> Result<(), SinkError> {
        if offsets.is_empty() {
            return Ok(());
        }
        let result = match self.conn.client().await {
            Ok(client) => {
                commit_offsets(
                    client,
                    self.dataflow,
                    sink,
                    &self.topic,
                    offsets,
                    &self.fence,
                )
                .await
            }
            Err(e) => Err(e),
        };
        result.map_err(|e| {
            self.conn.reset();
            e.into_sink_error()
        })
    }
}

/// The health check of a PostgreSQL sink: the server answers.
pub async fn ping(url: String) -> Result<(), SinkError> {
    let client = connect(&url).await.map_err(Classify::into_sink_error)?;
    client
        .simple_query("SELECT 1")
        .await
        .map(|_| ())
        .map_err(|source| {
            PostgresError::Statement {
                what: "health check",
                source,
            }
            .into_sink_error()
        })
}

impl super::StoredState {
    /// Every stored position of `sink`.
    pub fn offsets_of(&self, sink: &str) -> impl Iterator<Item = PartitionOffset> + '_ {
        self.offsets.get(sink).into_iter().flatten().copied()
    }
}
