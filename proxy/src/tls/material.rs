//! Certificate chains, private keys and CA bundles in PEM, checked before anything serves them: a
//! chain that does not parse, a key that does not match its certificate, or a certificate outside
//! its validity period is an error naming what is wrong, never carrying key bytes.

use std::{
    fmt,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::{
    RootCertStore,
    crypto::ring::sign::any_supported_type,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};
use serde::Deserialize;

/// A string that holds secret material: shown as `<redacted>` by `Debug` and `Display`, so a key
/// cannot reach a log line, a config dump or an error message by accident.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(s: impl Into<String>) -> Self {
        SecretString(s.into())
    }

    /// The secret itself; call sites are the few places that hand it to rustls.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Why certificate material was refused. No variant holds key bytes or PEM text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaterialError {
    #[error("no certificate found in the PEM data")]
    NoCertificate,
    #[error("certificate {index} of the chain is not valid PEM/DER: {reason}")]
    BadCertificate { index: usize, reason: String },
    #[error("no private key found in the PEM data (PKCS#8, PKCS#1 or SEC1 expected)")]
    NoKey,
    #[error("the private key is not usable: {0}")]
    BadKey(String),
    #[error("the private key does not match the certificate's public key")]
    KeyMismatch,
    #[error("the certificate expired at {not_after} (unix seconds)")]
    Expired { not_after: i64 },
    #[error("the certificate is not valid before {not_before} (unix seconds)")]
    NotYetValid { not_before: i64 },
    #[error("no CA certificate found in the bundle")]
    EmptyBundle,
    #[error("CA certificate {index} of the bundle is not usable: {reason}")]
    BadCa { index: usize, reason: String },
}

/// Certificate material from a file that could not be used; names the file, never its content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}: {source}")]
    Material {
        path: String,
        #[source]
        source: MaterialError,
    },
}

/// The PEM bytes of a certificate file and its key file, as read.
#[derive(Clone, PartialEq, Eq)]
pub struct PemFiles {
    pub chain: Vec<u8>,
    pub key: SecretString,
}

impl fmt::Debug for PemFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PemFiles")
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// Reads a certificate file and its key file. A key file others may read gets a warning: the
/// proxy serves it regardless, but it should be `0600` or `0640`.
pub fn read_pem_files(cert_file: &Path, key_file: &Path) -> Result<PemFiles, FileError> {
    let chain = read_pem(cert_file)?;
    let key = String::from_utf8(read_pem(key_file)?).map_err(|_| FileError::Material {
        path: key_file.display().to_string(),
        source: MaterialError::NoKey,
    })?;
    warn_if_readable_by_others(key_file);
    Ok(PemFiles {
        chain,
        key: SecretString::new(key),
    })
}

/// PEM files are kilobytes; a larger one is a mistake (or `/dev/zero`) and is not read whole.
const MAX_PEM_FILE: u64 = 1 << 20;

/// Reads a regular file of at most [`MAX_PEM_FILE`] bytes: a FIFO or a device would block or
/// never end.
fn read_pem(path: &Path) -> Result<Vec<u8>, FileError> {
    use std::io::Read;
    let fail = |reason: String| FileError::Read {
        path: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    let mut out = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PEM_FILE + 1).read_to_end(&mut out))
        .map_err(|e| fail(e.to_string()))?;
    if out.len() as u64 > MAX_PEM_FILE {
        return Err(fail(format!("larger than {MAX_PEM_FILE} bytes")));
    }
    Ok(out)
}

fn warn_if_readable_by_others(key_file: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(key_file)
        && meta.permissions().mode() & 0o004 != 0
    {
        tracing::warn!(file = %key_file.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "private key file is readable by every user; make it 0600 or 0640");
    }
}

/// [`certificate`] of PEM files: the error names the file at fault (the key file for a key that
/// does not parse, else the certificate file).
pub fn certificate_files(
    cert_file: &Path,
    key_file: &Path,
    now: SystemTime,
) -> Result<(Certificate, PemFiles), FileError> {
    let pem = read_pem_files(cert_file, key_file)?;
    let c = certificate_of(&pem, cert_file, key_file, now)?;
    Ok((c, pem))
}

/// [`certificate`] of PEM bytes read from `cert_file` and `key_file`.
pub fn certificate_of(
    pem: &PemFiles,
    cert_file: &Path,
    key_file: &Path,
    now: SystemTime,
) -> Result<Certificate, FileError> {
    certificate(&pem.chain, &pem.key, now).map_err(|source| {
        let at = match source {
            MaterialError::NoKey | MaterialError::BadKey(_) => key_file,
            _ => cert_file,
        };
        FileError::Material {
            path: at.display().to_string(),
            source,
        }
    })
}

/// [`ca_bundle`] of a PEM file.
pub fn ca_file(path: &Path) -> Result<RootCertStore, FileError> {
    let pem = read_pem(path)?;
    ca_bundle(&pem).map_err(|source| FileError::Material {
        path: path.display().to_string(),
        source,
    })
}

/// A checked certificate chain with its key, ready for rustls, and what operators watch.
#[derive(Debug, Clone)]
pub struct Certificate {
    pub key: Arc<CertifiedKey>,
    /// The leaf's `notAfter`.
    pub not_after: SystemTime,
    /// The leaf's DNS names (subject alternative names, else the subject's common name).
    pub dns_names: Vec<String>,
}

impl Certificate {
    /// Time left until `notAfter`; zero once it has passed.
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }
}

