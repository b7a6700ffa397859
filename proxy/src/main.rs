//! `trellis-proxy`: arguments, runtime, signals. Decisions live in the library.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use trellis_proxy::{
    Proxy,
    admin::{self, Admin, Lifecycle},
    load_file,
    telemetry::{self, logging::LogFormat},
};

/// Trellis proxy: an HTTP/1.1, HTTP/2 and gRPC routing proxy for service meshes and ingress.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Bootstrap configuration file (YAML). Reloaded on SIGHUP.
    #[arg(long, short)]
    config: PathBuf,
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
}

fn main() -> ExitCode {
    let args = Args::parse();
    telemetry::logging::init(&args.log, args.log_format);
    telemetry::install_global_recorder();

    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if workers == 0 {
        eprintln!("error: --workers must be at least 1");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let config = match load_file(&args.config) {
        Ok(c) => c,
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
    let proxy = Proxy::new();
    match proxy.apply(config).await {
        Ok(version) => telemetry::config_applied(version),
        Err(e) => {
            eprintln!("error: {}: {e}", args.config.display());
            return ExitCode::FAILURE;
        }
    }
    let lifecycle = Arc::new(Lifecycle::default());
    let _admin = Admin::new(proxy.clone(), lifecycle.clone()).spawn(admin_socket);
    tracing::info!(config = %args.config.display(), admin = %args.admin, "trellis-proxy started");

    let (Ok(mut hup), Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("error: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => reload(&proxy, &args.config).await,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("shutting down");
    lifecycle.start_drain();
    proxy.close_listeners().await;
    ExitCode::SUCCESS
}

/// A bad reload is logged and changes nothing.
async fn reload(proxy: &Arc<Proxy>, path: &std::path::Path) {
    let result = match load_file(path) {
        Ok(config) => proxy.apply(config).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
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
