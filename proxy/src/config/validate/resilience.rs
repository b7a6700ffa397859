//! Retries, rate limits, circuit breakers and retry budgets.

use std::{sync::Arc, time::Duration};

use super::{super::bootstrap as file, super::model::*, Validator};

/// Tries after the first, by default.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Request bodies up to this size are kept for replay by default.
pub const DEFAULT_REPLAY_BUFFER: usize = 64 * 1024;
/// Default for each circuit breaker limit (Envoy's).
pub const DEFAULT_CIRCUIT_LIMIT: u32 = 1024;
pub const DEFAULT_BUDGET_PERCENT: f64 = 20.0;
pub const DEFAULT_BUDGET_MIN_PER_SECOND: u32 = 10;
pub const DEFAULT_BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Largest replay buffer accepted.
const MAX_REPLAY_BUFFER: usize = 64 * 1024 * 1024;

/// The policy a route gets when neither it nor its virtual host has one: retry what provably
/// did not reach the upstream, and resets of idempotent requests, twice.
pub fn default_retry_policy() -> RetryPolicy {
    RetryPolicy {
        attempts: DEFAULT_RETRY_ATTEMPTS,
        retry_on: RetryOn::CONNECT_FAILURE
            .union(RetryOn::REFUSED_STREAM)
            .union(RetryOn::RESET),
        status_codes: Arc::from([]),
        per_try_timeout: None,
        backoff_base: DEFAULT_BACKOFF_BASE,
        backoff_max: DEFAULT_BACKOFF_BASE * 10,
        retry_non_idempotent: false,
        replay_buffer: DEFAULT_REPLAY_BUFFER,
    }
}

pub fn default_circuit_breakers() -> CircuitBreakers {
    CircuitBreakers {
        max_connections: DEFAULT_CIRCUIT_LIMIT,
        max_pending_requests: DEFAULT_CIRCUIT_LIMIT,
        max_requests: DEFAULT_CIRCUIT_LIMIT,
        max_retries: DEFAULT_CIRCUIT_LIMIT,
    }
}

pub fn default_retry_budget() -> RetryBudget {
    RetryBudget {
        ratio: DEFAULT_BUDGET_PERCENT / 100.0,
        min_retries_per_second: DEFAULT_BUDGET_MIN_PER_SECOND,
        window: DEFAULT_BUDGET_WINDOW,
    }
}

impl Validator {
    /// A retry policy; fields left out take the defaults (not the virtual host's: a route's
    /// policy replaces its host's whole).
    pub(super) fn retry(&mut self, path: &str, r: &file::Retry) -> RetryPolicy {
        let defaults = default_retry_policy();
        let retry_on = match &r.retry_on {
            None => defaults.retry_on,
            Some(names) => {
                let mut on = RetryOn::default();
                for (i, name) in names.iter().enumerate() {
                    match RetryOn::NAMES.iter().find(|(n, _)| n == name) {
                        Some((_, flag)) => on = on.union(*flag),
                        None => {
                            let known: Vec<&str> = RetryOn::NAMES.iter().map(|(n, _)| *n).collect();
                            self.error(
                                format!("{path}.retry_on[{i}]"),
                                format!(
                                    "unknown condition {name:?} (expected one of {})",
                                    known.join(", ")
                                ),
                            );
                        }
                    }
                }
                on
            }
        };
        for (i, code) in r.status_codes.iter().enumerate() {
            if !(100..=599).contains(code) {
                self.error(
                    format!("{path}.status_codes[{i}]"),
                    format!("{code} is not an HTTP status (100 to 599)"),
                );
            }
        }
        let per_try_timeout = r.per_try_timeout.as_deref().and_then(|t| {
            let d = self.duration(&format!("{path}.per_try_timeout"), Some(t), Duration::ZERO);
            (!d.is_zero()).then_some(d)
        });
        let backoff = r.backoff.clone().unwrap_or_default();
        let backoff_base = self.duration(
            &format!("{path}.backoff.base"),
            backoff.base.as_deref(),
            DEFAULT_BACKOFF_BASE,
        );
        if backoff.base.is_some() && backoff_base.is_zero() {
            self.error(format!("{path}.backoff.base"), "must be more than 0");
        }
        let backoff_max = self.duration(
            &format!("{path}.backoff.max"),
            backoff.max.as_deref(),
            backoff_base * 10,
        );
        if backoff_max < backoff_base {
            self.error(
                format!("{path}.backoff.max"),
                format!("{backoff_max:?} is less than the base {backoff_base:?}"),
            );
        }
        let replay_buffer = match r.replay_buffer.as_deref().map(parse_size) {
            None => DEFAULT_REPLAY_BUFFER,
            Some(Ok(n)) if n <= MAX_REPLAY_BUFFER => n,
            Some(Ok(n)) => {
                self.error(
                    format!("{path}.replay_buffer"),
                    format!("{n} bytes is more than the 64MiB allowed"),
                );
                DEFAULT_REPLAY_BUFFER
            }
            Some(Err(e)) => {
                self.error(format!("{path}.replay_buffer"), e);
                DEFAULT_REPLAY_BUFFER
            }
        };
        RetryPolicy {
            attempts: r.attempts.unwrap_or(DEFAULT_RETRY_ATTEMPTS),
            retry_on,
            status_codes: r.status_codes.clone().into(),
            per_try_timeout,
            backoff_base,
            backoff_max,
            retry_non_idempotent: r.retry_non_idempotent,
            replay_buffer,
        }
    }

