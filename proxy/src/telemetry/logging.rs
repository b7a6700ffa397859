//! The process's `tracing` subscriber: an env filter and one of three formats, to stderr (stdout
//! is left to access logs).

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event, human-readable.
    #[default]
    Text,
    /// One JSON object per event, for log collectors.
    Json,
    /// Multi-line, for reading during development.
    Pretty,
}

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `default_filter`.
pub fn init(default_filter: &str, format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(ansi).init(),
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Pretty => builder.pretty().with_ansi(ansi).init(),
    }
}
