//! TLS termination on a listener: one rustls `ServerConfig` per listener whose certificate
//! resolver picks by the ClientHello's server name (exact, then `*.` one label deep, then the
//! default or a refusal). Certificates from files are watched and swapped in place, so new
//! handshakes get the new certificate while open connections keep the session they have; a
//! session cache and a ticketer shared by every handshake of the listener allow resumption.

use std::{
    collections::HashMap,
    fmt,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use http::HeaderValue;
use rustls::{
    ProtocolVersion, ServerConfig, SupportedProtocolVersion,
    crypto::ring as provider,
    pki_types::CertificateDer,
    server::{
        ClientHello, ResolvesServerCert, ServerSessionMemoryCache, WebPkiClientVerifier,
        danger::ClientCertVerifier,
    },
    sign::CertifiedKey,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use super::{
    material::{self, Certificate, PemFiles},
    watch,
};
use crate::{
    config::model::{
        CaSource, CertificateSource, ClientCertificateMode, Config, Secret, ServerTls, TlsVersion,
        UnknownServerName,
    },
    telemetry::tls as metrics,
};

/// Time allowed for a whole handshake, from the accepted socket to the session established.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Sessions remembered for resumption by session ID (TLS 1.2 clients without tickets).
const SESSION_CACHE_SIZE: usize = 4096;

/// What rustls reports when the resolver found no certificate for the server name.
const NO_CERTIFICATE: &str = "no server certificate chain resolved";

/// Why a listener's TLS could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    #[error("certificates[{index}]: {source}")]
    File {
        index: usize,
        #[source]
        source: material::FileError,
    },
    #[error("certificates[{index}]: secret {name:?}: {reason}")]
    Secret {
        index: usize,
        name: String,
        reason: String,
    },
    #[error("client_certificate: {0}")]
    ClientCa(String),
    #[error("{0}")]
    Rustls(String),
}

/// A listener's TLS: what a handshake needs, and the certificates behind it.
pub struct TlsServer {
    acceptor: TlsAcceptor,
    certs: Arc<Certs>,
    /// What it was built from: a configuration update with the same model and secrets keeps it
    /// (with its session cache, tickets and file watch).
    model: ServerTls,
    secrets: Vec<Secret>,
    _watch: Option<watch::Watch>,
}

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsServer")
            .field("listener", &self.certs.listener)
            .field("certificates", &self.certs.slots.len())
            .finish_non_exhaustive()
    }
}

/// A handshake that completed.
pub struct Established<IO> {
    pub stream: TlsStream<IO>,
    /// ALPN chose `h2`.
    pub h2: bool,
    /// `x-forwarded-client-cert` for a verified client certificate.
    pub client_certificate: Option<HeaderValue>,
}

/// The certificates of a listener, by server name; also its rustls certificate resolver.
#[derive(Debug)]
pub(super) struct Certs {
    pub(super) listener: Arc<str>,
    exact: HashMap<Arc<str>, usize>,
    /// `*.example.com` stored as `example.com`.
    wildcard: HashMap<Arc<str>, usize>,
    default: Option<usize>,
    pub(super) slots: Box<[Slot]>,
}

#[derive(Debug)]
pub(super) struct Slot {
    /// The `name` label of the expiry gauge: the first server name, else `default`.
    label: Arc<str>,
    files: Option<(Arc<Path>, Arc<Path>)>,
    current: ArcSwap<Certificate>,
    /// The bytes last read from `files`, so an event that changed nothing reloads nothing.
    last_read: Mutex<Option<PemFiles>>,
}

