//! Listeners follow the configuration: new addresses are bound before an update is published (a
//! port in use is reported by listener, for the caller to refuse the update or that listener
//! alone), removed ones stop accepting. A
//! listener that stops accepting leaves its open connections to finish: reloads never close
//! connections. A drain stops every listener for good and asks HTTP connections to shut down
//! gracefully.
//!
//! Each listener holds at most `max_connections` open connections; one more is accepted and
//! closed at once, so a flood stops at the listener instead of at the descriptor limit. When
//! `accept` fails for want of descriptors the loop backs off (the admin API keeps a reserve, see
//! [`fds`]).

pub mod drain;
pub mod fds;

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hyper_util::{rt::TokioExecutor, server::conn::auto};
use tokio::{net::TcpListener, sync::oneshot};

use self::drain::{Drain, DrainWatch};
use crate::{
    capture,
    config::{Config, Store, compile::CompiledListener, model::Listener},
    http::{forward::ConnContext, server},
    l4,
    telemetry::{ListenerTelemetry, Refused, access_log},
};

#[derive(Debug, thiserror::Error)]
#[error("listeners[{index}] ({name}): cannot bind {address}: {source}")]
pub struct BindError {
    pub index: usize,
    pub name: Arc<str>,
    pub address: SocketAddr,
    #[source]
    pub source: io::Error,
}

#[derive(Debug)]
struct Active {
    /// The listener's name, metric handles and access log; replaced when an update changes them.
    entry: Arc<RwLock<Arc<ListenerTelemetry>>>,
    /// The listener's `max_connections`, replaced when an update changes it.
    max_connections: Arc<AtomicUsize>,
    local: SocketAddr,
    /// Dropping it ends the accept loop.
    _stop: oneshot::Sender<()>,
}

/// What identifies a bound socket across updates: its configured address, so a renamed listener
/// keeps its socket; with port 0 also the name, since each such listener has a port of its own.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    address: SocketAddr,
    ephemeral: Option<Arc<str>>,
}

impl Key {
    fn of(l: &Listener) -> Key {
        Key {
            address: l.address,
            ephemeral: (l.address.port() == 0).then(|| l.name.clone()),
        }
    }
}

/// The bound listeners.
#[derive(Debug, Default)]
pub struct Listeners {
    active: HashMap<Key, Active>,
    drain: Arc<Drain>,
    /// Set by [`Listeners::drain`]: listeners closed for good. Connections may drain before it,
    /// while the listeners still accept (the drain delay).
    closed: bool,
}

/// Sockets bound for an update that has not been published yet.
#[derive(Debug)]
pub struct Prepared {
    new: Vec<(Key, Settings, TcpListener)>,
    keep: HashMap<Key, Settings>,
}

/// What an update gives a listener that an update may change without rebinding it.
#[derive(Debug)]
struct Settings {
    telemetry: Arc<ListenerTelemetry>,
    max_connections: usize,
}

impl Listeners {
    /// Binds every listener of `config` that is not bound yet (none once closed). Listeners
    /// that cannot be bound are returned beside the sockets bound for the others.
    pub async fn prepare(&self, config: &Config) -> (Prepared, Vec<BindError>) {
        let mut new = Vec::new();
        let mut keep = HashMap::new();
        let mut failed = Vec::new();
        if self.closed {
            return (Prepared { new, keep }, failed);
        }
        for (index, l) in config.listeners.iter().enumerate() {
            let settings = Settings {
                telemetry: Arc::new(ListenerTelemetry::new(
                    l.name.clone(),
                    l.access_log.as_ref().map(access_log::sender),
                )),
                max_connections: l.max_connections as usize,
            };
            let key = Key::of(l);
            if self.active.contains_key(&key) {
                keep.insert(key, settings);
                continue;
            }
            match TcpListener::bind(l.address).await {
                Ok(socket) => new.push((key, settings, socket)),
                Err(source) => failed.push(BindError {
                    index,
                    name: l.name.clone(),
                    address: l.address,
                    source,
                }),
            }
        }
        (Prepared { new, keep }, failed)
    }

