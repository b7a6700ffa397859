//! TLS from Kubernetes objects: a Gateway listener's `certificateRefs` resolve to
//! `kubernetes.io/tls` Secrets served as Secret resources (named `<namespace>/<name>`), and a
//! `BackendTLSPolicy` gives a Service's cluster upstream TLS with its CA from a ConfigMap.
//! Every message here names objects and keys, never a value: Secrets hold private keys.

use std::time::{SystemTime, UNIX_EPOCH};

use rustls::{
    crypto::ring::sign::any_supported_type,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};
use trellis_proto::discovery::v1 as api;

use crate::{
    catalog::{Catalog, ObjectKey},
    diagnostics as d,
    source::manifest::{
        BackendTlsPolicy, FrontendValidation, Gateway, GatewayListener, SecretObjectRef,
    },
};

/// The Secret type whose `tls.crt` and `tls.key` the controller serves.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// A reference the controller cannot use, with the Gateway API reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unresolved {
    pub reason: &'static str,
    pub message: String,
}

/// A certificateRef that names a usable `kubernetes.io/tls` Secret. `problem` says why its
/// certificate fails the controller's check (it is served all the same: the proxy refuses it by
/// name and keeps the version it held, so a bad rotation never takes a certificate away).
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedCertificate {
    pub secret: api::Secret,
    pub problem: Option<String>,
}

/// The Secret resource name of a Kubernetes Secret.
pub fn secret_name(key: &ObjectKey) -> String {
    key.to_string()
}

/// The Secret resource name holding the CA bundle of a ConfigMap (a different name space from
/// Secrets, so a Secret and a ConfigMap of the same name never collide).
pub fn config_map_secret_name(key: &ObjectKey) -> String {
    format!("configmap/{key}")
}

/// Resolves one `certificateRefs` entry of a listener of the Gateway `gateway`.
pub fn resolve_certificate_ref(
    catalog: &Catalog,
    gateway: &ObjectKey,
    r: &SecretObjectRef,
    now: SystemTime,
) -> Result<ResolvedCertificate, Unresolved> {
    let invalid = |message: String| Unresolved {
        reason: d::INVALID_CERTIFICATE_REF,
        message,
    };
    let group = r.group.as_deref().unwrap_or("");
    let kind = r.kind.as_deref().unwrap_or("Secret");
    if !(group.is_empty() || group == "core") || kind != "Secret" {
        return Err(invalid(format!(
            "certificateRef {group}/{kind} {:?}: only core Secrets are supported",
            r.name
        )));
    }
    let namespace = r.namespace.as_deref().unwrap_or(&gateway.namespace);
    let key = ObjectKey::new(namespace, &r.name);
    if namespace != gateway.namespace
        && !granted(catalog, &gateway.namespace, "Gateway", &key, "Secret")
    {
        return Err(Unresolved {
            reason: d::REF_NOT_PERMITTED,
            message: format!(
                "Secret {key} is in another namespace and no ReferenceGrant in {namespace} \
                 lets Gateways of {} refer to it",
                gateway.namespace
            ),
        });
    }
    let Some(secret) = catalog.secrets.get(&key) else {
        return Err(invalid(format!("Secret {key} does not exist")));
    };
    let kind_of_secret = secret.kind_of_secret.as_deref().unwrap_or("Opaque");
    if kind_of_secret != TLS_SECRET_TYPE {
        return Err(invalid(format!(
            "Secret {key} has type {kind_of_secret:?}, not {TLS_SECRET_TYPE:?}"
        )));
    }
    let value = |field: &str| match secret.value(field) {
        Ok(Some(v)) if !v.is_empty() => Ok(v),
        Ok(_) => Err(invalid(format!("Secret {key} has no {field}"))),
        Err(why) => Err(invalid(format!("Secret {key}: {why}"))),
    };
    let chain = value("tls.crt")?;
    let private_key = value("tls.key")?;
    let problem = check_certificate(&chain, &private_key, now)
        .err()
        .map(|why| format!("Secret {key}: {why}"));
    let text = |bytes: Vec<u8>, field: &str| {
        String::from_utf8(bytes)
            .map_err(|_| invalid(format!("Secret {key}: {field} is not PEM text")))
    };
    Ok(ResolvedCertificate {
        secret: api::Secret {
            name: secret_name(&key),
            certificate_chain: text(chain, "tls.crt")?,
            private_key: text(private_key, "tls.key")?,
            ca_bundle: String::new(),
        },
        problem,
    })
}

