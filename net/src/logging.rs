//! Logging setup shared by cmx-gateway and cmx-agent: `tracing` to stderr, text or JSON lines,
//! with `RUST_LOG` overriding the level. Records of the `log` crate (russh, aya-log's relay of
//! the eBPF programs' logs) are bridged into it.

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable text.
    Text,
    /// One JSON object per line, fields at top level.
    Json,
}

pub fn init(format: LogFormat, level: &str) {
    init_with(format, level, None::<tracing_subscriber::layer::Identity>);
}

/// Like `init`, with one more layer beside the log writer (the gateway keeps its recent audit
/// lines for its admin API this way). The level filter applies to the writer only: `extra`
/// brings its own filter, so it sees what it asks for whatever the log level.
pub fn init_with<L>(format: LogFormat, level: &str, extra: Option<L>)
where
    L: tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync + 'static,
{
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let writer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let writer = match format {
        LogFormat::Text => writer.boxed(),
        LogFormat::Json => writer.json().flatten_event(true).with_current_span(false).boxed(),
    };
    tracing_subscriber::registry()
        .with(extra)
        .with(writer.with_filter(filter))
        .init();
}
