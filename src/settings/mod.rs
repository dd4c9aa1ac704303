//! Configuration: the TOML file (default `config/segmenter.toml`) with `SEGMENTER__SECTION__KEY`
//! environment overrides, validated into [`Settings`]. Every problem is collected and reported at
//! once with file, line, column and a plain-words reason; nothing starts on a broken config.

mod http;
mod raw;
mod secrets;
mod spans;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::decode::{Decoder, FieldMapping};
use crate::engine::{ClockMode, EngineConfig};
use crate::features::Limits;
use crate::rules::error::line_col;
use crate::rules::{compile, Program, SegmentDef};

use raw::{RawFile, RawSegment, RawSegmentsFile};
pub use secrets::{is_secret_key, KafkaSecret, Secret, SecretSource, SECRET_KEYS};

pub use http::{is_loopback, HttpAccess, HttpSettings, PreviewLimits, TlsFiles};

/// One configuration problem, located where possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based line and column, when the problem has a place in the file.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, column)) => write!(f, "{}:{line}:{column}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// All the problems found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (idx, error) in self.0.iter().enumerate() {
            if idx > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Input decoding settings.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSettings {
    pub topics: Vec<String>,
    pub max_event_bytes: usize,
    pub mapping: FieldMapping,
}

/// `processing.guarantee`: what a crash may do to the outputs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Offsets are committed after the outputs are acknowledged: a crash may repeat outputs
    /// (same ids), never lose one.
    #[default]
    AtLeastOnce,
    /// One Kafka transaction per micro-batch holds its outputs, changelog records and input
    /// offsets; the input is read `read_committed` (see `kafka::txn`).
    ExactlyOnce,
}

/// `processing.isolation`: how the input and the changelog restore read transactional records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// Only committed transactions' records, up to the last stable offset (the default with
    /// `exactly_once`, which needs it: an aborted batch's changelog records are not state).
    ReadCommitted,
    /// Every record (the default with `at_least_once`). With `exactly_once` only for brokers
    /// that do not implement the last stable offset (tansu 0.6.0), which show aborted records
    /// to every reader anyway.
    ReadUncommitted,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KafkaSettings {
    pub brokers: String,
    pub group_id: String,
    /// `group.instance.id` of the consumer (static membership), if set.
    pub instance_id: Option<String>,
    pub client: BTreeMap<String, String>,
    pub consumer: BTreeMap<String, String>,
    pub producer: BTreeMap<String, String>,
    /// `[kafka.secrets]`, read from the environment or files (values redacted in `Debug`);
    /// applied to every client after the pass-through settings.
    pub secrets: Vec<KafkaSecret>,
    /// `processing.guarantee` (it shapes the clients: transactional producers, isolation).
    pub guarantee: Guarantee,
    /// `processing.isolation` resolved: whether the input and the restore read
    /// `read_committed`.
    pub read_committed: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutputSettings {
    pub changes_topic: String,
    pub membership_topic: String,
    pub dlq_topic: String,
    pub partitions: Option<i32>,
    pub replication_factor: i32,
}

/// How the service moves work through a partition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PipelineSettings {
    pub batch_size: usize,
    pub timer_slice: usize,
    pub max_outbox_backlog: usize,
    pub shutdown_timeout: std::time::Duration,
    /// How long a partition's messages wait for a quiet co-partitioned topic before being
    /// applied out of cross-topic timestamp order.
    pub max_merge_wait: std::time::Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StateSettings {
    pub dir: PathBuf,
    pub block_cache_bytes: usize,
    pub sync_writes: bool,
    /// The compacted changelog topic (one partition per input partition).
    pub changelog_topic: String,
    /// 0: no standby copies; any other value: every instance follows the changelog of every
    /// partition it does not own (`pipeline::standby`).
    pub standby_replicas: u32,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub program: Arc<Program>,
    pub engine: EngineConfig,
    pub max_future_skew: i64,
    pub input: InputSettings,
    pub kafka: KafkaSettings,
    pub output: OutputSettings,
    pub state: StateSettings,
    pub pipeline: PipelineSettings,
    pub http_listen: String,
    /// Access control, limits and TLS of the HTTP API.
    pub http: HttpSettings,
}

impl Settings {
    /// The input decoder: the configured mapping and size limit, keeping only the event
    /// properties the compiled rules read. `run` and `replay` decode alike through it.
    pub fn input_decoder(&self) -> Decoder {
        Decoder::new(self.input.mapping.clone(), self.input.max_event_bytes)
            .with_property_keys(self.program.layout.property_keys())
    }
}

/// Config and segment files larger than this are refused before parsing (a config names its
/// `segments_file`, which could be anything, `/dev/zero` included).
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// Reads and validates `path`, applying environment overrides from `env`.
pub fn load(path: &Path, env: &[(String, String)]) -> Result<Settings, ConfigErrors> {
    let file = path.display().to_string();
    let text = read_bounded(path).map_err(|message| {
        ConfigErrors(vec![ConfigError {
            file: file.clone(),
            position: None,
            message,
        }])
    })?;
    load_str(&file, &text, path.parent().unwrap_or(Path::new(".")), env)
}

/// Validates the config `text` (named `file` in errors); a `segments_file` is read relative to
/// `dir`.
pub fn load_str(
    file: &str,
    text: &str,
    dir: &Path,
    env: &[(String, String)],
) -> Result<Settings, ConfigErrors> {
    let file = file.to_string();
    let spanned: RawFile<RawSegment> =
        toml::from_str(text).map_err(|err| ConfigErrors(vec![toml_error(&file, text, &err)]))?;
    let sections = with_env_overrides(&file, text, env)?;
    let mut errors = Vec::new();
    let pass_through = secrets::PassThrough {
        client: &sections.kafka.client,
        consumer: &sections.kafka.consumer,
        producer: &sections.kafka.producer,
    };
    let kafka_secrets = secrets::resolve(&file, text, dir, pass_through, env, &mut errors);
    let mut sources: Vec<(String, String, Vec<RawSegment>)> =
        vec![(file.clone(), text.to_string(), spanned.segment)];
    if let Some(extra) = &spanned.segments_file {
        let extra_path = dir.join(extra);
        let extra_file = extra_path.display().to_string();
        match read_bounded(&extra_path) {
            Ok(extra_text) => match toml::from_str::<RawSegmentsFile>(&extra_text) {
                Ok(parsed) => sources.push((extra_file, extra_text, parsed.segment)),
                Err(err) => errors.push(toml_error(&extra_file, &extra_text, &err)),
            },
            Err(message) => errors.push(ConfigError {
                file: file.clone(),
                position: None,
                message: format!("segments_file {extra:?}: {extra_file}: {message}"),
            }),
        }
    }
    let program = compile_segments(&sources, &mut errors);
    let settings = build(&file, sections, program, &mut errors);
    match settings {
        Some(mut settings) if errors.is_empty() => {
            settings.kafka.secrets = kafka_secrets;
            Ok(settings)
        }
        _ => Err(ConfigErrors(errors)),
    }
}

/// A text file of at most [`MAX_FILE_BYTES`]; the error says why not.
fn read_bounded(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|err| format!("cannot read: {err}"))?;
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|err| format!("cannot read: {err}"))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("larger than {MAX_FILE_BYTES} bytes"));
    }
    Ok(text)
}

