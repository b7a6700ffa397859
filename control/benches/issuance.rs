//! Certificate issuance rate of the mesh CA: `trellis.identity.v1.Identity/Certify` RPCs per
//! second against the controller's identity service in this process (the real CA, the real
//! `TokenDir` authenticator reading a token file per request), served by tonic on 127.0.0.1, with
//! N concurrent clients each on its own HTTP/2 connection.
//!
//! ```sh
//! cargo bench -p trellis-control --bench issuance                    # 1, 4, 16, 64 clients, 5 s each
//! cargo bench -p trellis-control --bench issuance -- --clients 8 --seconds 10
//! ```
//!
//! Each client sends the same CSR (a P-256 key made once, as a proxy does per renewal): what is
//! measured is the controller's work per certificate — token check, CSR signature check, signing.
//! Printed per N: certificates per second, latency p50/p99, the process's CPU per certificate
//! (clients included: they are cheap next to signing), and refusals (must be 0).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_stream::{StreamExt as _, wrappers::TcpListenerStream};
use tonic::{Request, transport::Channel};
use trellis_control::identity::{CaSource, CertificateAuthority, IdentityService, TokenDir};
use trellis_proto::identity::v1::{CertifyRequest, identity_client::IdentityClient};

const TOKEN: &str = "bench-token-4f1c";

struct Options {
    clients: Vec<usize>,
    seconds: u64,
}

fn parse() -> Options {
    let mut o = Options {
        clients: vec![1, 4, 16, 64],
        seconds: 5,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--clients" => {
                o.clients = args
                    .next()
                    .expect("--clients N[,N]")
                    .split(',')
                    .map(|n| n.trim().parse().expect("--clients: a list of numbers"))
                    .collect()
            }
            "--seconds" => {
                o.seconds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--seconds S")
            }
            // cargo bench passes `--bench`; anything else is a mistake worth saying.
            "--bench" => {}
            other => panic!("unknown argument {other:?} (--clients N[,N] --seconds S)"),
        }
    }
    assert!(o.seconds > 0 && o.clients.iter().all(|&n| n > 0));
    o
}

fn main() {
    let options = parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(options));
}

async fn run(options: Options) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tokens/shop")).unwrap();
    std::fs::write(dir.path().join("tokens/shop/web"), TOKEN).unwrap();
    let ca = CertificateAuthority::load(
        &CaSource::Dir(dir.path().join("ca")),
        "cluster.local",
        Duration::from_secs(24 * 3600),
    )
    .unwrap();
    let identity = IdentityService::new(
        Arc::new(ca),
        Some(Arc::new(TokenDir::new(dir.path().join("tokens")))),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // TCP_NODELAY as the controller's TLS listener sets it: without it each unary response
    // waits for the client's delayed ACK (~40 ms on Linux) and this would measure that timer.
    let incoming = TcpListenerStream::new(listener).map(|accepted| {
        accepted.and_then(|tcp| {
            tcp.set_nodelay(true)?;
            Ok(tcp)
        })
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(identity.into_server())
            .serve_with_incoming(incoming),
    );

    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    println!(
        "certificate issuance, {} s per run, {} cores",
        options.seconds,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>12} {:>8}",
        "clients", "certs/s", "p50", "p99", "cpu/cert", "refused"
    );
    for &n in &options.clients {
        let mut channels = Vec::with_capacity(n);
        for _ in 0..n {
            let channel = Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .expect("connect to the identity service");
            channels.push(channel);
        }
        // Warm-up: one certificate per client, so connections and caches are in place.
        for channel in &channels {
            certify(channel.clone(), &csr).await.expect("warm-up");
        }
        let cpu_before = process_cpu();
        let started = Instant::now();
        let deadline = started + Duration::from_secs(options.seconds);
        let tasks: Vec<_> = channels
            .into_iter()
            .map(|channel| {
                let csr = csr.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut refused = 0usize;
                    while Instant::now() < deadline {
                        let start = Instant::now();
                        match certify(channel.clone(), &csr).await {
                            Ok(()) => latencies.push(start.elapsed()),
                            Err(_) => refused += 1,
                        }
                    }
                    (latencies, refused)
                })
            })
            .collect();
        let mut latencies = Vec::new();
        let mut refused = 0;
        for task in tasks {
            let (l, r) = task.await.unwrap();
            latencies.extend(l);
            refused += r;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = process_cpu() - cpu_before;
        latencies.sort();
        let at = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        let issued = latencies.len();
        println!(
            "{:>8} {:>10.0} {:>10} {:>10} {:>12} {:>8}",
            n,
            issued as f64 / elapsed,
            format!("{:.2}ms", at(0.50).as_secs_f64() * 1e3),
            format!("{:.2}ms", at(0.99).as_secs_f64() * 1e3),
            format!("{:.0}us", cpu * 1e6 / issued.max(1) as f64),
            refused
        );
    }
}

async fn certify(channel: Channel, csr: &str) -> Result<(), tonic::Status> {
    let mut request = Request::new(CertifyRequest {
        csr_pem: csr.to_owned(),
        namespace: "shop".into(),
        service_account: "web".into(),
        requested_ttl_seconds: 0,
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let response = IdentityClient::new(channel).certify(request).await?;
    assert!(
        response
            .get_ref()
            .certificate_chain_pem
            .starts_with("-----BEGIN CERTIFICATE-----"),
        "a certificate comes back"
    );
    Ok(())
}

/// User plus system CPU seconds of this process, from /proc (0 where there is none).
fn process_cpu() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    // CLK_TCK is 100 on every Linux this runs on.
    ticks as f64 / 100.0
}
