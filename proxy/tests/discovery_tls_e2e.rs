//! The real `trellis-proxy` binary against the controller's discovery and identity services
//! served over TLS in process on 127.0.0.1 (a certificate made here with rcgen for IP 127.0.0.1
//! and a DNS name): with `--xds-ca-file` it opens its discovery stream and obtains its workload
//! certificate over TLS; with another CA, or `--xds-server-name` naming another host, it does
//! not connect, logs the controller's address and the TLS reason, and keeps retrying; a token
//! for a controller reached in clear off loopback stops the start, and so does a CA file with no
//! controller to use it for.

mod common;

use std::{
    cell::RefCell,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, mpsc},
    time::Duration,
};

use common::process::{BIN, output_within};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
};
use trellis_control::{
    catalog::Catalog,
    identity::{CaSource, CertificateAuthority, IdentityService, TokenDir},
    server::{
        self, DiscoveryService,
        tls::{DiscoveryTls, TlsFiles},
    },
    status::Registry,
};

const WAIT: Duration = Duration::from_secs(20);
const DNS_NAME: &str = "trellis-control.test";
const WEB_TOKEN: &str = "web-token-8d02";

/// Discovery and identity over TLS, with the CA and server certificate files it was given.
struct Controller {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    _catalog: watch::Sender<Arc<Catalog>>,
    _stop: oneshot::Sender<()>,
}

impl Controller {
    async fn start() -> Controller {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "discovery test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![DNS_NAME.to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(path("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(path("server.pem"), cert.pem()).unwrap();
        std::fs::write(path("server-key.pem"), key.serialize_pem()).unwrap();
        let other = rcgen::generate_simple_self_signed(vec![DNS_NAME.to_owned()]).unwrap();
        std::fs::write(path("other-ca.pem"), other.cert.pem()).unwrap();
        std::fs::create_dir_all(path("tokens/shop")).unwrap();
        std::fs::write(path("tokens/shop/web"), WEB_TOKEN).unwrap();
        std::fs::write(path("web.token"), WEB_TOKEN).unwrap();

        let tls = DiscoveryTls::load(&TlsFiles {
            cert: path("server.pem"),
            key: path("server-key.pem"),
            client_ca: None,
        })
        .unwrap();
        let ca = CertificateAuthority::load(
            &CaSource::Dir(path("mesh-ca")),
            "cluster.local",
            Duration::from_secs(3600),
        )
        .unwrap();
        let identity =
            IdentityService::new(Arc::new(ca), Some(Arc::new(TokenDir::new(path("tokens")))));
        let (catalog_tx, catalog) = watch::channel(Arc::new(Catalog::default()));
        let discovery = DiscoveryService::new(catalog, Arc::new(Registry::default()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server::serve_secured(
            listener,
            discovery,
            Some(identity),
            Some(tls),
            async {
                let _ = stopped.await;
            },
        ));
        Controller {
            addr,
            dir,
            _catalog: catalog_tx,
            _stop: stop,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// The proxy binary as a sidecar of shop/web with a token; killed on drop.
struct Proxy {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: RefCell<Vec<String>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    fn start(controller: &Controller, ca: &Path, extra: &[&str]) -> Proxy {
        let mut child = Command::new(BIN)
            .args(["--xds", &controller.addr.to_string()])
            .arg("--xds-ca-file")
            .arg(ca)
            .args(extra)
            .args(["--namespace", "shop", "--service-account", "web"])
            .arg("--identity-token-file")
            .arg(controller.path("web.token"))
            .args(["--admin", "127.0.0.1:0", "--workers", "1"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("proxy: {line}");
                // Keep draining: a closed pipe would fail the proxy's log writes.
                let _ = tx.send(line);
            }
        });
        Proxy {
            child,
            lines,
            seen: RefCell::default(),
        }
    }

    /// Waits (bounded) until `count` log lines, from the start, hold every one of `needles`;
    /// returns the last. Lines are kept, so the order of the waits does not matter.
    fn wait_lines(&self, needles: &[&str], count: usize) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        let mut seen = self.seen.borrow_mut();
        let mut next = 0;
        let mut found = 0;
        loop {
            while let Some(line) = seen.get(next) {
                next += 1;
                if needles.iter().all(|n| line.contains(n)) {
                    found += 1;
                    if found == count {
                        return line.clone();
                    }
                }
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => seen.push(line),
                Err(_) => panic!("the proxy logged {found} of {count} lines with {needles:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_ca_the_proxy_streams_and_gets_its_certificate_over_tls() {
    let controller = Controller::start().await;
    let proxy = Proxy::start(&controller, &controller.path("ca.pem"), &[]);
    proxy.wait_lines(&["connected to the control plane"], 1);
    proxy.wait_lines(
        &[
            "workload certificate obtained",
            "spiffe://cluster.local/ns/shop/sa/web",
        ],
        1,
    );

    // By DNS name, the address still an IP.
    let by_name = Proxy::start(
        &controller,
        &controller.path("ca.pem"),
        &["--xds-server-name", DNS_NAME],
    );
    by_name.wait_lines(&["connected to the control plane"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_or_name_is_logged_with_the_address_and_reason_and_retried() {
    let controller = Controller::start().await;
    let address = controller.addr.to_string();

    let wrong_ca = Proxy::start(&controller, &controller.path("other-ca.pem"), &[]);
    // Twice: the failure is retried with backoff, not given up.
    wrong_ca.wait_lines(
        &[
            "control plane stream failed",
            &format!("TLS to the controller at {address}"),
            "UnknownIssuer",
        ],
        2,
    );
    // The identity client, on the same channel settings, says the same.
    wrong_ca.wait_lines(&["no workload certificate yet", "UnknownIssuer"], 1);
    drop(wrong_ca);

    let wrong_name = Proxy::start(
        &controller,
        &controller.path("ca.pem"),
        &["--xds-server-name", "elsewhere.test"],
    );
    wrong_name.wait_lines(
        &[
            "control plane stream failed",
            &address,
            "certificate not valid for name",
        ],
        1,
    );
}

#[test]
fn a_token_for_a_controller_in_clear_off_loopback_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("web.token");
    std::fs::write(&token, WEB_TOKEN).unwrap();
    // A name, not loopback: nothing is resolved or contacted before the refusal.
    let out = output_within(
        Command::new(BIN)
            .args(["--xds", "trellis-control.invalid:18000"])
            .args(["--namespace", "shop", "--service-account", "web"])
            .arg("--identity-token-file")
            .arg(&token)
            .args(["--admin", "127.0.0.1:0", "--workers", "1"]),
        WAIT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started: {stderr}");
    assert!(
        stderr.contains("--identity-token-file")
            && stderr.contains("--xds-ca-file")
            && stderr.contains("trellis-control.invalid:18000")
            && stderr.contains("in clear"),
        "{stderr}"
    );
}

#[test]
fn a_ca_file_without_a_controller_is_refused_not_ignored() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart.yaml");
    let out = output_within(
        Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .args(["--xds-ca-file", "/nonexistent/ca.pem"])
            .args(["--admin", "127.0.0.1:0", "--workers", "1"]),
        WAIT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started: {stderr}");
    assert!(
        stderr.contains("--xds-ca-file") && stderr.contains("no control plane"),
        "{stderr}"
    );
}