/// Whether a ReferenceGrant in `to`'s namespace lets `from_kind` objects (Gateway API group) of
/// `from_namespace` refer to `to` of core kind `to_kind`.
pub(super) fn granted(
    catalog: &Catalog,
    from_namespace: &str,
    from_kind: &str,
    to: &ObjectKey,
    to_kind: &str,
) -> bool {
    catalog
        .reference_grants
        .iter()
        .filter(|(key, _)| key.namespace == to.namespace)
        .any(|(_, grant)| {
            grant.spec.from.iter().any(|f| {
                f.group == GATEWAY_GROUP && f.kind == from_kind && f.namespace == from_namespace
            }) && grant.spec.to.iter().any(|t| {
                t.group.is_empty()
                    && t.kind == to_kind
                    && t.name.as_deref().is_none_or(|n| n == to.name)
            })
        })
}

/// Checks a PEM chain and key as the proxy will: the chain parses, the key parses and matches
/// the leaf, and the leaf is within its validity period at `now`. Messages name the field only.
pub fn check_certificate(chain_pem: &[u8], key_pem: &[u8], now: SystemTime) -> Result<(), String> {
    let mut chain = Vec::new();
    for (i, c) in CertificateDer::pem_slice_iter(chain_pem).enumerate() {
        let c = c.map_err(|_| format!("tls.crt: certificate {i} is not valid PEM"))?;
        chain.push(c);
    }
    let Some(leaf) = chain.first() else {
        return Err("tls.crt: no certificate found in the PEM data".into());
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("tls.crt: certificate 0 does not parse: {e}"))?;
    let validity = parsed.validity();
    let now_secs = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if now_secs > validity.not_after.timestamp() {
        return Err(format!(
            "tls.crt: the certificate expired at {} (unix seconds)",
            validity.not_after.timestamp()
        ));
    }
    if now_secs < validity.not_before.timestamp() {
        return Err(format!(
            "tls.crt: the certificate is not valid before {} (unix seconds)",
            validity.not_before.timestamp()
        ));
    }
    // The parse error is not shown: a decoder may echo the bytes it chokes on.
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| {
        "tls.key: no private key found in the PEM data (PKCS#8, PKCS#1 or SEC1 expected)".to_owned()
    })?;
    let signing = any_supported_type(&key)
        .map_err(|_| "tls.key: the private key is not of a supported type".to_owned())?;
    match CertifiedKey::new(chain, signing).keys_match() {
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err("tls.key does not match the certificate in tls.crt".into())
        }
        _ => Ok(()),
    }
}

/// The client-certificate validation a terminating listener asks for: its own
/// `tls.frontendValidation`, else the Gateway's `spec.tls.frontend` entry for its port, else
/// the Gateway's default.
pub fn frontend_validation<'a>(
    gateway: &'a Gateway,
    listener: &'a GatewayListener,
) -> Option<&'a FrontendValidation> {
    if let Some(v) = listener
        .tls
        .as_ref()
        .and_then(|t| t.frontend_validation.as_ref())
    {
        return Some(v);
    }
    let frontend = gateway.spec.tls.as_ref()?.frontend.as_ref()?;
    match frontend.per_port.iter().find(|p| p.port == listener.port) {
        Some(per_port) => per_port.tls.validation.as_ref(),
        None => frontend.default.validation.as_ref(),
    }
}

