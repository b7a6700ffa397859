//! Drain: one signal that every accept loop and connection watches, and a count of those still
//! running. Each connection holds one receiver of a second channel, so that channel's receiver
//! count is the count of open connections and its `closed()` is "all of them are gone". The parts
//! of one connection that each keep a watch share that receiver, so a connection counts once
//! however many of its parts watch the signal.

use std::sync::Arc;

use tokio::sync::watch;

/// The proxy's drain signal. Accept loops stop when it fires; HTTP connections shut down
/// gracefully; TCP connections carry on until they end or the process exits.
#[derive(Debug)]
pub struct Drain {
    signal: watch::Sender<bool>,
    /// Carries nothing: its receivers are the open connections.
    open: watch::Sender<()>,
}

/// Held by an accept loop or a connection for as long as it runs: it counts as open until the
/// watch (and every [`share`](DrainWatch::share) of it) is dropped. A clone counts as one more:
/// an accept loop clones its watch for each connection it accepts.
#[derive(Debug)]
pub struct DrainWatch {
    signal: watch::Receiver<bool>,
    open: Arc<watch::Receiver<()>>,
}

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
            signal: watch::Sender::new(false),
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
        !self.signal.send_replace(true)
    }

    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
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
        if self.signal.wait_for(|draining| *draining).await.is_err() {
            std::future::pending::<()>().await;
        }
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
    async fn a_dropped_drain_does_not_signal() {
        let drain = Drain::default();
        let mut w = drain.watch();
        drop(drain);
        let waited = tokio::time::timeout(Duration::from_millis(50), w.signaled()).await;
        assert!(waited.is_err(), "no drain without a start");
    }
}
