//! The certificate authority: its key and certificate (from files, or generated once and kept in
//! a directory), and issuance from a CSR for an identity the caller has already proved.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData as _, SanType, SerialNumber,
    SubjectPublicKeyInfo,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, pem::PemObject};
use x509_parser::prelude::FromDer as _;

use super::WorkloadId;

/// How far back an issued certificate's notBefore is set: a peer whose clock is behind the
/// controller's still accepts a certificate issued a moment ago.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// Lifetime of issued certificates when `--cert-ttl` is not given; also the longest issued.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of a CA generated on first start.
const GENERATED_CA_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// File names in `--ca-dir`.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// CSRs larger than this are refused before parsing (a P-256 CSR is under 1 KiB).
const MAX_CSR_BYTES: usize = 16 * 1024;

/// Where the CA's key and certificate come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaSource {
    /// `--ca-cert` (the signing certificate first, then its issuers up to the root) and
    /// `--ca-key`.
    Files { cert: PathBuf, key: PathBuf },
    /// `--ca-dir`: generated on first start, reused after.
    Dir(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error(
        "--ca-dir {dir}: holds {present} but not {missing}; refusing to generate a new CA over \
         half of an old one (restore the missing file or empty the directory)"
    )]
    HalfPresent {
        dir: String,
        present: &'static str,
        missing: &'static str,
    },
    #[error("generating the CA: {0}")]
    Generate(String),
}

/// Why a CSR was refused. Messages name what is wrong with the request, never key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    #[error("csr_pem: not a PEM certificate signing request (\"CERTIFICATE REQUEST\")")]
    NotPem,
    #[error("csr_pem: larger than {MAX_CSR_BYTES} bytes")]
    TooLarge,
    #[error("csr_pem: not a valid PKCS#10 request: {0}")]
    Malformed(String),
    #[error("csr_pem: the request's signature does not verify with its own public key")]
    BadSignature,
    #[error(
        "csr_pem: unsupported key type {0} (ECDSA P-256 or P-384, Ed25519, or RSA of at least \
         2048 bits)"
    )]
    UnsupportedKey(String),
    #[error("signing the certificate: {0}")]
    Sign(String),
}

/// An issued certificate and what goes with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    /// The leaf, then intermediates, PEM.
    pub chain_pem: String,
    pub spiffe_id: String,
    pub not_after: SystemTime,
}

