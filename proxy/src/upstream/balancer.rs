//! Smooth weighted round robin, precomputed: the schedule is built once per config and a pick is
//! one atomic increment and an index.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

/// Longest schedule we precompute; larger weight sums are scaled down to fit.
const MAX_SCHEDULE: u64 = 4096;

#[derive(Debug)]
pub struct RoundRobin {
    schedule: Box<[u32]>,
    position: Arc<AtomicUsize>,
}

impl RoundRobin {
    /// `position` is shared with the balancer this one replaces, so an update does not restart
    /// the rotation.
    pub fn new(weights: &[u32], position: Arc<AtomicUsize>) -> Self {
        RoundRobin {
            schedule: smooth_schedule(weights).into(),
            position,
        }
    }

    pub fn next(&self) -> Option<usize> {
        if self.schedule.is_empty() {
            return None;
        }
        let n = self.position.fetch_add(1, Ordering::Relaxed);
        Some(self.schedule[n % self.schedule.len()] as usize)
    }

    pub fn position(&self) -> Arc<AtomicUsize> {
        self.position.clone()
    }
}

/// nginx's smooth weighted round robin: each step every endpoint gains its weight, the richest is
/// picked and pays the total. Weights 5,1,1 give a,a,b,a,c,a,a rather than a,a,a,a,a,b,c.
fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    if total == 0 {
        return Vec::new();
    }
    // Scale large sums down, keeping every endpoint at least weight 1.
    let weights: Vec<i64> = if total > MAX_SCHEDULE {
        weights
            .iter()
            .map(|&w| ((u64::from(w) * MAX_SCHEDULE / total).max(1)) as i64)
            .collect()
    } else {
        weights.iter().map(|&w| i64::from(w)).collect()
    };
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += w;
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
            .expect("weights is not empty");
        current[best] -= total;
        schedule.push(best as u32);
    }
    schedule
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_spreads_heavy_endpoint() {
        assert_eq!(smooth_schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_schedule(&[1, 1, 1]), vec![0, 1, 2]);
        assert!(smooth_schedule(&[]).is_empty());
    }

    #[test]
    fn weights_are_exact_over_a_cycle() {
        let rr = RoundRobin::new(&[3, 1], Arc::new(AtomicUsize::new(0)));
        let mut counts = [0; 2];
        for _ in 0..400 {
            counts[rr.next().unwrap()] += 1;
        }
        assert_eq!(counts, [300, 100]);
    }

    #[test]
    fn large_weights_are_scaled() {
        let s = smooth_schedule(&[1_000_000, 1]);
        assert!(s.len() as u64 <= MAX_SCHEDULE + 1);
        assert!(s.contains(&1), "a small weight still gets picked");
    }
}
