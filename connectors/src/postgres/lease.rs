//! The writer lease in PostgreSQL: at most one live writer per (dataflow, process id).
//!
//! `writer_leases` holds one row per (dataflow, process id) with the holder, its epoch and when
//! it last renewed (the database's clock, so no host clock decides a takeover). A process takes
//! every row of its dataflows in one transaction, with a new epoch from `writer_lease_epochs`,
//! when each row is free: never held, released by a clean shutdown, held by itself, not renewed
//! for the time to live (`postgres.lease_ttl`), or held by a process of this host that no longer
//! runs (a crash and restart here need not wait the time to live out). Otherwise it is a
//! standby and asks again.
//! The holder renews every quarter of the time to live; a renewal that finds another epoch means
//! the lease was taken over, and the process stops. What the epoch protects is in
//! [`crate::sink::fence`].

use std::time::Duration;

use tokio_postgres::Client;

use super::sink::stmt;
use super::PostgresError;
use crate::metrics::{WriterLeaseState, WriterLeaseStatus};
use crate::sink::fence::Fence;

/// Which lease a process asks for.
#[derive(Debug, Clone)]
pub struct LeaseSpec {
    /// The dataflows it runs.
    pub dataflows: Vec<String>,
    /// Its process id in the cluster.
    pub process_id: i32,
    /// `host:pid:instance`, shown to standbys and in logs.
    pub holder: String,
    /// How long a lease holds without renewal.
    pub ttl: Duration,
}

/// The answer to one [`try_acquire`].
#[derive(Debug)]
pub enum Attempt {
    /// Held: write under this fence. `predecessors` are the holders it took over from (not
    /// counting itself or a released lease).
    Held {
        /// The fence of the new epoch.
        fence: Fence,
        /// Who held the rows before, when they were taken over after expiring.
        predecessors: Vec<String>,
    },
    /// Another live holder has it.
    Standby {
        /// The dataflow whose row is held.
        dataflow: String,
        /// Its holder.
        holder: String,
        /// How long ago it renewed.
        renewed_ago: Duration,
    },
}

/// The holder name of this process: host, pid and instance tag.
pub fn holder_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    format!("{host}:{}", crate::nas::instance_tag())
}

/// Whether `holder` (`host:pid-tag`) is a process of this host that no longer runs: an earlier
/// run here that crashed (or this container's previous incarnation, with our own pid), whose
/// lease need not expire first. A frozen process still runs, and a holder elsewhere is never
/// judged from here.
fn dead_here(holder: &str, me: &str) -> bool {
    let (Some((host, tag)), Some((my_host, my_tag))) =
        (holder.rsplit_once(':'), me.rsplit_once(':'))
    else {
        return false;
    };
    if host != my_host || tag == my_tag {
        return false;
    }
    let (Some(pid), Some(my_pid)) = (tag.split('-').next(), my_tag.split('-').next()) else {
        return false;
    };
    if pid == my_pid {
        return true;
    }
    cfg!(target_os = "linux")
        && pid.bytes().all(|b| b.is_ascii_digit())
        && !std::path::Path::new("/proc").join(pid).exists()
}

/// One attempt to take the lease.
pub async fn try_acquire(client: &mut Client, spec: &LeaseSpec) -> Result<Attempt, PostgresError> {
    let ttl_s = spec.ttl.as_secs_f64();
    let tx = client
        .transaction()
        .await
        .map_err(stmt("beginning the lease transaction"))?;
    tx.execute(
        "INSERT INTO writer_leases (dataflow, process_id, epoch, holder, renewed_at)
         SELECT d, $2, 0, '', 'epoch'::timestamptz FROM unnest($1::text[]) AS d
         ON CONFLICT DO NOTHING",
        &[&spec.dataflows, &spec.process_id],
    )
    .await
    .map_err(stmt("creating lease rows"))?;
    let rows = tx
        .query(
            "SELECT dataflow, holder, extract(epoch FROM now() - renewed_at)::float8
             FROM writer_leases WHERE dataflow = ANY($1) AND process_id = $2
             ORDER BY dataflow FOR UPDATE",
            &[&spec.dataflows, &spec.process_id],
        )
        .await
        .map_err(stmt("reading lease rows"))?;
    let mut predecessors = Vec::new();
    for r in &rows {
        let (dataflow, holder, age): (String, String, f64) = (r.get(0), r.get(1), r.get(2));
        if holder.is_empty() || holder == spec.holder {
            continue;
        }
        if age < ttl_s && !dead_here(&holder, &spec.holder) {
            // Rolls back: nothing changed.
            return Ok(Attempt::Standby {
                dataflow,
                holder,
                renewed_ago: Duration::from_secs_f64(age.max(0.0)),
            });
        }
        if !predecessors.contains(&holder) {
            predecessors.push(holder);
        }
    }
    let epoch: i64 = tx
        .query_one("SELECT nextval('writer_lease_epochs')", &[])
        .await
        .map_err(stmt("taking an epoch"))?
        .get(0);
    tx.execute(
        "UPDATE writer_leases SET epoch = $3, holder = $4, renewed_at = now()
         WHERE dataflow = ANY($1) AND process_id = $2",
        &[&spec.dataflows, &spec.process_id, &epoch, &spec.holder],
    )
    .await
    .map_err(stmt("taking the lease"))?;
    tx.commit().await.map_err(stmt("committing the lease"))?;
    Ok(Attempt::Held {
        fence: Fence::held(epoch, spec.process_id, spec.ttl),
        predecessors,
    })
}