/// The signing key and certificate. The key is only ever used to sign; it is never logged,
/// served or copied out (its `Debug` shows the certificate's subject only).
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// Certificates sent after the leaf: the signing certificate when it is an intermediate, and
    /// any intermediates above it.
    intermediates_pem: String,
    bundle_pem: String,
    /// The signing certificate's notAfter: nothing is issued to outlive it.
    ca_not_after: SystemTime,
    trust_domain: String,
    cert_ttl: Duration,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("cert_ttl", &self.cert_ttl)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads (or, for a fresh `--ca-dir`, generates and persists) the CA.
    pub fn load(
        source: &CaSource,
        trust_domain: &str,
        cert_ttl: Duration,
    ) -> Result<Self, CaError> {
        let (cert_pem, key_pem, cert_path) = match source {
            CaSource::Files { cert, key } => (read(cert)?, read(key)?, cert.clone()),
            CaSource::Dir(dir) => {
                let (cert, key) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
                match (cert.exists(), key.exists()) {
                    (true, true) => {}
                    (false, false) => generate(dir, trust_domain)?,
                    (true, false) => return Err(half(dir, CA_CERT_FILE, CA_KEY_FILE)),
                    (false, true) => return Err(half(dir, CA_KEY_FILE, CA_CERT_FILE)),
                }
                (read(&cert)?, read(&key)?, cert)
            }
        };
        Self::from_pem(&cert_pem, &key_pem, &cert_path, trust_domain, cert_ttl)
    }

    fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        cert_path: &Path,
        trust_domain: &str,
        cert_ttl: Duration,
    ) -> Result<Self, CaError> {
        let invalid = |reason: String| CaError::Invalid {
            path: cert_path.display().to_string(),
            reason,
        };
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| invalid(format!("not PEM certificates: {e}")))?;
        let Some(signing) = certs.first() else {
            return Err(invalid("no certificate found".into()));
        };
        // The key's own parse error is not shown: it could echo key bytes.
        let key = KeyPair::from_pem(key_pem).map_err(|_| CaError::Invalid {
            path: "the CA key".into(),
            reason: "not a PEM private key rcgen can sign with (PKCS#8 ECDSA, Ed25519 or RSA)"
                .into(),
        })?;
        let (_, parsed) = x509_parser::parse_x509_certificate(signing)
            .map_err(|e| invalid(format!("certificate 0: {e}")))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(invalid(
                "the CA key does not match the first certificate".into(),
            ));
        }
        if !parsed.is_ca() {
            return Err(invalid(
                "the first certificate is not a CA (basicConstraints CA:TRUE)".into(),
            ));
        }
        let ca_not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(parsed.validity().not_after.timestamp().max(0) as u64);
        if ca_not_after <= SystemTime::now() {
            return Err(invalid("the CA certificate has expired".into()));
        }
        let issuer = Issuer::from_ca_cert_der(signing, key)
            .map_err(|e| invalid(format!("cannot sign with it: {e}")))?;
        // The root (last certificate) is what peers trust; everything below it travels with
        // each leaf.
        let pem = |c: &CertificateDer<'_>| pem_encode("CERTIFICATE", c);
        let bundle_pem = certs.last().map(pem).unwrap_or_default();
        let intermediates_pem = certs[..certs.len() - 1].iter().map(pem).collect();
        Ok(CertificateAuthority {
            issuer,
            intermediates_pem,
            bundle_pem,
            ca_not_after,
            trust_domain: trust_domain.to_owned(),
            cert_ttl,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificates peers verify against, PEM.
    pub fn trust_bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// Signs `csr_pem` for `id`. The CSR contributes its public key only: its subject and names
    /// are ignored, so a caller cannot ask for more than the identity it proved.
    pub fn issue(
        &self,
        csr_pem: &str,
        id: &WorkloadId,
        requested_ttl: Option<Duration>,
        now: SystemTime,
    ) -> Result<Issued, IssueError> {
        let public_key = csr_public_key(csr_pem)?;
        let spiffe_id = id.spiffe_id(&self.trust_domain);
        let ttl = requested_ttl
            .map_or(self.cert_ttl, |r| r.min(self.cert_ttl))
            .max(Duration::from_secs(1));
        // Never past the CA's own notAfter (which also bounds the addition).
        let not_after = now
            .checked_add(ttl)
            .map_or(self.ca_not_after, |t| t.min(self.ca_not_after));
        let mut params = CertificateParams::default();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = not_after.into();
        // Positive and non-zero whatever the random bytes: the top bit clear, a low bit set.
        let mut serial = [0u8; 16];
        serial.iter_mut().for_each(|b| *b = fastrand::u8(..));
        serial[0] = (serial[0] & 0x7f) | 0x01;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, self.trust_domain.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            spiffe_id
                .clone()
                .try_into()
                .map_err(|e| IssueError::Sign(format!("{e}")))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|e| IssueError::Sign(e.to_string()))?;
        Ok(Issued {
            chain_pem: format!("{}{}", cert.pem(), self.intermediates_pem),
            spiffe_id,
            not_after: truncate_to_second(not_after),
        })
    }
}

/// The CSR's public key, once its self-signature verifies and its key type is one peers can use.
fn csr_public_key(csr_pem: &str) -> Result<SubjectPublicKeyInfo, IssueError> {
    if csr_pem.len() > MAX_CSR_BYTES {
        return Err(IssueError::TooLarge);
    }
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|_| IssueError::NotPem)?;
    let (rest, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| IssueError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IssueError::Malformed(
            "trailing bytes after the request".into(),
        ));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let key_type = || spki.algorithm.algorithm.to_id_string();
    let key = SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|_| IssueError::UnsupportedKey(key_type()))?;
    let alg = key.algorithm();
    let supported = if alg == &rcgen::PKCS_ECDSA_P256_SHA256
        || alg == &rcgen::PKCS_ECDSA_P384_SHA384
        || alg == &rcgen::PKCS_ED25519
    {
        true
    } else if alg == &rcgen::PKCS_RSA_SHA256 {
        match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => rsa.key_size() >= 2048,
            _ => false,
        }
    } else {
        false
    };
    if !supported {
        return Err(IssueError::UnsupportedKey(key_type()));
    }
    csr.verify_signature()
        .map_err(|_| IssueError::BadSignature)?;
    Ok(key)
}

