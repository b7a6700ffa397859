//! Table-driven routing tests: (request) → expected route, against one configuration that holds
//! every kind of match, wildcard hosts and precedence ties.

use http::{HeaderMap, HeaderName, HeaderValue, Method};

use super::router::RequestHead;
use crate::config::{Compiled, validate};

const CONFIG: &str = r#"
listeners:
  - { name: l, address: "127.0.0.1:0" }
clusters:
  - { name: c, endpoints: ["127.0.0.1:1"] }
route_configs:
  - name: main
    virtual_hosts:
      - name: exact
        domains: [api.example.com]
        routes:
          - { name: r-exact, match: { path: { exact: /users } }, forward: { cluster: c } }
          - { name: r-users-prefix, match: { path: { prefix: /users } }, forward: { cluster: c } }
          - { name: r-users-template, match: { path: { template: "/users/{id}" } }, forward: { cluster: c } }
          - { name: r-users-me, match: { path: { exact: /users/me } }, forward: { cluster: c } }
          - { name: r-files, match: { path: { template: "/files/{*rest}" } }, forward: { cluster: c } }
          - { name: r-regex, match: { path: { regex: "/v[0-9]+/.*" } }, forward: { cluster: c } }
          - { name: r-admin-prefix, match: { path: { prefix: /admin } }, forward: { cluster: c } }
          - { name: r-admin-get, match: { path: { prefix: /admin }, method: GET }, forward: { cluster: c } }
          - name: r-admin-hdr
            match: { path: { prefix: /admin }, headers: [{ name: x-role, exact: admin }] }
            forward: { cluster: c }
          - name: r-admin-hdr2
            match: { path: { prefix: /admin }, headers: [{ name: x-role, exact: admin }, { name: x-team }] }
            forward: { cluster: c }
          - name: r-admin-query
            match: { path: { prefix: /admin }, query: [{ name: debug, exact: "1" }] }
            forward: { cluster: c }
          - name: r-admin-get-hdr
            match: { path: { prefix: /admin }, method: get, headers: [{ name: X-Role, exact: admin }] }
            forward: { cluster: c }
          - { name: r-deep, match: { path: { prefix: /admin/deep } }, forward: { cluster: c } }
          - name: r-header-regex
            match: { path: { prefix: /hr }, headers: [{ name: x-version, regex: "v[0-9]+" }] }
            forward: { cluster: c }
          - name: r-header-absent
            match: { path: { prefix: /hr }, headers: [{ name: x-version, present: false }] }
            forward: { cluster: c }
          - name: r-query-regex
            match: { path: { prefix: /q }, query: [{ name: id, regex: "[0-9]+" }] }
            forward: { cluster: c }
          - name: r-query-present
            match: { path: { prefix: /q }, query: [{ name: flag }] }
            forward: { cluster: c }
          - name: r-tie-a
            match: { path: { prefix: /tie }, headers: [{ name: x-a }] }
            forward: { cluster: c }
          - name: r-tie-b
            match: { path: { prefix: /tie }, headers: [{ name: x-b }] }
            forward: { cluster: c }
          - { name: r-slash, match: { path: { prefix: /slash/ } }, forward: { cluster: c } }
          - { name: r-exact-post, match: { path: { exact: /m }, method: POST }, forward: { cluster: c } }
          - { name: r-exact-any, match: { path: { exact: /m } }, forward: { cluster: c } }
          - { name: r-root, match: { path: { prefix: / } }, forward: { cluster: c } }
      - name: wild
        domains: ["*.example.com"]
        routes:
          - { name: w-root, forward: { cluster: c } }
      - name: deeper-wild
        domains: ["*.eu.example.com"]
        routes:
          - { name: dw-root, forward: { cluster: c } }
      - name: mixed-case
        domains: [Shop.Example.ORG]
        routes:
          - { name: o-root, forward: { cluster: c } }
      - name: any
        domains: ["*"]
        routes:
          - { name: any-only, match: { path: { prefix: /only } }, forward: { cluster: c } }
"#;

struct Case {
    host: &'static str,
    method: Method,
    target: &'static str,
    headers: &'static [(&'static str, &'static str)],
    want: Option<&'static str>,
}

fn case(host: &'static str, target: &'static str, want: Option<&'static str>) -> Case {
    Case {
        host,
        method: Method::GET,
        target,
        headers: &[],
        want,
    }
}

