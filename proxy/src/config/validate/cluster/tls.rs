//! `tls:` of a cluster: the CA bundle, client certificate and names, read and checked at
//! validation; `secret:` names are looked up in the same file's `secrets:`.

use std::{io::Read, sync::Arc};

use rustls::pki_types::ServerName;

use super::super::{super::bootstrap as file, super::model::*, Validator};
use crate::tls::{client::ClientTls, material};

/// A PEM file larger than this is refused: the whole Mozilla CA bundle is about 220 KB.
const MAX_PEM_FILE: u64 = 4 * 1024 * 1024;

/// `scheme:rest` with an RFC 3986 scheme and no whitespace, e.g. `spiffe://cluster.local/ns/a`.
fn is_absolute_uri(u: &str) -> bool {
    let Some((scheme, rest)) = u.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !rest.is_empty()
        && !u.chars().any(char::is_whitespace)
}

/// The secret of that name in the file's `secrets:`.
fn secret<'a>(file: &'a file::File, name: &str) -> Option<&'a file::Secret> {
    file.secrets.iter().find(|s| s.name == name)
}

impl Validator {
    /// `tls:` of a cluster: every file read and every PEM checked now, so a mistake is refused
    /// with its field instead of failing handshakes later.
    pub(super) fn upstream_tls(
        &mut self,
        path: &str,
        t: &file::ClusterTls,
        protocol: UpstreamProtocol,
        file: Option<&file::File>,
    ) -> Option<UpstreamTls> {
        let before = self.errors.len();
        if let Some(sni) = &t.sni
            && ServerName::try_from(sni.as_str()).is_err()
        {
            self.error(
                format!("{path}.sni"),
                format!("{sni:?} is not a DNS name or an IP address"),
            );
        }
        for (i, n) in t.subject_alt_names.iter().enumerate() {
            if ServerName::try_from(n.as_str()).is_err() {
                self.error(
                    format!("{path}.subject_alt_names[{i}]"),
                    format!("{n:?} is not a DNS name or an IP address"),
                );
            }
        }
        let mut verify_subject_alt_names = Vec::new();
        for (i, n) in t.verify_subject_alt_names.iter().enumerate() {
            let at = format!("{path}.verify_subject_alt_names[{i}]");
            match (&n.hostname, &n.uri) {
                (Some(_), Some(_)) => self.error(at, "give hostname or uri, not both"),
                (None, None) => self.error(at, "give hostname or uri"),
                (Some(h), None) => match ServerName::try_from(h.as_str()) {
                    Ok(ServerName::DnsName(_)) => verify_subject_alt_names
                        .push(SubjectAltName::Hostname(h.to_ascii_lowercase().into())),
                    _ => self.error(format!("{at}.hostname"), format!("{h:?} is not a DNS name")),
                },
                (None, Some(u)) if is_absolute_uri(u) => {
                    verify_subject_alt_names.push(SubjectAltName::Uri(u.as_str().into()));
                }
                (None, Some(u)) => {
                    self.error(format!("{at}.uri"), format!("{u:?} is not an absolute URI"))
                }
            }
        }
        let trust = match (&t.ca_file, &t.ca_secret) {
            (Some(_), Some(_)) => {
                self.error(
                    format!("{path}.ca_file"),
                    "give ca_file or ca_secret, not both",
                );
                None
            }
            (None, None) => Some(UpstreamTrust::System),
            (Some(f), None) => self
                .read(&format!("{path}.ca_file"), f)
                .and_then(|pem| self.ca_pem(&format!("{path}.ca_file"), pem, format!("file {f}"))),
            (None, Some(name)) => {
                let p = format!("{path}.ca_secret");
                match self
                    .find_secret(&p, file, name)
                    .map(|s| s.ca_bundle.clone())
                {
                    None => None,
                    Some(None) => {
                        self.error(p, format!("secret {name:?} has no ca_bundle"));
                        None
                    }
                    Some(Some(pem)) => self.ca_pem(&p, pem, format!("secret {name}")),
                }
            }
        };
        let client_certificate = t
            .client_certificate
            .as_ref()
            .and_then(|c| self.client_certificate(&format!("{path}.client_certificate"), c, file));
        if self.errors.len() != before {
            return None;
        }
        let tls = UpstreamTls {
            sni: t.sni.as_deref().map(Arc::from),
            trust: trust?,
            client_certificate,
            subject_alt_names: t
                .subject_alt_names
                .iter()
                .map(|n| Arc::from(&**n))
                .collect(),
            verify_subject_alt_names: verify_subject_alt_names.into(),
        };
        // What is left to fail is rustls's own verdict, or an empty system trust store.
        if let Some(e) = ClientTls::build(&tls, protocol).error() {
            self.error(path, e.to_string());
            return None;
        }
        Some(tls)
    }

