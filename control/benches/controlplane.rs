//! Control-plane scale: a generated catalog of N services (E endpoints each), the real
//! `trellis-control` process on it, and M simulated proxy streams in this process.
//!
//! ```sh
//! ulimit -n 65536
//! cargo bench -p trellis-control --bench controlplane -- --services 1000 --proxies 100
//! cargo bench -p trellis-control --bench controlplane -- --grid   # N ∈ {1k, 10k} × M ∈ {10, 100, 1k}
//! ```
//!
//! Reports, per (N, M): controller start-up to ready; time until all M streams hold a full
//! configuration after connecting at once (and failed stream attempts); for each of C endpoint
//! changes (one EndpointSlice file rewritten), the time until every stream ACKed the new
//! assignment — p50/p99/max over changes of the slowest stream, and the median stream — bytes sent
//! per stream per change, controller CPU seconds per change; the controller's peak RSS. A run
//! that does not converge within its bound is reported as such, never waited on forever.

use std::{
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use trellis_control::simulate::{self, Catalog, ControllerProcess, ProxyStats, SimOptions};
use trellis_proto::discovery::v1 as api;

struct Options {
    services: Vec<usize>,
    proxies: Vec<usize>,
    endpoints: usize,
    namespaces: usize,
    gateways: usize,
    changes: usize,
    full_timeout: Duration,
    change_timeout: Duration,
    out: Option<PathBuf>,
}

fn parse() -> Options {
    let mut o = Options {
        services: vec![1000],
        proxies: vec![10],
        endpoints: 10,
        namespaces: 10,
        gateways: 2,
        changes: 20,
        full_timeout: Duration::from_secs(400),
        change_timeout: Duration::from_secs(200),
        out: None,
    };
    let mut args = std::env::args().skip(1);
    let list = |v: String| -> Vec<usize> {
        v.split(',')
            .map(|x| x.trim().parse().expect("a list of numbers"))
            .collect()
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--services" => o.services = list(args.next().expect("--services N[,N]")),
            "--proxies" => o.proxies = list(args.next().expect("--proxies M[,M]")),
            "--endpoints" => {
                o.endpoints = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--endpoints E")
            }
            "--namespaces" => {
                o.namespaces = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--namespaces K")
            }
            "--gateways" => {
                o.gateways = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--gateways G")
            }
            "--changes" => {
                o.changes = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--changes C")
            }
            "--full-timeout" => {
                o.full_timeout = Duration::from_secs(
                    args.next()
                        .and_then(|v| v.parse().ok())
                        .expect("--full-timeout SECONDS"),
                )
            }
            "--change-timeout" => {
                o.change_timeout = Duration::from_secs(
                    args.next()
                        .and_then(|v| v.parse().ok())
                        .expect("--change-timeout SECONDS"),
                )
            }
            "--out" => o.out = Some(args.next().expect("--out FILE.md").into()),
            "--grid" => {
                o.services = vec![1000, 10_000];
                o.proxies = vec![10, 100, 1000];
            }
            // cargo bench passes --bench through.
            "--bench" => {}
            other => panic!("unknown argument {other:?} (see the file's header)"),
        }
    }
    o
}

/// One (N, M) result.
#[derive(Debug, Default)]
struct Row {
    services: usize,
    proxies: usize,
    ready: Duration,
    full: Option<Duration>,
    full_count: usize,
    failed_attempts: u64,
    /// Per change: (slowest stream, median stream), or None if some stream never ACKed it.
    changes: Vec<Option<(Duration, Duration)>>,
    bytes_per_change: f64,
    cpu_per_change: f64,
    peak_rss_mib: f64,
}

fn main() {
    let o = parse();
    let controller_bin = env!("CARGO_BIN_EXE_trellis-control");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for &n in &o.services {
        for &m in &o.proxies {
            let row = rt.block_on(run(&o, controller_bin, n, m));
            eprintln!("{}", render_row(&row));
            rows.push(row);
        }
    }
    let table = render(&o, &rows);
    println!("{table}");
    if let Some(out) = &o.out {
        std::fs::write(out, &table).expect("writing --out");
        eprintln!("wrote {}", out.display());
    }
}

