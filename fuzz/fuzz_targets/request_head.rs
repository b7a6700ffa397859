//! Arbitrary bytes as an HTTP/1.1 request head, parsed with httparse (the parser hyper uses) and
//! taken through what the proxy does before forwarding: header screening, path normalisation
//! under every escaped-slash action, and routing on a fixed route table. Checks that the
//! normalised path is normal (rooted, no dot segments, no empty segments, escapes upper-case,
//! no encoded slashes unless kept), that normalising is idempotent, and that no spelling of a
//! path under the denied prefix reaches another route.
#![no_main]

use std::{borrow::Cow, sync::LazyLock};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, Version};
use libfuzzer_sys::fuzz_target;
use trellis_proxy::{
    config::{
        model::{PathMatch, PathRewrite},
        validate,
    },
    http::{
        forward::new_path,
        headers::{Screened, screen},
        normalize::{EscapedSlashes, Normalized, normalize, request_target},
        router::{RequestHead, RouteTable, VhostInput},
    },
};

const ROUTES: &str = r#"
listeners:
  - { name: web, address: 127.0.0.1:8080, protocol: http, route_config: main }
route_configs:
  - name: main
    virtual_hosts:
      - name: api
        domains: [api.example.com, "*.example.org"]
        routes:
          - { name: deny, match: { path: { prefix: /public/admin } }, direct_response: { status: 403 } }
          - { name: public, match: { path: { prefix: /public } }, forward: { cluster: c } }
          - name: me
            match: { path: { exact: /t/me }, headers: [{ name: x-user, present: true }] }
            forward: { cluster: c }
          - { name: item, match: { path: { template: "/t/{id}" } }, forward: { cluster: c } }
          - { name: files, match: { path: { template: "/f/{*rest}" } }, forward: { cluster: c } }
          - { name: re, match: { path: { regex: "/re/[0-9]+" } }, forward: { cluster: c } }
          - name: v2
            match: { path: { prefix: /api } }
            filters: { rewrite: { prefix: /v2 } }
            forward: { cluster: c }
          - { name: post, match: { path: { prefix: /p }, method: POST }, forward: { cluster: c } }
          - { name: all, match: { path: { prefix: / } }, forward: { cluster: c } }
      - name: other
        domains: ["*"]
        routes:
          - { name: admin, match: { path: { exact: /admin } }, direct_response: { status: 403 } }
          - { name: rest, match: { path: { prefix: / } }, forward: { cluster: c } }
clusters:
  - { name: c, protocol: http1, endpoints: [127.0.0.1:8081] }
"#;

struct Entry {
    name: String,
    path: PathMatch,
    prefix_rewrite: Option<String>,
}

static TABLE: LazyLock<RouteTable<Entry>> = LazyLock::new(|| {
    let config = validate::from_yaml(ROUTES).expect("the fixed route table is valid");
    let vhosts = config.route_configs[0]
        .virtual_hosts
        .iter()
        .map(|vh| VhostInput {
            domains: vh.domains.to_vec(),
            routes: vh
                .routes
                .iter()
                .map(|r| {
                    let prefix_rewrite =
                        match r.filters.rewrite.as_ref().and_then(|w| w.path.as_ref()) {
                            Some(PathRewrite::Prefix(p)) => Some(p.to_string()),
                            _ => None,
                        };
                    let entry = Entry {
                        name: r.name.to_string(),
                        path: r.matcher.path.clone(),
                        prefix_rewrite,
                    };
                    (r.matcher.clone(), entry)
                })
                .collect(),
        })
        .collect();
    RouteTable::build(vhosts).expect("the fixed route table builds")
});

const ACTIONS: [EscapedSlashes; 4] = [
    EscapedSlashes::Reject,
    EscapedSlashes::Redirect,
    EscapedSlashes::UnescapeAndForward,
    EscapedSlashes::KeepUnchanged,
];

