//! Micro-benchmarks: route lookup on a 10,000-route table, and validating + compiling that
//! configuration (what every update costs).
//!
//!   cargo bench -p trellis-proxy --bench routing

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, Method};
use trellis_proxy::{
    config::{Compiled, validate},
    http::router::RequestHead,
};

/// 10,000 routes in one virtual host: per service an exact path, a template, a header-matched
/// prefix and a plain prefix (2,500 services), plus 10 regex routes and a catch-all.
fn big_config() -> String {
    let mut routes = String::new();
    for i in 0..2_497 {
        routes.push_str(&format!(
            "          - {{ match: {{ path: {{ exact: /svc{i}/health }} }}, direct_response: {{ status: 200 }} }}\n\
             \x20         - {{ match: {{ path: {{ template: \"/svc{i}/items/{{id}}\" }} }}, forward: {{ cluster: c }} }}\n\
             \x20         - {{ match: {{ path: {{ prefix: /svc{i} }}, headers: [{{ name: x-canary, exact: \"1\" }}] }}, forward: {{ cluster: c }} }}\n\
             \x20         - {{ match: {{ path: {{ prefix: /svc{i} }} }}, forward: {{ cluster: c }} }}\n"
        ));
    }
    for i in 0..10 {
        routes.push_str(&format!(
            "          - {{ match: {{ path: {{ regex: \"/re{i}/[0-9]+\" }} }}, forward: {{ cluster: c }} }}\n"
        ));
    }
    routes.push_str("          - { forward: { cluster: c } }\n");
    format!(
        "listeners: [{{ name: l, address: \"127.0.0.1:0\" }}]\n\
         clusters: [{{ name: c, endpoints: [\"127.0.0.1:1\"] }}]\n\
         route_configs:\n  - name: rc\n    virtual_hosts:\n      - name: v\n        domains: [\"*\", api.example.com]\n        routes:\n{routes}"
    )
}

fn bench(c: &mut Criterion) {
    let yaml = big_config();
    let config = validate::from_yaml(&yaml).expect("valid");
    let routes: usize = config.route_configs[0].virtual_hosts[0].routes.len();
    assert_eq!(routes, 2_497 * 4 + 11);
    let compiled = Compiled::build(config.clone().into(), 1, None).expect("compiles");
    let table = compiled.http_routes("l").unwrap().clone();
    let headers = HeaderMap::new();
    let mut canary = HeaderMap::new();
    canary.insert("x-canary", "1".parse().unwrap());
    let cases: [(&str, &str, &HeaderMap); 6] = [
        ("exact", "/svc1234/health", &headers),
        ("template", "/svc1234/items/42", &headers),
        ("prefix-deep", "/svc1234/a/b/c/d", &headers),
        ("prefix-header", "/svc1234/x", &canary),
        ("regex", "/re7/123", &headers),
        ("fallthrough", "/nothing/here", &headers),
    ];
    let mut g = c.benchmark_group("route_lookup_10k");
    for (name, path, headers) in cases {
        let head = RequestHead {
            host: "api.example.com",
            path,
            query: None,
            method: &Method::GET,
            headers,
        };
        assert!(table.route(&head).is_some(), "{name}");
        g.bench_function(name, |b| {
            b.iter(|| black_box(table.route(black_box(&head))))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("config_10k_routes");
    g.sample_size(10);
    g.bench_function("validate", |b| {
        b.iter(|| black_box(validate::from_yaml(black_box(&yaml)).unwrap()))
    });
    g.bench_function("compile", |b| {
        b.iter(|| black_box(Compiled::build(config.clone().into(), 2, Some(&compiled)).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