/// Parses and checks a PEM chain (leaf first) and its PEM private key, as of `now`.
pub fn certificate(
    chain_pem: &[u8],
    key_pem: &SecretString,
    now: SystemTime,
) -> Result<Certificate, MaterialError> {
    let chain = certificates(chain_pem)?;
    // The key's parse error is not shown: some decoders echo the input they choke on.
    let key = PrivateKeyDer::from_pem_slice(key_pem.expose().as_bytes())
        .map_err(|_| MaterialError::NoKey)?;
    let signing = any_supported_type(&key).map_err(|e| MaterialError::BadKey(e.to_string()))?;
    let (not_before, not_after, dns_names) = leaf_facts(&chain[0])?;
    let now_secs = unix(now);
    if now_secs > not_after {
        return Err(MaterialError::Expired { not_after });
    }
    if now_secs < not_before {
        return Err(MaterialError::NotYetValid { not_before });
    }
    let key = CertifiedKey::new(chain, signing);
    match key.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(MaterialError::KeyMismatch);
        }
        // The provider could not tell (no public key for this key type): accept, as rustls does.
        Err(rustls::Error::InconsistentKeys(_)) => {}
        Err(e) => {
            return Err(MaterialError::BadCertificate {
                index: 0,
                reason: e.to_string(),
            });
        }
    }
    Ok(Certificate {
        key: Arc::new(key),
        not_after: UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64),
        dns_names,
    })
}

/// Every certificate in a PEM text, in order; at least one.
pub fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, MaterialError> {
    let mut out = Vec::new();
    for (index, c) in CertificateDer::pem_slice_iter(pem).enumerate() {
        let c = c.map_err(|e| MaterialError::BadCertificate {
            index,
            reason: e.to_string(),
        })?;
        x509_parser::parse_x509_certificate(&c).map_err(|e| MaterialError::BadCertificate {
            index,
            reason: e.to_string(),
        })?;
        out.push(c);
    }
    if out.is_empty() {
        return Err(MaterialError::NoCertificate);
    }
    Ok(out)
}

/// A PEM bundle of trusted CA certificates.
pub fn ca_bundle(pem: &[u8]) -> Result<RootCertStore, MaterialError> {
    let mut roots = RootCertStore::empty();
    for (index, c) in CertificateDer::pem_slice_iter(pem).enumerate() {
        let c = c.map_err(|e| MaterialError::BadCa {
            index,
            reason: e.to_string(),
        })?;
        roots.add(c).map_err(|e| MaterialError::BadCa {
            index,
            reason: e.to_string(),
        })?;
    }
    if roots.is_empty() {
        return Err(MaterialError::EmptyBundle);
    }
    Ok(roots)
}

/// notBefore, notAfter (unix seconds) and DNS names of a certificate.
fn leaf_facts(der: &CertificateDer<'_>) -> Result<(i64, i64, Vec<String>), MaterialError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| MaterialError::BadCertificate {
            index: 0,
            reason: e.to_string(),
        })?;
    let validity = cert.validity();
    let mut names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok().map(str::to_owned)),
        );
    }
    Ok((
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
        names,
    ))
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str]) -> (String, SecretString) {
        let c = rcgen::generate_simple_self_signed(
            names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .expect("certificate");
        (
            c.cert.pem(),
            SecretString::new(c.signing_key.serialize_pem()),
        )
    }

    #[test]
    fn a_matching_pair_is_accepted_with_its_names_and_expiry() {
        let (chain, key) = self_signed(&["a.example", "*.b.example"]);
        let c = certificate(chain.as_bytes(), &key, SystemTime::now()).expect("valid");
        assert_eq!(c.dns_names, ["a.example", "*.b.example"]);
        assert!(c.remaining(SystemTime::now()) > Duration::from_secs(86_400));
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let (chain, _) = self_signed(&["a.example"]);
        let (_, other) = self_signed(&["a.example"]);
        let e = certificate(chain.as_bytes(), &other, SystemTime::now()).unwrap_err();
        assert_eq!(e, MaterialError::KeyMismatch);
    }

    #[test]
    fn an_expired_certificate_is_refused() {
        let (chain, key) = self_signed(&["a.example"]);
        // rcgen's default validity ends in 4096.
        let far = SystemTime::now() + Duration::from_secs(2_500 * 365 * 86_400);
        let e = certificate(chain.as_bytes(), &key, far).unwrap_err();
        assert!(matches!(e, MaterialError::Expired { .. }), "{e}");
    }

    #[test]
    fn devices_and_directories_are_not_read_as_pem() {
        for path in ["/dev/zero", "/"] {
            let e = ca_file(Path::new(path)).unwrap_err();
            assert_eq!(
                e,
                FileError::Read {
                    path: path.into(),
                    reason: "not a regular file".into()
                }
            );
        }
    }

    #[test]
    fn garbage_is_refused_without_echoing_the_key() {
        let (chain, _) = self_signed(&["a.example"]);
        let key = SecretString::new(
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWJ5dGVz\n-----END PRIVATE KEY-----\n",
        );
        let e = certificate(chain.as_bytes(), &key, SystemTime::now()).unwrap_err();
        let shown = format!("{e} {e:?} {key:?} {key}");
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
        assert_eq!(
            certificate(b"nothing", &key, SystemTime::now()).unwrap_err(),
            MaterialError::NoCertificate
        );
        assert_eq!(ca_bundle(b"").unwrap_err(), MaterialError::EmptyBundle);
    }
}