/// Validates only the segments of a file (for `replay`, whose config may hold nothing else).
pub fn load_program(path: &Path) -> Result<Arc<Program>, ConfigErrors> {
    load(path, &[]).map(|settings| settings.program)
}

fn toml_error(file: &str, text: &str, err: &toml::de::Error) -> ConfigError {
    let position = err.span().map(|span| line_col(text, span.start));
    ConfigError {
        file: file.to_string(),
        position,
        message: err.message().trim().to_string(),
    }
}

fn with_env_overrides(
    file: &str,
    text: &str,
    env: &[(String, String)],
) -> Result<RawFile<serde::de::IgnoredAny>, ConfigErrors> {
    let overrides: config::Map<String, String> = env
        .iter()
        .filter(|(key, _)| key.starts_with("SEGMENTER__"))
        .cloned()
        .collect();
    let built = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix("SEGMENTER")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("input.topics")
                .with_list_parse_key("input.mapping.customer_id")
                .with_list_parse_key("http.tokens")
                .source(Some(overrides)),
        )
        .build()
        .and_then(config::Config::try_deserialize);
    built.map_err(|err| {
        ConfigErrors(vec![ConfigError {
            file: file.to_string(),
            position: None,
            message: format!("with SEGMENTER__* environment overrides: {err}"),
        }])
    })
}

