//! The metrics registry: a `metrics::Recorder` whose handles are plain atomics, and the Prometheus
//! text rendering of everything registered.
//!
//! We keep our own recorder rather than `metrics-exporter-prometheus` because its histograms queue
//! every sample in an `AtomicBucket` (a heap block per 64 samples, drained by an upkeep task);
//! ours count into fixed buckets, so recording is a few relaxed atomic adds and never allocates.
//! The registry's lock is taken only to register a series (at config-compile time) and to render.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};

/// Upper bounds, in seconds, of the duration histograms' buckets (`+Inf` is implied).
pub const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Label pairs in registration order.
type Labels = Vec<(SharedString, SharedString)>;

#[derive(Debug, Default)]
pub struct Registry {
    families: Mutex<BTreeMap<String, Family>>,
}

#[derive(Debug)]
struct Family {
    help: Option<SharedString>,
    kind: Kind,
    series: BTreeMap<Labels, Series>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug)]
enum Series {
    /// A counter's count, or a gauge's `f64` bits.
    Value(Arc<AtomicU64>),
    Histogram(Arc<FixedHistogram>),
}

/// A histogram over [`DURATION_BUCKETS`]: per-bucket counts (not cumulative) and the sum.
#[derive(Debug)]
pub struct FixedHistogram {
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_bits: AtomicU64,
}

impl Default for FixedHistogram {
    fn default() -> Self {
        FixedHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }
}

impl HistogramFn for FixedHistogram {
    fn record(&self, value: f64) {
        let i = DURATION_BUCKETS
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some((f64::from_bits(s) + value).to_bits())
            });
    }
}

impl Registry {
    fn register(&self, key: &Key, kind: Kind) -> Option<Series> {
        let labels: Labels = key
            .labels()
            .map(|l| {
                (
                    SharedString::from(l.key().to_owned()),
                    SharedString::from(l.value().to_owned()),
                )
            })
            .collect();
        let mut families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        let family = families
            .entry(key.name().to_owned())
            .or_insert_with(|| Family {
                help: None,
                kind,
                series: BTreeMap::new(),
            });
        if family.kind != kind {
            // A name registered as two kinds is a programming error; the second kind records
            // nowhere rather than corrupting the first.
            tracing::error!(
                name = key.name(),
                "metric registered with two different kinds"
            );
            return None;
        }
        let series = family.series.entry(labels).or_insert_with(|| match kind {
            Kind::Histogram => Series::Histogram(Arc::default()),
            Kind::Counter | Kind::Gauge => Series::Value(Arc::new(AtomicU64::new(0))),
        });
        Some(match series {
            Series::Value(v) => Series::Value(v.clone()),
            Series::Histogram(h) => Series::Histogram(h.clone()),
        })
    }

    fn describe(&self, key: KeyName, kind: Kind, help: SharedString) {
        let mut families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        let family = families
            .entry(key.as_str().to_owned())
            .or_insert_with(|| Family {
                help: None,
                kind,
                series: BTreeMap::new(),
            });
        family.help = Some(help);
    }

    /// Drops the series of `families` for which `keep` says no, given their label pairs. A handle
    /// still held elsewhere keeps counting into its own atomics, unseen; a later registration
    /// of the same key starts a new series. Used when a configuration no longer holds the route
    /// or cluster a series is about, so series do not pile up under churn.
    pub fn retain(&self, families: &[&str], mut keep: impl FnMut(&[(&str, &str)]) -> bool) {
        let mut all = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        for name in families {
            let Some(family) = all.get_mut(*name) else {
                continue;
            };
            family.series.retain(|labels, _| {
                let pairs: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (&**k, &**v)).collect();
                keep(&pairs)
            });
        }
    }

    /// Appends every registered series in the Prometheus text format (version 0.0.4).
    pub fn render(&self, out: &mut String) {
        let families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        for (name, family) in families.iter() {
            if family.series.is_empty() {
                continue;
            }
            let kind = match family.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            header(out, name, family.help.as_deref(), kind);
            for (labels, series) in &family.series {
                let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (&**k, &**v)).collect();
                match (series, family.kind) {
                    (Series::Value(v), Kind::Counter) => {
                        sample(out, name, &labels, v.load(Ordering::Relaxed) as f64)
                    }
                    (Series::Value(v), _) => sample(
                        out,
                        name,
                        &labels,
                        f64::from_bits(v.load(Ordering::Relaxed)),
                    ),
                    (Series::Histogram(h), _) => histogram(out, name, &labels, h),
                }
            }
        }
    }
}