/// A frontend validation as the listener's client-certificate check and the Secret resource
/// holding its CA bundle.
pub fn client_validation(
    catalog: &Catalog,
    gateway: &ObjectKey,
    v: &FrontendValidation,
) -> Result<(api::ClientCertificateValidation, api::Secret), Unresolved> {
    let mode = match v.mode.as_deref() {
        None | Some("AllowValidOnly") => api::ClientCertificateMode::Require,
        Some("AllowInsecureFallback") => api::ClientCertificateMode::Optional,
        Some(other) => {
            return Err(Unresolved {
                reason: d::INVALID,
                message: format!("mode: {other:?} is not AllowValidOnly or AllowInsecureFallback"),
            });
        }
    };
    let [r] = &v.ca_certificate_refs[..] else {
        return Err(Unresolved {
            reason: d::INVALID_CA_CERTIFICATE_REF,
            message: format!(
                "caCertificateRefs: {} given, exactly one ConfigMap is supported",
                v.ca_certificate_refs.len()
            ),
        });
    };
    let kind = r.kind.as_deref().unwrap_or("");
    if kind != "ConfigMap" || !matches!(r.group.as_deref(), None | Some("")) {
        return Err(Unresolved {
            reason: d::INVALID_CA_CERTIFICATE_REF,
            message: format!("caCertificateRefs[0]: kind {kind:?}: only ConfigMaps are supported"),
        });
    }
    let namespace = r.namespace.as_deref().unwrap_or(&gateway.namespace);
    let key = ObjectKey::new(namespace, &r.name);
    if namespace != gateway.namespace
        && !granted(catalog, &gateway.namespace, "Gateway", &key, "ConfigMap")
    {
        return Err(Unresolved {
            reason: d::REF_NOT_PERMITTED,
            message: format!(
                "ConfigMap {key} is in another namespace and no ReferenceGrant in {namespace} \
                 lets Gateways of {} refer to it",
                gateway.namespace
            ),
        });
    }
    let ca = config_map_ca(catalog, &key)?;
    Ok((
        api::ClientCertificateValidation {
            mode: mode as i32,
            ca_secret: ca.name.clone(),
        },
        ca,
    ))
}

/// The `ca.crt` of a ConfigMap as a Secret resource's CA bundle, checked to hold certificates.
fn config_map_ca(catalog: &Catalog, cm_key: &ObjectKey) -> Result<api::Secret, Unresolved> {
    let invalid = |message: String| Unresolved {
        reason: d::INVALID_CA_CERTIFICATE_REF,
        message,
    };
    let Some(cm) = catalog.config_maps.get(cm_key) else {
        return Err(invalid(format!("ConfigMap {cm_key} does not exist")));
    };
    let Some(bundle) = cm.data.get("ca.crt").filter(|b| !b.is_empty()) else {
        return Err(invalid(format!("ConfigMap {cm_key} has no ca.crt")));
    };
    let certs = CertificateDer::pem_slice_iter(bundle.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| invalid(format!("ConfigMap {cm_key}: ca.crt is not valid PEM")))?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "ConfigMap {cm_key}: ca.crt holds no certificate"
        )));
    }
    Ok(api::Secret {
        name: config_map_secret_name(cm_key),
        certificate_chain: String::new(),
        private_key: String::new(),
        ca_bundle: bundle.clone(),
    })
}

/// Upstream TLS of a Service port under a BackendTLSPolicy, and the CA Secret resource it names
/// (none for the system roots).
#[derive(Clone, Debug, PartialEq)]
pub struct BackendTls {
    pub tls: api::UpstreamTls,
    pub ca: Option<api::Secret>,
}

