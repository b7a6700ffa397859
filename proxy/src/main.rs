//! `trellis-proxy`: arguments, runtime, signals. Decisions live in the library.

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use trellis_proxy::{Proxy, load_file};

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
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log));
    // Logs go to stderr (stdout is left for access logs); colour only on a terminal.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

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
    let proxy = Proxy::new();
    if let Err(e) = proxy.apply(config).await {
        eprintln!("error: {}: {e}", args.config.display());
        return ExitCode::FAILURE;
    }
    tracing::info!(config = %args.config.display(), "trellis-proxy started");

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
        Ok(version) => tracing::info!(version, "configuration reloaded"),
        Err(e) => {
            // One log line per event: list the problems on it.
            let e = e.replace(":\n", ": ").replace('\n', "; ");
            tracing::error!(error = %e, "reload rejected; the previous configuration stays")
        }
    }
}