    pub(super) fn rate_limit(&mut self, path: &str, r: &file::RateLimit) -> Option<TokenBucket> {
        let before = self.errors.len();
        if r.max_tokens == 0 {
            self.error(format!("{path}.max_tokens"), "must be at least 1");
        }
        let tokens_per_fill = r.tokens_per_fill.unwrap_or(r.max_tokens);
        if tokens_per_fill == 0 {
            self.error(format!("{path}.tokens_per_fill"), "must be at least 1");
        }
        let fill_interval = self.duration(
            &format!("{path}.fill_interval"),
            r.fill_interval.as_deref(),
            Duration::from_secs(1),
        );
        if fill_interval < Duration::from_millis(1) {
            self.error(format!("{path}.fill_interval"), "must be at least 1ms");
        }
        (self.errors.len() == before).then_some(TokenBucket {
            max_tokens: r.max_tokens,
            tokens_per_fill,
            fill_interval,
        })
    }

    pub(super) fn circuit_breakers(
        &mut self,
        path: &str,
        c: Option<&file::CircuitBreakers>,
    ) -> CircuitBreakers {
        let d = default_circuit_breakers();
        let Some(c) = c else {
            return d;
        };
        let mut limit = |field: &str, value: Option<u32>, default: u32| {
            let v = value.unwrap_or(default);
            if v == 0 {
                self.error(format!("{path}.{field}"), "must be at least 1");
            }
            v
        };
        CircuitBreakers {
            max_connections: limit("max_connections", c.max_connections, d.max_connections),
            max_pending_requests: limit(
                "max_pending_requests",
                c.max_pending_requests,
                d.max_pending_requests,
            ),
            max_requests: limit("max_requests", c.max_requests, d.max_requests),
            max_retries: limit("max_retries", c.max_retries, d.max_retries),
        }
    }

    pub(super) fn retry_budget(
        &mut self,
        path: &str,
        b: Option<&file::RetryBudget>,
    ) -> Option<RetryBudget> {
        let d = default_retry_budget();
        let Some(b) = b else {
            return Some(d);
        };
        if !b.enabled {
            return None;
        }
        let percent = b.percent.unwrap_or(DEFAULT_BUDGET_PERCENT);
        if !(0.0..=1000.0).contains(&percent) {
            self.error(
                format!("{path}.percent"),
                format!("{percent} is not between 0 and 1000"),
            );
        }
        let window = self.duration(&format!("{path}.window"), b.window.as_deref(), d.window);
        if window < Duration::from_secs(1) || window > Duration::from_secs(60) {
            self.error(format!("{path}.window"), "must be between 1s and 60s");
        }
        Some(RetryBudget {
            ratio: percent / 100.0,
            min_retries_per_second: b.min_retries_per_second.unwrap_or(d.min_retries_per_second),
            window,
        })
    }
}

/// Sizes are bytes, or a number with `KiB`, `MiB` (or `KB`, `MB`, decimal).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1024,
        "MiB" => 1024 * 1024,
        "KB" | "kB" => 1000,
        "MB" => 1000 * 1000,
        _ => {
            return Err(format!(
                "{text:?} is not a size (bytes, or a number with KiB or MiB)"
            ));
        }
    };
    number
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{text:?} is not a size (bytes, or a number with KiB or MiB)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(yaml: &str) -> String {
        match crate::config::validate::from_yaml(yaml) {
            Ok(_) => panic!("accepted:\n{yaml}"),
            Err(e) => e.to_string(),
        }
    }

    const BASE: &str = r#"
listeners:
  - { name: main, address: "127.0.0.1:0" }
  - { name: tcp, address: "127.0.0.1:0", protocol: tcp, cluster: c, rate_limit: RATE_TCP }
clusters:
  - { name: c, endpoints: ["127.0.0.1:1"], CLUSTER }
route_configs:
  - name: rc
    virtual_hosts:
      - name: v
        domains: ["*"]
        VHOST
        routes:
          - { forward: { cluster: c }, ROUTE }