/// Generates a self-signed root in `dir`: the key file is created with mode 0600 before any key
/// byte is written, and both files are written under temporary names and renamed, so a crash
/// never leaves a half-written CA that the next start would trust.
fn generate(dir: &Path, trust_domain: &str) -> Result<(), CaError> {
    let write_err = |path: &Path, source| CaError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    // Only the controller's user lists the directory it creates (an existing one is left as is).
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|e| write_err(dir, e))?;
    let key = KeyPair::generate().map_err(|e| CaError::Generate(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    // A random suffix tells one generated CA from another (after a directory was emptied, or
    // in another cluster) in every certificate that names it as issuer.
    dn.push(
        DnType::CommonName,
        format!("Trellis mesh CA {:08x}", fastrand::u32(..)),
    );
    params.distinguished_name = dn;
    let now = SystemTime::now();
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + GENERATED_CA_TTL).into();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Generate(e.to_string()))?;
    let key_path = dir.join(CA_KEY_FILE);
    let cert_path = dir.join(CA_CERT_FILE);
    write_private(&key_path, key.serialize_pem().as_bytes())
        .map_err(|e| write_err(&key_path, e))?;
    write_private(&cert_path, cert.pem().as_bytes()).map_err(|e| write_err(&cert_path, e))?;
    tracing::info!(dir = %dir.display(), "generated a new mesh CA");
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn half(dir: &Path, present: &'static str, missing: &'static str) -> CaError {
    CaError::HalfPresent {
        dir: dir.display().to_string(),
        present,
        missing,
    }
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// X.509 times have one-second resolution.
fn truncate_to_second(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(dir: &Path, ttl: Duration) -> CertificateAuthority {
        CertificateAuthority::load(&CaSource::Dir(dir.to_owned()), "cluster.local", ttl).unwrap()
    }

    fn csr(key: &KeyPair, names: Vec<String>) -> String {
        CertificateParams::new(names)
            .unwrap()
            .serialize_request(key)
            .unwrap()
            .pem()
            .unwrap()
    }

    fn id() -> WorkloadId {
        WorkloadId::new("shop", "web").unwrap()
    }

    #[test]
    fn issues_only_the_proved_identity_with_the_csr_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), DEFAULT_CERT_TTL);
        let key = KeyPair::generate().unwrap();
        // The CSR asks for other names: they are ignored.
        let now = SystemTime::now();
        let issued = ca
            .issue(&csr(&key, vec!["admin.example".into()]), &id(), None, now)
            .unwrap();
        assert_eq!(issued.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");
        let der = CertificateDer::from_pem_slice(issued.chain_pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", san.value.general_names),
            "[URI(\"spiffe://cluster.local/ns/shop/sa/web\")]"
        );
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.der_bytes()
        );
        let validity = cert.validity();
        let unix =
            |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert_eq!(validity.not_after.timestamp(), unix(now + DEFAULT_CERT_TTL));
        assert_eq!(validity.not_before.timestamp(), unix(now - CLOCK_SKEW));
        assert!(!cert.is_ca());
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        // Two issues: two serials.
        let again = ca.issue(&csr(&key, vec![]), &id(), None, now).unwrap();
        let der2 = CertificateDer::from_pem_slice(again.chain_pem.as_bytes()).unwrap();
        let (_, cert2) = x509_parser::parse_x509_certificate(&der2).unwrap();
        assert_ne!(cert.raw_serial(), cert2.raw_serial());
    }

    #[test]
    fn lifetime_is_the_shorter_of_requested_and_maximum() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), Duration::from_secs(3600));
        let key = KeyPair::generate().unwrap();
        let now = truncate_to_second(SystemTime::now());
        for (requested, expected) in [
            (None, 3600),
            (Some(60), 60),
            (Some(7200), 3600),
            (Some(0), 1),
        ] {
            let issued = ca
                .issue(
                    &csr(&key, vec![]),
                    &id(),
                    requested.map(Duration::from_secs),
                    now,
                )
                .unwrap();
            assert_eq!(
                issued.not_after,
                now + Duration::from_secs(expected),
                "{requested:?}"
            );
        }
    }

    #[test]
    fn refuses_bad_csrs_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), DEFAULT_CERT_TTL);
        let now = SystemTime::now();
        let err = |pem: &str| ca.issue(pem, &id(), None, now).unwrap_err();
        assert_eq!(err("hello"), IssueError::NotPem);
        let key = KeyPair::generate().unwrap();
        let good = csr(&key, vec![]);
        // Flip one byte of the signature (the DER's last byte): the self-signature fails.
        let mut der = CertificateSigningRequestDer::from_pem_slice(good.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let tampered = pem_encode("CERTIFICATE REQUEST", &der);
        assert_eq!(err(&tampered), IssueError::BadSignature);
        // Made with openssl (ring cannot make either key): P-521, and RSA of 1024 bits.
        for pem in [P521_CSR, RSA1024_CSR] {
            let e = err(pem);
            assert!(matches!(e, IssueError::UnsupportedKey(_)), "{e}");
            assert!(e.to_string().contains("unsupported key type"), "{e}");
        }
        assert!(matches!(
            err(&"A".repeat(MAX_CSR_BYTES + 1)),
            IssueError::TooLarge
        ));
    }

    const P521_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIIBTjCBsQIBADAMMQowCAYDVQQDDAF4MIGbMBAGByqGSM49AgEGBSuBBAAjA4GG