impl Certs {
    /// The certificate for a ClientHello's server name.
    fn pick(&self, server_name: Option<&str>) -> Option<usize> {
        let Some(name) = server_name else {
            return self.default;
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(i) = self.exact.get(name.as_str()) {
            return Some(*i);
        }
        // One label deep: `*.example.com` covers `a.example.com`, not `a.b.example.com`.
        if let Some((_, parent)) = name.split_once('.')
            && let Some(i) = self.wildcard.get(parent)
        {
            return Some(*i);
        }
        self.default
    }

    /// Reads the certificate files again; a changed pair that checks out replaces the one in
    /// use, one that does not is logged (naming the file) and the old one keeps serving.
    pub(super) fn reload(&self) {
        for slot in self.slots.iter() {
            let Some((cert_file, key_file)) = &slot.files else {
                continue;
            };
            let read = material::read_pem_files(cert_file, key_file);
            let mut last = slot.last_read.lock().unwrap_or_else(|e| e.into_inner());
            let pem = match read {
                Ok(pem) => pem,
                Err(e) => {
                    // A swap in progress may remove a file for a moment; the next event retries.
                    tracing::error!(listener = %self.listener, error = %e, "certificate reload failed; the previous certificate stays in use");
                    metrics::certificate_reload(&self.listener, false);
                    continue;
                }
            };
            if last.as_ref() == Some(&pem) {
                continue;
            }
            match material::certificate_of(&pem, cert_file, key_file, SystemTime::now()) {
                Ok(c) => {
                    tracing::info!(listener = %self.listener, file = %cert_file.display(), names = ?c.dns_names, "certificate reloaded");
                    slot.current.store(Arc::new(c));
                    metrics::certificate_reload(&self.listener, true);
                }
                Err(e) => {
                    tracing::error!(listener = %self.listener, error = %e, "certificate reload failed; the previous certificate stays in use");
                    metrics::certificate_reload(&self.listener, false);
                }
            }
            *last = Some(pem);
        }
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let i = self.pick(hello.server_name())?;
        Some(self.slots[i].current.load().key.clone())
    }
}

impl TlsServer {
    /// Loads the certificates `model` names (files now, secrets from `config`) and builds the
    /// rustls configuration; watches the certificate files.
    pub fn build(
        listener: &Arc<str>,
        model: &ServerTls,
        config: &Config,
    ) -> Result<Self, TlsError> {
        let now = SystemTime::now();
        let mut secrets = Vec::new();
        let mut secret = |name: &Arc<str>| -> Option<Secret> {
            let s = config.secret(name)?.clone();
            secrets.push(s.clone());
            Some(s)
        };
        let mut slots = Vec::with_capacity(model.certificates.len());
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut default = None;
        for (index, c) in model.certificates.iter().enumerate() {
            let (cert, files, last_read) = match &c.source {
                CertificateSource::Files {
                    cert_file,
                    key_file,
                } => {
                    let (cert, pem) = material::certificate_files(cert_file, key_file, now)
                        .map_err(|source| TlsError::File { index, source })?;
                    (cert, Some((cert_file.clone(), key_file.clone())), Some(pem))
                }
                CertificateSource::Secret(name) => {
                    let bad = |reason: String| TlsError::Secret {
                        index,
                        name: name.to_string(),
                        reason,
                    };
                    let s = secret(name).ok_or_else(|| bad("is not defined".into()))?;
                    let (Some(chain), Some(key)) = (&s.certificate_chain, &s.private_key) else {
                        return Err(bad("has no certificate_chain and private_key".into()));
                    };
                    let cert = material::certificate(chain.as_bytes(), key, now)
                        .map_err(|e| bad(e.to_string()))?;
                    (cert, None, None)
                }
            };
            for n in c.server_names.iter() {
                match n.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(Arc::from(parent)).or_insert(index),
                    None => exact.entry(n.clone()).or_insert(index),
                };
            }
            if c.server_names.is_empty() && default.is_none() {
                default = Some(index);
            }
            slots.push(Slot {
                label: c
                    .server_names
                    .first()
                    .cloned()
                    .unwrap_or_else(|| Arc::from("default")),
                files,
                current: ArcSwap::from_pointee(cert),
                last_read: Mutex::new(last_read),
            });
        }
        let default = match model.unknown_server_name {
            UnknownServerName::Refuse => None,
            UnknownServerName::Default => default.or((!slots.is_empty()).then_some(0)),
        };
        let certs = Arc::new(Certs {
            listener: listener.clone(),
            exact,
            wildcard,
            default,
            slots: slots.into(),
        });