fn api(target: &'static str, want: &'static str) -> Case {
    case("api.example.com", target, Some(want))
}

impl Case {
    fn method(mut self, m: Method) -> Self {
        self.method = m;
        self
    }
    fn headers(mut self, h: &'static [(&'static str, &'static str)]) -> Self {
        self.headers = h;
        self
    }
}

#[test]
fn route_selection_table() {
    let config = validate::from_yaml(CONFIG).expect("fixture config is valid");
    let compiled = Compiled::build(config.into(), 1, None).expect("fixture compiles");
    let table = &compiled.http_routes("l").unwrap();
    let post = Method::POST;
    let cases = vec![
        // Path kinds and their precedence.
        api("/users", "r-exact"),
        api("/users?x=1", "r-exact"),
        api("/users/", "r-users-prefix"),
        api("/users/42", "r-users-template"),
        api("/users/me", "r-users-me"),
        api("/users/42/posts", "r-users-prefix"),
        api("/usersx", "r-root"),
        api("/files/a/b/c", "r-files"),
        api("/files", "r-root"),
        api("/v2/things", "r-regex"),
        api("/v2", "r-root"),
        api("/vx/things", "r-root"),
        api("/slash", "r-slash"),
        api("/slash/x", "r-slash"),
        api("/slashy", "r-root"),
        // Same prefix: method, then header count, then query count, then order.
        api("/admin/x", "r-admin-get-hdr").headers(&[("x-role", "admin")]),
        api("/admin/x", "r-admin-get"),
        api("/admin/x", "r-admin-hdr")
            .method(post.clone())
            .headers(&[("x-role", "admin")]),
        api("/admin/x", "r-admin-hdr2")
            .method(post.clone())
            .headers(&[("x-role", "admin"), ("x-team", "a")]),
        api("/admin/x", "r-admin-get-hdr").headers(&[("x-role", "admin"), ("x-team", "a")]),
        api("/admin?debug=1", "r-admin-query").method(post.clone()),
        api("/admin?debug=2", "r-admin-prefix").method(post.clone()),
        api("/admin?debug=1", "r-admin-hdr")
            .method(post.clone())
            .headers(&[("x-role", "admin")]),
        api("/admin", "r-admin-prefix").method(Method::DELETE),
        api("/admin", "r-admin-prefix")
            .method(post.clone())
            .headers(&[("x-role", "Admin")]),
        // A longer prefix beats every tie-breaker of a shorter one.
        api("/admin/deep/x", "r-deep").method(post.clone()),
        api("/admin/deep", "r-deep").headers(&[("x-role", "admin")]),
        api("/admin/deeper", "r-admin-get"),
        // Header and query value matches.
        api("/hr", "r-header-regex").headers(&[("x-version", "v12")]),
        api("/hr", "r-root").headers(&[("x-version", "vx")]),
        api("/hr", "r-header-absent"),
        api("/q?id=123", "r-query-regex"),
        api("/q?id=abc&flag", "r-query-present"),
        api("/q?flag=1&id=12", "r-query-regex"),
        api("/q?id=12x", "r-root"),
        api("/q", "r-root"),
        // Equal rank: config order.
        api("/tie", "r-tie-a").headers(&[("x-b", "1"), ("x-a", "1")]),
        api("/tie", "r-tie-b").headers(&[("x-b", "1")]),
        // Exact paths with and without a method.
        api("/m", "r-exact-post").method(post.clone()),
        api("/m", "r-exact-any"),
        // Hosts: exact, case, port, trailing dot, wildcards, fallbacks.
        case("API.Example.COM:8443", "/users", Some("r-exact")),
        case("api.example.com.", "/users", Some("r-exact")),
        case("foo.example.com", "/x", Some("w-root")),
        case("a.b.example.com", "/x", Some("w-root")),
        case("x.eu.example.com", "/x", Some("dw-root")),
        case("eu.example.com", "/x", Some("w-root")),
        case("example.com", "/only/x", Some("any-only")),
        case("example.com", "/x", None),
        case("shop.example.org", "/", Some("o-root")),
        case("", "/only", Some("any-only")),
        case("[::1]:8080", "/only", Some("any-only")),
        case("127.0.0.1:8080", "/other", None),
    ];
    assert!(cases.len() >= 40);
    let mut failures = Vec::new();
    for c in &cases {
        let mut headers = HeaderMap::new();
        for (k, v) in c.headers {
            headers.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_static(v),
            );
        }
        let (path, query) = match c.target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (c.target, None),
        };
        let head = RequestHead {
            host: c.host,
            path,
            query,
            method: &c.method,
            headers: &headers,
        };
        let got = table.route(&head).map(|r| &*r.name);
        if got != c.want {
            failures.push(format!(
                "{} {} {}{} {:?}: want {:?}, got {:?}",
                c.method, c.host, c.target, "", c.headers, c.want, got
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn conflicting_templates_are_rejected_with_their_path() {
    let config = validate::from_yaml(
        r#"
clusters: [{ name: c, endpoints: ["127.0.0.1:1"] }]
route_configs:
  - name: main
    virtual_hosts:
      - name: v
        domains: ["*"]
        routes:
          - { match: { path: { template: "/u/{id}" } }, forward: { cluster: c } }
          - { match: { path: { template: "/u/{name}" } }, forward: { cluster: c } }
"#,
    )
    .unwrap();
    let err = Compiled::build(config.into(), 1, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("route_configs[0].virtual_hosts[0].routes[1].match.path.template"),
        "{err}"
    );
}

/// Routes `target` (GET, with `headers`) through the table compiled from `yaml`'s listener `l`.
fn route_name(
    yaml: &str,
    target: &str,
    headers: &[(&'static str, &'static str)],
) -> Option<String> {
    let config = validate::from_yaml(yaml).expect("test config is valid");
    let compiled = Compiled::build(config.into(), 1, None).expect("test config compiles");
    let table = compiled.http_routes("l").unwrap();
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(*k, HeaderValue::from_static(v));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let head = RequestHead {
        host: "t.example",
        path,
        query,
        method: &Method::GET,
        headers: &map,
    };
    table.route(&head).map(|r| r.name.to_string())
}

const FALL_THROUGH: &str = r#"
listeners:
  - { name: l, address: "127.0.0.1:0" }
clusters:
  - { name: c, endpoints: ["127.0.0.1:1"] }
route_configs:
  - name: main
    virtual_hosts:
      - name: v
        domains: ["*"]
        routes:
          - name: t-me
            match: { path: { template: "/t/me" }, headers: [{ name: x-me }] }
            forward: { cluster: c }
          - name: t-me-x
            match: { path: { template: "/t/me/{x}" }, headers: [{ name: x-me }] }
            forward: { cluster: c }
          - { name: t-id, match: { path: { template: "/t/{id}" } }, forward: { cluster: c } }
          - name: t-id-x
            match: { path: { template: "/t/{id}/{x}" }, headers: [{ name: x-deep }] }
            forward: { cluster: c }
          - { name: t-prefix, match: { path: { prefix: /t } }, forward: { cluster: c } }
          - { name: catch-all, match: { path: { prefix: / } }, forward: { cluster: c } }
"#;

/// "The first route in precedence order whose conditions all hold" holds across templates: when
/// every route of the most specific template that matches the path fails its conditions, the next
/// template that also matches the path is tried before regexes and prefixes.
#[test]
fn templates_fall_through_to_the_next_matching_template() {
    type Headers = &'static [(&'static str, &'static str)];
    let cases: &[(&str, Headers, Option<&str>)] = &[
        ("/t/me", &[("x-me", "1")], Some("t-me")),
        ("/t/me", &[], Some("t-id")),
        ("/t/42", &[], Some("t-id")),
        ("/t/me/a", &[("x-me", "1")], Some("t-me-x")),
        ("/t/me/a", &[("x-deep", "1")], Some("t-id-x")),
        ("/t/me/a", &[], Some("t-prefix")),
        ("/t/42/a", &[("x-deep", "1")], Some("t-id-x")),
        ("/t/42/a/b", &[("x-deep", "1")], Some("t-prefix")),
        ("/t", &[], Some("t-prefix")),
        ("/u/me", &[], Some("catch-all")),
    ];
    let mut failures = Vec::new();
    for (target, headers, want) in cases {
        let got = route_name(FALL_THROUGH, target, headers);
        if got.as_deref() != *want {
            failures.push(format!("{target} {headers:?}: want {want:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Random route tables against a reference that reads the precedence rules at the top of
/// `router.rs` literally: of every route whose path match and conditions hold, the one that
/// ranks first. Requests are normalised first, as the proxy routes them.
mod properties {
    use std::{cmp::Reverse, sync::LazyLock};

    use http::{HeaderMap, HeaderName, HeaderValue, Method};
    use proptest::prelude::*;

    use crate::{
        config::model::{
            DomainMatch, HeaderMatch, PathMatch, Pattern, QueryMatch, RouteMatch, ValueMatch,
        },
        http::{
            normalize::{EscapedSlashes, Normalized, normalize},
            router::{RequestHead, RouteTable, VhostInput},
        },
    };

    const SEGMENTS: [&str; 4] = ["a", "b", "me", "t"];
    const REGEXES: [&str; 5] = ["/a/.*", "/[ab]+(/.*)?", "/me", "/t/[^/]+", "/.*/"];
    static COMPILED: LazyLock<Vec<Pattern>> = LazyLock::new(|| {
        REGEXES
            .iter()
            .map(|r| Pattern::full_match(r).unwrap())
            .collect()
    });

    fn segment() -> impl Strategy<Value = &'static str> {
        prop::sample::select(SEGMENTS.to_vec())
    }

    fn literal_path(max: usize) -> impl Strategy<Value = String> {
        (prop::collection::vec(segment(), 0..max), any::<bool>()).prop_map(|(segs, slash)| {
            let mut p: String = segs.iter().map(|s| format!("/{s}")).collect();
            if p.is_empty() || slash {
                p.push('/');
            }
            p
        })
    }

    /// Literal segments and `{p}` parameters (some with literal text before or after them),
    /// sometimes ending in a catch-all.
    fn template() -> impl Strategy<Value = String> {
        let seg = prop_oneof![
            3 => segment().prop_map(str::to_owned),
            2 => Just("{p}".to_owned()),
            1 => prop::sample::select(vec!["m{p}", "me{p}", "{p}e", "{p}ee"]).prop_map(str::to_owned),
        ];
        (prop::collection::vec(seg, 1..4), 0..4u8).prop_map(|(segs, end)| {
            let mut t: String = segs.iter().map(|s| format!("/{s}")).collect();
            match end {
                0 => t.push_str("/{*rest}"),
                1 => t.push('/'),
                _ => {}
            }
            t
        })
    }

    fn path_match() -> impl Strategy<Value = PathMatch> {
        prop_oneof![
            literal_path(4).prop_map(|p| PathMatch::Exact(p.into())),
            // Stored as validation stores it: without a trailing slash, except for `/`.
            literal_path(3).prop_map(|p| {
                let p = p.trim_end_matches('/');
                PathMatch::Prefix(if p.is_empty() { "/" } else { p }.into())
            }),
            template().prop_map(|t| PathMatch::Template(t.into())),
            // Compiled once: compiling a regex per case would be most of the run time.
            prop::sample::select(COMPILED.clone()).prop_map(PathMatch::Regex),
        ]
    }

    fn header_match() -> impl Strategy<Value = HeaderMatch> {
        let value = prop_oneof![
            Just(ValueMatch::Present),
            Just(ValueMatch::Absent),
            Just(ValueMatch::Exact("1".into())),
        ];
        (prop::sample::select(vec!["x-a", "x-b"]), value).prop_map(|(name, value)| HeaderMatch {
            name: HeaderName::from_static(name),
            value,
        })
    }

    fn route_match() -> impl Strategy<Value = RouteMatch> {
        (
            path_match(),
            prop::option::of(prop::sample::select(vec![Method::GET, Method::POST])),
            prop::collection::vec(header_match(), 0..3),
            prop::option::weighted(0.2, Just(())),
        )
            .prop_map(|(path, method, headers, query)| RouteMatch {
                path,
                headers: headers.into(),
                query: query
                    .map(|()| QueryMatch {
                        name: "q".into(),
                        value: ValueMatch::Present,
                    })
                    .into_iter()
                    .collect::<Vec<_>>()
                    .into(),
                method,
            })
    }

    /// Request targets from the same segments, with dot segments, doubled slashes and escapes
    /// that normalisation resolves.
    fn raw_path() -> impl Strategy<Value = String> {
        let piece = prop::sample::select(vec![
            "/a", "/b", "/me", "/t", "/x", "/", "/.", "/..", "/%61", "/m%65", "/%2e%2e", "/mee",
            "/tee",
        ]);
        prop::collection::vec(piece, 0..6).prop_map(|v| v.concat())
    }

    #[derive(Debug, Clone)]
    struct Request {
        path: String,
        method: Method,
        headers: Vec<(&'static str, &'static str)>,
        query: Option<&'static str>,
    }

    fn request() -> impl Strategy<Value = Request> {
        (
            raw_path(),
            prop::sample::select(vec![Method::GET, Method::POST]),
            prop::sample::subsequence(vec![("x-a", "1"), ("x-b", "1"), ("x-b", "2")], 0..=3),
            prop::sample::select(vec![None, Some("q=1"), Some("r")]),
        )
            .prop_map(|(path, method, headers, query)| Request {
                path,
                method,
                headers,
                query,
            })
    }

    /// Drops template routes that matchit cannot hold next to the ones before them (the config
    /// compiler rejects such tables), so every generated table builds.
    fn buildable(routes: Vec<RouteMatch>) -> Vec<RouteMatch> {
        let mut scratch = matchit::Router::new();
        let mut seen = Vec::new();
        routes
            .into_iter()
            .filter(|m| match &m.path {
                PathMatch::Template(t) if seen.contains(t) => true,
                PathMatch::Template(t) => {
                    let ok = scratch.insert(&**t, ()).is_ok();
                    if ok {
                        seen.push(t.clone());
                    }
                    ok
                }
                _ => true,
            })
            .collect()
    }

    /// How specific one template segment is, as documented: a literal, then a parameter, then a
    /// catch-all.
    fn segment_rank(s: &str) -> (u8, Reverse<usize>, &str) {
        match s {
            "{p}" => (2, Reverse(0), ""),
            s if s.starts_with("{*") => (3, Reverse(0), ""),
            s if s.contains("{p}") => (1, Reverse(s.len() - 3), s),
            s => (0, Reverse(0), s),
        }
    }

    /// Whether one template segment matches one path segment; a parameter is never empty.
    fn segment_matches(t: &str, p: &str) -> bool {
        match t.split_once("{p}") {
            Some((before, after)) => {
                p.len() > before.len() + after.len() && p.starts_with(before) && p.ends_with(after)
            }
            None => t == p,
        }
    }

    /// Whether a template of literals, `{p}` and a final `{*rest}` matches `path`: a parameter
    /// takes one non-empty segment, a catch-all the non-empty rest.
    fn template_matches(template: &str, path: &str) -> bool {
        let tsegs: Vec<&str> = template[1..].split('/').collect();
        let psegs: Vec<&str> = path[1..].split('/').collect();
        for (i, t) in tsegs.iter().enumerate() {
            if t.starts_with("{*") {
                return psegs.len() > i && !psegs[i..].join("/").is_empty();
            }
            match psegs.get(i) {
                Some(p) if segment_matches(t, p) => {}
                _ => return false,
            }
        }
        tsegs.len() == psegs.len()
    }

    fn path_matches(m: &PathMatch, path: &str) -> bool {
        match m {
            PathMatch::Exact(p) => **p == *path,
            PathMatch::Prefix(p) => {
                &**p == "/" || path == &**p || path.starts_with(&format!("{p}/"))
            }
            PathMatch::Template(t) => template_matches(t, path),
            PathMatch::Regex(re) => re.is_match(path),
        }
    }

    fn value_holds(v: &ValueMatch, found: &[&str]) -> bool {
        match v {
            ValueMatch::Present => !found.is_empty(),
            ValueMatch::Absent => found.is_empty(),
            ValueMatch::Exact(want) => found.iter().any(|f| *f == &**want),
            ValueMatch::Regex(re) => found.iter().any(|f| re.is_match(f)),
        }
    }

    fn conditions_hold(m: &RouteMatch, req: &Request) -> bool {
        let method = m.method.as_ref().is_none_or(|want| *want == req.method);
        let headers = m.headers.iter().all(|h| {
            let found: Vec<&str> = req
                .headers
                .iter()
                .filter(|(k, _)| *k == h.name.as_str())
                .map(|(_, v)| *v)
                .collect();
            value_holds(&h.value, &found)
        });
        // The generated queries are `q=1` or `r`: the first `q` parameter is the only one.
        let query = m.query.iter().all(|q| {
            let found: Vec<&str> = req
                .query
                .into_iter()
                .flat_map(|qs| qs.split('&'))
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (k == &*q.name).then_some(v)
                })
                .take(1)
                .collect();
            value_holds(&q.value, &found)
        });
        method && headers && query
    }

    /// Precedence, smaller first: the path kind (exact, template, regex, prefix) and its own
    /// order (template specificity, longer prefix), then method, header count, query count and
    /// config order.
    type Rank<'a> = (
        u8,
        Vec<(u8, Reverse<usize>, &'a str)>,
        Reverse<usize>,
        Reverse<bool>,
        Reverse<usize>,
        Reverse<usize>,
        usize,
    );

    fn rank(m: &RouteMatch, index: usize) -> Rank<'_> {
        let (kind, specificity, length) = match &m.path {
            PathMatch::Exact(_) => (0, Vec::new(), 0),
            PathMatch::Template(t) => (1, t[1..].split('/').map(segment_rank).collect(), 0),
            PathMatch::Regex(_) => (2, Vec::new(), 0),
            PathMatch::Prefix(p) => (3, Vec::new(), p.len()),
        };
        (
            kind,
            specificity,
            Reverse(length),
            Reverse(m.method.is_some()),
            Reverse(m.headers.len()),
            Reverse(m.query.len()),
            index,
        )
    }

    fn reference(routes: &[RouteMatch], req: &Request, path: &str) -> Option<usize> {
        routes
            .iter()
            .enumerate()
            .filter(|(_, m)| path_matches(&m.path, path) && conditions_hold(m, req))
            .min_by_key(|(i, m)| rank(m, *i))
            .map(|(i, _)| i)
    }

    fn table(routes: &[RouteMatch]) -> RouteTable<usize> {
        RouteTable::build(vec![VhostInput {
            domains: vec![DomainMatch::Any],
            routes: routes.iter().cloned().zip(0..).collect(),
        }])
        .expect("templates that conflict were dropped")
    }

    fn route(table: &RouteTable<usize>, req: &Request, path: &str) -> Option<usize> {
        let mut headers = HeaderMap::new();
        for (k, v) in &req.headers {
            headers.append(*k, HeaderValue::from_static(v));
        }
        let head = RequestHead {
            host: "p.test",
            path,
            query: req.query,
            method: &req.method,
            headers: &headers,
        };
        table.route(&head).copied()
    }

    proptest! {
        // Each case routes several requests through one table; 512 cases keep the debug-build
        // run to a few seconds.
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn routing_agrees_with_the_reference(
            routes in prop::collection::vec(route_match(), 1..12).prop_map(buildable),
            requests in prop::collection::vec(request(), 1..8),
        ) {
            let table = table(&routes);
            for req in &requests {
                let path = match normalize(&req.path, EscapedSlashes::Reject) {
                    Normalized::Path(p) => p.into_owned(),
                    other => panic!("{:?} does not normalise: {other:?}", req.path),
                };
                let want = reference(&routes, req, &path);
                let got = route(&table, req, &path);
                prop_assert_eq!(got, want, "{:?} (normalised {:?}) with routes {:#?}", req, path, routes);
            }
        }
    }
}

/// Found by `properties`: with a parameter that has literal text beside it, matchit's one lookup
/// can miss a template that matches (here it finds nothing for `/me/a`), so such tables route
/// by scanning the templates in precedence order.
#[test]
fn a_template_beside_an_affixed_parameter_is_still_found() {
    const AFFIXED: &str = r#"
listeners:
  - { name: l, address: "127.0.0.1:0" }
clusters:
  - { name: c, endpoints: ["127.0.0.1:1"] }
route_configs:
  - name: main
    virtual_hosts:
      - name: v
        domains: ["*"]
        routes:
          - { name: suffixed, match: { path: { template: "/{p}e/" } }, forward: { cluster: c } }
          - { name: rest, match: { path: { template: "/{p}/{*rest}" } }, forward: { cluster: c } }
          - { name: catch-all, match: { path: { prefix: / } }, forward: { cluster: c } }
"#;
    let cases: &[(&str, &str)] = &[
        ("/me/a", "rest"),
        ("/me/", "suffixed"),
        ("/ma/b", "rest"),
        ("/ma/", "catch-all"),
        ("/me", "catch-all"),
    ];
    for (target, want) in cases {
        assert_eq!(
            route_name(AFFIXED, target, &[]).as_deref(),
            Some(*want),
            "{target}"
        );
    }
}
