//! Policy conversion and evaluation tables: (policies, call) → decision.

use std::{net::IpAddr, sync::Arc};

use trellis_proto::discovery::v1::{self as api, policy_path};

use super::*;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
const OTHER_NS: &str = "spiffe://cluster.local/ns/bank/sa/web";
const OTHER_TD: &str = "spiffe://other.local/ns/shop/sa/web";

fn rule() -> api::PolicyRule {
    api::PolicyRule::default()
}

fn prefix(p: &str) -> api::PolicyPath {
    api::PolicyPath {
        kind: Some(policy_path::Kind::Prefix(p.into())),
    }
}

fn exact(p: &str) -> api::PolicyPath {
    api::PolicyPath {
        kind: Some(policy_path::Kind::Exact(p.into())),
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn policy(name: &str, action: api::PolicyAction, rules: Vec<api::PolicyRule>) -> Arc<Policy> {
    let p = api::Policy {
        name: name.into(),
        action: action as i32,
        rules,
    };
    Arc::new(Policy::try_from(&p).unwrap_or_else(|e| panic!("{name}: {e}")))
}

fn allow(name: &str, rules: Vec<api::PolicyRule>) -> Arc<Policy> {
    policy(name, api::PolicyAction::Allow, rules)
}

fn deny(name: &str, rules: Vec<api::PolicyRule>) -> Arc<Policy> {
    policy(name, api::PolicyAction::Deny, rules)
}

/// A call: identity (or plaintext), source address, port, and `Some((method, path))` for HTTP.
struct Call {
    id: Option<&'static str>,
    ip: &'static str,
    port: u16,
    http: Option<(&'static str, &'static str)>,
}

fn http(id: Option<&'static str>, method: &'static str, path: &'static str) -> Call {
    Call {
        id,
        ip: "10.1.2.3",
        port: 8080,
        http: Some((method, path)),
    }
}

fn tcp(id: Option<&'static str>, ip: &'static str, port: u16) -> Call {
    Call {
        id,
        ip,
        port,
        http: None,
    }
}

/// The decision as (allowed, policy, rule).
fn decide(set: &PolicySet, call: &Call) -> (bool, String, String) {
    let id = call.id.map(|s| SpiffeId::parse(s).unwrap());
    let facts = Facts {
        source_identity: id.as_ref(),
        source_ip: call.ip.parse::<IpAddr>().unwrap(),
        destination_port: call.port,
        http: call.http.map(|(method, path)| HttpFacts { method, path }),
    };
    let (d, _) = set.evaluate(&facts);
    (
        d.allowed,
        d.policy.as_deref().unwrap_or("").to_owned(),
        d.rule.to_string(),
    )
}

/// Whether a single ALLOW policy with `r` allows each call, as expected.
fn allow_table(r: api::PolicyRule, cases: &[(Call, bool)]) {
    let set = PolicySet::new([allow("t/p", vec![r.clone()])]);
    for (i, (call, want)) in cases.iter().enumerate() {
        let (got, ..) = decide(&set, call);
        assert_eq!(
            got, *want,
            "case {i}: id {:?} ip {} port {} http {:?} with {r:?}",
            call.id, call.ip, call.port, call.http
        );
    }
}

#[test]
fn identities_exact_namespace_wildcard_and_any() {
    let exact_rule = api::PolicyRule {
        source_identities: strings(&[WEB]),
        ..rule()
    };
    allow_table(
        exact_rule,
        &[
            (http(Some(WEB), "GET", "/"), true),
            (http(Some(API), "GET", "/"), false),
            (http(Some(OTHER_TD), "GET", "/"), false),
            // A plaintext caller has no identity and matches no identity rule.
            (http(None, "GET", "/"), false),
        ],
    );
    let namespace = api::PolicyRule {
        source_identities: strings(&["spiffe://cluster.local/ns/shop/sa/*"]),
        ..rule()
    };
    allow_table(
        namespace,
        &[
            (http(Some(WEB), "GET", "/"), true),
            (http(Some(API), "GET", "/"), true),
            (http(Some(OTHER_NS), "GET", "/"), false),
            (http(Some(OTHER_TD), "GET", "/"), false),
            (
                http(
                    Some("spiffe://cluster.local/ns/shop/sa/web/extra"),
                    "GET",
                    "/",
                ),
                false,
            ),
            (
                http(
                    Some("spiffe://cluster.local/ns/shopping/sa/web"),
                    "GET",
                    "/",
                ),
                false,
            ),
            (http(None, "GET", "/"), false),
        ],
    );
    let any = api::PolicyRule {
        source_identities: strings(&["*"]),
        ..rule()
    };
    allow_table(
        any,
        &[
            (http(Some(WEB), "GET", "/"), true),
            (http(Some(OTHER_TD), "GET", "/"), true),
            (http(None, "GET", "/"), false),
        ],
    );
    // No identity condition: plaintext callers match too.
    allow_table(rule(), &[(http(None, "GET", "/"), true)]);
}

#[test]
fn cidrs_v4_v6_single_addresses_and_mapped_callers() {
    let r = api::PolicyRule {
        source_cidrs: strings(&["10.1.0.0/16", "fd00::/8", "192.168.1.7", "172.16.5.9/12"]),
        ..rule()
    };
    allow_table(
        r,
        &[
            (tcp(None, "10.1.255.255", 1), true),
            (tcp(None, "10.2.0.0", 1), false),
            (tcp(None, "fd12:3456::1", 1), true),
            (tcp(None, "fe80::1", 1), false),
            (tcp(None, "192.168.1.7", 1), true),
            (tcp(None, "192.168.1.8", 1), false),
            // Host bits in the range are ignored: 172.16.0.0/12.
            (tcp(None, "172.31.0.1", 1), true),
            (tcp(None, "172.32.0.1", 1), false),
            // An IPv4 caller as a dual-stack socket reports it.
            (tcp(None, "::ffff:10.1.0.1", 1), true),
            (tcp(None, "::ffff:10.2.0.1", 1), false),
        ],
    );
    let everyone = api::PolicyRule {
        source_cidrs: strings(&["0.0.0.0/0", "::ffff:127.0.0.0/104"]),
        ..rule()
    };
    allow_table(
        everyone,
        &[
            (tcp(None, "203.0.113.1", 1), true),
            (tcp(None, "2001:db8::1", 1), false),
        ],
    );
    let mapped = api::PolicyRule {
        source_cidrs: strings(&["::ffff:127.0.0.0/104"]),
        ..rule()
    };
    allow_table(
        mapped,
        &[
            (tcp(None, "127.0.0.1", 1), true),
            (tcp(None, "128.0.0.1", 1), false),
        ],
    );
}

#[test]
fn ports_methods_and_paths() {
    let r = api::PolicyRule {
        destination_ports: vec![8080, 9090],
        methods: strings(&["GET", "HEAD"]),
        paths: vec![prefix("/public"), exact("/health"), prefix("/api/v1/")],
        ..rule()
    };
    allow_table(
        r,
        &[
            (http(None, "GET", "/public"), true),
            (http(None, "GET", "/public/x/y"), true),
            (http(None, "GET", "/publicity"), false),
            (http(None, "GET", "/"), false),
            (http(None, "HEAD", "/health"), true),
            (http(None, "GET", "/health/x"), false),
            (http(None, "GET", "/healthz"), false),
            // A trailing slash in a prefix still matches element-wise.
            (http(None, "GET", "/api/v1"), true),
            (http(None, "GET", "/api/v1/users"), true),
            (http(None, "GET", "/api/v10"), false),
            // Methods are exact and case-sensitive.
            (http(None, "get", "/public"), false),
            (http(None, "POST", "/public"), false),
            (
                Call {
                    port: 9090,
                    ..http(None, "GET", "/public")
                },
                true,
            ),
            (
                Call {
                    port: 8081,
                    ..http(None, "GET", "/public")
                },
                false,
            ),
        ],
    );
    let root = api::PolicyRule {
        paths: vec![prefix("/")],
        ..rule()
    };
    allow_table(
        root,
        &[
            (http(None, "GET", "/"), true),
            (http(None, "DELETE", "/anything/at/all"), true),
        ],
    );
}

#[test]
fn deny_wins_and_allow_policies_make_the_default_deny() {
    let public = api::PolicyRule {
        name: "public-get".into(),
        methods: strings(&["GET"]),
        paths: vec![prefix("/public")],
        ..rule()
    };
    let no_bank = api::PolicyRule {
        name: "no-bank".into(),
        source_identities: strings(&["spiffe://cluster.local/ns/bank/sa/*"]),
        ..rule()
    };
    let none = PolicySet::new([]);
    assert!(none.is_empty());
    assert_eq!(
        decide(&none, &http(None, "POST", "/admin")),
        (true, String::new(), "default".into()),
        "no policy held: allowed"
    );

    let only_allow = PolicySet::new([allow("shop/public", vec![public.clone()])]);
    assert_eq!(
        decide(&only_allow, &http(Some(WEB), "GET", "/public/a")),
        (true, "shop/public".into(), "public-get".into())
    );
    assert_eq!(
        decide(&only_allow, &http(Some(WEB), "POST", "/public/a")),
        (false, String::new(), "default".into()),
        "an ALLOW policy held: what it does not allow is denied"
    );

    let only_deny = PolicySet::new([deny("shop/deny", vec![no_bank.clone()])]);
    assert_eq!(
        decide(&only_deny, &http(Some(WEB), "POST", "/admin")),
        (true, String::new(), "default".into()),
        "DENY policies alone leave the default allow"
    );
    assert_eq!(
        decide(&only_deny, &http(Some(OTHER_NS), "GET", "/")),
        (false, "shop/deny".into(), "no-bank".into())
    );

    let both = PolicySet::new([
        allow("shop/public", vec![public]),
        deny("shop/deny", vec![no_bank]),
    ]);
    assert_eq!(
        decide(&both, &http(Some(OTHER_NS), "GET", "/public")),
        (false, "shop/deny".into(), "no-bank".into()),
        "deny wins over a matching allow"
    );
    assert_eq!(
        decide(&both, &http(Some(WEB), "GET", "/public")),
        (true, "shop/public".into(), "public-get".into())
    );
}

#[test]
fn unnamed_rules_are_named_by_index() {
    let set = PolicySet::new([allow(
        "shop/p",
        vec![
            api::PolicyRule {
                destination_ports: vec![1],
                ..rule()
            },
            api::PolicyRule {
                destination_ports: vec![2],
                ..rule()
            },
        ],
    )]);
    assert_eq!(
        decide(&set, &tcp(None, "10.0.0.1", 2)),
        (true, "shop/p".into(), "rules[1]".into())
    );
}

#[test]
fn http_rules_on_tcp_connections() {
    let http_rule = api::PolicyRule {
        source_cidrs: strings(&["10.0.0.0/8"]),
        paths: vec![prefix("/admin")],
        ..rule()
    };
    // An ALLOW policy's HTTP rule never matches a TCP connection: it is denied by default.
    let allows = PolicySet::new([allow("t/allow-http", vec![http_rule.clone()])]);
    assert_eq!(
        decide(&allows, &tcp(None, "10.1.1.1", 8080)),
        (false, String::new(), "default".into())
    );
    assert!(decide(&allows, &http(None, "GET", "/admin")).0);
    // A DENY policy's HTTP rule matches a TCP connection on its other conditions.
    let denies = PolicySet::new([deny("t/deny-http", vec![http_rule])]);
    assert_eq!(
        decide(&denies, &tcp(None, "10.1.1.1", 8080)),
        (false, "t/deny-http".into(), "rules[0]".into())
    );
    assert!(
        decide(&denies, &tcp(None, "192.168.0.1", 8080)).0,
        "its other conditions must still hold"
    );
    assert!(
        decide(&denies, &http(None, "GET", "/public")).0,
        "on HTTP its paths apply"
    );
    // A rule with no HTTP condition applies to TCP as to HTTP.
    let tcp_allow = PolicySet::new([allow(
        "t/port",
        vec![api::PolicyRule {
            destination_ports: vec![5432],
            ..rule()
        }],
    )]);
    assert!(decide(&tcp_allow, &tcp(None, "10.0.0.1", 5432)).0);
    assert!(!decide(&tcp_allow, &tcp(None, "10.0.0.1", 5433)).0);
}

#[test]
fn requests_are_judged_on_the_normalised_path() {
    // The request path reaches the check after normalisation (`http::forward`); a path that
    // climbs out of an allowed prefix is judged where it lands.
    let set = PolicySet::new([allow(
        "t/public",
        vec![api::PolicyRule {
            paths: vec![prefix("/public")],
            ..rule()
        }],
    )]);
    for (raw, allowed) in [
        ("/public/../admin", false),
        ("/public/./x", true),
        ("//public", true),
        ("/%70ublic", true),
    ] {
        let normal = match crate::http::normalize::normalize(
            raw,
            crate::http::normalize::EscapedSlashes::KeepUnchanged,
        ) {
            crate::http::normalize::Normalized::Path(p) => p.into_owned(),
            other => panic!("{raw}: {other:?}"),
        };
        let call = Call {
            http: Some(("GET", Box::leak(normal.into_boxed_str()))),
            ..http(None, "GET", "/")
        };
        assert_eq!(decide(&set, &call).0, allowed, "{raw}");
    }
}

/// The refusal of one bad policy, as the NACK shows it after `policy "<name>": `.
fn refusal(p: api::Policy) -> String {
    Policy::try_from(&p).expect_err("refused").to_string()
}

fn one_rule(r: api::PolicyRule) -> api::Policy {
    api::Policy {
        name: "shop/p".into(),
        action: api::PolicyAction::Allow as i32,
        rules: vec![r],
    }
}

#[test]
fn bad_policies_are_refused_naming_the_field() {
    let cases: Vec<(api::Policy, &str)> = vec![
        (
            one_rule(api::PolicyRule {
                source_cidrs: strings(&["10.0.0.0/8", "10.0.0.0/33"]),
                ..rule()
            }),
            r#"rules[0].source_cidrs[1]: "10.0.0.0/33" is not a CIDR"#,
        ),
        (
            one_rule(api::PolicyRule {
                source_cidrs: strings(&["fd00::/129"]),
                ..rule()
            }),
            r#"rules[0].source_cidrs[0]: "fd00::/129" is not a CIDR: the prefix length must be 0 to 128"#,
        ),
        (
            one_rule(api::PolicyRule {
                source_cidrs: strings(&["10.0.0/8"]),
                ..rule()
            }),
            r#"rules[0].source_cidrs[0]: "10.0.0/8" is not a CIDR: not an IP address"#,
        ),
        (
            one_rule(api::PolicyRule {
                source_identities: strings(&["web"]),
                ..rule()
            }),
            r#"rules[0].source_identities[0]: "web" is not a SPIFFE ID"#,
        ),
        (
            one_rule(api::PolicyRule {
                source_identities: strings(&["spiffe://cluster.local/ns/*"]),
                ..rule()
            }),
            "a wildcard stands only for the service account",
        ),
        (
            one_rule(api::PolicyRule {
                source_identities: strings(&["spiffe://cluster.local/ns/shop/sa/w*"]),
                ..rule()
            }),
            "a wildcard stands only for the service account",
        ),
        (
            one_rule(api::PolicyRule {
                destination_ports: vec![80, 70000],
                ..rule()
            }),
            "rules[0].destination_ports[1]: 70000 is not a port (1-65535)",
        ),
        (
            one_rule(api::PolicyRule {
                destination_ports: vec![0],
                ..rule()
            }),
            "rules[0].destination_ports[0]: 0 is not a port",
        ),
        (
            one_rule(api::PolicyRule {
                methods: strings(&["GET POST"]),
                ..rule()
            }),
            r#"rules[0].methods[0]: "GET POST" is not an HTTP method"#,
        ),
        (
            one_rule(api::PolicyRule {
                paths: vec![prefix("public")],
                ..rule()
            }),
            r#"rules[0].paths[0].prefix: "public" does not start with '/'"#,
        ),
        (
            one_rule(api::PolicyRule {
                paths: vec![exact("/a"), exact("/a/../b")],
                ..rule()
            }),
            r#"rules[0].paths[1].exact: "/a/../b" is not a normalised path (requests are matched on "/b")"#,
        ),
        (
            one_rule(api::PolicyRule {
                paths: vec![exact("/a?b=1")],
                ..rule()
            }),
            r#"rules[0].paths[0].exact: "/a?b=1" holds a '?'"#,
        ),
        (
            one_rule(api::PolicyRule {
                paths: vec![api::PolicyPath { kind: None }],
                ..rule()
            }),
            "rules[0].paths[0]: neither exact nor prefix is set",
        ),
        (
            api::Policy {
                name: "shop/p".into(),
                action: api::PolicyAction::Deny as i32,
                rules: Vec::new(),
            },
            "rules: a policy needs at least one rule",
        ),
        (
            api::Policy {
                action: 7,
                ..one_rule(rule())
            },
            "action: 7 is not POLICY_ACTION_ALLOW (0) or POLICY_ACTION_DENY (1)",
        ),
        (
            api::Policy {
                rules: vec![
                    api::PolicyRule {
                        name: "rules[1]".into(),
                        ..rule()
                    },
                    rule(),
                ],
                ..one_rule(rule())
            },
            r#"rules[1].name: "rules[1]" names another rule of the policy too"#,
        ),
    ];
    for (p, want) in cases {
        let got = refusal(p);
        assert!(got.contains(want), "{got:?} does not say {want:?}");
    }
}

#[test]
fn decisions_are_counted_by_policy_and_rule() {
    let set = PolicySet::new([
        allow(
            "count/allow",
            vec![api::PolicyRule {
                name: "get".into(),
                methods: strings(&["GET"]),
                ..rule()
            }],
        ),
        deny(
            "count/deny",
            vec![api::PolicyRule {
                name: "admin".into(),
                paths: vec![prefix("/admin")],
                ..rule()
            }],
        ),
    ]);
    let value = |policy: &str, rule: &str, decision: &str| {
        let mut out = String::new();
        crate::telemetry::registry().render(&mut out);
        let line = format!(
            "{AUTHZ_DECISIONS_TOTAL}{{policy=\"{policy}\",rule=\"{rule}\",decision=\"{decision}\"}} "
        );
        out.lines()
            .find_map(|l| l.strip_prefix(&line))
            .map_or(0, |v| v.parse::<u64>().unwrap())
    };
    let count = |call: &Call| {
        let id = call.id.map(|s| SpiffeId::parse(s).unwrap());
        let facts = Facts {
            source_identity: id.as_ref(),
            source_ip: call.ip.parse().unwrap(),
            destination_port: call.port,
            http: call.http.map(|(method, path)| HttpFacts { method, path }),
        };
        let (_, counter) = set.evaluate(&facts);
        counter.increment(1);
    };
    count(&http(None, "GET", "/x"));
    count(&http(None, "GET", "/y"));
    count(&http(None, "GET", "/admin"));
    assert_eq!(value("count/allow", "get", "allow"), 2);
    assert_eq!(value("count/deny", "admin", "deny"), 1);
    assert_eq!(value("count/allow", "get", "deny"), 0, "no such series");

    // A set without the deny policy forgets its series; the allow policy's stay.
    PolicySet::new([allow(
        "count/allow",
        vec![api::PolicyRule {
            name: "get".into(),
            methods: strings(&["GET"]),
            ..rule()
        }],
    )])
    .forget_other_series();
    assert_eq!(value("count/allow", "get", "allow"), 2);
    let mut out = String::new();
    crate::telemetry::registry().render(&mut out);
    assert!(!out.contains("policy=\"count/deny\""), "{out}");
}
