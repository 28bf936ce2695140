//! Failed authentications per client address, for both SQL endpoints: a token bucket per
//! address, one token taken per failure; an address with none left is refused before it is
//! authenticated again, until a token refills. Guessing a password or token from one address
//! then runs at the configured rate, whatever the attacker's bandwidth.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Failed authentications per address: `per_minute` tokens per address.
pub(crate) struct LoginLimiter {
    per_minute: u32,
    peers: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

/// Addresses remembered at most; full buckets are forgotten first.
const MAX_PEERS: usize = 10_000;

impl LoginLimiter {
    pub(crate) fn new(per_minute: u32) -> Self {
        Self {
            per_minute: per_minute.max(1),
            peers: Mutex::new(HashMap::new()),
        }
    }

    fn refill(&self, tokens: f64, at: Instant, now: Instant) -> f64 {
        let cap = f64::from(self.per_minute);
        (tokens + now.duration_since(at).as_secs_f64() * cap / 60.0).min(cap)
    }

    /// `Err(seconds)` while `peer` has no failure left.
    pub(crate) fn check(&self, peer: IpAddr) -> Result<(), u64> {
        let Ok(peers) = self.peers.lock() else {
            return Ok(());
        };
        let Some(&(tokens, at)) = peers.get(&peer) else {
            return Ok(());
        };
        let tokens = self.refill(tokens, at, Instant::now());
        if tokens >= 1.0 {
            Ok(())
        } else {
            let rate = f64::from(self.per_minute) / 60.0;
            Err(((1.0 - tokens) / rate).ceil().max(1.0) as u64)
        }
    }

    /// Counts one failed login of `peer`.
    pub(crate) fn failed(&self, peer: IpAddr) {
        let Ok(mut peers) = self.peers.lock() else {
            return;
        };
        let now = Instant::now();
        if peers.len() >= MAX_PEERS {
            let cap = f64::from(self.per_minute);
            peers.retain(|_, (t, at)| self.refill(*t, *at, now) < cap);
        }
        let cap = f64::from(self.per_minute);
        let entry = peers.entry(peer).or_insert((cap, now));
        entry.0 = (self.refill(entry.0, entry.1, now) - 1.0).max(0.0);
        entry.1 = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_limited_per_address_and_refill() {
        let limiter = LoginLimiter::new(3);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..3 {
            assert!(limiter.check(a).is_ok());
            limiter.failed(a);
        }
        let wait = limiter.check(a).unwrap_err();
        assert!((1..=20).contains(&wait), "{wait}");
        assert!(limiter.check(b).is_ok(), "another address is not limited");
        // A minute later a's bucket is full again.
        if let Ok(mut peers) = limiter.peers.lock() {
            let entry = peers.get_mut(&a).unwrap();
            entry.1 = entry
                .1
                .checked_sub(std::time::Duration::from_secs(60))
                .unwrap();
        }
        assert!(limiter.check(a).is_ok());
    }
}
