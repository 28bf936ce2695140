//! The flags a worker's operators share: shutdown, pause, backpressure, and whether each
//! operator that holds data has handed all of it off.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Flags every operator of one worker's dataflow watches.
#[derive(Debug, Clone, Default)]
pub struct Control {
    /// Set when the process is shutting down: sources stop reading (keeping their
    /// capabilities), sinks hand off what they hold.
    pub shutdown: Arc<AtomicBool>,
    /// Set while the sources are paused (`run --paused`, until SIGUSR1): read nothing.
    pub paused: Arc<AtomicBool>,
    /// Set by this worker's raw sink when its writer cannot take more: stop reading.
    pub pressure: Rc<Cell<bool>>,
    /// Set by this worker's source while its last read found nothing more to read (it is at
    /// the end of what the broker holds, or it has no partitions): the sinks then hand off
    /// what they hold without waiting out their flush interval.
    pub caught_up: Rc<Cell<bool>>,
}

impl Control {
    /// A worker's flags around the process-wide shutdown and pause flags.
    pub fn new(shutdown: Arc<AtomicBool>, paused: Arc<AtomicBool>) -> Self {
        Self {
            shutdown,
            paused,
            pressure: Rc::default(),
            caught_up: Rc::default(),
        }
    }

    /// Whether a shutdown was requested.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }

    /// Whether the sources are paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// Whether the raw sink asked the source to wait.
    pub fn under_pressure(&self) -> bool {
        self.pressure.get()
    }

    /// Whether this worker's source read everything there was at its last read.
    pub fn is_caught_up(&self) -> bool {
        self.caught_up.get()
    }
}

/// Whether each operator that buffers data has handed it all off; the worker loop watches
/// them to know when a shutdown (or a finished backfill) has flushed everything.
#[derive(Debug, Clone)]
pub struct Drained {
    /// The raw sink handed off its buffer.
    pub raw: Rc<Cell<bool>>,
    /// The commit operator handed off its last checkpoint.
    pub aggregates: Rc<Cell<bool>>,
    /// The scoring operator holds no sample (true where there is none).
    pub scoring: Rc<Cell<bool>>,
}

impl Default for Drained {
    fn default() -> Self {
        Self {
            raw: Rc::default(),
            aggregates: Rc::default(),
            scoring: Rc::new(Cell::new(true)),
        }
    }
}

impl Drained {
    /// All done.
    pub fn all(&self) -> bool {
        self.raw.get() && self.aggregates.get() && self.scoring.get()
    }
}