        let crypto = Arc::new(provider::default_provider());
        let versions: &[&'static SupportedProtocolVersion] = match model.min_version {
            TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let builder = ServerConfig::builder_with_provider(crypto.clone())
            .with_protocol_versions(versions)
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let builder = match &model.client_certificate {
            None => builder.with_no_client_auth(),
            Some(cc) => {
                let roots = match &cc.ca {
                    CaSource::File(path) => {
                        material::ca_file(path).map_err(|e| TlsError::ClientCa(e.to_string()))?
                    }
                    CaSource::Secret(name) => {
                        let s = secret(name).ok_or_else(|| {
                            TlsError::ClientCa(format!("secret {name:?} is not defined"))
                        })?;
                        let pem = s.ca_bundle.as_deref().ok_or_else(|| {
                            TlsError::ClientCa(format!("secret {name:?} has no ca_bundle"))
                        })?;
                        material::ca_bundle(pem.as_bytes())
                            .map_err(|e| TlsError::ClientCa(format!("secret {name:?}: {e}")))?
                    }
                };
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), crypto);
                let verifier = match cc.mode {
                    ClientCertificateMode::Require => verifier,
                    ClientCertificateMode::Optional => verifier.allow_unauthenticated(),
                };
                let verifier: Arc<dyn ClientCertVerifier> = verifier
                    .build()
                    .map_err(|e| TlsError::ClientCa(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut server = builder.with_cert_resolver(certs.clone());
        server.alpn_protocols = model.alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        server.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
        server.ticketer = provider::Ticketer::new().map_err(|e| TlsError::Rustls(e.to_string()))?;

        let files: Vec<&Path> = certs
            .slots
            .iter()
            .filter_map(|s| s.files.as_ref())
            .flat_map(|(c, k)| [&**c, &**k])
            .collect();
        let watch = if files.is_empty() {
            None
        } else {
            watch::Watch::start(&files, Arc::downgrade(&certs))
        };
        Ok(TlsServer {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            certs,
            model: model.clone(),
            secrets,
            _watch: watch,
        })
    }

    /// Whether this server was built from `model` with these secrets' current content.
    pub fn built_from(&self, model: &ServerTls, config: &Config) -> bool {
        self.model == *model
            && self
                .secrets
                .iter()
                .all(|s| config.secret(&s.name) == Some(s))
    }

    /// Each certificate's `name` label and `notAfter`, as served now.
    pub fn expiry(&self) -> Vec<(Arc<str>, SystemTime)> {
        self.certs
            .slots
            .iter()
            .map(|s| (s.label.clone(), s.current.load().not_after))
            .collect()
    }

    /// Runs the handshake on `io` within [`HANDSHAKE_TIMEOUT`], counting its outcome.
    pub async fn accept<IO>(&self, io: IO) -> Option<Established<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let listener = &*self.certs.listener;
        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(io)).await {
            Err(_) => {
                metrics::handshake(listener, "unknown", "none", "timeout");
                return None;
            }
            Ok(Err(e)) => {
                let reason = failure_reason(&e);
                tracing::debug!(listener, error = %e, reason, "TLS handshake failed");
                metrics::handshake(listener, "unknown", "none", reason);
                return None;
            }
            Ok(Ok(s)) => s,
        };
        let conn = stream.get_ref().1;
        let version = match conn.protocol_version() {
            Some(ProtocolVersion::TLSv1_3) => "1.3",
            Some(ProtocolVersion::TLSv1_2) => "1.2",
            _ => "unknown",
        };
        let alpn = conn
            .alpn_protocol()
            .map(|a| String::from_utf8_lossy(a).into_owned());
        let h2 = alpn.as_deref() == Some("h2");
        metrics::handshake(
            listener,
            version,
            alpn.as_deref().unwrap_or("none"),
            "success",
        );
        let client_certificate = conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(forwarded_client_cert);
        Some(Established {
            stream,
            h2,
            client_certificate,
        })
    }
}

/// The `outcome` label of a failed handshake.
fn failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::{Error, PeerIncompatible};
    let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) else {
        return "other";
    };
    match inner {
        Error::General(m) if m == NO_CERTIFICATE => "no_certificate",
        Error::PeerIncompatible(
            PeerIncompatible::SupportedVersionsExtensionRequired
            | PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::Tls12NotOfferedOrEnabled
            | PeerIncompatible::ServerDoesNotSupportTls12Or13
            | PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig,
        ) => "protocol_version",
        Error::NoCertificatesPresented | Error::InvalidCertificate(_) => "bad_client_certificate",
        _ => "other",
    }
}

