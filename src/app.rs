//! Wiring of the service (`segmenter run`) and its ordered shutdown: stop intake → each partition
//! worker publishes what it can and commits → offsets committed to Kafka → producer flushed.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use rdkafka::consumer::CommitMode;

use crate::api::ServiceApi;
use crate::kafka::consumer::{commit, group_consumer, poll_loop, InputSink, PayloadLimit};
use crate::kafka::{self, AckBoard, KafkaSetupError, TopicSpec};
use crate::metrics::Metrics;
use crate::outbox::{Topics, DEAD_LETTER_MAX_PAYLOAD};
use crate::pipeline::{Dispatcher, Shared};
use crate::settings::{HttpAccess, Settings};
use crate::store::rocks::{RocksOptions, RocksStore};

/// Runs the service until `shutdown` is set (or a partition worker fails).
pub async fn run(settings: Settings, shutdown: Arc<AtomicBool>) -> anyhow::Result<()> {
    let state_dir = &settings.state.dir;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating state dir {}", state_dir.display()))?;
    let store = Arc::new(open_store(state_dir, &settings)?);
    let segment_ids: Vec<String> = settings
        .program
        .segments
        .iter()
        .map(|s| s.id.clone())
        .collect();
    let metrics = Metrics::new(&settings.program.version, &segment_ids);
    let board = Arc::new(AckBoard::default());
    let publisher = Arc::new(kafka::Publisher::new(
        &settings.kafka,
        board.clone(),
        metrics.clone(),
    )?);
    let decoder = settings.input_decoder();
    let topics = Topics {
        changes: settings.output.changes_topic.clone(),
        membership: settings.output.membership_topic.clone(),
        dlq: settings.output.dlq_topic.clone(),
        changelog: settings.state.changelog_topic.clone(),
    };
    let shared = Arc::new(Shared::new(
        settings.program.clone(),
        settings.engine,
        store,
        decoder,
        publisher.clone(),
        board,
        topics.clone(),
        settings.pipeline,
        settings.max_future_skew,
        settings.input.topics.clone(),
        metrics.clone(),
        settings.kafka.clone(),
    )?);
    let dispatcher = Arc::new(Dispatcher::new(shared.clone()));
    let dispatcher_shared = shared.clone();
    let sink: Arc<dyn InputSink> = dispatcher.clone();
    // Nothing over input.max_event_bytes is decoded: only what its dead letter forwards of it
    // is copied out of librdkafka.
    let limit = PayloadLimit {
        max_bytes: settings.input.max_event_bytes,
        kept_bytes: DEAD_LETTER_MAX_PAYLOAD,
    };
    let consumer = group_consumer(&settings.kafka, sink, metrics, publisher.health(), limit)?;

    // Up before Kafka is: liveness and (un)readiness answer while the service waits for it.
    let api = Arc::new(
        ServiceApi::new(shared, dispatcher.clone()).with_preview_limits(settings.http.preview),
    );
    let http = start_http(&settings, api, shutdown.clone()).await?;
    let _http = AbortOnDrop(http);

    let health = publisher.health();
    let Some(partitions) = wait_for_inputs(&consumer, &settings, &shutdown, &health).await? else {
        return Ok(());
    };
    let output_partitions = settings.output.partitions.unwrap_or(partitions);
    let specs = [
        TopicSpec {
            name: topics.changes.clone(),
            partitions: output_partitions,
            compact: false,
        },
        TopicSpec {
            name: topics.membership.clone(),
            partitions: output_partitions,
            compact: true,
        },
        TopicSpec {
            name: topics.dlq.clone(),
            partitions: output_partitions,
            compact: false,
        },
        // Partition p mirrors input partition p: as many partitions as the input.
        TopicSpec {
            name: topics.changelog.clone(),
            partitions,
            compact: true,
        },
    ];
    kafka::ensure_topics(
        &settings.kafka,
        &specs,
        settings.output.replication_factor,
        Duration::from_secs(30),
    )
    .await?;
    let changelog_partitions = kafka::input_partitions(
        &consumer,
        std::slice::from_ref(&topics.changelog),
        Duration::from_secs(30),
    )?;
    if changelog_partitions != partitions {
        anyhow::bail!(
            "changelog topic {:?} has {changelog_partitions} partitions, the input {partitions}: \
             partition p of the changelog mirrors input partition p, so they must be equal \
             (delete the changelog topic or name another with state.changelog_topic)",
            topics.changelog
        );
    }
    if settings.kafka.guarantee == crate::settings::Guarantee::ExactlyOnce {
        // Refuse to run without transactions rather than fall back silently.
        let kafka_settings = settings.kafka.clone();
        tokio::task::spawn_blocking(move || {
            kafka::txn::probe(&kafka_settings, Duration::from_secs(30))
        })
        .await
        .context("the transactions probe")??;
        tracing::warn!(
            "processing.guarantee = \"exactly_once\" is not reliable yet: on tansu its takeover \
             tests lost changes and a restart stalled once (README \"Exactly-once mode\"); \
             \"at_least_once\" is the verified mode"
        );
        if !settings.kafka.read_committed {
            tracing::warn!(
                "exactly-once with processing.isolation = \"read_uncommitted\": aborted \
                 transactions' records are read back (only for a broker without the last stable \
                 offset, such as tansu 0.6.0, which shows them to every reader anyway)"
            );
        }
    }
    tracing::info!(
        input = ?settings.input.topics,
        partitions,
        guarantee = ?settings.kafka.guarantee,
        read_committed = settings.kafka.read_committed,
        segments = settings.program.segments.len(),
        definitions = %settings.program.version,
        "segmenter running"
    );

    let standby_stop = Arc::new(AtomicBool::new(false));
    let standby = crate::pipeline::standby::spawn(
        dispatcher_shared.clone(),
        partitions,
        settings.state.standby_replicas,
        standby_stop.clone(),
    );
    let input_topics = settings.input.topics.clone();
    let poll_shutdown = shutdown.clone();
    let poller = dispatcher.clone();
    let shutdown_timeout = settings.pipeline.shutdown_timeout;
    let outcome = tokio::task::spawn_blocking(move || {
        let polled = poll_loop(&consumer, &input_topics, &poll_shutdown);
        let deadline = Instant::now() + shutdown_timeout;
        poller.shutdown();
        // Informational only (segmenter resumes from its own offsets), so never wait for it.
        commit(&consumer, &poller.publishable_offsets(), CommitMode::Async);
        // Leaving the group blocks while the broker is unreachable; everything durable is done,
        // so let it finish in the background rather than overrun the shutdown deadline.
        let closer = std::thread::spawn(move || drop(consumer));
        while !closer.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        (polled, deadline)
    })
    .await
    .context("poll loop panicked")?;
    let (polled, deadline) = outcome;
    standby_stop.store(true, Ordering::Relaxed);
    if let Some(standby) = standby {
        // Stops at its next check (within a poll of the changelog), its progress saved.
        let _ = standby.join();
    }
    // Records still queued stay in the outbox and are published at the next start.
    let remaining = deadline.saturating_duration_since(Instant::now());
    publisher.flush(remaining.max(Duration::from_millis(100)));
    polled?;
    if let Some(reason) = dispatcher.failure_reason() {
        anyhow::bail!("stopped after a failure: {reason}");
    }
    tracing::info!("segmenter stopped cleanly");
    Ok(())
}

