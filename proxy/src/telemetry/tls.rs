//! TLS handshake and certificate-reload counters. Handshakes are counted through the registry by
//! key: a handshake costs far more than the lookup, and the labels (listener, version, ALPN from
//! the configured list, outcome) are all bounded.

use metrics::{Key, Label, Metadata, Recorder};

use super::{names, registry};

static META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

fn count(name: &'static str, labels: &[(&'static str, &str)]) {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.to_string()))
        .collect();
    registry()
        .register_counter(&Key::from_parts(name, labels), &META)
        .increment(1);
}

/// One handshake on `listener`: `outcome` is `success` or why it failed (`no_certificate`,
/// `protocol_version`, `bad_client_certificate`, `timeout`, `other`).
pub fn handshake(listener: &str, version: &str, alpn: &str, outcome: &'static str) {
    count(
        names::TLS_HANDSHAKES_TOTAL,
        &[
            ("listener", listener),
            ("version", version),
            ("alpn", alpn),
            ("outcome", outcome),
        ],
    );
}

/// A certificate file pair of `listener` was reread after a change: loaded, or refused.
pub fn certificate_reload(listener: &str, ok: bool) {
    count(
        names::TLS_CERTIFICATE_RELOADS_TOTAL,
        &[
            ("listener", listener),
            ("outcome", if ok { "loaded" } else { "error" }),
        ],
    );
}
