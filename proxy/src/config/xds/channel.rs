//! The gRPC channel to trellis-control, shared by the discovery stream and the identity service:
//! plaintext, or TLS verified against a CA bundle (or the system's roots) and a server name. The
//! service-account token travels on this channel, so a plaintext one is allowed to carry it only
//! to a loopback controller.

use std::{
    future::Future,
    net::IpAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{InvalidDnsNameError, ServerName},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::tls::material;

/// TLS towards the controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdsTls {
    /// PEM bundle trusted for the controller's certificate (`--xds-ca-file`, `xds.ca_file`);
    /// `None`: the system's trust store. Read at every connection, so a rotated bundle applies
    /// at the next reconnect.
    pub ca_file: Option<PathBuf>,
    /// The name the certificate must carry (`--xds-server-name`, `xds.server_name`; default the
    /// address's host): a DNS SAN, or an IP SAN when it is an address.
    pub server_name: String,
}

/// Why the channel settings cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("--xds / xds.address {address:?}: not a host:port or URI: {reason}")]
    BadAddress { address: String, reason: String },
    #[error("--xds / xds.address {address:?}: scheme {scheme:?} is neither http nor https")]
    BadScheme { address: String, scheme: String },
    #[error(
        "--xds / xds.address {address:?} is http:// but a CA file is given (--xds-ca-file / \
         xds.ca_file): use https:// or host:port, or drop the CA file"
    )]
    CaWithHttp { address: String },
    #[error("--xds-server-name / xds.server_name {0:?} is neither a DNS name nor an IP address")]
    BadServerName(String),
    #[error("--xds-ca-file / xds.ca_file {path}: {reason}")]
    Ca { path: String, reason: String },
    #[error("the system trust store holds no usable certificate; give --xds-ca-file")]
    NoSystemRoots,
    #[error(
        "--identity-token-file: the controller at {address} is reached over plaintext, so the \
         service-account token would travel in clear; give --xds-ca-file (xds.ca_file) to use \
         TLS, or run the controller on a loopback address"
    )]
    TokenInClear { address: String },
}

/// One failed connection to the controller: names the address and, for TLS, the server name and
/// the TLS reason (unknown issuer, name mismatch, ...).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("tcp connect to {address}: {source}")]
    Tcp {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS to the controller at {address} (server name {server_name:?}): {reason}")]
    Tls {
        address: String,
        server_name: String,
        reason: String,
    },
}

/// The controller's address and how to reach it, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlChannel {
    /// As configured, for messages.
    address: String,
    uri: Uri,
    tls: Option<XdsTls>,
}

