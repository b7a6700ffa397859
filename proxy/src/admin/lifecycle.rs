//! Readiness and drain. `/ready` is true once the first configuration is published (its listeners
//! are bound before it is published) while every listener it holds serves (none warming, none
//! unable to bind), and false from the moment a drain starts.
//!
//! The drain sequence on SIGTERM ([`Lifecycle::shut_down`]): readiness turns 503 and connections
//! start draining at once, while the listeners keep accepting for the drain delay, so that a
//! Kubernetes Service has taken the pod out of its endpoints before new connections are refused.
//! Then the listeners close and connections get the drain timeout to finish; what is left then is
//! cut (answered 503 `drain-timeout` or ended, and logged).

use std::{future::Future, time::Duration};

use tokio::sync::watch;

use crate::{Proxy, config::Store};

/// How long the drain sequence lets each phase last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainTiming {
    /// Readiness is off and listeners still accept: the time a Kubernetes Service (kube-proxy,
    /// ingress controllers, other proxies) takes to stop sending new connections.
    pub delay: Duration,
    /// Listeners are closed; open connections finish.
    pub timeout: Duration,
}

impl DrainTiming {
    /// 5 s: endpoint removal reaches kube-proxy and other proxies within a second or two on a
    /// healthy cluster, with room to spare under load (Istio's termination drain duration has the
    /// same default).
    pub const DEFAULT_DELAY: Duration = Duration::from_secs(5);
    /// 20 s: with the delay, 25 s, inside Kubernetes' default 30 s grace period with time left for
    /// the cut and the exit before the kubelet's SIGKILL.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
}

/// After the cut, how long the 503s of cut requests and their log lines get to go out.
const CUT_GRACE: Duration = Duration::from_secs(1);

/// How a drain sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutDown {
    /// Every connection finished.
    Drained,
    /// The drain timeout ended with this many connections open; they were cut.
    TimedOut { open: usize },
    /// A second signal: the operator does not want to wait.
    Interrupted,
}

/// A `drain_delay` that is not a duration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("drain_delay: {value:?}: {message}")]
pub struct DrainDelayError {
    pub value: String,
    pub message: String,
}

/// The drain delay: `--drain-delay` if given, else the bootstrap file's `drain_delay`, else
/// [`DrainTiming::DEFAULT_DELAY`].
pub fn drain_delay(
    flag: Option<Duration>,
    file: Option<&str>,
) -> Result<Duration, DrainDelayError> {
    match (flag, file) {
        (Some(delay), _) => Ok(delay),
        (None, Some(text)) => {
            crate::config::duration::parse_duration(text).map_err(|message| DrainDelayError {
                value: text.to_owned(),
                message,
            })
        }
        (None, None) => Ok(DrainTiming::DEFAULT_DELAY),
    }
}

#[derive(Debug)]
pub struct Lifecycle {
    draining: watch::Sender<bool>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            draining: watch::Sender::new(false),
        }
    }
}

impl Lifecycle {
    /// Whether load balancers should send this proxy traffic.
    pub fn is_ready(&self, store: &Store) -> bool {
        store.load().is_some() && store.not_serving().is_empty() && !self.is_draining()
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Starts draining; returns false if a drain had already started.
    pub fn start_drain(&self) -> bool {
        !self.draining.send_replace(true)
    }

    /// Resolves once a drain has started (at once if it already has).
    pub async fn draining(&self) {
        let mut rx = self.draining.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|d| *d).await;
    }

    /// The drain sequence (see the module's documentation). `interrupt` resolving (a second
    /// signal) ends it at once, in any phase.
    pub async fn shut_down(
        &self,
        proxy: &Proxy,
        timing: DrainTiming,
        interrupt: impl Future<Output = ()>,
    ) -> ShutDown {
        let mut interrupt = std::pin::pin!(interrupt);
        self.start_drain();
        proxy.drain_connections().await;
        tracing::info!(
            delay = ?timing.delay,
            timeout = ?timing.timeout,
            "shutting down: readiness off, connections draining, listeners open for the drain delay"
        );
        tokio::select! {
            _ = tokio::time::sleep(timing.delay) => {}
            _ = &mut interrupt => return ShutDown::Interrupted,
        }
        proxy.drain().await;
        tracing::info!("drain delay over: listeners closed; waiting for connections");
        tokio::select! {
            _ = proxy.drained() => return ShutDown::Drained,
            _ = tokio::time::sleep(timing.timeout) => {}
            _ = &mut interrupt => return ShutDown::Interrupted,
        }
        let open = proxy.open_connections().await;
        tracing::info!(
            open,
            "drain timeout reached; cutting the remaining connections (requests cut are logged \
             and counted in trellis_drain_cut_requests_total)"
        );
        proxy.cut().await;
        tokio::select! {
            _ = proxy.drained() => {}
            _ = tokio::time::sleep(CUT_GRACE) => {}
            _ = &mut interrupt => {}
        }
        ShutDown::TimedOut { open }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn the_drain_delay_comes_from_the_flag_then_the_file_then_the_default() {
        let flag = Some(Duration::from_millis(300));
        assert_eq!(
            drain_delay(flag, Some("9s")),
            Ok(Duration::from_millis(300))
        );
        assert_eq!(drain_delay(None, Some("9s")), Ok(Duration::from_secs(9)));
        assert_eq!(drain_delay(None, Some("0")), Ok(Duration::ZERO));
        assert_eq!(drain_delay(None, None), Ok(DrainTiming::DEFAULT_DELAY));
        let e = drain_delay(None, Some("5")).unwrap_err();
        assert_eq!(e.value, "5");
        assert!(
            e.to_string()
                .starts_with(r#"drain_delay: "5": "5" is not a duration"#),
            "{e}"
        );
    }

    #[tokio::test]
    async fn drain_is_awaitable_and_turns_readiness_off() {
        let l = Arc::new(Lifecycle::default());
        let store = Store::default();
        assert!(!l.is_ready(&store), "no config yet");
        store.publish(Arc::new(
            crate::config::Compiled::build(Arc::default(), 1, None).unwrap(),
        ));
        assert!(l.is_ready(&store));
        store.set_not_serving(vec![r#"listener "l" not serving: waiting"#.into()]);
        assert!(!l.is_ready(&store), "a listener warms");
        store.set_not_serving(Vec::new());
        assert!(l.is_ready(&store));
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.draining().await }
        });
        assert!(l.start_drain());
        assert!(!l.start_drain(), "second drain is a no-op");
        waiter.await.unwrap();
        assert!(l.is_draining());
    }
}
