//! TLS towards upstreams: one rustls client configuration per cluster, built when the config is
//! compiled, so a handshake only reads it. Each configuration keeps rustls's in-memory session
//! cache, so connections after the first to an endpoint resume instead of a full handshake.

use std::{
    fmt,
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::SystemTime,
};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    sign::SingleCertAndKey,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::material::{self, MaterialError};
use crate::config::model::{SubjectAltName, UpstreamProtocol, UpstreamTls, UpstreamTrust};

/// The application protocol a connection will speak, offered by ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    Http1,
    Http2,
    /// No ALPN offer: opaque bytes from a TCP listener, whose protocol the proxy does not know.
    None,
}

impl From<UpstreamProtocol> for Alpn {
    fn from(p: UpstreamProtocol) -> Self {
        match p {
            UpstreamProtocol::Http1 => Alpn::Http1,
            UpstreamProtocol::Http2 => Alpn::Http2,
        }
    }
}

/// Why a cluster's TLS settings cannot make a client configuration. No variant holds key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientTlsError {
    #[error("sni: {0:?} is not a DNS name or an IP address")]
    BadServerName(String),
    #[error("subject_alt_names: {0:?} is not a DNS name or an IP address")]
    BadAltName(String),
    #[error("CA bundle ({origin}): {error}")]
    Bundle {
        origin: Arc<str>,
        error: MaterialError,
    },
    #[error(
        "no CA certificate could be loaded from the system trust store (give ca_file or ca_secret)"
    )]
    NoSystemRoots,
    #[error("trusted CAs ({origin}) refused: {reason}")]
    Verifier { origin: Arc<str>, reason: String },
    #[error("client_certificate ({origin}): {error}")]
    ClientCertificate {
        origin: Arc<str>,
        error: MaterialError,
    },
}

/// The TLS client side of one cluster: its settings and the rustls configurations made from
/// them, one per ALPN offer (a gRPC health check speaks HTTP/2 to an HTTP/1.1 cluster). The
/// configurations share one session cache.
pub struct ClientTls {
    settings: UpstreamTls,
    protocol: UpstreamProtocol,
    /// The configured server name, parsed once.
    sni: Option<ServerName<'static>>,
    /// An error when the settings could not be made into a configuration; every handshake then
    /// fails with it, so a cluster never falls back to plain TCP or to unchecked certificates.
    configs: Result<Configs, ClientTlsError>,
}

struct Configs {
    http1: Arc<ClientConfig>,
    http2: Arc<ClientConfig>,
    opaque: Arc<ClientConfig>,
}

/// Pools are kept across updates while their TLS settings are equal (see `PoolSettings`).
impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings && self.protocol == other.protocol
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("sni", &self.settings.sni)
            .field("protocol", &self.protocol)
            .field("error", &self.configs.as_ref().err())
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Builds the client configurations of a cluster. A failure is kept (see
    /// [`ClientTls::error`]): validation refuses such settings, so it shows only if the system
    /// trust store changed in between.
    pub fn build(settings: &UpstreamTls, protocol: UpstreamProtocol) -> ClientTls {
        let sni = settings
            .sni
            .as_deref()
            .map(|s| ServerName::try_from(s.to_owned()));
        let (sni, configs) = match sni {
            Some(Err(_)) => (
                None,
                Err(ClientTlsError::BadServerName(
                    settings.sni.as_deref().unwrap_or_default().to_owned(),
                )),
            ),
            Some(Ok(name)) => (Some(name), configs(settings)),
            None => (None, configs(settings)),
        };
        ClientTls {
            settings: settings.clone(),
            protocol,
            sni,
            configs,
        }
    }

    /// Why these settings cannot originate TLS, if they cannot.
    pub fn error(&self) -> Option<&ClientTlsError> {
        self.configs.as_ref().err()
    }

    pub fn settings(&self) -> &UpstreamTls {
        &self.settings
    }

    /// The ALPN offer of the cluster's own requests.
    pub fn alpn(&self) -> Alpn {
        self.protocol.into()
    }

    /// The name sent and verified for an endpoint: the configured `sni`, else its IP address.
    pub fn server_name(&self, address: SocketAddr) -> ServerName<'static> {
        self.sni
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(address.ip().into()))
    }

    /// The TLS handshake over an open connection to `address`; the caller bounds its time.
    pub async fn connect<IO>(
        &self,
        io: IO,
        address: SocketAddr,
        alpn: Alpn,
    ) -> std::io::Result<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let configs = self
            .configs
            .as_ref()
            .map_err(|e| std::io::Error::other(e.clone()))?;
        let config = match alpn {
            Alpn::Http1 => &configs.http1,
            Alpn::Http2 => &configs.http2,
            Alpn::None => &configs.opaque,
        };
        TlsConnector::from(config.clone())
            .connect(self.server_name(address), io)
            .await
    }
}

fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The operating system's trust store, read once per process: reading it walks the file system,
/// and its contents change only with the image.
fn system_roots() -> Result<Arc<RootCertStore>, ClientTlsError> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    let roots = ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "reading the system trust store");
        }
        let mut roots = RootCertStore::empty();
        let (_, unusable) = roots.add_parsable_certificates(found.certs);
        if unusable > 0 {
            tracing::debug!(
                unusable,
                "system trust store certificates skipped as unusable"
            );
        }
        Arc::new(roots)
    });
    if roots.is_empty() {
        return Err(ClientTlsError::NoSystemRoots);
    }
    Ok(roots.clone())
}

fn configs(settings: &UpstreamTls) -> Result<Configs, ClientTlsError> {
    let alt_names = settings
        .subject_alt_names
        .iter()
        .map(|n| {
            ServerName::try_from(n.to_string())
                .map_err(|_| ClientTlsError::BadAltName(n.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (roots, origin): (Arc<RootCertStore>, Arc<str>) = match &settings.trust {
        UpstreamTrust::System => (system_roots()?, "system trust store".into()),
        UpstreamTrust::Bundle { source, pem } => {
            let roots =
                material::ca_bundle(pem.as_bytes()).map_err(|error| ClientTlsError::Bundle {
                    origin: source.clone(),
                    error,
                })?;
            (Arc::new(roots), source.clone())
        }
    };
    let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| ClientTlsError::Verifier {
            origin,
            reason: e.to_string(),
        })?;
    let verifier: Arc<dyn ServerCertVerifier> = if !settings.verify_subject_alt_names.is_empty() {
        Arc::new(RequiredNameVerifier {
            inner: webpki,
            expected: settings.verify_subject_alt_names.clone(),
        })
    } else if alt_names.is_empty() {
        webpki
    } else {
        Arc::new(AltNameVerifier {
            inner: webpki,
            alt_names,
        })
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientTlsError::Verifier {
            origin: "protocol versions".into(),
            reason: e.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let base = match &settings.client_certificate {
        None => builder.with_no_client_auth(),
        Some(c) => {
            let checked =
                material::certificate(c.chain_pem.as_bytes(), &c.key_pem, SystemTime::now())
                    .map_err(|error| ClientTlsError::ClientCertificate {
                        origin: c.source.clone(),
                        error,
                    })?;
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(checked.key)))
        }
    };
    let with_alpn = |alpn: &[u8]| {
        let mut c = base.clone();
        c.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(c)
    };
    Ok(Configs {
        http1: with_alpn(b"http/1.1"),
        http2: with_alpn(b"h2"),
        opaque: Arc::new(base),
    })
}

/// WebPKI chain verification, then the certificate must carry one of `expected` as a subject
/// alternative name, whatever the server name sent (Gateway API BackendTLSPolicy
/// `subjectAltNames`): the name dialled and the identity checked are apart.
#[derive(Debug)]
struct RequiredNameVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expected: Arc<[SubjectAltName]>,
}

impl ServerCertVerifier for RequiredNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // WebPKI checks the chain before the name: a name error means the chain is good.
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        if carries_one_of(end_entity, &self.expected) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Whether the certificate's subject alternative names hold one of `expected`.
fn carries_one_of(cert: &CertificateDer<'_>, expected: &[SubjectAltName]) -> bool {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return false;
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return false;
    };
    san.value.general_names.iter().any(|g| match g {
        GeneralName::DNSName(presented) => expected
            .iter()
            .any(|e| matches!(e, SubjectAltName::Hostname(h) if dns_covers(presented, h))),
        GeneralName::URI(presented) => expected
            .iter()
            .any(|e| matches!(e, SubjectAltName::Uri(u) if **u == **presented)),
        _ => false,
    })
}

/// Whether a certificate's DNS name covers `wanted` (lower case): equal ignoring case, or a
/// `*.` wildcard standing for its first label.
fn dns_covers(presented: &str, wanted: &str) -> bool {
    let presented = presented.to_ascii_lowercase();
    if presented == wanted {
        return true;
    }
    presented.strip_prefix("*.").is_some_and(|suffix| {
        wanted
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && label != "*" && rest == suffix)
    })
}

/// WebPKI verification that also accepts a certificate naming one of `alt_names` instead of the
/// server name: for upstreams whose certificate names a service rather than the name dialled.
#[derive(Debug)]
struct AltNameVerifier {
    inner: Arc<WebPkiServerVerifier>,
    alt_names: Vec<ServerName<'static>>,
}

impl ServerCertVerifier for AltNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let first = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        match first {
            Err(
                e @ rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. },
                ),
            ) => self
                .alt_names
                .iter()
                .find_map(|name| {
                    self.inner
                        .verify_server_cert(end_entity, intermediates, name, ocsp_response, now)
                        .ok()
                })
                .ok_or(e),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::dns_covers;

    #[test]
    fn a_wildcard_covers_one_label() {
        for (presented, wanted, covers) in [
            ("api.internal", "api.internal", true),
            ("API.Internal", "api.internal", true),
            ("*.internal", "api.internal", true),
            ("*.internal", "a.api.internal", false),
            ("*.internal", "internal", false),
            ("api.internal", "web.internal", false),
        ] {
            assert_eq!(
                dns_covers(presented, wanted),
                covers,
                "{presented} {wanted}"
            );
        }
    }
}
