//! Shared names for the rows of a stream: a device's id and a metric's name occur in every
//! sample, so each thread keeps one `Arc<str>` per name and rows share it. A row then moves on
//! to the windows, the raw sinks and the Parquet roll by a reference count instead of two
//! string allocations per copy.
//!
//! The table is bounded: a stream with more distinct names than [`MAX_NAMES`] (or a producer
//! inventing a new one per event) empties it when full, and rows decoded after that get fresh
//! `Arc`s, so memory stays bounded and results do not change; only the sharing is lost.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::Arc;

/// Most names one thread keeps (device ids and metric names together).
pub const MAX_NAMES: usize = 1 << 16;

thread_local! {
    // foldhash rather than SipHash: a lookup per device id and metric name of every event. Its
    // seed is random per process, and the table is bounded, so chosen names cannot degrade it
    // for long.
    static NAMES: RefCell<HashSet<Arc<str>, foldhash::fast::RandomState>> =
        RefCell::new(HashSet::default());
}

/// The shared `Arc<str>` of `name` on this thread.
///
/// ```
/// let a = primespark_schemas::intern::name("pi-7");
/// let b = primespark_schemas::intern::name("pi-7");
/// assert!(std::sync::Arc::ptr_eq(&a, &b));
/// assert_eq!(&*a, "pi-7");
/// ```
pub fn name(name: &str) -> Arc<str> {
    NAMES.with(|names| {
        let mut names = names.borrow_mut();
        if let Some(known) = names.get(name) {
            return known.clone();
        }
        if names.len() >= MAX_NAMES {
            tracing::debug!(
                names = names.len(),
                "name table full: starting over (more distinct device ids and metric names than it keeps)"
            );
            names.clear();
        }
        let shared: Arc<str> = Arc::from(name);
        names.insert(shared.clone());
        shared
    })
}

/// Serde for a shared name as a plain string (`#[serde(with = "crate::intern::serde_name")]`):
/// reading one takes this thread's shared name, so rows that arrive from another process of a
/// cluster (or from the archive) share names as decoded ones do.
pub mod serde_name {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the name as a string.
    pub fn serialize<S: Serializer>(name: &Arc<str>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(name)
    }

    /// Reads a string into this thread's shared name.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Arc<str>, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Ok(super::name(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_and_stays_bounded() {
        let a = name("cpu_percent");
        assert!(Arc::ptr_eq(&a, &name("cpu_percent")));
        for i in 0..MAX_NAMES + 10 {
            let n = format!("device-{i}");
            assert_eq!(&*name(&n), n);
        }
        let size = NAMES.with(|n| n.borrow().len());
        assert!(size <= MAX_NAMES, "{size}");
        // Still right after the table started over.
        assert_eq!(&*name("cpu_percent"), "cpu_percent");
    }

    #[test]
    fn a_row_round_trips_through_serde() {
        let row = crate::rows::TelemetryRow {
            time_us: 1,
            device_id: name("pi-1"),
            metric_name: name("cpu_percent"),
            value: 2.5,
            partition: 0,
            offset: 9,
        };
        let text = serde_json::to_string(&row).unwrap();
        assert!(text.contains(r#""device_id":"pi-1""#), "{text}");
        let back: crate::rows::TelemetryRow = serde_json::from_str(&text).unwrap();
        assert_eq!(back, row);
        assert!(Arc::ptr_eq(&back.device_id, &row.device_id));
    }
}
