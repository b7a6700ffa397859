//! A running proxy: the config store plus the listeners that follow it. Every update, from the
//! bootstrap file or a reload, goes through [`Proxy::apply`]: compile, bind, publish once.

use std::{net::SocketAddr, path::Path, sync::Arc};

use tokio::sync::Mutex;

use crate::{
    config::{
        Compiled, Config, ConfigErrors, Store, bootstrap,
        limits::{self, CheckError, LimitError, Limits, ReadError},
        validate,
    },
    identity::{IdentityWatch, mtls::MeshTls},
    listener::{BindError, Listeners, Prepared},
    upstream::health::HealthCheckers,
};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Invalid(#[from] ConfigErrors),
    #[error(transparent)]
    Bind(#[from] BindError),
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Limit {
        path: String,
        #[source]
        source: LimitError,
    },
    #[error("{path} is invalid:\n{errors}")]
    Invalid { path: String, errors: ConfigErrors },
    #[error(
        "{path}: nothing to serve: the file defines no listeners and names no control plane \
         (`xds.address` in the file, or --xds)"
    )]
    NothingToServe { path: String },
    #[error("{path}: the loader stopped unexpectedly: {message}")]
    Crashed { path: String, message: String },
}

/// Reads and validates a bootstrap file.
pub fn load_file(path: &Path) -> Result<Config, LoadError> {
    read_bootstrap(path).map(|(_, config)| config)
}

/// Reads a bootstrap file: the file as written (for its `xds:` section and to serve its static
/// part beside the control plane's resources) and its validated config. The file must stay within
/// [`Limits::DEFAULT`]; this blocks for as long as reading and parsing take, so async code calls
/// [`load_bootstrap`] instead.
pub fn read_bootstrap(path: &Path) -> Result<(bootstrap::File, Config), LoadError> {
    let name = || path.display().to_string();
    let invalid = |errors| LoadError::Invalid {
        path: name(),
        errors,
    };
    let one_error = |message| {
        invalid(ConfigErrors(vec![validate::FieldError {
            path: String::new(),
            message,
        }]))
    };
    let limits = Limits::DEFAULT;
    let text = limits::read_bounded(path, &limits).map_err(|e| match e {
        ReadError::Io(source) => LoadError::Read {
            path: name(),
            source,
        },
        ReadError::Limit(source) => LoadError::Limit {
            path: name(),
            source,
        },
    })?;
    limits::check_text(&text, &limits).map_err(|e| match e {
        CheckError::Limit(source) => LoadError::Limit {
            path: name(),
            source,
        },
        CheckError::Yaml(message) => one_error(message),
    })?;
    let mut parsed = bootstrap::parse(&text).map_err(one_error)?;
    validate::resolve_file_paths(&mut parsed, path.parent().unwrap_or(Path::new(".")));
    let config = validate::validate(parsed.clone()).map_err(invalid)?;
    Ok((parsed, config))
}

/// [`read_bootstrap`] on a blocking thread, so a large or slow file never holds up the threads
/// that serve traffic.
pub async fn load_bootstrap(path: &Path) -> Result<(bootstrap::File, Config), LoadError> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || read_bootstrap(&owned))
        .await
        .unwrap_or_else(|e| {
            Err(LoadError::Crashed {
                path: path.display().to_string(),
                message: e.to_string(),
            })
        })
}

/// Without a control plane the file is all the proxy will ever serve: a file with no listener
/// would start a proxy that reports ready and serves nothing, so it is refused.
pub fn ensure_something_to_serve(path: &Path, config: &Config) -> Result<(), LoadError> {
    if config.listeners.is_empty() {
        return Err(LoadError::NothingToServe {
            path: path.display().to_string(),
        });
    }
    Ok(())
}

/// An update applied by [`Proxy::apply_leaving_unbound`]: its version and the listeners left out
/// because their address could not be bound.
#[derive(Debug)]
pub struct Applied {
    pub version: u64,
    pub unbound: Vec<BindError>,
}

#[derive(Debug, Default)]
pub struct Proxy {
    store: Arc<Store>,
    /// Held for the whole of an update, so updates apply one at a time.
    listeners: Mutex<Listeners>,
    health: std::sync::Mutex<HealthCheckers>,
    /// Mesh mTLS from the workload identity, when the proxy runs with one.
    mesh: Option<Arc<MeshTls>>,
}

