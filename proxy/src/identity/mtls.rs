//! Mesh mTLS between sidecars: rustls configs that present the current workload certificate and
//! check the peer's against the trust bundle by SPIFFE ID instead of DNS name.
//!
//! - Client side: the peer's chain must reach the bundle and its URI SAN must equal the SPIFFE ID
//!   the destination is expected to run as.
//! - Server side: any SPIFFE ID of this proxy's trust domain is accepted; the caller's ID is read
//!   from the connection ([`peer_identity`]) for authorization.
//! - ALPN: mesh connections offer `trellis-mesh/1` followed by the application protocol
//!   (`trellis-mesh/1+h2`, `trellis-mesh/1+http/1.1`, or `trellis-mesh/1` alone for opaque TCP),
//!   the way Istio's `istio-h2`/`istio-http/1.1` do: an inbound port can tell mesh mTLS from an
//!   application's own TLS (which never offers these) before it terminates anything.
//! - TLS 1.3 only: both ends are Trellis, so there is no older peer to accommodate.
//!
//! Certificates and bundle are read from the identity watch at each handshake, so a renewal
//! applies to the next handshake with no restart.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock, PoisonError},
};

use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig, SignatureScheme,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ClientHello, ParsedCertificate, ResolvesServerCert,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{IdentityWatch, SpiffeId, spiffe_id_of};
use crate::telemetry::mesh as metrics;

/// The ALPN prefix of mesh traffic.
pub const MESH_ALPN: &str = "trellis-mesh/1";

/// What a mesh connection carries, named in its ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AppProtocol {
    /// Opaque TCP: `trellis-mesh/1`.
    Tcp,
    /// `trellis-mesh/1+http/1.1`.
    Http1,
    /// `trellis-mesh/1+h2`.
    Http2,
}

impl AppProtocol {
    pub const ALL: [AppProtocol; 3] = [AppProtocol::Http2, AppProtocol::Http1, AppProtocol::Tcp];

    pub fn alpn(self) -> &'static [u8] {
        match self {
            AppProtocol::Tcp => b"trellis-mesh/1",
            AppProtocol::Http1 => b"trellis-mesh/1+http/1.1",
            AppProtocol::Http2 => b"trellis-mesh/1+h2",
        }
    }

    /// The protocol a negotiated ALPN names; `None` for anything that is not mesh traffic.
    pub fn from_alpn(alpn: &[u8]) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.alpn() == alpn)
    }
}

/// The verified peer of a mesh connection, read once the handshake is done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshPeer {
    pub id: SpiffeId,
    pub protocol: AppProtocol,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the connection did not negotiate a {MESH_ALPN} ALPN protocol")]
    NotMesh,
    #[error("the peer's certificate: {0}")]
    Identity(String),
}

/// The caller's SPIFFE ID and application protocol on an established mesh connection.
pub fn peer_identity(conn: &rustls::CommonState) -> Result<MeshPeer, PeerError> {
    let protocol = conn
        .alpn_protocol()
        .and_then(AppProtocol::from_alpn)
        .ok_or(PeerError::NotMesh)?;
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(PeerError::NoCertificate)?;
    let id = spiffe_id_of(leaf).map_err(|e| PeerError::Identity(e.to_string()))?;
    Ok(MeshPeer { id, protocol })
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The server side of mesh mTLS: presents the current certificate, requires a client
/// certificate from the trust domain, offers every mesh ALPN.
pub fn server_config(identity: IdentityWatch) -> Result<Arc<ServerConfig>, Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier {
            identity: identity.clone(),
        }))
        .with_cert_resolver(Arc::new(CurrentCertificate(identity)));
    config.alpn_protocols = AppProtocol::ALL.iter().map(|p| p.alpn().to_vec()).collect();
    Ok(Arc::new(config))
}

/// The client side of mesh mTLS towards a destination expected to run as `expected`: presents
/// the current certificate and accepts only a peer whose chain reaches the bundle and whose
/// SPIFFE ID is `expected`. SNI is not sent: the peer is named by its SPIFFE ID, and host names
/// of the mesh need not travel in clear.
pub fn client_config(
    identity: IdentityWatch,
    expected: SpiffeId,
    protocol: AppProtocol,
) -> Result<Arc<ClientConfig>, Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
            identity: identity.clone(),
            expected,
        }))
        .with_client_cert_resolver(Arc::new(CurrentCertificate(identity)));
    config.alpn_protocols = vec![protocol.alpn().to_vec()];
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// This proxy's side of mesh mTLS: its identity and the rustls configs made from it, built
/// once and kept (the server config, and a client config per expected peer and protocol), so a
/// connection only reads them. Each client config keeps rustls's session cache, so later
/// connections to a peer resume instead of a full handshake.
pub struct MeshTls {
    identity: IdentityWatch,
    server: Arc<ServerConfig>,
    clients: Mutex<HashMap<(SpiffeId, AppProtocol), Arc<ClientConfig>>>,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("identity", &*self.identity.borrow())
            .finish_non_exhaustive()
    }
}

