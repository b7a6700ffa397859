//! Consistent hashing: a Ketama-style ring and a Maglev table, both weighted, and the stable hash
//! they use (so every proxy maps a key to the same endpoint).

use std::net::SocketAddr;

/// FNV-1a followed by a 64-bit finaliser (MurmurHash3's fmix64): stable across builds and
/// processes, unlike `std`'s randomly keyed hasher.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Points on the ring, sorted by hash; each names an endpoint index.
#[derive(Debug)]
pub struct Ring {
    points: Box<[(u64, u32)]>,
    /// Virtual nodes per unit of weight.
    per_weight: u64,
}

impl Ring {
    /// Each endpoint gets `per_weight × weight` virtual nodes, so at least `min_size` in all.
    ///
    /// `previous` is the density of the ring this one replaces. Keeping it while the ring stays
    /// between half and four times `min_size` means an added endpoint only adds points and takes
    /// about 1/(N+1) of the keys; recomputing the density on every change would also move points
    /// of the endpoints that stayed.
    pub fn build(endpoints: &[(SocketAddr, u32)], min_size: u32, previous: Option<u64>) -> Ring {
        let total: u64 = endpoints.iter().map(|(_, w)| u64::from(*w)).sum();
        if total == 0 {
            return Ring {
                points: Box::new([]),
                per_weight: previous.unwrap_or(1),
            };
        }
        let min_size = u64::from(min_size);
        let per_weight = match previous {
            Some(p) if total * p >= min_size / 2 && total * p <= min_size * 4 => p,
            _ => min_size.div_ceil(total).max(1),
        };
        let mut points = Vec::with_capacity((total * per_weight) as usize);
        for (i, (addr, w)) in endpoints.iter().enumerate() {
            for r in 0..u64::from(*w) * per_weight {
                let h = hash64(format!("{addr}_{r}").as_bytes());
                points.push((h, i as u32));
            }
        }
        points.sort_unstable();
        Ring {
            points: points.into(),
            per_weight,
        }
    }

    pub fn per_weight(&self) -> u64 {
        self.per_weight
    }

    /// Indices clockwise from the key's point: the first is the owner, then the fallbacks.
    pub fn walk(&self, key: u64) -> impl Iterator<Item = usize> + '_ {
        let start = self.points.partition_point(|(h, _)| *h < key);
        let n = self.points.len();
        (0..n).map(move |i| self.points[(start + i) % n].1 as usize)
    }
}

/// A Maglev lookup table (Eisenbud et al., NSDI 2016), weighted by letting each endpoint fill
/// slots in proportion to its weight.
#[derive(Debug)]
pub struct Maglev {
    table: Box<[u32]>,
}