impl Proxy {
    pub fn new() -> Arc<Self> {
        Arc::new(Proxy::default())
    }

    /// A proxy that holds a workload identity (`identity::start`): it originates mesh mTLS to
    /// meshed endpoints and terminates it on inbound capture listeners. `None`: as [`Proxy::new`].
    pub fn with_identity(identity: Option<IdentityWatch>) -> Result<Arc<Self>, rustls::Error> {
        let mesh = identity.map(MeshTls::new).transpose()?;
        Ok(Arc::new(Proxy {
            mesh,
            ..Proxy::default()
        }))
    }

    /// The workload identity, when the proxy runs with one.
    pub fn identity(&self) -> Option<&IdentityWatch> {
        self.mesh.as_ref().map(|m| m.identity())
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Compiles `config`, binds its new listeners and publishes it. On any error nothing changes.
    pub async fn apply(&self, config: Config) -> Result<u64, ApplyError> {
        let mut listeners = self.listeners.lock().await;
        let (prepared, mut unbound) = listeners.prepare(&config).await;
        if !unbound.is_empty() {
            return Err(unbound.swap_remove(0).into());
        }
        self.publish(&mut listeners, prepared, config)
    }

    /// Like [`Proxy::apply`], except that a listener that cannot be bound is left out and the
    /// rest applies: one taken port must not hold up the other resources of a discovery update.
    pub async fn apply_leaving_unbound(&self, config: Config) -> Result<Applied, ApplyError> {
        let mut listeners = self.listeners.lock().await;
        let (prepared, unbound) = listeners.prepare(&config).await;
        let config = if unbound.is_empty() {
            config
        } else {
            let bound: Vec<_> = config
                .listeners
                .iter()
                .filter(|l| !unbound.iter().any(|u| u.name == l.name))
                .cloned()
                .collect();
            Config {
                listeners: bound.into(),
                ..config
            }
        };
        let version = self.publish(&mut listeners, prepared, config)?;
        Ok(Applied { version, unbound })
    }

    fn publish(
        &self,
        listeners: &mut Listeners,
        prepared: Prepared,
        config: Config,
    ) -> Result<u64, ApplyError> {
        let previous = self.store.load();
        let version = previous.as_ref().map_or(1, |p| p.version + 1);
        // Sockets bound in `prepared` are dropped (closed) if this fails.
        let compiled = Compiled::build_with_mesh(
            Arc::new(config),
            version,
            previous.as_deref(),
            self.mesh.as_ref(),
        )?;
        let compiled = Arc::new(compiled);
        self.store.publish(compiled.clone());
        listeners.commit(prepared, &self.store);
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reconcile(&self.store, &compiled);
        Ok(version)
    }

    pub async fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.lock().await.local_addr(name)
    }

    /// Starts draining: every listener stops accepting (its socket is closed), every HTTP
    /// connection shuts down gracefully, and later updates still publish routes and clusters but
    /// bind no listener. Returns false if a drain had already started.
    pub async fn drain(&self) -> bool {
        self.listeners.lock().await.drain()
    }

    /// Starts draining connections while the listeners keep accepting (the drain delay): HTTP/1.1
    /// responses carry `Connection: close`, HTTP/2 connections get a GOAWAY. [`Proxy::drain`]
    /// closes the listeners after it. Returns false if a drain had already started.
    pub async fn drain_connections(&self) -> bool {
        self.listeners.lock().await.drain_connections()
    }

    /// Ends the drain (its timeout passed): requests still waiting for a response head are
    /// answered 503 `drain-timeout`, the others are ended, each with an access log line and a
    /// count in `trellis_drain_cut_requests_total`. Returns false if it had already been cut.
    pub async fn cut(&self) -> bool {
        let drain = self.listeners.lock().await.drain_signal().clone();
        drain.cut()
    }

    /// Resolves once every listener and connection has finished (after [`Proxy::drain`]).
    pub async fn drained(&self) {
        let drain = self.listeners.lock().await.drain_signal().clone();
        drain.finished().await;
    }

    /// Connections (and accept loops) still open.
    pub async fn open_connections(&self) -> usize {
        self.listeners.lock().await.drain_signal().open()
    }
}