AAQA6y3s6OXzLcZMtlbhR+k+XXm/rXLR9BesHyj2lAYlJNGVQnPrsH0KPJVdmgXq
JX2KknOVN4sLFjkt1CmliK3Bkc0Afnbqp1GGnHCWt1ILX2GNep6U7S4AtRIY6Gc9
yVwbwAvyISzEIOwOKStfNEk9HU4U+lCnfwsPDCPGEQcTPn7uoQigADAKBggqhkjO
PQQDAgOBiwAwgYcCQVeN449cXuxfuainR4HU8gWw3aIrZ7LvIUfe1DtHSn8s9mGd
PWofRqUJPsHCgMt7HtF6l7mLNwuHbkJJ47cy2PC3AkIB9alWohU05dDuR8vPpspO
fSNGyHbctnst3wJ9OLOEPAIvjH6B90U7HbjNX5KK9jfoNPzuz8hUg5kMQVMVxrcU
37Y=
-----END CERTIFICATE REQUEST-----
";
    const RSA1024_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIIBSzCBtQIBADAMMQowCAYDVQQDDAF4MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCB
iQKBgQCvgIv+apqQHTrQC39sCctSfjhWo64AYZKA4uz4UIWPnJrOd+pXLhAGl5HF
Ejja+Fd0c/NRy8RiGs+7P2YVCs6QgbYMmQR8ZZo5dM92j7M1mnhlqAJVJXVj7KV+
S2YPa9kovSnilzZl+j0dS0qojWC4FKzXwYAasNJn2U/JfNF/2QIDAQABoAAwDQYJ
KoZIhvcNAQELBQADgYEAVAReJUYBbQJiqZSL9Yt7m0C80E7/6fOe44DEOrAixpRx
Gk0pcnSM9Ct0JRw0K35mQrcEtXrq+91uSJuti9y6m54mdNk3O/fZXc8p8AUlXsFG
eE1RPeXWlH6bRJyY+a/cqF0hNe7QcNTvXQOKLbGAIxSlwJ/GE5byh4NC6jYilRQ=
-----END CERTIFICATE REQUEST-----
";

    #[test]
    fn a_generated_ca_is_persisted_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = ca(dir.path(), DEFAULT_CERT_TTL);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(dir.path().join(CA_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let second = ca(dir.path(), DEFAULT_CERT_TTL);
        assert_eq!(first.trust_bundle_pem(), second.trust_bundle_pem());
        // Half a CA is refused, never replaced.
        fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        let e = CertificateAuthority::load(
            &CaSource::Dir(dir.path().to_owned()),
            "cluster.local",
            DEFAULT_CERT_TTL,
        )
        .unwrap_err();
        assert!(e.to_string().contains("refusing to generate"), "{e}");
    }

    #[test]
    fn an_intermediate_from_files_signs_and_travels_with_each_leaf() {
        let dir = tempfile::tempdir().unwrap();
        let root_key = KeyPair::generate().unwrap();
        let mut root_params = CertificateParams::default();
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root_params
            .distinguished_name
            .push(DnType::CommonName, "root");
        let root = rcgen::CertifiedIssuer::self_signed(root_params, root_key).unwrap();
        let mid_key = KeyPair::generate().unwrap();
        let mid_pem = mid_key.serialize_pem();
        let mut mid_params = CertificateParams::default();
        mid_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        mid_params
            .distinguished_name
            .push(DnType::CommonName, "intermediate");
        let mid = mid_params.signed_by(&mid_key, &root).unwrap();
        let cert_path = dir.path().join("ca.pem");
        fs::write(&cert_path, format!("{}{}", mid.pem(), root.pem())).unwrap();
        let key_path = dir.path().join("ca-key.pem");
        fs::write(&key_path, mid_pem).unwrap();
        let ca = CertificateAuthority::load(
            &CaSource::Files {
                cert: cert_path,
                key: key_path,
            },
            "cluster.local",
            DEFAULT_CERT_TTL,
        )
        .unwrap();
        assert_eq!(ca.trust_bundle_pem(), root.pem());
        let key = KeyPair::generate().unwrap();
        let issued = ca
            .issue(&csr(&key, vec![]), &id(), None, SystemTime::now())
            .unwrap();
        let chain: Vec<_> = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
            .map(Result::unwrap)
            .collect();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1].as_ref(), mid.der().as_ref());
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let (_, mid) = x509_parser::parse_x509_certificate(&chain[1]).unwrap();
        leaf.verify_signature(Some(mid.public_key())).unwrap();
    }

    #[test]
    fn ca_files_must_match_and_be_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        let other = KeyPair::generate().unwrap();
        ca(dir.path(), DEFAULT_CERT_TTL);
        let key_path = dir.path().join("other.pem");
        fs::write(&key_path, other.serialize_pem()).unwrap();
        let e = CertificateAuthority::load(
            &CaSource::Files {
                cert: dir.path().join(CA_CERT_FILE),
                key: key_path,
            },
            "cluster.local",
            DEFAULT_CERT_TTL,
        )
        .unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
        assert!(!e.to_string().contains("PRIVATE"), "{e}");
    }
}
