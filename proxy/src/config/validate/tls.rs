//! `secrets:` and a listener's `tls:` block → typed model. The bootstrap file and the discovery
//! stream (whose `Secret` resources and listener TLS arrive as the same bootstrap structs) both
//! come through here. Certificate material is loaded and checked now, so a chain that does not
//! parse, does not match its key or is out of date is refused by name before anything serves it.

use std::{collections::HashSet, path::Path, sync::Arc, time::SystemTime};

use super::{ConfigErrors, Validator};
use crate::{
    config::{bootstrap as file, model::*},
    tls::material,
};

/// ALPN names an HTTP listener may offer: ALPN picks the protocol served, so only these two.
const HTTP_ALPN: [&str; 2] = ["h2", "http/1.1"];

/// Checks one secret on its own; error paths start at its fields.
pub fn check_secret(s: &file::Secret) -> Result<Secret, ConfigErrors> {
    let mut v = Validator::default();
    let checked = v.secret("", s);
    v.alone(checked)
}

/// Makes the relative certificate, key and CA file paths of a bootstrap file relative to `base`,
/// the directory holding it, so a file means the same wherever the proxy is started from.
pub fn resolve_file_paths(f: &mut file::File, base: &Path) {
    let resolve = |p: &mut Option<String>| {
        if let Some(path) = p
            && Path::new(path.as_str()).is_relative()
        {
            *path = base.join(&*path).display().to_string();
        }
    };
    for l in &mut f.listeners {
        if let Some(tls) = &mut l.tls {
            for c in &mut tls.certificates {
                resolve(&mut c.source.cert_file);
                resolve(&mut c.source.key_file);
            }
            if let Some(cc) = &mut tls.client_certificate {
                resolve(&mut cc.ca_file);
            }
        }
    }
    for c in &mut f.clusters {
        if let Some(tls) = &mut c.tls {
            resolve(&mut tls.ca_file);
            if let Some(cert) = &mut tls.client_certificate {
                resolve(&mut cert.cert_file);
                resolve(&mut cert.key_file);
            }
        }
    }
}