/// Renews the lease; `Ok(false)` when another epoch holds a row (taken over).
pub async fn renew(
    client: &Client,
    spec: &LeaseSpec,
    fence: &Fence,
) -> Result<bool, PostgresError> {
    let Some(epoch) = fence.epoch() else {
        return Ok(true);
    };
    let n = client
        .execute(
            "UPDATE writer_leases SET renewed_at = now()
             WHERE dataflow = ANY($1) AND process_id = $2 AND epoch = $3",
            &[&spec.dataflows, &spec.process_id, &epoch],
        )
        .await
        .map_err(stmt("renewing the lease"))?;
    Ok(n == spec.dataflows.len() as u64)
}

/// Gives the lease up at a clean shutdown, so a standby takes over at once.
pub async fn release(
    client: &Client,
    spec: &LeaseSpec,
    fence: &Fence,
) -> Result<(), PostgresError> {
    let Some(epoch) = fence.epoch() else {
        return Ok(());
    };
    client
        .execute(
            "UPDATE writer_leases SET holder = '', renewed_at = 'epoch'::timestamptz
             WHERE dataflow = ANY($1) AND process_id = $2 AND epoch = $3",
            &[&spec.dataflows, &spec.process_id, &epoch],
        )
        .await
        .map_err(stmt("releasing the lease"))?;
    Ok(())
}

/// Waits until the lease is held (`None`: `stop` said to give up first), reporting the standby
/// in the log, the metrics and `status` (for `/readyz`).
pub async fn acquire(
    url: &str,
    spec: &LeaseSpec,
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<Option<(Fence, Vec<String>)>, PostgresError> {
    let poll = (spec.ttl / 5).clamp(Duration::from_millis(200), Duration::from_secs(2));
    let mut client: Option<Client> = None;
    let mut logged: Option<String> = None;
    let waited = std::time::Instant::now();
    while !stop() {
        if client.as_ref().is_none_or(Client::is_closed) {
            client = Some(super::connect(url).await?);
        }
        let Some(c) = client.as_mut() else { continue };
        match try_acquire(c, spec).await {
            Ok(Attempt::Held {
                fence,
                predecessors,
            }) => {
                WriterLeaseStatus {
                    state: WriterLeaseState::Held,
                    epoch: fence.epoch().unwrap_or(0),
                    detail: format!("held by this process ({})", spec.holder),
                }
                .emit();
                tracing::info!(
                    epoch = fence.epoch(),
                    holder = %spec.holder,
                    predecessors = ?predecessors,
                    waited_ms = waited.elapsed().as_millis() as u64,
                    "writer lease taken"
                );
                return Ok(Some((fence, predecessors)));
            }
            Ok(Attempt::Standby {
                dataflow,
                holder,
                renewed_ago,
            }) => {
                let detail = format!(
                    "standby: the writer lease of {dataflow} (process {}) is held by {holder}, renewed {:.1}s ago",
                    spec.process_id,
                    renewed_ago.as_secs_f64()
                );
                if logged.as_deref() != Some(holder.as_str()) {
                    tracing::warn!(%dataflow, %holder, process_id = spec.process_id, "another instance writes this configuration: waiting as a standby");
                    logged = Some(holder);
                }
                WriterLeaseStatus {
                    state: WriterLeaseState::Standby,
                    epoch: 0,
                    detail,
                }
                .emit();
            }
            Err(e) => {
                tracing::warn!(error = %e, "taking the writer lease failed; retrying");
                client = None;
            }
        }
        tokio::time::sleep(poll).await;
    }
    Ok(None)
}

/// Renews the lease until `stop`, every quarter of its time to live; tells `lost` (and marks
/// the fence) when another instance took it over. Releases it when stopped cleanly.
pub async fn keep(
    url: String,
    spec: LeaseSpec,
    fence: Fence,
    stop: impl Fn() -> bool + Send,
    lost: impl FnOnce(String) + Send,
) {
    let every = spec.ttl / 4;
    let mut client: Option<Client> = None;
    loop {
        let deadline = std::time::Instant::now() + every;
        while std::time::Instant::now() < deadline && !stop() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if client.as_ref().is_none_or(Client::is_closed) {
            client = super::connect(&url).await.ok();
        }
        let Some(c) = client.as_ref() else {
            tracing::warn!("renewing the writer lease: PostgreSQL unreachable");
            continue;
        };
        if stop() {
            if let Err(e) = release(c, &spec, &fence).await {
                tracing::warn!(error = %e, "releasing the writer lease failed; a standby takes over when it expires");
            } else {
                tracing::info!(epoch = fence.epoch(), "writer lease released");
            }
            return;
        }
        match renew(c, &spec, &fence).await {
            Ok(true) => fence.renewed(),
            Ok(false) => {
                let why = format!(
                    "the writer lease (process {}, epoch {}) was taken over by another instance",
                    spec.process_id,
                    fence.epoch().unwrap_or(0)
                );
                fence.lose(why.clone());
                WriterLeaseStatus {
                    state: WriterLeaseState::Lost,
                    epoch: fence.epoch().unwrap_or(0),
                    detail: why.clone(),
                }
                .emit();
                lost(why);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "renewing the writer lease failed");
                client = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::dead_here;

    #[test]
    fn only_dead_processes_of_this_host_give_way_at_once() {
        let me = format!("h:{}-aa", std::process::id());
        // A pid that cannot run: the kernel's limit is far below.
        assert!(dead_here("h:999999999-bb", &me));
        // Our own pid with another tag: this container's previous incarnation.
        assert!(dead_here(&format!("h:{}-bb", std::process::id()), &me));
        // Alive (pid 1 always is), another host, or ourselves.
        assert!(!dead_here("h:1-bb", &me));
        assert!(!dead_here("other:999999999-bb", &me));
        assert!(!dead_here(&me, &me));
        assert!(!dead_here("garbage", &me));
    }
}
