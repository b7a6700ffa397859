//! The real `trellis-control` binary as a mesh CA: a proxy with the right token gets a
//! certificate naming its service account and chaining to the trust bundle; without a proof, with
//! a wrong one, or with another account's, it gets nothing; the generated CA survives a restart.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{CertificateParams, KeyPair};
use tonic::{Code, Request};
use trellis_proto::identity::v1::{
    CertifyRequest, CertifyResponse, identity_client::IdentityClient,
};

const BIN: &str = env!("CARGO_BIN_EXE_trellis-control");
/// Bound on start-up: a test fails rather than hangs.
const WAIT: Duration = Duration::from_secs(10);
const WEB_TOKEN: &str = "web-token-5f1d";
const DB_TOKEN: &str = "db-token-a9c2";

/// A running controller; killed on drop.
struct Running {
    child: Child,
    grpc: SocketAddr,
    admin: SocketAddr,
    early: Vec<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Starts the binary with an empty manifests directory and `args`, and waits for its
    /// "serving" line, which names the addresses it bound.
    fn start(manifests: &Path, args: &[&str]) -> Running {
        let mut child = Command::new(BIN)
            .args(["serve", "--manifests"])
            .arg(manifests)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("controller: {line}");
                // Keep draining after the test stops listening: a closed pipe would fail the
                // controller's log writes.
                let _ = tx.send(line);
            }
        });
        let deadline = std::time::Instant::now() + WAIT;
        let mut early = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok(line) = log.recv_timeout(left) else {
                let _ = child.kill();
                let status = child.wait();
                panic!("the controller did not log `serving` in time ({status:?}): {early:?}");
            };
            if line.contains("trellis_control: serving ") {
                return Running {
                    grpc: field(&line, "listen"),
                    admin: field(&line, "admin"),
                    child,
                    early,
                };
            }
            early.push(line);
        }
    }

    async fn certify(
        &self,
        token: Option<&str>,
        namespace: &str,
        service_account: &str,
        csr_pem: String,
        ttl: u64,
    ) -> Result<CertifyResponse, tonic::Status> {
        let mut client = IdentityClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap();
        let mut request = Request::new(CertifyRequest {
            csr_pem,
            namespace: namespace.into(),
            service_account: service_account.into(),
            requested_ttl_seconds: ttl,
        });
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        client.certify(request).await.map(|r| r.into_inner())
    }

    async fn metrics(&self) -> String {
        let (status, body) = trellis_control::admin::get(self.admin, "/metrics")
            .await
            .unwrap();
        assert!(status.is_success());
        String::from_utf8(body.to_vec()).unwrap()
    }
}