fn compile_segments(
    sources: &[(String, String, Vec<RawSegment>)],
    errors: &mut Vec<ConfigError>,
) -> Option<Program> {
    let mut defs = Vec::new();
    let mut places: Vec<(&str, &str, &RawSegment)> = Vec::new();
    let mut seen: BTreeMap<String, (String, usize)> = BTreeMap::new();
    for (file, text, segments) in sources {
        for segment in segments {
            let id = segment.id.get_ref();
            let at = |offset: usize| Some(line_col(text, offset));
            let id_ok = !id.is_empty()
                && id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !id_ok {
                errors.push(ConfigError {
                    file: file.clone(),
                    position: at(segment.id.span().start),
                    message: format!("segment '{id}': the id must match [a-z0-9_]+ (lowercase letters, digits, underscores)"),
                });
                continue;
            }
            if let Some((other_file, other_line)) = seen.get(id) {
                errors.push(ConfigError {
                    file: file.clone(),
                    position: at(segment.id.span().start),
                    message: format!(
                        "segment '{id}': duplicate id (first defined at {other_file}:{other_line})"
                    ),
                });
                continue;
            }
            seen.insert(
                id.clone(),
                (file.clone(), line_col(text, segment.id.span().start).0),
            );
            if segment.rule.get_ref().trim().is_empty() {
                errors.push(ConfigError {
                    file: file.clone(),
                    position: at(segment.rule.span().start),
                    message: format!("segment '{id}': the rule is empty"),
                });
                continue;
            }
            defs.push(SegmentDef {
                id: id.clone(),
                description: segment.description.clone(),
                rule: segment.rule.get_ref().clone(),
            });
            places.push((file, text, segment));
        }
    }
    if !errors.is_empty() {
        return None;
    }
    match compile(&defs) {
        Ok(program) => Some(program),
        Err(segment_errors) => {
            for err in segment_errors {
                let (file, text, segment) = places[err.segment];
                let offset = spans::rule_offset(text, segment.rule.span(), err.error.span.start);
                errors.push(ConfigError {
                    file: file.to_string(),
                    position: Some(line_col(text, offset)),
                    message: format!("segment '{}': {}", defs[err.segment].id, err.error.message),
                });
            }
            None
        }
    }
}

/// Parses a settings duration such as `24h`, `5m`, `90s`, `250ms`.
pub fn parse_duration(text: &str) -> Option<i64> {
    let digits_end = text.find(|c: char| !c.is_ascii_digit())?;
    let count: i64 = text[..digits_end].parse().ok()?;
    let unit = crate::model::time::duration_unit(&text[digits_end..])?;
    count.checked_mul(unit)
}