    /// Starts accepting on the new sockets and stops listeners the update removed. Call after the
    /// update is published.
    pub fn commit(&mut self, prepared: Prepared, store: &Arc<Store>) {
        let Prepared { new, keep } = prepared;
        self.active.retain(|key, active| match keep.get(key) {
            Some(settings) => {
                *active.entry.write().unwrap_or_else(|e| e.into_inner()) =
                    settings.telemetry.clone();
                active
                    .max_connections
                    .store(settings.max_connections, Ordering::Relaxed);
                true
            }
            None => {
                tracing::info!(address = %key.address, "listener removed");
                false // dropping `stop` ends its accept loop
            }
        });
        let builders = Builders::new();
        for (key, settings, socket) in new {
            let local = socket.local_addr().unwrap_or(key.address);
            let (stop, stopped) = oneshot::channel();
            tracing::info!(%local, listener = %settings.telemetry.name, max_connections = settings.max_connections, "listening");
            let entry = Arc::new(RwLock::new(settings.telemetry));
            let max_connections = Arc::new(AtomicUsize::new(settings.max_connections));
            tokio::spawn(accept_loop(
                socket,
                entry.clone(),
                Limit {
                    max: max_connections.clone(),
                    open: Arc::default(),
                },
                store.clone(),
                builders.clone(),
                stopped,
                self.drain.watch(),
            ));
            self.active.insert(
                key,
                Active {
                    entry,
                    max_connections,
                    local,
                    _stop: stop,
                },
            );
        }
    }

    /// The address a listener is bound to (useful when it was configured with port 0).
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.active
            .values()
            .find(|a| &*a.entry.read().unwrap_or_else(|e| e.into_inner()).name == name)
            .map(|a| a.local)
    }

    /// Starts the drain: every listener closes its socket, every HTTP connection shuts down
    /// gracefully, and later updates bind nothing. Returns false if it had already started.
    pub fn drain(&mut self) -> bool {
        self.active.clear();
        self.closed = true;
        self.drain.start()
    }

    /// Starts draining connections while the listeners keep accepting: responses tell HTTP/1.1
    /// clients to close, HTTP/2 connections get a GOAWAY. Returns false if a drain had started.
    pub fn drain_connections(&self) -> bool {
        self.drain.start()
    }

    /// The drain signal, to wait for connections to finish.
    pub fn drain_signal(&self) -> &Arc<Drain> {
        &self.drain
    }
}

/// A listener's connection count and its limit. The accept loop alone adds to the count, so
/// checking it and then adding cannot overshoot; connections ending only lower it.
#[derive(Debug)]
struct Limit {
    max: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

impl Limit {
    /// A slot for one more connection, or `None` if `max` are open.
    fn try_take(&self) -> Option<Slot> {
        if self.open.load(Ordering::Acquire) >= self.max.load(Ordering::Relaxed) {
            return None;
        }
        self.open.fetch_add(1, Ordering::AcqRel);
        Some(Slot(self.open.clone()))
    }
}

/// One open connection's place under its listener's limit, freed on drop.
#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The HTTP connection builders: one that tells HTTP/1.1 from HTTP/2 by the preface (cleartext),
/// and one per protocol for TLS, where ALPN decided.
#[derive(Clone)]
struct Builders {
    cleartext: Arc<auto::Builder<TokioExecutor>>,
    http1: Arc<auto::Builder<TokioExecutor>>,
    http2: Arc<auto::Builder<TokioExecutor>>,
}

impl Builders {
    fn new() -> Self {
        Builders {
            cleartext: Arc::new(server::builder()),
            http1: Arc::new(server::builder().http1_only()),
            http2: Arc::new(server::builder().http2_only()),
        }
    }
}

/// Backoff after an accept fails for want of descriptors: short at first, so the listener
/// recovers quickly once connections close, and doubling so an exhausted process does not spin.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// A connection the kernel has already completed on `socket`, taken without waiting; `None` when
/// there is none. Closing a listening socket resets the connections still queued on it, which
/// their clients (connected, request written) would see as a lost request: a listener that stops
/// takes them first, and they are served (told to close, while draining).
fn accept_queued(socket: &TcpListener) -> Option<io::Result<(tokio::net::TcpStream, SocketAddr)>> {
    let (queued, peer) = socket2::SockRef::from(socket).accept().ok()?;
    let peer = peer.as_socket()?;
    let stream: std::net::TcpStream = queued.into();
    let served = stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(stream));
    Some(served.map(|s| (s, peer)))
}

/// The most connections a stopping listener takes from its queue: tokio's listen backlog.
const QUEUED_MAX: usize = 1024;