/// A path is under `prefix` on a segment boundary.
fn under(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn assert_normal(original: &str, path: &str, action: EscapedSlashes) {
    assert!(
        path.starts_with('/'),
        "{original:?} -> {path:?}: not rooted"
    );
    assert!(
        !path.contains("//"),
        "{original:?} -> {path:?}: empty segment"
    );
    for seg in path.split('/').skip(1) {
        assert!(
            seg != "." && seg != "..",
            "{original:?} -> {path:?}: dot segment"
        );
    }
    let bytes = path.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).expect("a whole escape");
            assert!(
                hex.iter()
                    .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h)),
                "{original:?} -> {path:?}: escape not upper-case hex"
            );
            let v = u8::from_str_radix(std::str::from_utf8(hex).unwrap(), 16).unwrap();
            assert!(
                !(v.is_ascii_alphanumeric() || b"-._~".contains(&v)),
                "{original:?} -> {path:?}: escaped unreserved character"
            );
            if action != EscapedSlashes::KeepUnchanged {
                assert!(
                    v != b'/' && v != b'\\',
                    "{original:?} -> {path:?}: encoded slash kept"
                );
            }
        }
        if action != EscapedSlashes::KeepUnchanged {
            assert!(b != b'\\', "{original:?} -> {path:?}: backslash kept");
        }
    }
    assert_eq!(
        normalize(path, action),
        Normalized::Path(Cow::Borrowed(path)),
        "{original:?} -> {path:?}: normalising again changes it"
    );
}

fn route(path: &str, query: Option<&str>, host: &str, method: &Method, headers: &HeaderMap) {
    let head = RequestHead {
        host,
        path,
        query,
        method,
        headers,
    };
    let Some(entry) = TABLE.route(&head) else {
        return;
    };
    match &entry.path {
        PathMatch::Exact(p) => assert_eq!(&**p, path, "route {}", entry.name),
        PathMatch::Prefix(p) => assert!(under(path, p), "{path:?} routed to {}", entry.name),
        PathMatch::Template(_) | PathMatch::Regex(_) => {}
    }
    // The security property normalisation exists for: nothing under the denied prefix reaches
    // a forwarding route of the virtual host that denies it.
    if under(path, "/public/admin") && entry.name != "rest" && entry.name != "admin" {
        assert_eq!(entry.name, "deny", "{path:?} escaped the deny route");
    }
    if let (Some(rewrite), PathMatch::Prefix(p)) = (&entry.prefix_rewrite, &entry.path) {
        let rewritten = new_path(path, &PathRewrite::Prefix(rewrite.as_str().into()), Some(p));
        assert!(
            under(&rewritten, rewrite),
            "{path:?} rewritten to {rewritten:?} escapes {rewrite:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let mut raw_headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut raw_headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(data) else {
        return;
    };
    // As hyper turns a parsed head into a request: anything it cannot represent is a 400 there.
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let Ok(uri) = target.parse::<Uri>() else {
        return;
    };
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut headers = HeaderMap::new();
    for h in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return;
        };
        headers.append(name, value);
    }
    if screen(&method, &uri, version, &headers) != Screened::Proceed {
        return;
    }
    let host = match uri.authority() {
        Some(a) => a.as_str().to_owned(),
        None => match headers.get(http::header::HOST).map(HeaderValue::to_str) {
            Some(Ok(h)) => h.to_owned(),
            Some(Err(_)) => return,
            None => String::new(),
        },
    };
    for action in ACTIONS {
        let original = uri.path();
        if original.starts_with('/') {
            match normalize(original, action) {
                Normalized::Path(p) => assert_normal(original, &p, action),
                Normalized::Redirect(p) => {
                    assert_eq!(action, EscapedSlashes::Redirect);
                    assert_normal(original, &p, action);
                }
                Normalized::Invalid(_) => {}
            }
        }
        let mut target = uri.clone();
        match request_target(&mut target, action) {
            Ok(None) => {
                if original.starts_with('/') {
                    assert_normal(original, target.path(), action);
                    assert_eq!(target.query(), uri.query(), "the query is kept as sent");
                }
                route(target.path(), target.query(), &host, &method, &headers);
            }
            Ok(Some(_redirect)) => assert_eq!(action, EscapedSlashes::Redirect),
            Err(_) => {}
        }
    }
});