impl Validator {
    /// Every secret, then their names' uniqueness.
    pub(super) fn secrets(&mut self, secrets: &[file::Secret]) -> Vec<Secret> {
        let checked: Vec<Secret> = secrets
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.secret(&format!("secrets[{i}]"), s))
            .collect();
        self.unique("secrets", checked.iter().map(|s| &*s.name));
        checked
    }

    fn secret(&mut self, path: &str, s: &file::Secret) -> Option<Secret> {
        let before = self.errors.len();
        let name = self.name(path, &s.name);
        match (&s.certificate_chain, &s.private_key) {
            (Some(chain), Some(key)) => {
                if let Err(e) = material::certificate(chain.as_bytes(), key, SystemTime::now()) {
                    self.error(format!("{path}.certificate_chain"), e.to_string());
                }
            }
            (Some(_), None) => self.error(
                format!("{path}.private_key"),
                "required with certificate_chain",
            ),
            (None, Some(_)) => self.error(
                format!("{path}.certificate_chain"),
                "required with private_key",
            ),
            (None, None) if s.ca_bundle.is_none() => self.error(
                path,
                "holds nothing: give certificate_chain and private_key, or ca_bundle",
            ),
            (None, None) => {}
        }
        if let Some(ca) = &s.ca_bundle
            && let Err(e) = material::ca_bundle(ca.as_bytes())
        {
            self.error(format!("{path}.ca_bundle"), e.to_string());
        }
        (self.errors.len() == before).then(|| Secret {
            name,
            certificate_chain: s.certificate_chain.as_deref().map(Arc::from),
            private_key: s.private_key.clone(),
            ca_bundle: s.ca_bundle.as_deref().map(Arc::from),
        })
    }

    /// A listener's `tls:`. `secrets`: the configuration's checked secrets, or `None` when the
    /// listener is checked alone (whether a named secret exists is then the configuration's
    /// matter).
    pub(super) fn listener_tls(
        &mut self,
        path: &str,
        tls: &file::ListenerTls,
        http: bool,
        secrets: Option<&[Secret]>,
    ) -> Option<ServerTls> {
        let before = self.errors.len();
        if tls.certificates.is_empty() {
            self.error(format!("{path}.certificates"), "must list at least one");
        }
        let mut seen = HashSet::new();
        let mut defaults = 0;
        let certificates: Vec<ServerCertificate> = tls
            .certificates
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let p = format!("{path}.certificates[{i}]");
                let mut names = Vec::with_capacity(c.server_names.len());
                for (j, n) in c.server_names.iter().enumerate() {
                    let Some(n) = self.server_name(&format!("{p}.server_names[{j}]"), n) else {
                        continue;
                    };
                    if !seen.insert(n.clone()) {
                        self.error(
                            format!("{p}.server_names[{j}]"),
                            format!("{n:?} is claimed by another certificate of this listener"),
                        );
                    }
                    names.push(n);
                }
                if c.server_names.is_empty() {
                    defaults += 1;
                    if defaults > 1 {
                        self.error(
                            format!("{p}.server_names"),
                            "only one certificate may have no server names (the default)",
                        );
                    }
                }
                let source = self.certificate_source(&p, &c.source, secrets)?;
                Some(ServerCertificate {
                    server_names: names.into(),
                    source,
                })
            })
            .collect();
        let unknown_server_name = match tls.unknown_server_name.as_deref() {
            None | Some("default") => UnknownServerName::Default,
            Some("refuse") => UnknownServerName::Refuse,
            Some(other) => {
                self.error(
                    format!("{path}.unknown_server_name"),
                    format!("{other:?} is not one of default, refuse"),
                );
                UnknownServerName::Default
            }
        };
        let alpn: Vec<Arc<str>> = match &tls.alpn {
            None if http => HTTP_ALPN.iter().map(|a| Arc::from(*a)).collect(),
            None => Vec::new(),
            Some(list) => list
                .iter()
                .enumerate()
                .filter_map(|(i, a)| {
                    let known = if http {
                        HTTP_ALPN.contains(&a.as_str())
                    } else {
                        !a.is_empty() && a.len() <= 255 && a.bytes().all(|b| b.is_ascii_graphic())
                    };
                    if !known {
                        self.error(
                            format!("{path}.alpn[{i}]"),
                            if http {
                                format!("unknown ALPN protocol {a:?} (expected \"h2\" or \"http/1.1\")")
                            } else {
                                format!("{a:?} is not an ALPN protocol name (1 to 255 printable ASCII characters)")
                            },
                        );
                    }
                    known.then(|| Arc::from(a.as_str()))
                })
                .collect(),
        };
        self.unique(&format!("{path}.alpn"), alpn.iter().map(|a| &**a));
        let min_version = match tls.min_version.as_deref() {
            None | Some("1.2") => TlsVersion::Tls12,
            Some("1.3") => TlsVersion::Tls13,
            Some(other) => {
                self.error(
                    format!("{path}.min_version"),
                    format!("{other:?} is not one of \"1.2\", \"1.3\""),
                );
                TlsVersion::Tls12
            }
        };
        let client_certificate = tls.client_certificate.as_ref().and_then(|c| {
            let p = format!("{path}.client_certificate");
            let mode = match c.mode.as_deref() {
                None | Some("require") => ClientCertificateMode::Require,
                Some("optional") => ClientCertificateMode::Optional,
                Some(other) => {
                    self.error(
                        format!("{p}.mode"),
                        format!("{other:?} is not one of require, optional"),
                    );
                    ClientCertificateMode::Require
                }
            };
            let ca = match (&c.ca_file, &c.ca_secret) {
                (Some(f), None) => {
                    if let Err(e) = material::ca_file(Path::new(f)) {
                        self.error(format!("{p}.ca_file"), e.to_string());
                    }
                    CaSource::File(Path::new(f).into())
                }
                (None, Some(s)) => {
                    if let Some(secrets) = secrets {
                        match secrets.iter().find(|x| &*x.name == s.as_str()) {
                            None => self.error(
                                format!("{p}.ca_secret"),
                                format!("secret {s:?} is not defined"),
                            ),
                            Some(x) if x.ca_bundle.is_none() => self.error(
                                format!("{p}.ca_secret"),
                                format!("secret {s:?} has no ca_bundle"),
                            ),
                            Some(_) => {}
                        }
                    }
                    CaSource::Secret(s.as_str().into())
                }
                _ => {
                    self.error(p.clone(), "give exactly one of ca_file, ca_secret");
                    return None;
                }
            };
            Some(ClientCertificate { mode, ca })
        });
        (self.errors.len() == before).then(|| ServerTls {
            certificates: certificates.into(),
            unknown_server_name,
            alpn: alpn.into(),
            min_version,
            client_certificate,
        })
    }

    /// A lower-case DNS name, or `*.` and one.
    fn server_name(&mut self, path: &str, name: &str) -> Option<Arc<str>> {
        let lower = name.to_ascii_lowercase();
        let host = lower.strip_prefix("*.").unwrap_or(&lower);
        let valid = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid {
            self.error(
                path,
                format!("{name:?} is not a DNS name or a \"*.\" wildcard of one"),
            );
            return None;
        }
        Some(lower.into())
    }

    fn certificate_source(
        &mut self,
        path: &str,
        s: &file::CertificateSource,
        secrets: Option<&[Secret]>,
    ) -> Option<CertificateSource> {
        match (&s.cert_file, &s.key_file, &s.secret) {
            (Some(cert), Some(key), None) => {
                let (cert, key) = (Path::new(cert), Path::new(key));
                if let Err(e) = material::certificate_files(cert, key, SystemTime::now()) {
                    self.error(path, e.to_string());
                    return None;
                }
                Some(CertificateSource::Files {
                    cert_file: cert.into(),
                    key_file: key.into(),
                })
            }
            (None, None, Some(name)) => {
                if let Some(secrets) = secrets {
                    match secrets.iter().find(|x| &*x.name == name.as_str()) {
                        None => {
                            self.error(
                                format!("{path}.secret"),
                                format!("secret {name:?} is not defined"),
                            );
                            return None;
                        }
                        Some(x) if x.certificate_chain.is_none() => {
                            self.error(
                                format!("{path}.secret"),
                                format!("secret {name:?} has no certificate_chain and private_key"),
                            );
                            return None;
                        }
                        Some(_) => {}
                    }
                }
                Some(CertificateSource::Secret(name.as_str().into()))
            }
            (Some(_), None, None) => {
                self.error(format!("{path}.key_file"), "required with cert_file");
                None
            }
            (None, Some(_), None) => {
                self.error(format!("{path}.cert_file"), "required with key_file");
                None
            }
            (None, None, None) => {
                self.error(
                    path,
                    "give cert_file and key_file, or secret (neither was given)",
                );
                None
            }
            _ => {
                self.error(path, "give cert_file and key_file, or secret, not both");
                None
            }
        }
    }
}