fn build(
    file: &str,
    raw: RawFile<serde::de::IgnoredAny>,
    program: Option<Program>,
    errors: &mut Vec<ConfigError>,
) -> Option<Settings> {
    let mut problem = |message: String| {
        errors.push(ConfigError {
            file: file.to_string(),
            position: None,
            message,
        })
    };
    let mut duration = |key: &str, value: Option<String>, default: i64| match value {
        None => default,
        Some(text) => parse_duration(&text).unwrap_or_else(|| {
            problem(format!(
                "{key} = {text:?} is not a duration like 90s, 15m, 24h or 7d"
            ));
            default
        }),
    };
    let max_future_skew = duration(
        "engine.max_future_skew",
        raw.engine.max_future_skew,
        300_000,
    );
    let dedup_window = duration("input.dedup_window", raw.input.dedup_window, 86_400_000);
    let shutdown_timeout = duration(
        "engine.shutdown_timeout",
        raw.engine.shutdown_timeout,
        15_000,
    );
    let max_merge_wait = duration("input.max_merge_wait", raw.input.max_merge_wait, 50);
    let clock = match raw.engine.clock.as_deref() {
        None | Some("wall") => ClockMode::Wall,
        Some("event") => ClockMode::Event,
        Some(other) => {
            errors.push(ConfigError {
                file: file.to_string(),
                position: None,
                message: format!("engine.clock = {other:?}: use \"wall\" or \"event\""),
            });
            ClockMode::Wall
        }
    };
    let defaults = EngineConfig::default();
    let limits = Limits {
        max_entries_per_series: raw
            .engine
            .max_entries_per_series
            .unwrap_or(defaults.limits.max_entries_per_series)
            .max(2),
        max_dedup_ids: raw
            .input
            .max_dedup_ids
            .unwrap_or(defaults.limits.max_dedup_ids),
        dedup_window,
    };
    let engine = EngineConfig {
        clock,
        limits,
        lookahead_steps: raw
            .engine
            .lookahead_steps
            .unwrap_or(defaults.lookahead_steps)
            .max(1),
        max_cached_customers: raw
            .engine
            .max_cached_customers
            .unwrap_or(defaults.max_cached_customers),
        timer_window: defaults.timer_window,
    };
    let mapping = build_mapping(raw.input.mapping, file, errors);
    let input = InputSettings {
        topics: raw
            .input
            .topics
            .unwrap_or_else(|| vec!["events".to_string()]),
        max_event_bytes: raw.input.max_event_bytes.unwrap_or(65_536),
        mapping,
    };
    let kafka = KafkaSettings {
        brokers: raw.kafka.brokers.unwrap_or_else(|| "localhost:9092".into()),
        group_id: raw.kafka.group_id.unwrap_or_else(|| "segmenter".into()),
        instance_id: raw.kafka.instance_id.filter(|id| !id.is_empty()),
        client: raw.kafka.client,
        consumer: raw.kafka.consumer,
        producer: raw.kafka.producer,
        secrets: Vec::new(),
        guarantee: raw.processing.guarantee.unwrap_or_default(),
        read_committed: match raw.processing.isolation {
            Some(Isolation::ReadCommitted) => true,
            Some(Isolation::ReadUncommitted) => false,
            None => raw.processing.guarantee == Some(Guarantee::ExactlyOnce),
        },
    };
    let output = OutputSettings {
        changes_topic: raw
            .output
            .changes_topic
            .unwrap_or_else(|| "segment-changes".into()),
        membership_topic: raw
            .output
            .membership_topic
            .unwrap_or_else(|| "segment-membership".into()),
        dlq_topic: raw
            .output
            .dlq_topic
            .unwrap_or_else(|| "segmenter-dlq".into()),
        partitions: raw.output.partitions,
        replication_factor: raw.output.replication_factor.unwrap_or(1),
    };
    let pipeline = PipelineSettings {
        batch_size: raw.engine.batch_size.unwrap_or(5000).max(1),
        timer_slice: raw.engine.timer_slice.unwrap_or(2000).max(1),
        max_outbox_backlog: raw.engine.max_outbox_backlog.unwrap_or(100_000).max(1),
        shutdown_timeout: std::time::Duration::from_millis(shutdown_timeout.max(0) as u64),
        max_merge_wait: std::time::Duration::from_millis(max_merge_wait.max(0) as u64),
    };
    let state = StateSettings {
        dir: PathBuf::from(raw.state.dir.unwrap_or_else(|| "state".into())),
        block_cache_bytes: raw.state.block_cache_mb.unwrap_or(128) << 20,
        sync_writes: raw.state.sync_writes.unwrap_or(false),
        changelog_topic: raw
            .state
            .changelog_topic
            .unwrap_or_else(|| "segmenter-changelog".into()),
        standby_replicas: raw.state.standby_replicas.unwrap_or(0),
    };
    let http_listen = raw
        .http
        .listen
        .clone()
        .unwrap_or_else(|| http::DEFAULT_LISTEN.into());
    let http = http::build(file, &http_listen, raw.http, errors);
    Some(Settings {
        program: Arc::new(program?),
        engine,
        max_future_skew,
        input,
        kafka,
        output,
        state,
        pipeline,
        http_listen,
        http,
    })
}

fn build_mapping(raw: raw::RawMapping, file: &str, errors: &mut Vec<ConfigError>) -> FieldMapping {
    let defaults = FieldMapping::default();
    let mut pointer = |key: &str,
                       value: Option<String>,
                       default: Option<String>|
     -> Option<String> {
        match value {
            None => default,
            Some(text) if text.is_empty() => None,
            Some(text) if text.starts_with('/') => Some(text),
            Some(text) => {
                errors.push(ConfigError {
                    file: file.to_string(),
                    position: None,
                    message: format!("input.mapping.{key} = {text:?} is not a JSON pointer (it must start with '/')"),
                });
                default
            }
        }
    };
    let event_type = pointer("type", raw.event_type, defaults.event_type.clone());
    let event_name = pointer("event", raw.event, Some(defaults.event_name.clone()))
        .unwrap_or(defaults.event_name.clone());
    let timestamp = pointer("timestamp", raw.timestamp, Some(defaults.timestamp.clone()))
        .unwrap_or(defaults.timestamp.clone());
    let message_id = pointer("message_id", raw.message_id, defaults.message_id.clone());
    let properties = pointer("properties", raw.properties, defaults.properties.clone());
    let traits = pointer("traits", raw.traits, defaults.traits.clone());
    let customer_id = match raw.customer_id {
        None => defaults.customer_id,
        Some(list) => list
            .into_iter()
            .filter_map(|p| pointer("customer_id", Some(p), None))
            .collect(),
    };
    if customer_id.is_empty() {
        errors.push(ConfigError {
            file: file.to_string(),
            position: None,
            message: "input.mapping.customer_id needs at least one JSON pointer".into(),
        });
    }
    FieldMapping {
        customer_id,
        event_type,
        event_name,
        timestamp,
        message_id,
        properties,
        traits,
    }
}

#[cfg(test)]
mod tests;
