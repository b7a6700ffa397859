//! `trellis-proxy`: arguments, runtime, signals. Decisions live in the library.

mod iptables;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{Notify, watch};
use trellis_proxy::{
    Proxy,
    admin::{
        self, Admin, Lifecycle,
        lifecycle::{self, DrainTiming, ShutDown},
    },
    config::{
        bootstrap,
        duration::parse_duration,
        xds::{Client, XdsSettings},
    },
    ensure_something_to_serve,
    listener::fds,
    load_bootstrap,
    telemetry::{self, logging::LogFormat},
};

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

/// Trellis proxy: an HTTP/1.1, HTTP/2 and gRPC routing proxy for service meshes and ingress.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Bootstrap configuration file (YAML). Reloaded on SIGHUP.
    #[arg(long, short, required_unless_present = "xds")]
    config: Option<PathBuf>,
    /// Control plane (trellis-control) address, host:port; overrides `xds.address` in the file.
    #[arg(long)]
    xds: Option<String>,
    /// PEM CA bundle trusted for the controller's certificate; with it the proxy connects to
    /// --xds over TLS (as with an `https://` address). Overrides `xds.ca_file`.
    #[arg(long)]
    xds_ca_file: Option<PathBuf>,
    /// The name the controller's certificate must carry (default: the host of --xds; an IP
    /// address is checked against the certificate's IP SANs). Overrides `xds.server_name`.
    #[arg(long)]
    xds_server_name: Option<String>,
    /// This proxy's id for the control plane (default: host name and process id).
    #[arg(long)]
    node_id: Option<String>,
    /// `gateway` or `sidecar` (default sidecar).
    #[arg(long)]
    role: Option<String>,
    /// Namespace the proxy runs in (default "default").
    #[arg(long)]
    namespace: Option<String>,
    /// Service account of the workload.
    #[arg(long)]
    service_account: Option<String>,
    /// For a gateway: the Gateway resource it serves.
    #[arg(long)]
    gateway: Option<String>,
    /// A node label for the control plane, `key=value`; repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Worker threads for the runtime (default: number of CPU cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Log filter, e.g. `info` or `trellis_proxy=debug` (the RUST_LOG environment variable wins).
    #[arg(long, default_value = "info")]
    log: String,
    /// Log format.
    #[arg(long, value_enum, default_value_t)]
    log_format: LogFormat,
    /// Admin API address: /ready, /live, /metrics, /config_dump, /clusters, POST /drain.
    #[arg(long, default_value = admin::DEFAULT_ADDRESS)]
    admin: SocketAddr,
    /// Allow an --admin address other than loopback (the admin API can drain the proxy).
    #[arg(long)]
    admin_allow_remote: bool,
    /// On SIGTERM or SIGINT, how long readiness is off while the listeners still accept new
    /// connections, before they close: the time a Kubernetes Service takes to stop sending new
    /// connections (default 5s; `drain_delay` in the file).
    #[arg(long, value_parser = parse_duration)]
    drain_delay: Option<Duration>,
    /// After the drain delay, how long in-flight requests and open connections get to finish
    /// before they are cut and the process exits, e.g. `20s` or `500ms`.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// The service-account token proving this proxy's identity to the controller (re-read at
    /// each renewal); with it, the proxy obtains and renews a SPIFFE workload certificate for
    /// --namespace/--service-account from the --xds controller.
    #[arg(long)]
    identity_token_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    Iptables(iptables::IptablesArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Iptables(a)) = &args.command {
        return match iptables::run(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    telemetry::logging::init(&args.log, args.log_format);
    telemetry::install_global_recorder();
    match fds::raise_nofile_limit() {
        Ok(limit) => tracing::info!(
            soft = ?limit.soft,
            hard = ?limit.hard,
            "file descriptor limit (RLIMIT_NOFILE) raised to the hard limit"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise the file descriptor limit"),
    }
    // Before any listener: these descriptors let the admin API answer when the data plane has
    // taken every other one.
    fds::fill_reserve();

    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if workers == 0 {
        eprintln!("error: --workers must be at least 1");
        return ExitCode::FAILURE;
    }
    // One worker runs on the current thread: no work-stealing scheduler to pay for when there is
    // nobody to steal from.
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(args));
    // A reload may still be blocked reading a file (a named pipe nobody writes to); do not wait
    // for it.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// The signals the proxy acts on, installed together.
struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

async fn run(args: Args) -> ExitCode {
    // First of all: once installed, a SIGHUP during a slow start-up waits for the loop below
    // instead of killing the process (its default action).
    let Ok(mut signals) = Signals::install() else {
        eprintln!("error: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    let (file, config) = match &args.config {
        Some(path) => {
            let loaded = tokio::select! {
                loaded = load_bootstrap(path) => loaded,
                _ = signals.term.recv() => return ExitCode::SUCCESS,
                _ = signals.int.recv() => return ExitCode::SUCCESS,
            };
            match loaded {
                Ok(pair) => pair,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        None => Default::default(),
    };
    let drain = match lifecycle::drain_delay(args.drain_delay, file.drain_delay.as_deref()) {
        Ok(delay) => DrainTiming {
            delay,
            timeout: args.drain_timeout,
        },
        Err(e) => {
            let path = args.config.as_deref().unwrap_or(std::path::Path::new("-"));
            eprintln!("error: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let xds = match xds_settings(&args, file.xds.clone()) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let (None, Some(path)) = (&xds, &args.config)
        && let Err(e) = ensure_something_to_serve(path, &config)
    {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    // Held for the mesh mTLS configs; renewals publish on it.
    let identity =
        match trellis_proxy::identity::start(args.identity_token_file.clone(), xds.as_ref()) {
            Ok(identity) => identity,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
    let admin_socket = match admin::bind(args.admin, args.admin_allow_remote).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let proxy = match Proxy::with_identity(identity) {
        Ok(proxy) => proxy,
        Err(e) => {
            eprintln!("error: mesh mTLS: {e}");
            return ExitCode::FAILURE;
        }
    };
    let static_part = watch::Sender::new(Arc::new(file));
    let control_plane = xds.is_some();
    match xds {
        // The first control-plane update publishes the static part with the dynamic one, so
        // /ready turns true only once the proxy has what the control plane gives it.
        Some(settings) => {
            tracing::info!(address = %settings.address, node = %settings.node.id, "using the control plane");
            tokio::spawn(Client::new(proxy.clone(), settings, static_part.subscribe()).run());
        }
        None => match proxy.apply(config).await {
            Ok(version) => telemetry::config_applied(version),
            Err(e) => {
                let path = args.config.as_deref().unwrap_or(std::path::Path::new("-"));
                eprintln!("error: {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
    }
    let lifecycle = Arc::new(Lifecycle::default());
    // The bound address, so `--admin 127.0.0.1:0` logs the port it got.
    let admin_address = admin_socket.local_addr().unwrap_or(args.admin);
    let _admin = Admin::new(proxy.clone(), lifecycle.clone()).spawn(admin_socket);
    tracing::info!(admin = %admin_address, "trellis-proxy started");

    // Reloads run on their own task, one at a time: a SIGHUP during a reload leaves one more
    // pending (however many arrive), and the loop below never waits for a file.
    let reload_wanted = Arc::new(Notify::new());
    if let Some(path) = args.config.clone() {
        let target = if control_plane {
            ReloadTarget::StaticPart(static_part)
        } else {
            ReloadTarget::Proxy(proxy.clone())
        };
        tokio::spawn(reloads(path, target, reload_wanted.clone()));
    }
    let Signals {
        mut hup,
        mut term,
        mut int,
    } = signals;
    loop {
        tokio::select! {
            _ = hup.recv() => match &args.config {
                Some(_) => reload_wanted.notify_one(),
                None => tracing::info!("SIGHUP ignored: there is no --config file to reload"),
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // A second signal: the operator does not want to wait.
    let second_signal = async {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    match lifecycle.shut_down(&proxy, drain, second_signal).await {
        ShutDown::Drained => tracing::info!("drained; exiting"),
        ShutDown::TimedOut { open } => tracing::info!(open, "exiting after the drain timeout"),
        ShutDown::Interrupted => {
            tracing::info!("second signal; closing the remaining connections")
        }
    }
    // The access log writer flushes within milliseconds of its last line; the last requests'
    // lines would be lost if the runtime stopped first.
    tokio::time::sleep(Duration::from_millis(50)).await;
    ExitCode::SUCCESS
}

/// `--xds` and node flags over the file's `xds:` section; `None` without a control plane.
fn xds_settings(args: &Args, file: Option<bootstrap::Xds>) -> Result<Option<XdsSettings>, String> {
    let mut x = file.unwrap_or_default();
    let set = |field: &mut Option<String>, flag: &Option<String>| {
        if flag.is_some() {
            field.clone_from(flag);
        }
    };
    set(&mut x.address, &args.xds);
    set(&mut x.node_id, &args.node_id);
    set(&mut x.role, &args.role);
    set(&mut x.namespace, &args.namespace);
    set(&mut x.service_account, &args.service_account);
    set(&mut x.gateway, &args.gateway);
    set(&mut x.server_name, &args.xds_server_name);
    if args.xds_ca_file.is_some() {
        x.ca_file.clone_from(&args.xds_ca_file);
    }
    x.labels.extend(args.labels.iter().cloned());
    if x.address.is_none() {
        // Silently ignoring them would leave an operator believing the channel is secured.
        if x.ca_file.is_some() || x.server_name.is_some() {
            return Err(
                "--xds-ca-file / --xds-server-name (xds.ca_file / xds.server_name): \
                 there is no control plane to use them for (--xds or xds.address)"
                    .into(),
            );
        }
        return Ok(None);
    }
    XdsSettings::from_bootstrap(&x).map(Some)
}

/// What a reload updates.
enum ReloadTarget {
    /// With a control plane, the file's static part; the client republishes it with the dynamic
    /// resources (and logs the outcome).
    StaticPart(watch::Sender<Arc<bootstrap::File>>),
    /// Without one, the whole configuration.
    Proxy(Arc<Proxy>),
}

/// Reloads `path` each time `wanted` is notified. A bad reload is logged and changes nothing.
async fn reloads(path: PathBuf, target: ReloadTarget, wanted: Arc<Notify>) {
    loop {
        wanted.notified().await;
        let result = match (load_bootstrap(&path).await, &target) {
            (Ok((file, _)), ReloadTarget::StaticPart(static_part)) => {
                static_part.send_replace(Arc::new(file));
                continue;
            }
            (Ok((_, config)), ReloadTarget::Proxy(proxy)) => {
                match ensure_something_to_serve(&path, &config) {
                    Ok(()) => proxy.apply(config).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            }
            (Err(e), _) => Err(e.to_string()),
        };
        match result {
            Ok(version) => {
                telemetry::config_applied(version);
                tracing::info!(version, "configuration reloaded")
            }
            Err(e) => {
                telemetry::config_rejected();
                // One log line per event: list the problems on it.
                let e = e.replace(":\n", ": ").replace('\n', "; ");
                tracing::error!(error = %e, "reload rejected; the previous configuration stays")
            }
        }
    }
}
