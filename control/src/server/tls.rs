//! TLS on the discovery port. Proxies send their service-account tokens and receive the mesh's
//! trust bundle on this port, so off loopback it must not be plaintext: [`check_plaintext_identity`]
//! decides at start. The certificate files are re-read when they change (cert-manager renews them
//! in place), checked at each handshake: proxies connect rarely, so a `stat` of two files per
//! handshake costs nothing and needs no watcher.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A handshake that takes longer is dropped: a peer must not hold a task by stalling.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const ACCEPT_QUEUE: usize = 64;

/// Certificate files that cannot serve. Names the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {path}: {reason}")]
    File {
        flag: &'static str,
        path: String,
        reason: String,
    },
    #[error("--tls-key {key} does not match the certificate in --tls-cert {cert}: {reason}")]
    Mismatch {
        cert: String,
        key: String,
        reason: String,
    },
    #[error("--tls-client-ca {path}: {reason}")]
    ClientCa { path: String, reason: String },
}

/// Identity is on, there is no TLS, and the listen address is not loopback.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the identity service is on (--ca-dir/--ca-cert) and --listen {listen} is not a loopback \
     address, but there is no --tls-cert/--tls-key: service-account tokens and the trust bundle \
     would travel in clear to and from every proxy; give --tls-cert and --tls-key, or \
     --insecure-plaintext-identity to accept that"
)]
pub struct PlaintextIdentity {
    pub listen: SocketAddr,
}

/// What start-up does about identity on a plaintext port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlaintextCheck {
    /// TLS on, identity off, or loopback only: nothing to say.
    Fine,
    /// Plaintext off loopback, accepted by `--insecure-plaintext-identity`: warn.
    Insecure,
}

/// Whether the controller may start: tokens must not cross a network in clear unless the
/// operator said so.
pub fn check_plaintext_identity(
    identity_on: bool,
    tls_on: bool,
    listen: SocketAddr,
    insecure_allowed: bool,
) -> Result<PlaintextCheck, PlaintextIdentity> {
    if !identity_on || tls_on || listen.ip().is_loopback() {
        return Ok(PlaintextCheck::Fine);
    }
    if insecure_allowed {
        return Ok(PlaintextCheck::Insecure);
    }
    Err(PlaintextIdentity { listen })
}

/// Where the server's certificate and key are, and optionally the CA client certificates must
/// chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The acceptor of the discovery port.
#[derive(Clone)]
pub struct DiscoveryTls {
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for DiscoveryTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscoveryTls").finish_non_exhaustive()
    }
}

impl DiscoveryTls {
    /// Loads and checks the files now, so a bad file stops the start.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let resolver = Arc::new(ReloadingCert::load(
            files.cert.clone(),
            files.key.clone(),
            provider.clone(),
        )?);
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::File {
                flag: "--tls-cert",
                path: files.cert.display().to_string(),
                reason: e.to_string(),
            })?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let client_ca = |reason: String| TlsError::ClientCa {
                    path: path.display().to_string(),
                    reason,
                };
                let mut roots = rustls::RootCertStore::empty();
                for cert in
                    CertificateDer::pem_file_iter(path).map_err(|e| client_ca(e.to_string()))?
                {
                    let cert = cert.map_err(|e| client_ca(e.to_string()))?;
                    roots.add(cert).map_err(|e| client_ca(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(client_ca("no certificate in the file".into()));
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| client_ca(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(resolver);
        // gRPC is HTTP/2 only.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(DiscoveryTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Accepts on `listener` and hands over connections once their handshake is done. Each
    /// handshake runs on its own task, so a slow or silent peer does not hold up the others.
    /// Ends when the receiver is dropped.
    pub fn incoming(
        self,
        listener: TcpListener,
    ) -> mpsc::Receiver<Result<TlsConnection, io::Error>> {
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            // Out of descriptors and the like: pass, and keep accepting.
                            tracing::warn!(error = %e, "accepting a discovery connection");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    () = tx.closed() => return,
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = self.acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(TlsConnection { stream })).await;
                        }
                        Ok(Err(e)) => tracing::info!(
                            %peer,
                            error = %e,
                            "TLS handshake on the discovery port failed"
                        ),
                        Err(_) => tracing::info!(
                            %peer,
                            timeout = ?HANDSHAKE_TIMEOUT,
                            "TLS handshake on the discovery port timed out"
                        ),
                    }
                });
            }
        });
        rx
    }
}

/// A connection after its handshake, as tonic serves it.
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
}

impl Connected for TlsConnection {
    type ConnectInfo = TcpConnectInfo;

    /// The TCP addresses, so handlers see the proxy's address as on a plaintext port.
    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// What identifies a version of the two files: a rename over them or a rewrite changes it.
type Stamp = Option<[(SystemTime, u64); 2]>;

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let one = |p: &Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    Some([one(cert)?, one(key)?])
}

/// The server certificate, reloaded when its files change. A bad new version is logged and the
/// previous one keeps serving.
#[derive(Debug)]
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Mutex<(Stamp, Arc<CertifiedKey>)>,
}