    /// A PEM file's text. Only a regular file of at most [`MAX_PEM_FILE`] bytes: a path such as
    /// `/dev/zero` or a FIFO would otherwise hang or exhaust validation.
    fn read(&mut self, path: &str, name: &str) -> Option<String> {
        let read = || -> std::io::Result<Result<String, String>> {
            let f = std::fs::File::open(name)?;
            if !f.metadata()?.is_file() {
                return Ok(Err("is not a regular file".into()));
            }
            let mut text = String::new();
            f.take(MAX_PEM_FILE + 1).read_to_string(&mut text)?;
            if text.len() as u64 > MAX_PEM_FILE {
                return Ok(Err(format!("is over {MAX_PEM_FILE} bytes")));
            }
            Ok(Ok(text))
        };
        match read() {
            Ok(Ok(text)) => Some(text),
            Ok(Err(why)) => {
                self.error(path, format!("{name:?} {why}"));
                None
            }
            Err(e) => {
                self.error(path, format!("cannot read {name:?}: {e}"));
                None
            }
        }
    }

    fn find_secret<'a>(
        &mut self,
        path: &str,
        file: Option<&'a file::File>,
        name: &str,
    ) -> Option<&'a file::Secret> {
        let found = file.and_then(|f| secret(f, name));
        if found.is_none() && !self.secrets_may_dangle {
            self.error(path, format!("unknown secret {name:?}"));
        }
        found
    }

    fn ca_pem(&mut self, path: &str, pem: String, origin: String) -> Option<UpstreamTrust> {
        match material::ca_bundle(pem.as_bytes()) {
            Ok(_) => Some(UpstreamTrust::Bundle {
                source: origin.into(),
                pem: pem.into(),
            }),
            Err(e) => {
                self.error(path, format!("{origin}: {e}"));
                None
            }
        }
    }

    /// A certificate and key to present, from two files or a secret; checked to parse, to match
    /// and to be within its validity period. Errors never quote the key.
    fn client_certificate(
        &mut self,
        path: &str,
        c: &file::CertificateSource,
        file: Option<&file::File>,
    ) -> Option<UpstreamClientCertificate> {
        let (chain, key, origin) = match (&c.cert_file, &c.key_file, &c.secret) {
            (Some(cert), Some(key), None) => {
                let chain = self.read(&format!("{path}.cert_file"), cert);
                let key = self.read(&format!("{path}.key_file"), key);
                (
                    chain?,
                    material::SecretString::new(key?),
                    format!(
                        "files {cert}, {}",
                        c.key_file.as_deref().unwrap_or_default()
                    ),
                )
            }
            (None, None, Some(name)) => {
                let p = format!("{path}.secret");
                let s = self.find_secret(&p, file, name)?;
                match (&s.certificate_chain, &s.private_key) {
                    (Some(chain), Some(key)) => {
                        (chain.clone(), key.clone(), format!("secret {name}"))
                    }
                    _ => {
                        self.error(
                            p,
                            format!("secret {name:?} needs certificate_chain and private_key"),
                        );
                        return None;
                    }
                }
            }
            _ => {
                self.error(
                    path,
                    "give cert_file and key_file, or secret (exactly one of the two)",
                );
                return None;
            }
        };
        if let Err(e) = material::certificate(chain.as_bytes(), &key, std::time::SystemTime::now())
        {
            self.error(path, format!("{origin}: {e}"));
            return None;
        }
        Some(UpstreamClientCertificate {
            source: origin.into(),
            chain_pem: chain.into(),
            key_pem: key,
        })
    }

    /// A `tls_passthrough` listener forwards the client's own TLS session: originating TLS to
    /// the cluster would wrap it in a second session no endpoint expects, and sending it as is
    /// would ignore what the cluster asks, so such a listener naming a TLS cluster is refused.
    /// (A `tcp` listener originates the cluster's TLS.)
    pub(in crate::config::validate) fn no_tcp_listener_to(
        &mut self,
        path: &str,
        cluster: &str,
        file: &file::File,
    ) {
        for (i, l) in file.listeners.iter().enumerate() {
            let names = l
                .cluster
                .iter()
                .chain(l.default_cluster.iter())
                .chain(l.sni.iter().map(|r| &r.cluster));
            if l.protocol == "tls_passthrough" && names.into_iter().any(|n| n == cluster) {
                self.error(
                    path,
                    format!(
                        "listeners[{i}] ({:?}, protocol {}) sends to this cluster, and a \
                         passthrough listener forwards the client's own TLS, which cannot be \
                         wrapped in the cluster's",
                        l.name, l.protocol
                    ),
                );
            }
        }
    }
}
