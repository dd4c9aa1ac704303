//! The `segmenter` command line: parses arguments, sets up logging, hands over to the library.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use segmenter::model::time::{format_duration, parse_cli_time};
use segmenter::replay::{replay, ReplayJob};
use segmenter::rules::Program;
use segmenter::settings::{self, Settings};

/// mimalloc: the engine allocates many small, short-lived objects per event; measured ~10%
/// faster replay than the system allocator (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "segmenter",
    version,
    about = "Live behavioural customer segments from a Kafka event stream"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A live demo with no external services: in-process Kafka, generated traffic, the service,
    /// and every change printed as it happens.
    Demo {
        /// Input events per second.
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        #[arg(long, default_value_t = 2000)]
        customers: u64,
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        duration: Option<u64>,
        /// Segment definitions to use instead of the built-in demo set.
        #[arg(long)]
        segments: Option<PathBuf>,
        /// Address of the HTTP API and /metrics.
        #[arg(long, default_value = "127.0.0.1:9898")]
        http: String,
    },
    /// Produce realistic generated customer events to Kafka at a steady rate (for docker
    /// compose and load tests): keyed by customer id, routed by kind to the input topics.
    Generate {
        #[arg(long, default_value = "localhost:9092")]
        brokers: String,
        /// Events per second.
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        #[arg(long, default_value_t = 10000)]
        customers: u64,
        /// One topic for everything, or the topics for activity (pages, products, checkouts,
        /// identify), email events and orders, in that order.
        #[arg(long, value_delimiter = ',', default_value = "clicks,email,orders")]
        topics: Vec<String>,
        /// Stop after this many seconds (default: run until SIGTERM/Ctrl-C).
        #[arg(long)]
        duration: Option<u64>,
        /// Seed of the generator (default: from the clock).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Run the service: consume, segment, publish.
    Run {
        #[arg(long, default_value = "config/segmenter.toml")]
        config: PathBuf,
    },
    /// Validate the config and rules; print each segment's compiled plan.
    Check {
        #[arg(long, default_value = "config/segmenter.toml")]
        config: PathBuf,
    },
    /// Bearer tokens of the HTTP API.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Run the engine offline over an NDJSON file with the event clock; print changes as NDJSON.
    Replay {
        #[arg(long)]
        config: PathBuf,
        /// NDJSON events, or `-` for stdin.
        #[arg(long)]
        input: String,
        /// Finally advance the clock to this time (RFC 3339 or epoch ms) so pending timers fire.
        #[arg(long)]
        until: Option<String>,
        /// Keep the RocksDB state here (default: a temporary directory, removed afterwards).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Mint a token from the OS's randomness: prints the token once, then its line for the tokens
    /// file (`http.tokens_file`), which holds only its SHA-256.
    New {
        /// Who uses it; appears in the audit log of every erasure.
        #[arg(long)]
        name: String,
        /// `read` (segments, members, customers, explain, preview) or `admin` (also erasure).
        #[arg(long, default_value = "read")]
        role: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Run { .. } | Command::Generate { .. } => "info",
        _ => "warn",
    };
    let default_level = if matches!(cli.command, Command::Demo { .. }) {
        "warn,segmenter=info"
    } else {
        default_level
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn env_vars() -> Vec<(String, String)> {
    std::env::vars().collect()
}

fn load_settings(config: &Path) -> Result<Settings, ExitCode> {
    settings::load(config, &env_vars()).map_err(|errors| {
        for error in &errors.0 {
            eprintln!("{error}");
        }
        eprintln!("error: {} problem(s) in the configuration", errors.0.len());
        ExitCode::FAILURE
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo {
            rate,
            customers,
            duration,
            segments,
            http,
        } => {
            let options = segmenter::demo::DemoOptions {
                rate,
                customers,
                duration: duration.map(std::time::Duration::from_secs),
                segments,
                http,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(async {
                let shutdown = Arc::new(AtomicBool::new(false));
                let signals = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    signals.store(true, Ordering::Relaxed);
                    wait_for_signal().await;
                    std::process::exit(130);
                });
                segmenter::demo::run(options, shutdown).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate {
            brokers,
            rate,
            customers,
            topics,
            duration,
            seed,
        } => {
            let routing = segmenter::loadgen::Routing::from_topics(&topics)?;
            let mut options =
                segmenter::loadgen::LoadOptions::new(&brokers, rate, customers, routing);
            options.duration = duration.map(std::time::Duration::from_secs);
            options.seed = seed.unwrap_or(options.seed);
            options.report_every = Some(std::time::Duration::from_secs(10));
            tracing::info!(%brokers, rate, customers, ?topics, "generate: producing");
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let stats = runtime.block_on(async {
                let stop = Arc::new(AtomicBool::new(false));
                let signals = stop.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    signals.store(true, Ordering::Relaxed);
                });
                tokio::task::spawn_blocking(move || segmenter::loadgen::run(&options, &stop)).await
            })??;
            tracing::info!(
                sent = stats.sent,
                delivered = stats.delivered,
                failed = stats.failed,
                "generate: done"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { config } => {
            let settings = match load_settings(&config) {
                Ok(settings) => settings,
                Err(code) => return Ok(code),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(serve(settings))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            command: TokenCommand::New { name, role },
        } => {
            let role = segmenter::auth::Role::parse(&role)
                .with_context(|| format!("--role {role:?}: use read or admin"))?;
            let (token, entry) =
                segmenter::auth::mint(&name, role).map_err(|reason| anyhow::anyhow!(reason))?;
            eprintln!(
                "# the token, shown once (give it to the client; segmenter keeps only its hash):"
            );
            println!("{token}");
            eprintln!(
                "# its line for the tokens file (http.tokens_file) or SEGMENTER__HTTP__TOKENS:"
            );
            println!("{}", entry.line());
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => {
            let settings = match load_settings(&config) {
                Ok(settings) => settings,
                Err(code) => return Ok(code),
            };
            print_plan(&settings.program);
            print_secret_sources(&settings.kafka);
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay {
            config,
            input,
            until,
            state_dir,
        } => {
            let settings = match load_settings(&config) {
                Ok(settings) => settings,
                Err(code) => return Ok(code),
            };
            let until = until
                .map(|text| parse_cli_time(&text).with_context(|| format!("--until {text:?}")))
                .transpose()?;
            let temp;
            let dir = match state_dir {
                Some(dir) => dir,
                None => {
                    temp = tempfile::tempdir().context("creating a temporary state dir")?;
                    temp.path().to_path_buf()
                }
            };
            let reader: Box<dyn BufRead> = if input == "-" {
                Box::new(BufReader::with_capacity(1 << 20, std::io::stdin().lock()))
            } else {
                let file =
                    std::fs::File::open(&input).with_context(|| format!("opening {input}"))?;
                Box::new(BufReader::with_capacity(1 << 20, file))
            };
            let job = ReplayJob {
                program: settings.program.clone(),
                decoder: settings.input_decoder(),
                engine: settings.engine,
                state_dir: &dir,
                until,
            };
            let stdout = BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
            let stderr = std::io::stderr();
            let (summary, elapsed) = replay(job, reader, stdout, stderr.lock())?;
            eprintln!("{}", summary.line(elapsed));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The service with signal handling: the first SIGTERM/SIGINT drains and stops (bounded by
/// `engine.shutdown_timeout`), a second exits at once — safe, because nothing is acknowledged
/// before it is durable.
async fn serve(settings: Settings) -> anyhow::Result<()> {
    let shutdown = Arc::new(AtomicBool::new(false));
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: draining (send another to exit at once)");
        signals.store(true, Ordering::Relaxed);
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    segmenter::app::run(settings, shutdown).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut terminate) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Where each Kafka secret was read from (never the value).
fn print_secret_sources(kafka: &settings::KafkaSettings) {
    if kafka.secrets.is_empty() {
        return;
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "\nkafka secrets (values not shown):");
    for secret in &kafka.secrets {
        let _ = writeln!(out, "  {} from {}", secret.key, secret.source);
    }
}

fn print_plan(program: &Program) {
    let mut out = std::io::stdout().lock();
    let layout = &program.layout;
    let _ = writeln!(
        out,
        "{} segment(s), definitions version {}",
        program.segments.len(),
        program.version
    );
    for segment in &program.segments {
        let _ = writeln!(out, "\n{}  (version {})", segment.id, segment.version);
        if let Some(description) = &segment.description {
            let _ = writeln!(out, "  description: {description}");
        }
        let _ = writeln!(out, "  rule: {}", segment.canonical);
        if !segment.depends_on.is_empty() {
            let names: Vec<&str> = segment
                .depends_on
                .iter()
                .map(|idx| program.segments[*idx].id.as_str())
                .collect();
            let _ = writeln!(out, "  reads segments: {}", names.join(", "));
        }
        let timing = if segment.time_dependent {
            "changes with time alone (durable timers)"
        } else {
            "changes only on events"
        };
        let _ = writeln!(out, "  {timing}");
    }
    let _ = writeln!(out, "\nper-customer state:");
    let property = |path: &Option<Vec<String>>| {
        path.as_ref()
            .map(|p| format!(", property {:?}", p.join(".")))
            .unwrap_or_default()
    };
    for spec in &layout.series {
        let property = property(&spec.property);
        let _ = writeln!(
            out,
            "  window series of {}{property}, kept {}",
            layout.matchers[spec.matcher].text,
            format_duration(spec.retention)
        );
    }
    for spec in &layout.totals {
        let property = property(&spec.property);
        let _ = writeln!(
            out,
            "  all-time totals of {}{property}",
            layout.matchers[spec.matcher].text
        );
    }
    for matcher in &layout.extremes {
        let _ = writeln!(
            out,
            "  first/last time of {}",
            layout.matchers[*matcher].text
        );
    }
    for name in &layout.traits {
        let _ = writeln!(out, "  trait {name}");
    }
}