impl ReloadingCert {
    fn load(cert: PathBuf, key: PathBuf, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let seen = stamp(&cert, &key);
        let certified = read_certified(&cert, &key, &provider)?;
        Ok(ReloadingCert {
            cert,
            key,
            provider,
            current: Mutex::new((seen, Arc::new(certified))),
        })
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let now = stamp(&self.cert, &self.key);
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if now.is_some() && now != current.0 {
            // Recorded even when the new files are bad: they are tried again once they change,
            // not at every handshake.
            current.0 = now;
            match read_certified(&self.cert, &self.key, &self.provider) {
                Ok(certified) => {
                    tracing::info!(cert = %self.cert.display(), "discovery TLS certificate reloaded");
                    current.1 = Arc::new(certified);
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "the changed discovery TLS certificate cannot be used; the previous one stays"
                ),
            }
        }
        Some(current.1.clone())
    }
}

fn read_certified(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let file = |flag, path: &Path, reason: String| TlsError::File {
        flag,
        path: path.display().to_string(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file("--tls-cert", cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file("--tls-cert", cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(file(
            "--tls-cert",
            cert,
            "no PEM certificate in the file".into(),
        ));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| file("--tls-key", key, e.to_string()))?;
    CertifiedKey::from_der(chain, key_der, provider).map_err(|e| TlsError::Mismatch {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn identity_in_clear_is_refused_off_loopback() {
        use PlaintextCheck::*;
        let public = addr("0.0.0.0:18000");
        // (identity on, tls on, listen, --insecure-plaintext-identity) -> outcome
        let cases = [
            (false, false, public, false, Ok(Fine)),
            (true, true, public, false, Ok(Fine)),
            (true, false, addr("127.0.0.1:18000"), false, Ok(Fine)),
            (true, false, addr("[::1]:18000"), false, Ok(Fine)),
            (true, false, public, true, Ok(Insecure)),
            (
                true,
                false,
                public,
                false,
                Err(PlaintextIdentity { listen: public }),
            ),
            (
                true,
                false,
                addr("10.0.0.5:18000"),
                false,
                Err(PlaintextIdentity {
                    listen: addr("10.0.0.5:18000"),
                }),
            ),
        ];
        for (identity, tls, listen, insecure, want) in cases {
            assert_eq!(
                check_plaintext_identity(identity, tls, listen, insecure),
                want,
                "identity={identity} tls={tls} listen={listen} insecure={insecure}"
            );
        }
        let text = PlaintextIdentity { listen: public }.to_string();
        for needle in ["--tls-cert", "--insecure-plaintext-identity", "in clear"] {
            assert!(text.contains(needle), "{text}");
        }
    }

    /// With `--tls-client-ca`, a client without a certificate is refused; one issued by that CA
    /// is let in.
    #[tokio::test]
    async fn a_client_ca_requires_client_certificates() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        let server = rcgen::generate_simple_self_signed(vec!["ctl.example".to_owned()]).unwrap();
        std::fs::write(path("cert.pem"), server.cert.pem()).unwrap();
        std::fs::write(path("key.pem"), server.signing_key.serialize_pem()).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        std::fs::write(path("client-ca.pem"), ca.pem()).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let client_key = KeyPair::generate().unwrap();
        let client_cert = CertificateParams::new(vec!["proxy.example".to_owned()])
            .unwrap()
            .signed_by(&client_key, &issuer)
            .unwrap();
        let tls = DiscoveryTls::load(&TlsFiles {
            cert: path("cert.pem"),
            key: path("key.pem"),
            client_ca: Some(path("client-ca.pem")),
        })
        .unwrap();

        let handshake = |with_cert: bool| {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(server.cert.der().clone()).unwrap();
            let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
            let mut config = if with_cert {
                builder
                    .with_client_auth_cert(
                        vec![client_cert.der().clone()],
                        PrivateKeyDer::try_from(client_key.serialize_der()).unwrap(),
                    )
                    .unwrap()
            } else {
                builder.with_no_client_auth()
            };
            config.alpn_protocols = vec![b"h2".to_vec()];
            let acceptor = tls.acceptor.clone();
            async move {
                let (client_io, server_io) = tokio::io::duplex(64 * 1024);
                let name = rustls::pki_types::ServerName::try_from("ctl.example").unwrap();
                let client = tokio_rustls::TlsConnector::from(Arc::new(config));
                let (server, client) =
                    tokio::join!(acceptor.accept(server_io), client.connect(name, client_io));
                drop(client);
                server.map(drop).map_err(|e| e.to_string())
            }
        };
        let refused = handshake(false).await.unwrap_err();
        assert!(refused.contains("certificate"), "{refused}");
        handshake(true).await.unwrap();
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["ctl.example".to_owned()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["ctl.example".to_owned()]).unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let cert = write("cert.pem", &a.cert.pem());
        let key = write("key.pem", &a.signing_key.serialize_pem());
        let other_key = write("other.pem", &b.signing_key.serialize_pem());
        let files = |cert: &Path, key: &Path| TlsFiles {
            cert: cert.into(),
            key: key.into(),
            client_ca: None,
        };
        assert!(DiscoveryTls::load(&files(&cert, &key)).is_ok());
        let missing = DiscoveryTls::load(&files(&dir.path().join("none.pem"), &key))
            .unwrap_err()
            .to_string();
        assert!(missing.starts_with("--tls-cert "), "{missing}");
        let not_a_key = DiscoveryTls::load(&files(&cert, &cert))
            .unwrap_err()
            .to_string();
        assert!(not_a_key.starts_with("--tls-key "), "{not_a_key}");
        let mismatch = DiscoveryTls::load(&files(&cert, &other_key))
            .unwrap_err()
            .to_string();
        assert!(mismatch.contains("does not match"), "{mismatch}");
    }
}