fn histogram(out: &mut String, name: &str, labels: &[(&str, &str)], h: &FixedHistogram) {
    let bucket_name = format!("{name}_bucket");
    let mut cumulative = 0u64;
    for (i, count) in h.buckets.iter().enumerate() {
        cumulative += count.load(Ordering::Relaxed);
        let le = DURATION_BUCKETS
            .get(i)
            .map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
        let mut with_le = labels.to_vec();
        with_le.push(("le", &le));
        sample(out, &bucket_name, &with_le, cumulative as f64);
    }
    let sum = f64::from_bits(h.sum_bits.load(Ordering::Relaxed));
    sample(out, &format!("{name}_sum"), labels, sum);
    sample(out, &format!("{name}_count"), labels, cumulative as f64);
}

/// Writes the `# HELP` and `# TYPE` lines of a family.
pub fn header(out: &mut String, name: &str, help: Option<&str>, kind: &str) {
    if let Some(help) = help {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(out, "# HELP {name} {help}");
    }
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Writes one sample line, escaping label values as the text format requires.
pub fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            for c in v.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '"' => out.push_str("\\\""),
                    '\n' => out.push_str("\\n"),
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

impl Recorder for Registry {
    fn describe_counter(&self, key: KeyName, _unit: Option<Unit>, help: SharedString) {
        self.describe(key, Kind::Counter, help)
    }

    fn describe_gauge(&self, key: KeyName, _unit: Option<Unit>, help: SharedString) {
        self.describe(key, Kind::Gauge, help)
    }

    fn describe_histogram(&self, key: KeyName, _unit: Option<Unit>, help: SharedString) {
        self.describe(key, Kind::Histogram, help)
    }

    fn register_counter(&self, key: &Key, _metadata: &Metadata<'_>) -> Counter {
        match self.register(key, Kind::Counter) {
            Some(Series::Value(v)) => Counter::from_arc(v),
            _ => Counter::noop(),
        }
    }

    fn register_gauge(&self, key: &Key, _metadata: &Metadata<'_>) -> Gauge {
        match self.register(key, Kind::Gauge) {
            Some(Series::Value(v)) => Gauge::from_arc(v),
            _ => Gauge::noop(),
        }
    }

    fn register_histogram(&self, key: &Key, _metadata: &Metadata<'_>) -> Histogram {
        match self.register(key, Kind::Histogram) {
            Some(Series::Histogram(h)) => Histogram::from_arc(h),
            _ => Histogram::noop(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::Label;

    static META: Metadata<'static> = Metadata::new("test", metrics::Level::INFO, None);

    #[test]
    fn same_key_shares_one_series() {
        let r = Registry::default();
        let key = Key::from_parts("c_total", vec![Label::new("a", "x\"y")]);
        r.register_counter(&key, &META).increment(2);
        r.register_counter(&key, &META).increment(3);
        r.describe_counter("c_total".into(), None, "Things.".into());
        let mut out = String::new();
        r.render(&mut out);
        assert_eq!(
            out,
            "# HELP c_total Things.\n# TYPE c_total counter\nc_total{a=\"x\\\"y\"} 5\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let r = Registry::default();
        let h = r.register_histogram(&Key::from_name("d_seconds"), &META);
        h.record(0.0001);
        h.record(0.003);
        h.record(100.0);
        let mut out = String::new();
        r.render(&mut out);
        assert!(out.contains("d_seconds_bucket{le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("d_seconds_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("d_seconds_bucket{le=\"30\"} 2\n"), "{out}");
        assert!(out.contains("d_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("d_seconds_count 3\n"), "{out}");
    }

    #[test]
    fn retain_drops_only_the_series_refused() {
        let r = Registry::default();
        let key = |c: &str| Key::from_parts("c_total", vec![Label::new("cluster", c.to_owned())]);
        r.register_counter(&key("a"), &META).increment(1);
        r.register_counter(&key("b"), &META).increment(2);
        r.register_counter(&Key::from_name("other_total"), &META)
            .increment(3);
        r.retain(&["c_total", "other_total", "absent"], |labels| {
            !labels.contains(&("cluster", "a"))
        });
        let mut out = String::new();
        r.render(&mut out);
        assert_eq!(
            out,
            "# TYPE c_total counter\nc_total{cluster=\"b\"} 2\n# TYPE other_total counter\nother_total 3\n"
        );
        // Registered again, the key starts from zero.
        r.register_counter(&key("a"), &META).increment(5);
        let mut out = String::new();
        r.render(&mut out);
        assert!(out.contains("c_total{cluster=\"a\"} 5\n"), "{out}");
    }

    #[test]
    fn a_name_keeps_its_first_kind() {
        let r = Registry::default();
        r.register_counter(&Key::from_name("x"), &META).increment(1);
        r.register_gauge(&Key::from_name("x"), &META).set(9.0);
        let mut out = String::new();
        r.render(&mut out);
        assert!(out.ends_with("x 1\n"), "{out}");
    }
}