impl ControlChannel {
    /// `address` is `host:port`, `http://host:port` or `https://host:port`. TLS when the scheme is
    /// https or a CA file is given; `server_name` overrides the host as the verified name.
    pub fn new(
        address: &str,
        ca_file: Option<&Path>,
        server_name: Option<&str>,
    ) -> Result<Self, ChannelError> {
        let bad = |reason: String| ChannelError::BadAddress {
            address: address.to_owned(),
            reason,
        };
        let (scheme, rest) = match address.split_once("://") {
            Some((scheme, rest)) => (Some(scheme.to_ascii_lowercase()), rest),
            None => (None, address),
        };
        let secure = match scheme.as_deref() {
            None => ca_file.is_some(),
            Some("https") => true,
            Some("http") if ca_file.is_some() => {
                return Err(ChannelError::CaWithHttp {
                    address: address.to_owned(),
                });
            }
            Some("http") => false,
            Some(other) => {
                return Err(ChannelError::BadScheme {
                    address: address.to_owned(),
                    scheme: other.to_owned(),
                });
            }
        };
        let scheme = if secure { "https" } else { "http" };
        let uri: Uri = format!("{scheme}://{rest}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host".into()))?;
        if uri.port_u16().is_none() {
            return Err(bad("no port".into()));
        }
        let tls = if secure {
            let name = server_name.unwrap_or(host);
            server_name_of(name)?;
            Some(XdsTls {
                ca_file: ca_file.map(Path::to_path_buf),
                server_name: name.to_owned(),
            })
        } else {
            None
        };
        Ok(ControlChannel {
            address: address.to_owned(),
            uri,
            tls,
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn tls(&self) -> Option<&XdsTls> {
        self.tls.as_ref()
    }

    /// Whether the controller's host is a loopback address (or `localhost`): the only place a
    /// plaintext channel may carry a token, since nothing else is on the path.
    pub fn is_loopback(&self) -> bool {
        let host = self.uri.host().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host.eq_ignore_ascii_case("localhost")
            || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// Refuses to send a service-account token where anyone on the path could read it.
    pub fn check_token_allowed(&self) -> Result<(), ChannelError> {
        if self.tls.is_none() && !self.is_loopback() {
            return Err(ChannelError::TokenInClear {
                address: self.address.clone(),
            });
        }
        Ok(())
    }

    /// Loads the trust now, so a missing or unusable CA file stops the start instead of failing
    /// every connection.
    pub fn check_trust(&self) -> Result<(), ChannelError> {
        match &self.tls {
            Some(tls) => client_config(tls).map(drop),
            None => Ok(()),
        }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::from(self.uri.clone()).connect_timeout(Duration::from_secs(5))
    }

    fn connector(&self) -> Connector {
        Connector {
            address: self.address.clone(),
            tls: self.tls.clone(),
        }
    }

    /// Connects now (TCP, then TLS when configured).
    pub async fn connect(&self) -> Result<Channel, String> {
        self.endpoint()
            .connect_with_connector(self.connector())
            .await
            .map_err(|e| error_chain(&e))
    }

    /// A channel that connects at its first request (and again after a failure), with
    /// `timeout` on every request.
    pub fn connect_lazy(&self, timeout: Duration) -> Channel {
        self.endpoint()
            .timeout(timeout)
            .connect_with_connector_lazy(self.connector())
    }
}

/// An error and its sources, `a: b: c`: tonic's own message for a failed connection is only
/// "transport error", the reason is in the sources.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

fn server_name_of(name: &str) -> Result<ServerName<'static>, ChannelError> {
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_owned())
        .map_err(|_: InvalidDnsNameError| ChannelError::BadServerName(name.to_owned()))
}

fn client_config(tls: &XdsTls) -> Result<Arc<ClientConfig>, ChannelError> {
    let roots = match &tls.ca_file {
        Some(path) => material::ca_file(path).map_err(|e| ChannelError::Ca {
            path: path.display().to_string(),
            reason: match e {
                material::FileError::Read { reason, .. } => reason,
                material::FileError::Material { source, .. } => source.to_string(),
            },
        })?,
        None => system_roots()?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ChannelError::Ca {
            path: "protocol versions".into(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn system_roots() -> Result<RootCertStore, ChannelError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(ChannelError::NoSystemRoots);
    }
    Ok(roots)
}

/// Either side of the connection, boxed: tonic takes one type from a connector.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Opens the connections of a channel: TCP to the URI's host and port, then the TLS handshake
/// with the configured trust and name.
#[derive(Clone, Debug)]
struct Connector {
    address: String,
    tls: Option<XdsTls>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Box<dyn Io>>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(443);
            let tcp =
                TcpStream::connect((host, port))
                    .await
                    .map_err(|source| ConnectError::Tcp {
                        address: this.address.clone(),
                        source,
                    })?;
            let _ = tcp.set_nodelay(true);
            let Some(tls) = &this.tls else {
                return Ok(TokioIo::new(Box::new(tcp) as Box<dyn Io>));
            };
            let fail = |reason: String| ConnectError::Tls {
                address: this.address.clone(),
                server_name: tls.server_name.clone(),
                reason,
            };
            let config = client_config(tls).map_err(|e| fail(e.to_string()))?;
            let name = server_name_of(&tls.server_name).map_err(|e| fail(e.to_string()))?;
            let stream = TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| fail(error_chain(&e)))?;
            Ok(TokioIo::new(Box::new(stream) as Box<dyn Io>))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(address: &str, ca: Option<&str>, name: Option<&str>) -> ControlChannel {
        ControlChannel::new(address, ca.map(Path::new), name).unwrap()
    }

    #[test]
    fn tls_follows_the_scheme_or_a_ca_file() {
        assert_eq!(channel("127.0.0.1:18000", None, None).tls(), None);
        assert_eq!(channel("http://ctl.example:18000", None, None).tls(), None);
        let by_ca = channel("ctl.example:18000", Some("/ca.pem"), None);
        assert_eq!(
            by_ca.tls(),
            Some(&XdsTls {
                ca_file: Some("/ca.pem".into()),
                server_name: "ctl.example".into(),
            })
        );
        assert_eq!(by_ca.uri.scheme_str(), Some("https"));
        let https = channel("https://ctl.example:18000", None, None);
        assert_eq!(https.tls().unwrap().ca_file, None);
        // The name defaults to the host, an address included (verified as an IP SAN).
        let ip = channel("10.1.2.3:18000", Some("/ca.pem"), None);
        assert_eq!(ip.tls().unwrap().server_name, "10.1.2.3");
        let named = channel(
            "10.1.2.3:18000",
            Some("/ca.pem"),
            Some("trellis-control.mesh"),
        );
        assert_eq!(named.tls().unwrap().server_name, "trellis-control.mesh");
        let v6 = channel("[::1]:18000", Some("/ca.pem"), None);
        assert!(matches!(
            server_name_of(&v6.tls().unwrap().server_name),
            Ok(ServerName::IpAddress(_))
        ));
    }

    #[test]
    fn bad_settings_are_refused_naming_the_field() {
        let err = |a: &str, ca: Option<&str>, name: Option<&str>| {
            ControlChannel::new(a, ca.map(Path::new), name)
                .unwrap_err()
                .to_string()
        };
        assert!(err("http://ctl:1", Some("/ca.pem"), None).contains("xds.ca_file"));
        assert!(err("ftp://ctl:1", None, None).contains("scheme \"ftp\""));
        assert!(err("ctl", None, None).contains("no port"));
        assert!(err("ctl:1", Some("/ca.pem"), Some("bad name!")).contains("xds.server_name"));
        let missing = channel("ctl:1", Some("/nonexistent/ca.pem"), None)
            .check_trust()
            .unwrap_err()
            .to_string();
        assert!(
            missing.starts_with("--xds-ca-file / xds.ca_file /nonexistent/ca.pem:"),
            "{missing}"
        );
    }

    #[test]
    fn the_bootstrap_section_sets_tls_and_a_bad_ca_file_stops_the_start() {
        use crate::config::{bootstrap::Xds, xds::XdsSettings};
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let c = rcgen::generate_simple_self_signed(vec!["ctl.example".to_owned()]).unwrap();
        std::fs::write(&ca, c.cert.pem()).unwrap();
        let yaml = format!(
            "address: 10.0.0.9:18000\nca_file: {}\nserver_name: ctl.example\n",
            ca.display()
        );
        let x: Xds = serde_yaml::from_str(&yaml).unwrap();
        let settings = XdsSettings::from_bootstrap(&x).unwrap();
        let channel = settings.channel().unwrap();
        assert_eq!(
            channel.tls(),
            Some(&XdsTls {
                ca_file: Some(ca.clone()),
                server_name: "ctl.example".into(),
            })
        );
        assert_eq!(channel.check_token_allowed(), Ok(()));

        std::fs::write(&ca, "not PEM").unwrap();
        let err = XdsSettings::from_bootstrap(&x).unwrap_err();
        assert!(err.starts_with("--xds-ca-file / xds.ca_file "), "{err}");
    }

    #[test]
    fn a_token_never_travels_in_clear_off_loopback() {
        for loopback in [
            "127.0.0.1:1",
            "http://127.0.0.2:1",
            "[::1]:1",
            "localhost:1",
        ] {
            assert_eq!(channel(loopback, None, None).check_token_allowed(), Ok(()));
        }
        for remote in [
            "ctl.example:1",
            "10.0.0.1:1",
            "http://0.0.0.0:1",
            "[fd00::1]:1",
        ] {
            let e = channel(remote, None, None)
                .check_token_allowed()
                .unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains("--identity-token-file") && text.contains("--xds-ca-file"),
                "{text}"
            );
        }
        assert_eq!(
            channel("ctl.example:1", Some("/ca.pem"), None).check_token_allowed(),
            Ok(())
        );
        assert_eq!(
            channel("https://ctl.example:1", None, None).check_token_allowed(),
            Ok(())
        );
    }
}