async fn accept_loop(
    socket: TcpListener,
    entry: Arc<RwLock<Arc<ListenerTelemetry>>>,
    limit: Limit,
    store: Arc<Store>,
    builders: Builders,
    mut stopped: oneshot::Receiver<()>,
    drain: DrainWatch,
) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    // Once stopped: how many more queued connections may still be taken. Connections that keep
    // arriving must not keep a closed listener open: one backlog's worth is taken at most.
    let mut stopping: Option<usize> = None;
    loop {
        let accepted = if let Some(left) = &mut stopping {
            let queued = if *left > 0 {
                accept_queued(&socket)
            } else {
                None
            };
            let Some(a) = queued else { return };
            *left -= 1;
            a
        } else {
            tokio::select! {
                // Listeners stop when they are closed, not when connections start draining.
                _ = &mut stopped => {
                    stopping = Some(QUEUED_MAX);
                    continue;
                }
                a = socket.accept() => a,
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                let listener = entry.read().unwrap_or_else(|e| e.into_inner()).clone();
                let Some(slot) = limit.try_take() else {
                    listener.connection_refused(Refused::MaxConnections);
                    tracing::debug!(%peer, listener = %listener.name, "max_connections reached; closing");
                    continue; // dropping `stream` closes it
                };
                // What the listener does is looked up per connection, so a reload that changes
                // it applies to the next connection.
                let Some(config) = store.load() else {
                    continue;
                };
                let Some(kind) = config.listeners.get(&listener.name).cloned() else {
                    continue;
                };
                if !matches!(kind, CompiledListener::Http { .. })
                    && let Some(limit) = config.listener_rate_limit(&listener.name)
                    && !limit.try_acquire()
                {
                    tracing::debug!(%peer, listener = %listener.name, "connection rate limit reached; closing");
                    continue; // dropping `stream` closes it
                }
                let open = (listener.connection_opened(), slot);
                let watch = drain.clone();
                match kind {
                    CompiledListener::Http {
                        connection, tls, ..
                    } => {
                        let ctx = ConnContext::new(store.clone(), listener, peer.ip())
                            .with_escaped_slashes(connection.escaped_slashes);
                        let ctx = ctx.with_local_port(stream.local_addr().ok().map(|a| a.port()));
                        let _ = stream.set_nodelay(true);
                        let builders = builders.clone();
                        tokio::spawn(async move {
                            match tls {
                                None => {
                                    server::serve(
                                        builders.cleartext,
                                        stream,
                                        ctx,
                                        connection,
                                        watch,
                                    )
                                    .await
                                }
                                // The handshake runs here, off the accept loop, under its own
                                // timeout; the connection counts against the limit meanwhile.
                                Some(tls) => {
                                    let Some(session) = tls.accept(stream).await else {
                                        drop(open);
                                        return;
                                    };
                                    // ALPN decided the protocol; no ALPN means HTTP/1.1.
                                    let builder = if session.h2 {
                                        builders.http2
                                    } else {
                                        builders.http1
                                    };
                                    let ctx = ctx
                                        .with_tls(session.client_certificate)
                                        .with_alpn(session.h2);
                                    server::serve(builder, session.stream, ctx, connection, watch)
                                        .await
                                }
                            }
                            drop(open);
                        });
                    }
                    CompiledListener::Tcp(target) => {
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(async move {
                            let cluster = target.cluster.clone();
                            let idle = target.idle_timeout;
                            match &target.tls {
                                None => {
                                    l4::tcp::serve(stream, peer, cluster, idle, &[], &listener)
                                        .await
                                }
                                Some(tls) => {
                                    if let Some(session) = tls.accept(stream).await {
                                        l4::tcp::serve(
                                            session.stream,
                                            peer,
                                            cluster,
                                            idle,
                                            &[],
                                            &listener,
                                        )
                                        .await
                                    }
                                }
                            }
                            drop((open, watch));
                        });
                    }
                    CompiledListener::TlsPassthrough(table) => {
                        tokio::spawn(async move {
                            l4::sni::serve(stream, peer, table, &listener).await;
                            drop((open, watch));
                        });
                    }
                    CompiledListener::Capture(table) => {
                        let conn = capture::Connection {
                            stream,
                            peer,
                            listener,
                            store: store.clone(),
                            builder: builders.cleartext.clone(),
                            drain: watch,
                        };
                        tokio::spawn(async move {
                            capture::serve(conn, table).await;
                            drop(open);
                        });
                    }
                }
            }
            Err(e) if fds::is_exhaustion(&e) => {
                // The connection stays in the backlog; trying again at once would spin.
                let listener = entry.read().unwrap_or_else(|e| e.into_inner()).clone();
                listener.connection_refused(Refused::FdExhausted);
                // One WARN per run of failures; the counter tells how long it lasted.
                if backoff == ACCEPT_BACKOFF_MIN {
                    tracing::warn!(listener = %listener.name, error = %e, "out of file descriptors; accept paused");
                } else {
                    tracing::debug!(listener = %listener.name, error = %e, retry_in = ?backoff, "still out of file descriptors");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
            Err(e) => {
                // Errors such as a connection aborted before it was accepted concern that one
                // connection; a short pause keeps an unforeseen persistent error from spinning.
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF_MIN).await;
            }
        }
    }
}