"#;

    fn config(route: &str, vhost: &str, cluster: &str, tcp_rate: &str) -> String {
        BASE.replace("ROUTE", route)
            .replace("VHOST", vhost)
            .replace("CLUSTER", cluster)
            .replace("RATE_TCP", tcp_rate)
    }

    #[test]
    fn bad_knobs_are_named_with_their_values() {
        let ok_rate = "{ max_tokens: 1 }";
        let none = "panic_threshold: 50";
        let cases = [
            (
                config("retry: { retry_on: [5xx, sometimes] }", "", none, ok_rate),
                r#"routes[0].retry.retry_on[1]: unknown condition "sometimes""#,
            ),
            (
                config("retry: { status_codes: [99] }", "", none, ok_rate),
                "routes[0].retry.status_codes[0]: 99 is not an HTTP status",
            ),
            (
                config(
                    "retry: { backoff: { base: 1s, max: 10ms } }",
                    "",
                    none,
                    ok_rate,
                ),
                "routes[0].retry.backoff.max: 10ms is less than the base 1s",
            ),
            (
                config("retry: { replay_buffer: lots }", "", none, ok_rate),
                r#"routes[0].retry.replay_buffer: "lots" is not a size"#,
            ),
            (
                config("retry: { per_try_timeout: 5 }", "", none, ok_rate),
                r#"routes[0].retry.per_try_timeout: "5" is not a duration"#,
            ),
            (
                config("rate_limit: { max_tokens: 0 }", "", none, ok_rate),
                "routes[0].rate_limit.max_tokens: must be at least 1",
            ),
            (
                config(
                    "timeout: 1s",
                    "rate_limit: { max_tokens: 5, fill_interval: 0 }",
                    none,
                    ok_rate,
                ),
                "virtual_hosts[0].rate_limit.fill_interval: must be at least 1ms",
            ),
            (
                config(
                    "timeout: 1s",
                    "retry: { attempts: 1, retry_on: [never] }",
                    none,
                    ok_rate,
                ),
                r#"virtual_hosts[0].retry.retry_on[0]: unknown condition "never""#,
            ),
            (
                config(
                    "timeout: 1s",
                    "",
                    "circuit_breakers: { max_requests: 0 }",
                    ok_rate,
                ),
                "clusters[0].circuit_breakers.max_requests: must be at least 1",
            ),
            (
                config("timeout: 1s", "", "retry_budget: { window: 2m }", ok_rate),
                "clusters[0].retry_budget.window: must be between 1s and 60s",
            ),
            (
                config("timeout: 1s", "", "retry_budget: { percent: -5 }", ok_rate),
                "clusters[0].retry_budget.percent: -5 is not between 0 and 1000",
            ),
            (
                config("timeout: 1s", "", "idle_timeout: 0", ok_rate),
                "clusters[0].idle_timeout: must be more than 0",
            ),
            (
                config(
                    "timeout: 1s",
                    "",
                    none,
                    "{ max_tokens: 3, tokens_per_fill: 0 }",
                ),
                "listeners[1].rate_limit.tokens_per_fill: must be at least 1",
            ),
        ];
        for (yaml, want) in cases {
            let got = errors(&yaml);
            assert!(got.contains(want), "want {want:?} in:\n{got}");
        }
    }

    #[test]
    fn defaults_when_nothing_is_said() {
        let c = crate::config::validate::from_yaml(&config(
            "timeout: 1s",
            "",
            "panic_threshold: 50",
            "{ max_tokens: 1 }",
        ))
        .unwrap();
        let route = &c.route_configs[0].virtual_hosts[0].routes[0];
        assert_eq!(route.retry, default_retry_policy());
        assert_eq!(route.rate_limit, None);
        assert_eq!(c.clusters[0].circuit_breakers, default_circuit_breakers());
        assert_eq!(c.clusters[0].retry_budget, Some(default_retry_budget()));
        assert_eq!(c.clusters[0].idle_timeout, Duration::from_secs(4));
    }

    #[test]
    fn a_route_policy_replaces_the_hosts_and_others_inherit_it() {
        let yaml = r#"
listeners: [{ name: main, address: "127.0.0.1:0" }]
clusters: [{ name: c, endpoints: ["127.0.0.1:1"] }]
route_configs:
  - name: rc
    virtual_hosts:
      - name: v
        domains: ["*"]
        retry: { attempts: 5, retry_on: [gateway-error], status_codes: [409] }
        routes:
          - { match: { path: { prefix: /own } }, forward: { cluster: c }, retry: { attempts: 1 } }
          - { forward: { cluster: c } }
"#;
        let c = crate::config::validate::from_yaml(yaml).unwrap();
        let routes = &c.route_configs[0].virtual_hosts[0].routes;
        assert_eq!(routes[0].retry.attempts, 1);
        assert_eq!(routes[0].retry.retry_on, default_retry_policy().retry_on);
        assert!(routes[0].retry.status_codes.is_empty());
        assert_eq!(routes[1].retry.attempts, 5);
        assert_eq!(routes[1].retry.retry_on, RetryOn::GATEWAY_ERROR);
        assert_eq!(&*routes[1].retry.status_codes, &[409]);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2 KB"), Ok(2000));
        assert!(parse_size("1.5KiB").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("").is_err());
    }
}