/// The BackendTLSPolicy targeting a Service (and port name, when the policy gives a
/// sectionName), if any; the first by namespace/name wins, as older policies do in Gateway API.
pub fn backend_policy<'a>(
    catalog: &'a Catalog,
    service: &ObjectKey,
    port_name: Option<&str>,
) -> Option<(&'a ObjectKey, &'a BackendTlsPolicy)> {
    catalog
        .backend_tls_policies
        .iter()
        .filter(|(key, _)| key.namespace == service.namespace)
        .find(|(_, p)| {
            p.spec.target_refs.iter().any(|t| {
                matches!(t.group.as_deref(), None | Some("") | Some("core"))
                    && t.kind == "Service"
                    && t.name == service.name
                    && t.section_name
                        .as_deref()
                        .is_none_or(|s| Some(s) == port_name)
            })
        })
}

/// What a BackendTLSPolicy asks for, resolved against the catalog.
pub fn backend_tls(
    catalog: &Catalog,
    key: &ObjectKey,
    policy: &BackendTlsPolicy,
) -> Result<BackendTls, Unresolved> {
    let v = &policy.spec.validation;
    let invalid = |message: String| Unresolved {
        reason: d::INVALID_CA_CERTIFICATE_REF,
        message,
    };
    if v.hostname.is_empty() {
        return Err(Unresolved {
            reason: d::INVALID,
            message: "validation.hostname is required".into(),
        });
    }
    let ca = match (
        &v.ca_certificate_refs[..],
        v.well_known_ca_certificates.as_deref(),
    ) {
        ([], Some("System")) => None,
        ([], Some(other)) => {
            return Err(Unresolved {
                reason: d::INVALID,
                message: format!("validation.wellKnownCACertificates: {other:?} is not \"System\""),
            });
        }
        ([], None) => {
            return Err(Unresolved {
                reason: d::INVALID,
                message: "validation: caCertificateRefs or wellKnownCACertificates is required"
                    .into(),
            });
        }
        (_, Some(_)) => {
            return Err(Unresolved {
                reason: d::INVALID,
                message: "validation: caCertificateRefs and wellKnownCACertificates exclude \
                          each other"
                    .into(),
            });
        }
        ([r], None) => {
            let kind = r.kind.as_deref().unwrap_or("");
            if kind != "ConfigMap" || !matches!(r.group.as_deref(), None | Some("")) {
                return Err(invalid(format!(
                    "validation.caCertificateRefs[0]: kind {kind:?}: only ConfigMaps are supported"
                )));
            }
            let cm_key = ObjectKey::new(&key.namespace, &r.name);
            Some(config_map_ca(catalog, &cm_key)?)
        }
        (_, None) => {
            return Err(invalid(
                "validation.caCertificateRefs: more than one is not supported".into(),
            ));
        }
    };
    let mut verify_subject_alt_names = Vec::new();
    for (i, n) in v.subject_alt_names.iter().enumerate() {
        use api::subject_alt_name::Kind;
        let kind = match (n.kind.as_str(), &n.hostname, &n.uri) {
            ("Hostname", Some(h), None) if !h.is_empty() => Kind::Hostname(h.clone()),
            ("URI", None, Some(u)) if !u.is_empty() => Kind::Uri(u.clone()),
            (kind @ ("Hostname" | "URI"), _, _) => {
                return Err(Unresolved {
                    reason: d::INVALID,
                    message: format!(
                        "validation.subjectAltNames[{i}]: type {kind} needs {} and nothing else",
                        if kind == "URI" { "uri" } else { "hostname" }
                    ),
                });
            }
            (other, _, _) => {
                return Err(Unresolved {
                    reason: d::INVALID,
                    message: format!(
                        "validation.subjectAltNames[{i}].type: {other:?} is not Hostname or URI"
                    ),
                });
            }
        };
        verify_subject_alt_names.push(api::SubjectAltName { kind: Some(kind) });
    }
    Ok(BackendTls {
        tls: api::UpstreamTls {
            sni: v.hostname.clone(),
            ca_secret: ca.as_ref().map(|c| c.name.clone()).unwrap_or_default(),
            client_certificate_secret: String::new(),
            subject_alt_names: Vec::new(),
            verify_subject_alt_names,
        },
        ca,
    })
}