async fn run(o: &Options, bin: &str, n: usize, m: usize) -> Row {
    let catalog = Catalog {
        services: n,
        endpoints_per_service: o.endpoints,
        namespaces: o.namespaces,
        gateways: o.gateways,
        route_every: 10,
    };
    let dir = tempfile::tempdir().unwrap();
    catalog.write(dir.path()).unwrap();
    let mut row = Row {
        services: n,
        proxies: m,
        ..Default::default()
    };

    let started = Instant::now();
    let controller = ControllerProcess::spawn(bin, dir.path());
    while !controller.ready().await {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "controller never ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    row.ready = started.elapsed();

    // M sidecars spread over the namespaces, connecting at once (a controller restart).
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stats: Vec<Arc<ProxyStats>> = (0..m).map(|_| Arc::default()).collect();
    let connect_at = Instant::now();
    for (i, s) in stats.iter().enumerate() {
        let options = SimOptions {
            node: simulate::sidecar_node(
                &format!("sim-{i}"),
                &format!("ns-{}", i % o.namespaces.max(1)),
            ),
            track_versions: false,
            start_delay: Duration::ZERO,
            max_message: 64 << 20,
        };
        tokio::spawn(simulate::run(
            controller.grpc,
            options,
            s.clone(),
            stop_rx.clone(),
        ));
    }
    let deadline = connect_at + o.full_timeout;
    loop {
        let full: Vec<Instant> = stats.iter().filter_map(|s| s.full_at()).collect();
        row.full_count = full.len();
        if full.len() == m {
            row.full = full.iter().max().map(|t| *t - connect_at);
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    row.failed_attempts = stats
        .iter()
        .map(|s| s.failed_attempts.load(Ordering::Relaxed))
        .sum();

    if row.full.is_some() {
        let mut cpu = 0.0;
        let mut bytes = 0.0;
        for c in 0..o.changes {
            let service = (c * 7919 + 13) % n;
            let cluster = catalog.cluster_of(service);
            for s in &stats {
                s.watch(api::CLUSTER_LOAD_ASSIGNMENT_TYPE, &cluster);
            }
            let cpu_before = controller.cpu_seconds();
            let file = dir.path().join(catalog.file_of(service));
            let tmp = dir
                .path()
                .join(format!(".{}.tmp", catalog.file_of(service)));
            std::fs::write(&tmp, catalog.service_yaml(service, c as u32 + 1)).unwrap();
            let changed_at = Instant::now();
            std::fs::rename(&tmp, &file).unwrap();
            let deadline = changed_at + o.change_timeout;
            let outcome = loop {
                let acked: Vec<Duration> = stats
                    .iter()
                    .filter_map(|s| s.watched().and_then(|w| w.acked_at))
                    .map(|t| t.saturating_duration_since(changed_at))
                    .collect();
                if acked.len() == m {
                    let mut sorted = acked;
                    sorted.sort();
                    break Some((sorted[m - 1], sorted[m / 2]));
                }
                if Instant::now() > deadline {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            // Let the controller finish what the change started before reading its CPU.
            tokio::time::sleep(Duration::from_millis(200)).await;
            cpu += controller.cpu_seconds() - cpu_before;
            bytes += stats
                .iter()
                .filter_map(|s| s.watched())
                .map(|w| w.bytes as f64)
                .sum::<f64>()
                / m as f64;
            row.changes.push(outcome);
            if outcome.is_none() {
                break;
            }
        }
        let done = row.changes.len().max(1) as f64;
        row.cpu_per_change = cpu / done;
        row.bytes_per_change = bytes / done;
    }
    row.peak_rss_mib = controller.peak_rss_mib();
    let _ = stop_tx.send(true);
    drop(controller);
    row
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn secs(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64())
}

fn render_row(r: &Row) -> String {
    let full = match r.full {
        Some(d) => format!("{} s", secs(d)),
        None => format!("{} of {} full", r.full_count, r.proxies),
    };
    let done: Vec<(Duration, Duration)> = r.changes.iter().flatten().copied().collect();
    let changes = if r.full.is_none() {
        "not measured".to_owned()
    } else if done.len() < r.changes.len() || done.is_empty() {
        format!(
            "{} of {} changes reached every stream",
            done.len(),
            r.changes.len()
        )
    } else {
        let mut slowest: Vec<Duration> = done.iter().map(|c| c.0).collect();
        slowest.sort();
        let mut median: Vec<Duration> = done.iter().map(|c| c.1).collect();
        median.sort();
        format!(
            "{} / {} / {} s (median stream p50 {} s)",
            secs(percentile(&slowest, 0.5)),
            secs(percentile(&slowest, 0.99)),
            secs(*slowest.last().unwrap()),
            secs(percentile(&median, 0.5)),
        )
    };
    format!(
        "| {} | {} | {} s | {} | {} | {} | {:.0} | {:.3} | {:.0} MiB |",
        r.services,
        r.proxies,
        secs(r.ready),
        full,
        r.failed_attempts,
        changes,
        r.bytes_per_change,
        r.cpu_per_change,
        r.peak_rss_mib
    )
}

fn render(o: &Options, rows: &[Row]) -> String {
    let mut out = format!(
        "Services with {} endpoints each over {} namespaces, {} gateways; M sidecar streams connecting at once; {} endpoint changes.\n\n",
        o.endpoints, o.namespaces, o.gateways, o.changes
    );
    out.push_str("| services | streams | controller ready | all streams full | failed stream attempts | one change → all ACKed: p50 / p99 / max | bytes per stream per change | controller CPU s per change | controller peak RSS |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        out.push_str(&render_row(r));
        out.push('\n');
    }
    out
}