/// Why a mesh connection could not be made or accepted.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("this proxy holds no workload certificate yet")]
    NoIdentity,
    #[error("mesh TLS configuration: {0}")]
    Config(#[from] Error),
    #[error("mesh TLS handshake: {0}")]
    Handshake(#[source] io::Error),
    #[error(transparent)]
    Peer(#[from] PeerError),
}

impl MeshTls {
    pub fn new(identity: IdentityWatch) -> Result<Arc<Self>, Error> {
        Ok(Arc::new(MeshTls {
            server: server_config(identity.clone())?,
            identity,
            clients: Mutex::new(HashMap::new()),
        }))
    }

    pub fn identity(&self) -> &IdentityWatch {
        &self.identity
    }

    /// Whether a certificate has arrived: until then nothing can be originated or accepted.
    pub fn has_identity(&self) -> bool {
        self.identity.borrow().is_some()
    }

    /// The client config towards peers that must be `expected`, speaking `protocol`.
    pub fn client(
        &self,
        expected: &SpiffeId,
        protocol: AppProtocol,
    ) -> Result<Arc<ClientConfig>, Error> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = clients.get(&(expected.clone(), protocol)) {
            return Ok(c.clone());
        }
        let config = client_config(self.identity.clone(), expected.clone(), protocol)?;
        clients.insert((expected.clone(), protocol), config.clone());
        Ok(config)
    }

    /// Originates mesh mTLS over `io` to `address`, which must be `expected`. A failure is
    /// counted and logged with the endpoint, the expected and the presented identity.
    pub async fn connect<IO>(
        &self,
        io: IO,
        address: SocketAddr,
        expected: &SpiffeId,
        protocol: AppProtocol,
    ) -> Result<tokio_rustls::client::TlsStream<IO>, MeshError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let result = async {
            if !self.has_identity() {
                return Err(MeshError::NoIdentity);
            }
            let config = self.client(expected, protocol)?;
            TlsConnector::from(config)
                .connect(server_name(), io)
                .await
                .map_err(MeshError::Handshake)
        }
        .await;
        metrics::handshake(metrics::Direction::Outbound, result.is_ok());
        if let Err(e) = &result {
            tracing::warn!(
                endpoint = %address,
                expected = %expected,
                error = %e,
                "mesh mTLS to the endpoint failed"
            );
        }
        result
    }

    /// Terminates mesh mTLS on an accepted connection whose ClientHello offered a mesh ALPN;
    /// returns the session and its verified caller. Counted; a failure is logged by the caller.
    pub async fn accept<IO>(
        &self,
        io: IO,
    ) -> Result<(tokio_rustls::server::TlsStream<IO>, MeshPeer), MeshError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let result = async {
            if !self.has_identity() {
                return Err(MeshError::NoIdentity);
            }
            let tls = TlsAcceptor::from(self.server.clone())
                .accept(io)
                .await
                .map_err(MeshError::Handshake)?;
            let peer = peer_identity(tls.get_ref().1)?;
            Ok((tls, peer))
        }
        .await;
        metrics::handshake(metrics::Direction::Inbound, result.is_ok());
        result
    }
}

/// The name handed to rustls when connecting; never sent (SNI is off) nor checked (the verifier
/// checks the SPIFFE ID).
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("mesh.trellis.invalid").expect("a valid DNS name")
}

/// The certificate of the identity in force, for both sides.
#[derive(Debug)]
struct CurrentCertificate(IdentityWatch);

impl CurrentCertificate {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.0.borrow().as_ref().map(|i| i.certified_key.clone())
    }
}

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for CurrentCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.0.borrow().is_some()
    }
}

fn no_identity() -> Error {
    Error::General("this proxy holds no workload identity yet".into())
}

fn bad_identity(message: String) -> Error {
    Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(PeerIdentityMismatch(message)),
    )))
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PeerIdentityMismatch(String);

/// Chain to the current bundle (webpki), then the SPIFFE ID, not a DNS name.
#[derive(Debug)]
struct SpiffeServerVerifier {
    identity: IdentityWatch,
    expected: SpiffeId,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let roots = self
            .identity
            .borrow()
            .as_ref()
            .map(|i| i.roots.clone())
            .ok_or_else(no_identity)?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            provider().signature_verification_algorithms.all,
        )
        .map_err(|e| {
            // Named with what the peer claims to be, so a log line says who was refused.
            let presented = spiffe_id_of(end_entity)
                .map_or_else(|_| "no SPIFFE ID".to_owned(), |id| id.to_string());
            bad_identity(format!(
                "the peer's certificate ({presented}, expected {}) is not trusted: {e}",
                self.expected
            ))
        })?;
        let got = spiffe_id_of(end_entity).map_err(|e| bad_identity(e.to_string()))?;
        if got != self.expected {
            return Err(bad_identity(format!(
                "the peer is {got}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Chain to the current bundle (webpki, client-auth usage), then a SPIFFE ID of this proxy's own
/// trust domain.
#[derive(Debug)]
struct SpiffeClientVerifier {
    identity: IdentityWatch,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: the client has exactly one certificate to offer.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let (verifier, domain) = {
            let current = self.identity.borrow();
            let current = current.as_ref().ok_or_else(no_identity)?;
            (
                current.client_verifier.clone(),
                current.spiffe_id.trust_domain().to_owned(),
            )
        };
        verifier.verify_client_cert(end_entity, intermediates, now)?;
        let got = spiffe_id_of(end_entity).map_err(|e| bad_identity(e.to_string()))?;
        if got.trust_domain() != domain {
            return Err(bad_identity(format!(
                "the peer {got} is not of trust domain {domain}"
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