/// Envoy's `x-forwarded-client-cert` element for a verified client certificate:
/// `Hash=<sha256 of the DER, hex>;Subject="<RFC 2253 DN>";URI=<uri SAN>;DNS=<dns SAN>...`.
pub fn forwarded_client_cert(der: &CertificateDer<'_>) -> Option<HeaderValue> {
    use std::fmt::Write;
    let sha256 = provider::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()?
        .common
        .hash_provider
        .hash(der);
    let mut out = String::from("Hash=");
    for b in sha256.as_ref() {
        let _ = write!(out, "{b:02x}");
    }
    if let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) {
        let subject = cert.subject().to_string();
        if !subject.is_empty() {
            let escaped = subject.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = write!(out, ";Subject=\"{escaped}\"");
        }
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            use x509_parser::extensions::GeneralName;
            for n in &san.value.general_names {
                match n {
                    GeneralName::URI(u) => {
                        let _ = write!(out, ";URI={u}");
                    }
                    GeneralName::DNSName(d) => {
                        let _ = write!(out, ";DNS={d}");
                    }
                    _ => {}
                }
            }
        }
    }
    // A name with bytes a header cannot carry: the hash alone still identifies the certificate.
    HeaderValue::from_str(&out).ok().or_else(|| {
        let hash_only = out.split(';').next().unwrap_or_default().to_owned();
        HeaderValue::from_str(&hash_only).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certs(names: &[&[&str]], default: Option<usize>) -> Certs {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (i, ns) in names.iter().enumerate() {
            for n in *ns {
                match n.strip_prefix("*.") {
                    Some(p) => wildcard.insert(Arc::from(p), i),
                    None => exact.insert(Arc::from(*n), i),
                };
            }
        }
        Certs {
            listener: "l".into(),
            exact,
            wildcard,
            default,
            slots: Box::new([]),
        }
    }

    #[test]
    fn server_names_pick_exact_then_one_label_wildcard_then_default() {
        let c = certs(&[&["api.example.com"], &["*.example.com"], &[]], Some(2));
        let cases: &[(Option<&str>, Option<usize>)] = &[
            (Some("api.example.com"), Some(0)),
            (Some("API.Example.COM."), Some(0)),
            (Some("www.example.com"), Some(1)),
            (Some("a.b.example.com"), Some(2)),
            (Some("example.com"), Some(2)),
            (Some("other.test"), Some(2)),
            (None, Some(2)),
        ];
        for (sni, want) in cases {
            assert_eq!(c.pick(*sni), *want, "{sni:?}");
        }
        let refusing = certs(&[&["api.example.com"]], None);
        assert_eq!(refusing.pick(Some("x.test")), None);
        assert_eq!(refusing.pick(None), None);
    }

    #[test]
    fn xfcc_names_the_hash_subject_and_sans() {
        let mut params = rcgen::CertificateParams::new(vec!["client.test".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "client one");
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://trellis/ns/a/sa/b".try_into().unwrap(),
        ));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let v = forwarded_client_cert(cert.der()).unwrap();
        let v = v.to_str().unwrap();
        let hash = v.strip_prefix("Hash=").unwrap().split(';').next().unwrap();
        assert_eq!(hash.len(), 64, "{v}");
        assert!(v.contains(";Subject=\"CN=client one\""), "{v}");
        assert!(v.contains(";URI=spiffe://trellis/ns/a/sa/b"), "{v}");
        assert!(v.contains(";DNS=client.test"), "{v}");
    }
}