/// Binds the HTTP port (TLS if configured) and serves the API until `shutdown` is set.
async fn start_http(
    settings: &Settings,
    api: Arc<ServiceApi>,
    shutdown: Arc<AtomicBool>,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let http = settings.http.clone();
    let tls = http
        .tls
        .as_ref()
        .map(crate::http::serve::tls_config)
        .transpose()?;
    let listener = tokio::net::TcpListener::bind(&settings.http_listen)
        .await
        .with_context(|| format!("listening for HTTP on {}", settings.http_listen))?;
    let address = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let scheme = if tls.is_some() { "https" } else { "http" };
    match &http.access {
        HttpAccess::Tokens(tokens) => {
            tracing::info!(%address, scheme, tokens = tokens.len(), "HTTP API listening")
        }
        HttpAccess::Open { explicit } => tracing::warn!(
            %address,
            scheme,
            explicit,
            "HTTP API listening without access control"
        ),
    }
    Ok(tokio::spawn(async move {
        crate::http::serve(listener, api, &http, tls, async move {
            while !shutdown.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }))
}

/// Stops a spawned task when the service returns, however it returns.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn open_store(dir: &Path, settings: &Settings) -> anyhow::Result<RocksStore> {
    let options = RocksOptions {
        block_cache_bytes: settings.state.block_cache_bytes,
        sync_writes: settings.state.sync_writes,
    };
    RocksStore::open(dir, options).with_context(|| format!("opening state in {}", dir.display()))
}

/// Waits until the input topics can be described (the broker may not be up yet); `None` if
/// shut down meanwhile. Topics that exist but are not co-partitioned are a hard error.
async fn wait_for_inputs(
    consumer: &kafka::consumer::GroupConsumer,
    settings: &Settings,
    shutdown: &AtomicBool,
    health: &kafka::ClientHealth,
) -> anyhow::Result<Option<i32>> {
    let mut delay = Duration::from_millis(250);
    loop {
        match kafka::input_partitions(consumer, &settings.input.topics, Duration::from_secs(5)) {
            Ok(partitions) => {
                health.clear();
                return Ok(Some(partitions));
            }
            Err(KafkaSetupError::NotCoPartitioned(detail)) => {
                anyhow::bail!("input topics are not co-partitioned: {detail}")
            }
            Err(error) => tracing::warn!(%error, "waiting for kafka and the input topics"),
        }
        kafka::consumer::serve_callbacks(consumer);
        if shutdown.load(Ordering::Relaxed) {
            return Ok(None);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
