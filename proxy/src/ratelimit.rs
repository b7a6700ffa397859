//! Local rate limiting: token buckets, refilled in whole fills as time passes.

use std::{
    sync::{Mutex, PoisonError},
    time::Instant,
};

use crate::config::model::TokenBucket;

/// One bucket's state. Shared by every connection that draws from it; kept across config updates
/// while its settings stay the same.
#[derive(Debug)]
pub struct RateLimiter {
    settings: TokenBucket,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens: u32,
    last_fill: Instant,
}

impl RateLimiter {
    /// A full bucket.
    pub fn new(settings: TokenBucket) -> Self {
        RateLimiter {
            state: Mutex::new(State {
                tokens: settings.max_tokens,
                last_fill: Instant::now(),
            }),
            settings,
        }
    }

    pub fn settings(&self) -> &TokenBucket {
        &self.settings
    }

    /// Takes a token if there is one.
    pub fn try_acquire(&self) -> bool {
        self.try_acquire_at(Instant::now())
    }

    fn try_acquire_at(&self, now: Instant) -> bool {
        let s = &self.settings;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let elapsed = now.saturating_duration_since(state.last_fill);
        let fills = elapsed.as_nanos() / s.fill_interval.as_nanos().max(1);
        if fills > 0 {
            let added = fills.saturating_mul(u128::from(s.tokens_per_fill));
            state.tokens = (u128::from(state.tokens) + added).min(u128::from(s.max_tokens)) as u32;
            // Whole fills only, so the remainder counts towards the next one.
            state.last_fill += s.fill_interval * fills.min(u128::from(u32::MAX)) as u32;
        }
        if state.tokens == 0 {
            return false;
        }
        state.tokens -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn burst_then_refill() {
        let l = RateLimiter::new(TokenBucket {
            max_tokens: 3,
            tokens_per_fill: 2,
            fill_interval: Duration::from_secs(1),
        });
        let t0 = l.state.lock().unwrap().last_fill;
        assert!((0..3).all(|_| l.try_acquire_at(t0)));
        assert!(!l.try_acquire_at(t0 + Duration::from_millis(999)));
        let t1 = t0 + Duration::from_millis(1500);
        assert!(l.try_acquire_at(t1));
        assert!(l.try_acquire_at(t1));
        assert!(!l.try_acquire_at(t1), "one fill gives two tokens");
        // A long pause fills the bucket to its size, not beyond.
        let t2 = t0 + Duration::from_secs(100);
        assert_eq!((0..10).filter(|_| l.try_acquire_at(t2)).count(), 3);
    }
}
