//! The latest dead letters and anomalies this process saw, kept in two small rings for the
//! console: an operator asks "what was the last bad record, and why" without a database (the
//! demo has none) and without reading the dead-letter topic.
//!
//! Bounded in count and in bytes: a payload keeps at most [`PAYLOAD_PREVIEW_BYTES`], so a
//! producer sending only garbage costs [`CAPACITY`] small entries, not its traffic. Entries are
//! what the operators produced, before any sink stored them; the sinks' tables stay the record.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};

use serde::Serialize;

/// Entries kept per ring.
pub const CAPACITY: usize = 50;

/// Payload bytes kept per dead letter.
pub const PAYLOAD_PREVIEW_BYTES: usize = 512;

/// One dead letter, as the console shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecentDeadLetter {
    /// Wall clock when it was made, microseconds since the epoch.
    pub at_us: i64,
    /// Source topic.
    pub topic: String,
    /// Kafka partition.
    pub partition: i32,
    /// Kafka offset.
    pub offset: i64,
    /// Stable reason code.
    pub reason: String,
    /// The one-line error.
    pub error: String,
    /// The payload's first bytes, as UTF-8 with invalid bytes replaced.
    pub payload: String,
    /// The payload's full length in bytes.
    pub payload_bytes: usize,
}

/// One anomalous sample, as the console shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecentAnomaly {
    /// Wall clock when it was scored, microseconds since the epoch.
    pub at_us: i64,
    /// Event time of the sample, microseconds since the epoch.
    pub event_time_us: i64,
    /// Device.
    pub device_id: String,
    /// Model.
    pub model: String,
    /// Score.
    pub score: f32,
    /// The model's threshold.
    pub threshold: f32,
    /// Backend that scored it.
    pub backend: String,
    /// Kafka partition.
    pub partition: i32,
    /// Kafka offset.
    pub offset: i64,
}

#[derive(Default)]
struct Rings {
    dead_letters: VecDeque<RecentDeadLetter>,
    anomalies: VecDeque<RecentAnomaly>,
}

fn rings() -> &'static Mutex<Rings> {
    static R: OnceLock<Mutex<Rings>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Wall clock, microseconds since the epoch.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

fn push<T>(ring: &mut VecDeque<T>, item: T) {
    if ring.len() >= CAPACITY {
        ring.pop_front();
    }
    ring.push_back(item);
}

/// At most `max` bytes of `payload` as text, never splitting a UTF-8 sequence into two
/// replacement characters at the cut.
pub fn preview(payload: &[u8], max: usize) -> String {
    let cut = payload.len().min(max);
    let head = &payload[..cut];
    match std::str::from_utf8(head) {
        Ok(s) => s.to_owned(),
        Err(e) if e.error_len().is_none() && cut < payload.len() => {
            // The cut fell inside a character: drop its first bytes.
            String::from_utf8_lossy(&head[..e.valid_up_to()]).into_owned()
        }
        Err(_) => String::from_utf8_lossy(head).into_owned(),
    }
}

/// Keeps a dead letter (its payload cut to [`PAYLOAD_PREVIEW_BYTES`]).
pub fn record_dead_letter(
    topic: &str,
    partition: i32,
    offset: i64,
    reason: &str,
    error: &str,
    payload: &[u8],
) {
    let entry = RecentDeadLetter {
        at_us: now_us(),
        topic: topic.to_owned(),
        partition,
        offset,
        reason: reason.to_owned(),
        error: preview(error.as_bytes(), 4 * PAYLOAD_PREVIEW_BYTES),
        payload: preview(payload, PAYLOAD_PREVIEW_BYTES),
        payload_bytes: payload.len(),
    };
    if let Ok(mut r) = rings().lock() {
        push(&mut r.dead_letters, entry);
    }
}

/// Keeps an anomaly.
pub fn record_anomaly(entry: RecentAnomaly) {
    if let Ok(mut r) = rings().lock() {
        push(&mut r.anomalies, entry);
    }
}

/// The kept dead letters, newest first.
pub fn dead_letters() -> Vec<RecentDeadLetter> {
    rings()
        .lock()
        .map(|r| r.dead_letters.iter().rev().cloned().collect())
        .unwrap_or_default()
}

/// The kept anomalies, newest first.
pub fn anomalies() -> Vec<RecentAnomaly> {
    rings()
        .lock()
        .map(|r| r.anomalies.iter().rev().cloned().collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_are_bounded_and_newest_first() {
        for i in 0..(CAPACITY as i64 + 7) {
            record_dead_letter("t", 1, i, "malformed_json", "bad", &[b'x'; 2000]);
        }
        let kept = dead_letters();
        assert_eq!(kept.len(), CAPACITY);
        assert_eq!(kept[0].offset, CAPACITY as i64 + 6);
        assert_eq!(kept[CAPACITY - 1].offset, 7);
        assert_eq!(kept[0].payload.len(), PAYLOAD_PREVIEW_BYTES);
        assert_eq!(kept[0].payload_bytes, 2000);
    }

    #[test]
    fn previews_never_split_a_character_or_keep_invalid_bytes() {
        // "é" is two bytes; a cut after its first byte drops it whole.
        assert_eq!(preview("aé".as_bytes(), 2), "a");
        assert_eq!(preview("aé".as_bytes(), 3), "aé");
        assert_eq!(preview(&[b'a', 0xff, b'b'], 10), "a\u{fffd}b");
        assert_eq!(preview(b"", 10), "");
    }
}