impl Maglev {
    /// `size` must be prime (validated with the config).
    pub fn build(endpoints: &[(SocketAddr, u32)], size: u32) -> Maglev {
        let m = size as u64;
        if endpoints.is_empty() || m == 0 {
            return Maglev {
                table: Box::new([]),
            };
        }
        let max_weight = endpoints.iter().map(|(_, w)| *w).max().unwrap_or(1).max(1) as f64;
        let perms: Vec<(u64, u64)> = endpoints
            .iter()
            .map(|(addr, _)| {
                let name = addr.to_string();
                let offset = hash64(name.as_bytes()) % m;
                let skip = hash64(format!("{name}#skip").as_bytes()) % (m - 1).max(1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; endpoints.len()];
        let mut credit = vec![0f64; endpoints.len()];
        let mut table = vec![u32::MAX; m as usize];
        let mut filled = 0u64;
        'fill: loop {
            for (i, (offset, skip)) in perms.iter().enumerate() {
                credit[i] += f64::from(endpoints[i].1) / max_weight;
                while credit[i] >= 1.0 {
                    credit[i] -= 1.0;
                    // Next free slot in this endpoint's permutation.
                    let mut slot = (offset + next[i] * skip) % m;
                    while table[slot as usize] != u32::MAX {
                        next[i] += 1;
                        slot = (offset + next[i] * skip) % m;
                    }
                    table[slot as usize] = i as u32;
                    next[i] += 1;
                    filled += 1;
                    if filled == m {
                        break 'fill;
                    }
                }
            }
        }
        Maglev {
            table: table.into(),
        }
    }

    /// The owner first, then the following slots' endpoints as fallbacks.
    pub fn walk(&self, key: u64) -> impl Iterator<Item = usize> + '_ {
        let n = self.table.len();
        let start = if n == 0 { 0 } else { (key % n as u64) as usize };
        (0..n).map(move |i| self.table[(start + i) % n] as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: u16) -> Vec<(SocketAddr, u32)> {
        (0..n)
            .map(|i| {
                (
                    SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8], 8080)),
                    1,
                )
            })
            .collect()
    }

    /// Share of 10,000 keys whose owner changes when one endpoint is added to `n`.
    /// `table` builds a lookup (endpoint list → key → owner index) once per endpoint set.
    fn moved_share<T>(
        n: u16,
        table: impl Fn(&[(SocketAddr, u32)]) -> T,
        owner: impl Fn(&T, u64) -> usize,
    ) -> f64 {
        let before = endpoints(n);
        let after = endpoints(n + 1);
        let (tb, ta) = (table(&before), table(&after));
        let keys = 10_000u64;
        let moved = (0..keys)
            .filter(|k| {
                let h = hash64(&k.to_le_bytes());
                before[owner(&tb, h)].0 != after[owner(&ta, h)].0
            })
            .count();
        moved as f64 / keys as f64
    }

    #[test]
    fn ring_moves_about_one_nth_of_keys() {
        for n in [5u16, 10, 20] {
            // The ring after the change keeps the density of the one before, as a config update
            // does.
            let density = Ring::build(&endpoints(n), 4096, None).per_weight();
            let share = moved_share(
                n,
                |eps| Ring::build(eps, 4096, Some(density)),
                |r, h| r.walk(h).next().unwrap(),
            );
            println!(
                "ring hash: adding 1 endpoint to {n} moved {:.2}% of keys",
                share * 100.0
            );
            assert!(share <= 1.5 / f64::from(n), "ring n={n}: moved {share}");
            assert!(share > 0.0);
        }
    }

    #[test]
    fn maglev_moves_about_one_nth_of_keys() {
        for n in [5u16, 10, 20] {
            let share = moved_share(
                n,
                |eps| Maglev::build(eps, 65537),
                |m, h| m.walk(h).next().unwrap(),
            );
            println!(
                "maglev: adding 1 endpoint to {n} moved {:.2}% of keys",
                share * 100.0
            );
            assert!(share <= 1.5 / f64::from(n), "maglev n={n}: moved {share}");
            assert!(share > 0.0);
        }
    }

    #[test]
    fn maglev_respects_weights() {
        let mut eps = endpoints(2);
        eps[0].1 = 3;
        let t = Maglev::build(&eps, 10007);
        let zero = t.table.iter().filter(|&&i| i == 0).count() as f64;
        let share = zero / t.table.len() as f64;
        assert!((0.72..0.78).contains(&share), "{share}");
        assert!(t.table.iter().all(|&i| i < 2));
    }

    #[test]
    fn ring_respects_weights() {
        let mut eps = endpoints(2);
        eps[0].1 = 3;
        let ring = Ring::build(&eps, 4096, None);
        let owned = (0..20_000u64)
            .filter(|k| ring.walk(hash64(&k.to_le_bytes())).next() == Some(0))
            .count() as f64
            / 20_000.0;
        assert!((0.70..0.80).contains(&owned), "{owned}");
    }

    #[test]
    fn hash_is_stable() {
        assert_eq!(hash64(b"trellis"), hash64(b"trellis"));
        assert_ne!(hash64(b"a"), hash64(b"b"));
    }
}
