//! Drain: one signal that every accept loop and connection watches, and a count of those still
//! running. Each connection holds one receiver of a second channel, so that channel's receiver
//! count is the count of open connections and its `closed()` is "all of them are gone". The parts
//! of one connection that each keep a watch share that receiver, so a connection counts once
//! however many of its parts watch the signal.
//!
//! The signal moves forward through [`Phase`]s: connections start closing at `Draining`, and at
//! `Cut` (the drain timeout) the requests still waiting are answered and the rest are ended.

use std::sync::Arc;

use tokio::sync::watch;

/// Where a drain stands; it only ever moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    /// Connections close as soon as they can without losing a request.
    Draining,
    /// The drain timeout ended: requests still without a response are answered 503 and the
    /// connections are closed.
    Cut,
}

/// The proxy's drain signal. HTTP connections shut down gracefully when it fires; TCP connections
/// carry on until they end or the process exits. Accept loops are stopped by the listeners, not by
/// this signal, so that listeners can keep accepting while connections drain.
#[derive(Debug)]
pub struct Drain {
    signal: watch::Sender<Phase>,
    /// Carries nothing: its receivers are the open connections.
    open: watch::Sender<()>,
}

/// Held by an accept loop or a connection for as long as it runs: it counts as open until the
/// watch (and every [`share`](DrainWatch::share) of it) is dropped. A clone counts as one more:
/// an accept loop clones its watch for each connection it accepts.
#[derive(Debug)]
pub struct DrainWatch {
    signal: watch::Receiver<Phase>,
    open: Arc<watch::Receiver<()>>,
}

/// Watches for the cut alone, without counting as an open connection: one per request.
#[derive(Clone, Debug)]
pub struct CutWatch(watch::Receiver<Phase>);

impl Clone for DrainWatch {
    fn clone(&self) -> Self {
        DrainWatch {
            signal: self.signal.clone(),
            open: Arc::new((*self.open).clone()),
        }
    }
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            signal: watch::Sender::new(Phase::Serving),
            open: watch::Sender::new(()),
        }
    }
}

impl Drain {
    pub fn watch(&self) -> DrainWatch {
        DrainWatch {
            signal: self.signal.subscribe(),
            open: Arc::new(self.open.subscribe()),
        }
    }

    /// Starts the drain; returns false if it had already started.
    pub fn start(&self) -> bool {
        self.advance(Phase::Draining)
    }

    /// Cuts what the drain left open (the drain timeout ended); starts the drain if it had not
    /// started. Returns false if it had already been cut.
    pub fn cut(&self) -> bool {
        self.advance(Phase::Cut)
    }

    fn advance(&self, to: Phase) -> bool {
        self.signal.send_if_modified(|phase| {
            let moves = *phase < to;
            if moves {
                *phase = to;
            }
            moves
        })
    }

    pub fn is_draining(&self) -> bool {
        *self.signal.borrow() != Phase::Serving
    }

    /// Accept loops and connections still running.
    pub fn open(&self) -> usize {
        self.open.receiver_count()
    }

    /// Resolves once every watch has been dropped (at once if none is held).
    pub async fn finished(&self) {
        self.open.closed().await;
    }
}

impl DrainWatch {
    /// Another watch of the same connection: it does not count as one more.
    pub fn share(&self) -> DrainWatch {
        DrainWatch {
            signal: self.signal.clone(),
            open: self.open.clone(),
        }
    }

    /// Resolves once the drain has started (at once if it already has). Never resolves if the
    /// proxy is dropped without draining: its connections are left to finish on their own.
    pub async fn signaled(&mut self) {
        wait_for(&mut self.signal, Phase::Draining).await;
    }

    pub fn cut_watch(&self) -> CutWatch {
        CutWatch(self.signal.clone())
    }
}

impl CutWatch {
    /// Resolves once the drain timeout has cut the drain (at once if it has).
    pub async fn cut(&mut self) {
        wait_for(&mut self.0, Phase::Cut).await;
    }
}

async fn wait_for(signal: &mut watch::Receiver<Phase>, phase: Phase) {
    if signal.wait_for(|p| *p >= phase).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn counts_watches_until_they_are_dropped() {
        let drain = Drain::default();
        drain.finished().await; // nothing open
        let mut a = drain.watch();
        let b = a.clone();
        assert_eq!(drain.open(), 2);
        assert!(drain.start());
        assert!(!drain.start(), "a second start is a no-op");
        a.signaled().await;
        drop(a);
        let wait = tokio::time::timeout(Duration::from_millis(50), drain.finished()).await;
        assert!(wait.is_err(), "one watch is still held");
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), drain.finished())
            .await
            .expect("finished once the last watch is dropped");
    }

    #[tokio::test]
    async fn a_shared_watch_counts_once_and_holds_the_connection_open() {
        let drain = Drain::default();
        let a = drain.watch();
        let shared = a.share();
        assert_eq!(drain.open(), 1);
        drop(a);
        assert_eq!(drain.open(), 1, "the shared watch still holds it");
        let wait = tokio::time::timeout(Duration::from_millis(50), drain.finished()).await;
        assert!(wait.is_err(), "the shared watch is still held");
        drop(shared);
        assert_eq!(drain.open(), 0);
        tokio::time::timeout(Duration::from_secs(5), drain.finished())
            .await
            .expect("finished once the last share is dropped");
    }

    #[tokio::test]
    async fn the_cut_comes_after_the_drain_and_both_are_seen() {
        let drain = Drain::default();
        let mut w = drain.watch();
        let mut cut = w.cut_watch();
        assert_eq!(drain.open(), 1, "a cut watch does not count as open");
        let early = tokio::time::timeout(Duration::from_millis(50), cut.cut()).await;
        assert!(early.is_err(), "no cut before the drain");
        assert!(drain.cut());
        assert!(!drain.cut(), "a second cut is a no-op");
        assert!(!drain.start(), "a cut drain has started");
        assert!(drain.is_draining());
        tokio::time::timeout(Duration::from_secs(5), w.signaled())
            .await
            .expect("a cut is also a drain");
        tokio::time::timeout(Duration::from_secs(5), cut.cut())
            .await
            .expect("the cut is seen");
    }

    #[tokio::test]
    async fn a_dropped_drain_does_not_signal() {
        let drain = Drain::default();
        let mut w = drain.watch();
        drop(drain);
        let waited = tokio::time::timeout(Duration::from_millis(50), w.signaled()).await;
        assert!(waited.is_err(), "no drain without a start");
    }
}
