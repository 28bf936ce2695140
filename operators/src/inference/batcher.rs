//! Micro-batches: a batch closes when it holds `batch_size` items or when its first item has
//! waited `max_wait`, whichever comes first (the platform's engine batches 8).

use std::time::{Duration, Instant};

/// Collects items into batches, in arrival order.
#[derive(Debug)]
pub struct Batcher<T> {
    size: usize,
    max_wait: Duration,
    items: Vec<T>,
    opened: Option<Instant>,
}

impl<T> Batcher<T> {
    /// A batcher closing batches at `size` items (at least 1) or `max_wait` after the first.
    pub fn new(size: usize, max_wait: Duration) -> Self {
        let size = size.max(1);
        Self {
            size,
            max_wait,
            items: Vec::with_capacity(size),
            opened: None,
        }
    }

    /// Adds an item; returns the batch if it is now full.
    pub fn push(&mut self, item: T, now: Instant) -> Option<Vec<T>> {
        if self.items.is_empty() {
            self.opened = Some(now);
        }
        self.items.push(item);
        if self.items.len() >= self.size {
            self.take()
        } else {
            None
        }
    }

    /// The open batch if it has waited `max_wait` by `now`.
    pub fn poll(&mut self, now: Instant) -> Option<Vec<T>> {
        match self.deadline() {
            Some(d) if now >= d => self.take(),
            _ => None,
        }
    }

    /// The open batch, whatever its size or age (end of input, shutdown).
    pub fn flush(&mut self) -> Option<Vec<T>> {
        self.take()
    }

    /// When the open batch is due, if there is one.
    pub fn deadline(&self) -> Option<Instant> {
        self.opened.map(|o| o + self.max_wait)
    }

    /// Items waiting in the open batch.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether no batch is open.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn take(&mut self) -> Option<Vec<T>> {
        if self.items.is_empty() {
            return None;
        }
        self.opened = None;
        Some(std::mem::replace(
            &mut self.items,
            Vec::with_capacity(self.size),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        Push,
        Advance(u64),
        Flush,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => Just(Step::Push),
            3 => (0u64..5_000).prop_map(Step::Advance),
            1 => Just(Step::Flush),
        ]
    }

    proptest! {
        /// Whatever the interleaving of arrivals, clock and flushes, the concatenated batches
        /// are exactly the pushed items in order; no batch exceeds the size; none is empty;
        /// a batch only closes early by age.
        #[test]
        fn batches_never_reorder_drop_or_duplicate(
            size in 1usize..20,
            wait_us in 1u64..3_000,
            steps in proptest::collection::vec(step(), 0..400),
        ) {
            let start = Instant::now();
            let mut now = start;
            let mut b = Batcher::new(size, Duration::from_micros(wait_us));
            let mut next = 0u64;
            let mut out: Vec<u64> = Vec::new();
            let check = |batch: Vec<u64>, out: &mut Vec<u64>| {
                prop_assert!(!batch.is_empty());
                prop_assert!(batch.len() <= size);
                out.extend(batch);
                Ok(())
            };
            for s in steps {
                match s {
                    Step::Push => {
                        if let Some(batch) = b.push(next, now) {
                            prop_assert_eq!(batch.len(), size);
                            check(batch, &mut out)?;
                        }
                        next += 1;
                    }
                    Step::Advance(us) => {
                        now += Duration::from_micros(us);
                        let due = b.deadline().is_some_and(|d| now >= d);
                        match b.poll(now) {
                            Some(batch) => { prop_assert!(due); check(batch, &mut out)?; }
                            None => prop_assert!(!due || b.is_empty()),
                        }
                    }
                    Step::Flush => {
                        if let Some(batch) = b.flush() { check(batch, &mut out)?; }
                        prop_assert!(b.is_empty());
                    }
                }
            }
            if let Some(batch) = b.flush() { check(batch, &mut out)?; }
            prop_assert_eq!(out, (0..next).collect::<Vec<_>>());
        }
    }

    #[test]
    fn closes_by_age() {
        let t0 = Instant::now();
        let mut b = Batcher::new(8, Duration::from_millis(2));
        assert!(b.push(1, t0).is_none());
        assert!(b.poll(t0 + Duration::from_millis(1)).is_none());
        assert_eq!(b.poll(t0 + Duration::from_millis(2)), Some(vec![1]));
        assert_eq!(b.deadline(), None);
    }
}