fn field(line: &str, key: &str) -> SocketAddr {
    let start = line
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        + key.len()
        + 1;
    line[start..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

struct Dirs {
    root: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Dirs {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("manifests")).unwrap();
        std::fs::create_dir_all(root.path().join("tokens/shop")).unwrap();
        std::fs::write(
            root.path().join("tokens/shop/web"),
            format!("{WEB_TOKEN}\n"),
        )
        .unwrap();
        std::fs::write(root.path().join("tokens/shop/db"), DB_TOKEN).unwrap();
        Dirs { root }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.root.path().join(p)
    }
    fn start(&self, extra: &[&str]) -> Running {
        let ca = self.path("ca");
        let tokens = self.path("tokens");
        let mut args = vec![
            "--ca-dir",
            ca.to_str().unwrap(),
            "--identity-tokens",
            tokens.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Running::start(&self.path("manifests"), &args)
    }
}

fn csr() -> String {
    let key = KeyPair::generate().unwrap();
    CertificateParams::new(vec!["asks-for-more.example".to_owned()])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

fn der_of(pem: &str) -> Vec<Vec<u8>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap().to_vec())
        .collect()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn the_right_token_gets_its_identity_chained_to_the_bundle() {
    let dirs = Dirs::new();
    let ctl = dirs.start(&["--cert-ttl", "1h", "--trust-domain", "mesh.test"]);
    for (requested, lifetime) in [(0, 3600), (60, 60), (7200, 3600)] {
        let before = unix_now();
        let resp = ctl
            .certify(Some(WEB_TOKEN), "shop", "web", csr(), requested)
            .await
            .unwrap();
        let after = unix_now();
        assert_eq!(resp.spiffe_id, "spiffe://mesh.test/ns/shop/sa/web");
        assert!(
            (before + lifetime..=after + lifetime).contains(&resp.not_after_unix_seconds),
            "requested {requested}: not_after {} not {lifetime}s after {before}..{after}",
            resp.not_after_unix_seconds
        );
        let chain = der_of(&resp.certificate_chain_pem);
        let bundle = der_of(&resp.trust_bundle_pem);
        assert_eq!((chain.len(), bundle.len()), (1, 1));
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let (_, root) = x509_parser::parse_x509_certificate(&bundle[0]).unwrap();
        // Only the proved identity is named, whatever the CSR asked for.
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", san.value.general_names),
            "[URI(\"spiffe://mesh.test/ns/shop/sa/web\")]"
        );
        assert_eq!(
            leaf.validity().not_after.timestamp(),
            resp.not_after_unix_seconds
        );
        assert_eq!(leaf.issuer(), root.subject());
        leaf.verify_signature(Some(root.public_key()))
            .expect("the leaf is signed by the bundle's CA");
        assert!(root.is_ca());
    }
    let metrics = ctl.metrics().await;
    assert!(
        metrics.contains("trellis_control_identity_issued_total 3\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn no_wrong_or_borrowed_token_gets_nothing() {
    let dirs = Dirs::new();
    let ctl = dirs.start(&[]);
    let cases = [
        (None, "web", Code::Unauthenticated, "authorization"),
        (Some("guess"), "web", Code::PermissionDenied, "shop/web"),
        // The db account's own token does not prove the web account.
        (Some(DB_TOKEN), "web", Code::PermissionDenied, "shop/web"),
        // An account with no token file: the same answer as a wrong token.
        (
            Some(WEB_TOKEN),
            "admin",
            Code::PermissionDenied,
            "shop/admin",
        ),
        (
            Some(WEB_TOKEN),
            "../web",
            Code::InvalidArgument,
            "service_account",
        ),
    ];
    for (token, sa, code, names) in cases {
        let status = ctl
            .certify(token, "shop", sa, csr(), 0)
            .await
            .expect_err("refused");
        assert_eq!(status.code(), code, "{token:?} {sa}: {status:?}");
        assert!(status.message().contains(names), "{status:?}");
        for secret in [WEB_TOKEN, DB_TOKEN] {
            assert!(!status.message().contains(secret), "{status:?}");
        }
    }
    // A proof but a CSR whose signature fails.
    let status = ctl
        .certify(
            Some(WEB_TOKEN),
            "shop",
            "web",
            csr().replace("MII", "MIJ"),
            0,
        )
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("csr_pem"), "{status:?}");
    let metrics = ctl.metrics().await;
    for line in [
        "trellis_control_identity_issued_total 0\n",
        "trellis_control_identity_refused_total{reason=\"unauthenticated\"} 1\n",
        "trellis_control_identity_refused_total{reason=\"permission_denied\"} 3\n",
        "trellis_control_identity_refused_total{reason=\"invalid_request\"} 2\n",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
}

#[tokio::test]
async fn the_generated_ca_is_kept_across_restarts() {
    let dirs = Dirs::new();
    let first = {
        let ctl = dirs.start(&[]);
        ctl.certify(Some(WEB_TOKEN), "shop", "web", csr(), 0)
            .await
            .unwrap()
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dirs.path("ca/ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the CA key is private");
    }
    let ctl = dirs.start(&[]);
    let second = ctl
        .certify(Some(WEB_TOKEN), "shop", "web", csr(), 0)
        .await
        .unwrap();
    assert_eq!(first.trust_bundle_pem, second.trust_bundle_pem);
    let bundle = der_of(&first.trust_bundle_pem);
    let (_, root) = x509_parser::parse_x509_certificate(&bundle[0]).unwrap();
    let leaf = der_of(&second.certificate_chain_pem);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf[0]).unwrap();
    leaf.verify_signature(Some(root.public_key()))
        .expect("signed by the same CA after the restart");
}

#[tokio::test]
async fn without_a_token_directory_every_request_is_refused() {
    let dirs = Dirs::new();
    let ca = dirs.path("ca");
    let ctl = Running::start(&dirs.path("manifests"), &["--ca-dir", ca.to_str().unwrap()]);
    assert!(
        ctl.early
            .iter()
            .any(|l| l.contains("every certificate request will be refused")),
        "{:?}",
        ctl.early
    );
    let status = ctl
        .certify(Some(WEB_TOKEN), "shop", "web", csr(), 0)
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("--identity-tokens"), "{status:?}");
}
