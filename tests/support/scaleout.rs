//! A consumer group of real `segmenter run` instances over one tansu broker, each with its own
//! state dir, for tests/service_scaleout.rs and the scale-out soak in tests/soak.rs
//! (scripts/soak/scaleout.sh). A [`Cluster`] starts instances, stops them with SIGTERM, kills
//! them with SIGKILL (and deletes their state dir), while a producer thread feeds generated input
//! at a steady rate; [`Cluster::settle`] waits until the input is consumed, committed and the
//! output quiet; [`Cluster::verify`] compares the change topic, de-duplicated by `id`, with
//! `segmenter replay` of the same input per partition (event clock) and panics with a report of
//! what is missing, extra or different, per input partition with that partition's owners.
//!
//! Include it after `tansu.rs` and `service.rs` (it names them as `super::tansu`, `super::service`):
//!
//! ```ignore
//! #[path = "support/scaleout.rs"]
//! mod scaleout;
//! ```

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::Value;

use segmenter::generate::GeneratorConfig;

use super::service::{
    assert_seq_alternation, check_config, diff_changes, expected_changes, fnv1a, generated_input,
    http, log_partitions, metric_sum, readyz, rfc3339, topic_size, GroupOffsets, InputLine,
    InputProducer, Service, TestConfig, TopicReader,
};
use super::tansu;

/// Input partitions (and of every output topic).
pub const PARTITIONS: i32 = 12;

/// Segments whose output depends on history and on time: windows, inactivity timers, traits
/// and another segment. A new owner that starts a partition with empty state gets them wrong.
pub const SEGMENTS: &str = r#"
[[segment]]
id = "viewer"
rule = 'count("Product Viewed", 5m) >= 2'

[[segment]]
id = "cart_abandoner"
rule = 'last("Product Added") > last("Order Completed") and since(last("Product Added")) >= 10m'

[[segment]]
id = "idle"
rule = 'count(any) >= 1 and since(last(any)) >= 15m'

[[segment]]
id = "spender"
rule = 'sum("Order Completed", "revenue", 1h) >= 100'

[[segment]]
id = "frequent"
rule = 'count(any, 30m) >= 10'

[[segment]]
id = "dutch_reader"
rule = 'trait.country in ["NL", "BE"] and count("Email Opened", 1h) >= 1'

[[segment]]
id = "vip"
rule = 'in_segment("spender") and bucket(4) == 0'
"#;

/// Event time of the first generated event.
const START_MS: i64 = 1_793_491_200_000;

/// Member heartbeat: how soon a member hears of a rebalance.
const HEARTBEAT_MS: &str = "500";

/// How long the group may take to settle after a move.
pub const SETTLE: Duration = Duration::from_secs(60);

/// `SCALEOUT_KAFKA_DEBUG=cgrp` (any librdkafka `debug` contexts): every instance logs those
/// librdkafka debug contexts, to see what the group coordinator answers when a run hangs.
fn kafka_debug() -> Option<String> {
    std::env::var("SCALEOUT_KAFKA_DEBUG")
        .ok()
        .filter(|v| !v.is_empty())
}

/// What one cluster run consumes.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Unique per test: names the group, the topics and the temp dir.
    pub name: String,
    /// Generated input: customers, events, seed, and the rate the producer thread sends at.
    pub customers: u64,
    pub events: u64,
    pub seed: u64,
    pub produce_rate: u64,
    /// Customers with one `identify` each (no segment changes), produced at full speed before
    /// the steady input: state that a new owner has to restore, to make restores long.
    pub ballast_customers: u64,
    /// `session.timeout.ms` of every instance: a killed instance's partitions move after it;
    /// tansu's group join takes about half of it. At least 3 × [`Cluster::freeze`]'s longest
    /// hold where that is used.
    pub session_timeout_ms: u32,
}

/// The kinds of moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MoveKind {
    /// A new instance with an empty state dir.
    StartFresh,
    /// An instance started again on the state dir it left behind.
    Restart,
    /// SIGTERM: a planned leave.
    Sigterm,
    /// SIGKILL, state dir kept.
    Kill9,
    /// SIGKILL and the state dir deleted (a lost volume).
    Kill9Wipe,
}

impl MoveKind {
    pub fn label(self) -> &'static str {
        match self {
            MoveKind::StartFresh => "start (empty state dir)",
            MoveKind::Restart => "restart (on its old state dir)",
            MoveKind::Sigterm => "SIGTERM",
            MoveKind::Kill9 => "kill -9",
            MoveKind::Kill9Wipe => "kill -9 + delete state dir",
        }
    }
}

/// One move, for the report.
#[derive(Debug, Clone)]
pub struct Move {
    pub at: Duration,
    pub kind: MoveKind,
    pub instance: String,
    /// Input lines produced when it was made.
    pub produced: usize,
    pub note: String,
    /// Who owned what once the group settled after it (if it was waited for).
    pub owners_after: Option<String>,
}

/// What a restore looked like from outside when a move was made in the middle of it.
#[derive(Debug, Clone, Default)]
pub struct RestoreWatch {
    /// The `/readyz` answer that said `restoring`, and how long after the watch began.
    pub restoring: Option<(Duration, String)>,
    /// The instance answered 200 after that and before the rebalance reached it.
    pub ready_before_rebalance: bool,
    /// The rebalance reached it (a `partitions revoked` / `assigned` line) within the watch.
    pub rebalanced: bool,
}

impl RestoreWatch {
    /// The move landed while the instance was restoring.
    pub fn interrupted(&self) -> bool {
        self.restoring.is_some() && self.rebalanced && !self.ready_before_rebalance
    }

    pub fn describe(&self, instance: &str) -> String {
        match &self.restoring {
            None => format!(
                "{instance} was never seen restoring (/readyz went to 200 first): the move came after its restore"
            ),
            Some((after, body)) => format!(
                "{instance} seen restoring {:.2} s after it started ({body}); {}",
                after.as_secs_f64(),
                if self.interrupted() {
                    "the rebalance reached it while still restoring".to_string()
                } else if !self.rebalanced {
                    "no rebalance reached it within the watch".to_string()
                } else {
                    "it finished restoring before the rebalance reached it".to_string()
                }
            ),
        }
    }
}

/// How the `[state]` key for the changelog was handled.
#[derive(Debug, Clone)]
enum ChangelogKey {
    /// `changelog_topic` is in every instance's config.
    Passed,
    /// The binary refuses the key as unknown: left out, the service's default applies.
    Omitted(String),
}

/// A live instance.
struct Instance {
    service: Service,
    address: String,
    state_dir: PathBuf,
}

/// What [`Cluster::compare`] compared.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// Changes of the oracle.
    pub expected: usize,
    /// Change records read.
    pub records: usize,
    /// Identical re-publications dropped.
    pub duplicates: usize,
    /// What differs, if anything (see [`Cluster::compare`]).
    pub report: Option<String>,
}

/// The broker, the instances, the input and the oracle of one scale-out run.
pub struct Cluster {
    pub plan: Plan,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    broker: tansu::Tansu,
    pub brokers: String,
    pub group: String,
    pub input_topic: String,
    pub changes_topic: String,
    pub changelog_topic: String,
    base: TestConfig,
    changelog_key: ChangelogKey,
    live: BTreeMap<String, Instance>,
    /// Instances stopped by SIGTERM while their exit is awaited.
    stopping: Vec<(String, Instance)>,
    /// Stopped or killed instances whose state dir is still there.
    stopped: BTreeMap<String, PathBuf>,
    started_instances: usize,
    pub moves: Vec<Move>,
    /// Every instance name ever started, in order (each has `<name>.log`).
    names: Vec<String>,
    lines: Arc<Vec<InputLine>>,
    ballast_lines: usize,
    expected: Vec<Value>,
    produced: Arc<AtomicUsize>,
    feeder: Option<JoinHandle<()>>,
    changes: TopicReader,
    started: Instant,
}

impl Cluster {
    /// Starts a broker with the topics (all `PARTITIONS` wide; not the changelog, which the
    /// service creates), generates the input and computes the oracle. No instance runs yet.
    pub fn new(plan: Plan) -> Cluster {
        let started = Instant::now();
        let name = plan.name.clone();
        let broker = tansu::Tansu::start().expect("starting the tansu broker");
        let brokers = broker.bootstrap();
        let input_topic = format!("events-{name}");
        let changes_topic = format!("changes-{name}");
        let membership_topic = format!("membership-{name}");
        let dlq_topic = format!("dlq-{name}");
        let changelog_topic = format!("segmenter-changelog-{name}");
        for topic in [&input_topic, &changes_topic, &membership_topic, &dlq_topic] {
            broker
                .create_topic(topic, PARTITIONS)
                .unwrap_or_else(|e| panic!("creating topic {topic}: {e}"));
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("segmenter-{name}-"))
            .tempdir()
            .expect("creating a temp dir");
        let path = dir.path().to_path_buf();
        let mut base = TestConfig::new(&brokers, &path.join("state"), &[&input_topic], SEGMENTS);
        base.group_id = format!("segmenter-{name}");
        base.changes_topic = changes_topic.clone();
        base.membership_topic = membership_topic;
        base.dlq_topic = dlq_topic;
        base.batch_size = 200;
        base.consumer.insert(
            "session.timeout.ms".into(),
            plan.session_timeout_ms.to_string(),
        );
        base.consumer
            .insert("heartbeat.interval.ms".into(), HEARTBEAT_MS.into());
        if let Some(debug) = kafka_debug() {
            base.consumer.insert("debug".into(), debug);
        }
        let changelog_key = changelog_key(&mut base, &path, &changelog_topic);
        let oracle_config = base.write(&path.join("oracle.toml"));

        let mut lines = ballast(&input_topic, plan.ballast_customers);
        let ballast_lines = lines.len();
        lines.extend(generated_input(
            &input_topic,
            PARTITIONS,
            GeneratorConfig {
                customers: plan.customers,
                events: plan.events,
                seed: plan.seed,
                start_ms: START_MS,
                events_per_second: 5.0,
                late_fraction: 0.02,
                duplicate_fraction: 0.01,
                malformed_fraction: 0.005,
            },
        ));
        let expected = expected_changes(&oracle_config, &path, &lines);
        assert!(
            expected.len() > 1_000,
            "only {} changes expected: the input does not exercise the segments",
            expected.len()
        );
        let changes = TopicReader::new(&brokers, &changes_topic);
        eprintln!(
            "[{name}] {} input lines ({ballast_lines} ballast identifies), {} changes expected; \
             changelog key: {changelog_key:?}; oracle ready after {:.1} s",
            lines.len(),
            expected.len(),
            started.elapsed().as_secs_f64()
        );
        Cluster {
            plan,
            dir: Some(dir),
            path,
            broker,
            brokers,
            group: base.group_id.clone(),
            input_topic,
            changes_topic,
            changelog_topic,
            base,
            changelog_key,
            live: BTreeMap::new(),
            stopping: Vec::new(),
            stopped: BTreeMap::new(),
            started_instances: 0,
            moves: Vec::new(),
            names: Vec::new(),
            lines: Arc::new(lines),
            ballast_lines,
            expected,
            produced: Arc::new(AtomicUsize::new(0)),
            feeder: None,
            changes,
            started,
        }
    }

    /// Where logs, configs and state dirs are.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    pub fn expected_changes(&self) -> usize {
        self.expected.len()
    }

    pub fn live(&self) -> Vec<String> {
        self.live.keys().cloned().collect()
    }

    /// Stopped or killed instances whose state dir is still on disk.
    pub fn stopped(&self) -> Vec<String> {
        self.stopped.keys().cloned().collect()
    }

    // --------------------------------------------------------------------------------------
    // Moves

    /// Starts a new instance with an empty state dir; returns its name.
    pub fn start_fresh(&mut self) -> String {
        let name = self.next_name();
        self.start_named(&name, MoveKind::StartFresh)
    }

    /// Starts instance `name` again on its state dir (empty if it was deleted).
    pub fn restart(&mut self, name: &str) -> String {
        let kind = if self.stopped.remove(name).is_some() {
            MoveKind::Restart
        } else {
            MoveKind::StartFresh
        };
        self.start_named(name, kind)
    }

    fn next_name(&mut self) -> String {
        let n = self.started_instances;
        self.started_instances += 1;
        if n < 26 {
            char::from(b'a' + n as u8).to_string()
        } else {
            format!("n{n}")
        }
    }

    fn start_named(&mut self, name: &str, kind: MoveKind) -> String {
        assert!(!self.live.contains_key(name), "{name} is already running");
        let state_dir = self.path.join(format!("state-{name}"));
        let mut config = self.base.clone();
        config.state_dir = state_dir.clone();
        let config_path = config.write(&self.path.join(format!("{name}.toml")));
        let log = self.path.join(format!("{name}.log"));
        let mut service = match kafka_debug() {
            Some(_) => Service::start_with_env(
                &config_path,
                &log,
                &[("RUST_LOG", "info,librdkafka=debug")],
            ),
            None => Service::start(&config_path, &log),
        };
        if !self.names.iter().any(|n| n == name) {
            self.names.push(name.to_string());
        }
        let address = service.http_address();
        self.live.insert(
            name.to_string(),
            Instance {
                service,
                address,
                state_dir,
            },
        );
        self.record(kind, name, String::new());
        name.to_string()
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self, name: &str) {
        self.begin_stop(name);
        self.reap();
    }

    /// SIGTERM without waiting; [`Cluster::reap`] waits for the exit.
    pub fn begin_stop(&mut self, name: &str) {
        let instance = self.take(name);
        instance.service.sigterm();
        self.stopping.push((name.to_string(), instance));
        self.record(MoveKind::Sigterm, name, String::new());
    }

    /// Waits for every instance sent SIGTERM to exit; panics (with its log) unless it exits 0
    /// within 60 s.
    pub fn reap(&mut self) {
        for (name, mut instance) in std::mem::take(&mut self.stopping) {
            let status = instance.service.wait_exit(Duration::from_secs(60));
            match status {
                Some(status) if status.success() => {}
                other => panic!(
                    "instance {name} did not exit cleanly within 60 s of SIGTERM ({other:?}); log:\n{}",
                    instance.service.log_tail()
                ),
            }
            self.stopped.insert(name, instance.state_dir);
        }
    }

    /// SIGKILL; with `wipe` its state dir is deleted too.
    pub fn kill9(&mut self, name: &str, wipe: bool) {
        let mut instance = self.take(name);
        instance.service.kill9();
        if wipe {
            std::fs::remove_dir_all(&instance.state_dir).unwrap_or_else(|e| {
                panic!("deleting {}: {e}", instance.state_dir.display());
            });
            self.record(MoveKind::Kill9Wipe, name, String::new());
        } else {
            self.stopped.insert(name.to_string(), instance.state_dir);
            self.record(MoveKind::Kill9, name, String::new());
        }
    }

    fn take(&mut self, name: &str) -> Instance {
        let mut instance = self
            .live
            .remove(name)
            .unwrap_or_else(|| panic!("{name} is not running"));
        instance.service.assert_running();
        instance
    }

    /// `input 45 %, event time …`: how far the generated input (after the ballast) was produced.
    fn progress(&self, produced: usize) -> String {
        let generated = (self.lines.len() - self.ballast_lines).max(1);
        let done = produced.saturating_sub(self.ballast_lines);
        let time = match produced.checked_sub(1).and_then(|i| self.lines.get(i)) {
            Some(line) => format!(", event time {}", rfc3339(line.timestamp_ms)),
            None => String::new(),
        };
        let ballast = if self.ballast_lines > 0 && produced < self.ballast_lines {
            format!(", ballast {produced} of {}", self.ballast_lines)
        } else {
            String::new()
        };
        format!("input {} %{ballast}{time}", done * 100 / generated)
    }

    fn record(&mut self, kind: MoveKind, name: &str, note: String) {
        let produced = self.produced.load(Ordering::Relaxed);
        eprintln!(
            "[{}] {:6.1} s  {} {name}  ({})",
            self.plan.name,
            self.started.elapsed().as_secs_f64(),
            kind.label(),
            self.progress(produced)
        );
        self.moves.push(Move {
            at: self.started.elapsed(),
            kind,
            instance: name.to_string(),
            produced,
            note,
            owners_after: None,
        });
    }

    /// Adds a note to the last move.
    pub fn note(&mut self, note: String) {
        eprintln!("[{}]          {note}", self.plan.name);
        if let Some(last) = self.moves.last_mut() {
            if !last.note.is_empty() {
                last.note.push_str("; ");
            }
            last.note.push_str(&note);
        }
    }

    // --------------------------------------------------------------------------------------
    // Waiting

    /// Waits until every partition is owned by exactly one live instance, each live instance
    /// owns some and answers `/readyz` 200; returns who owns what.
    pub fn wait_balanced(&mut self, timeout: Duration) -> BTreeMap<String, BTreeSet<i32>> {
        assert!(!self.live.is_empty(), "no instance is running");
        let deadline = Instant::now() + timeout;
        loop {
            let mut owners: BTreeMap<String, BTreeSet<i32>> = BTreeMap::new();
            let mut states = Vec::new();
            let mut all_ready = true;
            for (name, instance) in &mut self.live {
                instance.service.assert_running();
                let owned = instance.service.owned_partitions();
                let (status, body) = readyz(&instance.address);
                all_ready &= status == 200;
                states.push(format!("{name}: /readyz {status} {body}, owns {owned:?}"));
                owners.insert(name.clone(), owned);
            }
            let mut union = BTreeSet::new();
            let mut overlap = false;
            for owned in owners.values() {
                for partition in owned {
                    overlap |= !union.insert(*partition);
                }
            }
            let complete = union.len() == PARTITIONS as usize && !overlap;
            let everyone = self.live.len() > PARTITIONS as usize
                || owners.values().all(|owned| !owned.is_empty());
            if all_ready && complete && everyone {
                self.remember(&owners);
                return owners;
            }
            if Instant::now() >= deadline {
                // The logs are what tells why: keep them past the panic.
                let kept = self.keep_dir();
                eprintln!("kept {} (logs, configs, state)", kept.display());
            }
            assert!(
                Instant::now() < deadline,
                "[{}] the group did not settle within {timeout:?} after {}:\n  {}",
                self.plan.name,
                self.moves
                    .last()
                    .map_or("the start".to_string(), |m| format!(
                        "{} {}",
                        m.kind.label(),
                        m.instance
                    )),
                states.join("\n  ")
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn remember(&mut self, owners: &BTreeMap<String, BTreeSet<i32>>) {
        let text: Vec<String> = owners
            .iter()
            .map(|(name, owned)| format!("{name}={owned:?}"))
            .collect();
        if let Some(last) = self.moves.last_mut() {
            last.owners_after = Some(text.join(" "));
        }
    }

    /// Polls `name`'s `/readyz` every 5 ms until it says `restoring` (503), or it is ready with
    /// partitions, or `timeout` passes. Then [`Cluster::watch_rebalance`] tells whether a move
    /// made right after it landed during the restore (see [`Cluster::interrupt_restore`]).
    pub fn wait_restoring(&mut self, name: &str, timeout: Duration) -> RestoreWatch {
        let begun = Instant::now();
        let instance = self
            .live
            .get_mut(name)
            .unwrap_or_else(|| panic!("{name} is not running"));
        loop {
            instance.service.assert_running();
            let (status, body) = readyz(&instance.address);
            if status == 503 && body.contains("restoring") {
                return RestoreWatch {
                    restoring: Some((begun.elapsed(), body)),
                    ..RestoreWatch::default()
                };
            }
            if status == 200 && !instance.service.owned_partitions().is_empty() {
                return RestoreWatch::default();
            }
            if begun.elapsed() > timeout {
                return RestoreWatch::default();
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// How many rebalance lines (`partitions assigned` / `revoked`) `name` has logged.
    pub fn rebalance_lines(&self, name: &str) -> usize {
        let instance = &self.live[name];
        instance.service.log_count("partitions assigned")
            + instance.service.log_count("partitions revoked")
    }

    /// After a move made while `name` was restoring: watches (every 10 ms, for up to `timeout`)
    /// until `name` logs a rebalance line beyond `before`, noting whether it was ready first.
    /// The result is also noted on the last move.
    pub fn watch_rebalance(
        &mut self,
        name: &str,
        mut watch: RestoreWatch,
        before: usize,
        timeout: Duration,
    ) -> RestoreWatch {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.rebalance_lines(name) > before {
                watch.rebalanced = true;
                break;
            }
            let instance = self.live.get_mut(name).expect("watched instance");
            instance.service.assert_running();
            let (status, _) = readyz(&instance.address);
            watch.ready_before_rebalance |= status == 200 && watch.restoring.is_some();
            thread::sleep(Duration::from_millis(10));
        }
        self.note(format!("made during a restore? {}", watch.describe(name)));
        watch
    }

    /// SIGSTOP: the instance stops dead (no heartbeats either) until [`Cluster::thaw`]. Keep it
    /// well below the session timeout or the group evicts it.
    pub fn freeze(&mut self, name: &str) {
        self.live[name].service.signal("STOP");
    }

    /// SIGCONT after [`Cluster::freeze`].
    pub fn thaw(&mut self, name: &str) {
        self.live[name].service.signal("CONT");
    }

    /// Waits up to `timeout` for the instances sent SIGTERM to exit; whether they all did.
    /// [`Cluster::reap`] checks how.
    pub fn await_stopping(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let all = self
                .stopping
                .iter_mut()
                .all(|(_, instance)| instance.service.try_status().is_some());
            if all || Instant::now() > deadline {
                return all;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// A rebalance in the middle of `name`'s restore, made deterministic: as soon as `name`'s
    /// `/readyz` says `restoring`, it is frozen (SIGSTOP), `make_move` starts or stops another
    /// instance (so the group begins a rebalance without it), `hold` passes, and it is thawed
    /// (SIGCONT): its first heartbeat then learns of the rebalance while its restore is still
    /// in progress, however fast the restore is. Returns (and notes on the move) what was seen.
    pub fn interrupt_restore(
        &mut self,
        name: &str,
        hold: Duration,
        make_move: impl FnOnce(&mut Cluster),
    ) -> RestoreWatch {
        let watch = self.wait_restoring(name, SETTLE);
        let before = self.rebalance_lines(name);
        let frozen = watch.restoring.is_some();
        if frozen {
            self.freeze(name);
        }
        make_move(self);
        if frozen {
            thread::sleep(hold);
            self.thaw(name);
        }
        self.watch_rebalance(name, watch, before, Duration::from_secs(30))
    }

    // --------------------------------------------------------------------------------------
    // Input

    /// Starts the producer thread: the ballast at full speed, then the generated input at the
    /// plan's rate.
    pub fn start_input(&mut self) {
        assert!(self.feeder.is_none(), "input already started");
        let lines = self.lines.clone();
        let ballast = self.ballast_lines;
        let brokers = self.brokers.clone();
        let produced = self.produced.clone();
        let rate = self.plan.produce_rate.max(1);
        self.feeder = Some(thread::spawn(move || {
            let mut producer = InputProducer::new(&brokers);
            for (i, line) in lines[..ballast].iter().enumerate() {
                producer.send_line(line);
                produced.store(i + 1, Ordering::Relaxed);
            }
            producer.flush();
            let begun = Instant::now();
            for (i, line) in lines[ballast..].iter().enumerate() {
                let due = Duration::from_micros(i as u64 * 1_000_000 / rate);
                if let Some(wait) = due.checked_sub(begun.elapsed()) {
                    thread::sleep(wait);
                }
                producer.send_line(line);
                produced.store(ballast + i + 1, Ordering::Relaxed);
            }
            producer.flush();
        }));
    }

    pub fn produced(&self) -> usize {
        self.produced.load(Ordering::Relaxed)
    }

    pub fn input_lines(&self) -> usize {
        self.lines.len()
    }

    pub fn input_running(&self) -> bool {
        self.feeder.as_ref().is_some_and(|f| !f.is_finished())
    }

    /// Waits until `fraction` of the generated (non-ballast) input is produced, checking that
    /// every live instance keeps running.
    pub fn wait_produced(&mut self, fraction: f64) {
        let generated = self.lines.len() - self.ballast_lines;
        let target = self.ballast_lines + (generated as f64 * fraction) as usize;
        while self.produced() < target.min(self.lines.len()) {
            assert!(
                self.input_running(),
                "the producer thread stopped early at {} of {} lines",
                self.produced(),
                self.lines.len()
            );
            for instance in self.live.values_mut() {
                instance.service.assert_running();
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the group has committed, on every partition, at least the ballast.
    pub fn wait_ballast_committed(&mut self) {
        let mut counts: BTreeMap<i32, i64> = BTreeMap::new();
        for line in &self.lines[..self.ballast_lines] {
            *counts.entry(line.partition).or_default() += 1;
        }
        let mut wanted = TopicPartitionList::new();
        for (partition, count) in &counts {
            wanted
                .add_partition_offset(&self.input_topic, *partition, Offset::Offset(*count))
                .expect("adding a partition");
        }
        let offsets = GroupOffsets::new(&self.brokers, &self.group);
        let deadline = Instant::now() + SETTLE;
        loop {
            let behind = offsets.behind(&wanted);
            if behind.is_empty() {
                return;
            }
            for instance in self.live.values_mut() {
                instance.service.assert_running();
            }
            assert!(
                Instant::now() < deadline,
                "[{}] the ballast is not committed within {SETTLE:?}: {behind:?}",
                self.plan.name
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_input_done(&mut self) {
        if let Some(feeder) = self.feeder.take() {
            feeder.join().expect("the producer thread panicked");
        }
    }

    /// Waits until all input is produced and the group is settled, every partition's committed
    /// offset is its end, and for 3 s neither the change topic nor any instance's consumed
    /// count moved (an instance that resumed from an older local offset is still re-reading
    /// while the group's commit is already at the end).
    pub fn settle(&mut self) {
        self.wait_input_done();
        self.reap();
        self.wait_balanced(SETTLE);
        let offsets = GroupOffsets::new(&self.brokers, &self.group);
        let ends = offsets.ends(&[&self.input_topic]);
        let quiet = Duration::from_secs(3);
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last: Option<(i64, u64)> = None;
        let mut quiet_since = Instant::now();
        loop {
            let behind = offsets.behind(&ends);
            let published: i64 = self.changes.high_watermarks().values().sum();
            let mut consumed = 0.0;
            let mut states = Vec::new();
            let mut ready = true;
            for (name, instance) in &mut self.live {
                instance.service.assert_running();
                let (status, body) = readyz(&instance.address);
                ready &= status == 200;
                let (_, metrics) = http(&instance.address, "GET", "/metrics", None);
                let count = metric_sum(&metrics, "segmenter_events_consumed_total");
                consumed += count;
                states.push(format!("{name}: /readyz {status} {body}, consumed {count}"));
            }
            let snapshot = (published, consumed as u64);
            if last != Some(snapshot) || !behind.is_empty() || !ready {
                quiet_since = Instant::now();
                last = Some(snapshot);
            }
            if quiet_since.elapsed() >= quiet {
                return;
            }
            if Instant::now() >= deadline {
                let kept = self.keep_dir();
                panic!(
                    "[{}] not settled 120 s after the input ended: committed behind {behind:?}; \
                     change records {published}; {}; logs, configs and state dirs kept in {}",
                    self.plan.name,
                    states.join("; "),
                    kept.display()
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    // --------------------------------------------------------------------------------------
    // The verdict

    /// Stops every instance (SIGTERM), reads the change topic and compares it with the
    /// oracle; panics with the report of [`Cluster::compare`] if anything differs.
    pub fn verify(&mut self, context: &str) -> Verdict {
        let verdict = self.compare(context);
        if let Some(report) = &verdict.report {
            panic!("{report}");
        }
        verdict
    }

    /// Stops every instance (SIGTERM), reads the change topic and compares it, de-duplicated by
    /// `id`, with the oracle. A difference gives a report (and the temp dir is kept): counts
    /// per partition with the partition's owners, the first changes missing / extra /
    /// different, the moves, and what the broker has of the changelog.
    pub fn compare(&mut self, context: &str) -> Verdict {
        let names: Vec<String> = self.live.keys().cloned().collect();
        for name in &names {
            self.begin_stop(name);
        }
        self.reap();
        self.changes.read_to_end();
        // What the topic holds, read again from the beginning now that nothing is produced.
        // The live read is not trusted alone: on tansu 0.6.0 a reader that follows
        // transactional writes as they happen missed single records that a read from the
        // beginning afterwards finds (2026-12-04, exactly-once control: 1 of 2,732).
        let fresh = super::service::read_all(&self.brokers, &self.changes_topic);
        let live: BTreeSet<String> = self
            .changes
            .records
            .iter()
            .map(|r| r.json()["id"].to_string())
            .collect();
        let missed = fresh
            .iter()
            .map(|r| r.json()["id"].to_string())
            .collect::<BTreeSet<String>>()
            .difference(&live)
            .count();
        if missed > 0 {
            eprintln!(
                "[{}] note: the live read of the change topic missed {missed} change(s) that a \
                 read from the beginning finds",
                self.plan.name
            );
        }
        let diff = diff_changes(&fresh, &self.expected);
        let mut verdict = Verdict {
            expected: self.expected.len(),
            records: diff.records,
            duplicates: diff.duplicates,
            report: None,
        };
        if !diff.is_clean() {
            let history = self.ownership_history();
            let report = diff.report(8, partition_of, |p| match history.get(&p) {
                Some(owners) => format!(" — owners {}", owners.join(" → ")),
                None => String::new(),
            });
            // The change topic as read from the beginning, with offsets.
            let dump: String = fresh
                .iter()
                .map(|r| {
                    format!(
                        "{}\n",
                        serde_json::json!({
                            "partition": r.partition,
                            "offset": r.offset,
                            "timestamp": r.timestamp,
                            "change": r.json(),
                        })
                    )
                })
                .collect();
            let _ = std::fs::write(self.path.join("change-topic-read.ndjson"), dump);
            // ~10-30 MB per run; SCALEOUT_KEEP=0 lets the temp dir go.
            let kept = if std::env::var("SCALEOUT_KEEP").as_deref() == Ok("0") {
                "deleted (SCALEOUT_KEEP=0)".to_string()
            } else {
                format!("kept in {}", self.keep_dir().display())
            };
            verdict.report = Some(format!(
                "[{}] {context}: the change topic differs from `segmenter replay` of the same input\n\
                 {report}\n{}\n{}\nlogs, configs and state dirs {kept}",
                self.plan.name,
                self.moves_text(),
                self.changelog_text(),
            ));
            return verdict;
        }
        // Clean means equal to the oracle, whose output alternates; checked all the same.
        let distinct: Vec<Value> = {
            let mut seen = BTreeSet::new();
            fresh
                .iter()
                .map(|r| r.json())
                .filter(|c| seen.insert(c["id"].to_string()))
                .collect()
        };
        assert_seq_alternation(&distinct);
        eprintln!(
            "[{}] {context}: equal to the replay: {} changes, {} records read, {} duplicates \
             dropped; {}; {} moves; total {:.1} s",
            self.plan.name,
            verdict.expected,
            verdict.records,
            verdict.duplicates,
            self.changelog_text(),
            self.moves.len(),
            self.started.elapsed().as_secs_f64()
        );
        verdict
    }

    /// Per input partition, the instances that were assigned it, in turn, from every instance's
    /// log (`b#2` is the second start of `b`), including assignments that lasted only until the
    /// next rebalance.
    pub fn ownership_history(&self) -> BTreeMap<i32, Vec<String>> {
        let mut events: Vec<(String, String, BTreeSet<i32>)> = Vec::new();
        for name in &self.names {
            let text =
                std::fs::read_to_string(self.path.join(format!("{name}.log"))).unwrap_or_default();
            let mut start = 0;
            for line in text.lines() {
                if line.starts_with("=== test: starting") {
                    start += 1;
                    continue;
                }
                if !line.contains("partitions assigned") {
                    continue;
                }
                let label = if start > 1 {
                    format!("{name}#{start}")
                } else {
                    name.clone()
                };
                let time = line
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                events.push((time, label, log_partitions(line)));
            }
        }
        events.sort();
        let mut history: BTreeMap<i32, Vec<String>> = BTreeMap::new();
        for (_, label, partitions) in events {
            for partition in partitions {
                let owners = history.entry(partition).or_default();
                if owners.last() != Some(&label) {
                    owners.push(label.clone());
                }
            }
        }
        history
    }

    /// The moves as lines, with who owned what after each.
    pub fn moves_text(&self) -> String {
        let mut out = format!("moves ({}):", self.moves.len());
        for m in &self.moves {
            out.push_str(&format!(
                "\n  {:6.1} s  {} {}  ({})",
                m.at.as_secs_f64(),
                m.kind.label(),
                m.instance,
                self.progress(m.produced)
            ));
            if let Some(owners) = &m.owners_after {
                out.push_str(&format!(" → {owners}"));
            }
            if !m.note.is_empty() {
                out.push_str(&format!("\n           {}", m.note));
            }
        }
        out
    }

    /// What the broker has of the changelog topic, and how the config key was handled.
    pub fn changelog_text(&self) -> String {
        let key = match &self.changelog_key {
            ChangelogKey::Passed => format!("[state] changelog_topic = {:?}", self.changelog_topic),
            ChangelogKey::Omitted(why) => {
                format!("[state] changelog_topic left out (this binary refuses it: {why})")
            }
        };
        let topic = match &self.changelog_key {
            ChangelogKey::Passed => self.changelog_topic.clone(),
            ChangelogKey::Omitted(_) => "segmenter-changelog".to_string(),
        };
        let found = match topic_size(&self.brokers, &topic) {
            Some((partitions, records)) => {
                format!("changelog topic {topic}: {partitions} partitions, {records} records")
            }
            None => format!("changelog topic {topic}: absent"),
        };
        format!("{key}; {found}")
    }

    /// Appends `text` (whole TOML sections) to the config of every instance started from now
    /// on (the oracle's config is written already).
    pub fn add_config(&mut self, text: &str) {
        self.base.extra_toml.push_str(text);
    }

    /// Adds lines to the `[state]` table of every instance started from now on.
    pub fn add_state(&mut self, lines: &str) {
        self.base.state_extra.push_str(lines);
    }

    /// The ballast customers (see [`Plan::ballast_customers`]) on input partitions `partitions`.
    pub fn ballast_on(&self, partitions: &BTreeSet<i32>) -> usize {
        self.lines[..self.ballast_lines]
            .iter()
            .filter(|line| partitions.contains(&line.partition))
            .count()
    }

    /// The input partitions live instance `name` owns, from its log (works while it is frozen).
    pub fn owned(&self, name: &str) -> BTreeSet<i32> {
        self.live[name].service.owned_partitions()
    }

    /// The log of instance `name` (every start of it).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// The value of series `series` (e.g. `name{label="v"}`) on live instance `name`; 0 if it
    /// has none.
    pub fn series(&self, name: &str, series: &str) -> f64 {
        let (_, text) = http(&self.live[name].address, "GET", "/metrics", None);
        text.lines()
            .filter_map(|line| line.strip_prefix(series)?.trim().parse::<f64>().ok())
            .sum()
    }

    /// Keeps the temp dir (logs, configs, state) past the end of the test; returns its path.
    pub fn keep_dir(&mut self) -> PathBuf {
        match self.dir.take() {
            Some(dir) => dir.keep(),
            None => self.path.clone(),
        }
    }
}

/// The input partition of a customer (as `generated_input` places them).
pub fn partition_of(customer: &str) -> i32 {
    (fnv1a(customer) % PARTITIONS as u64) as i32
}

/// `customers` identify lines (customers `r-0` …), an hour before the generated input, a few
/// hundred bytes of traits each: state to restore, no segment changes.
fn ballast(topic: &str, customers: u64) -> Vec<InputLine> {
    let padding = "x".repeat(200);
    (0..customers)
        .map(|i| {
            let customer = format!("r-{i}");
            let timestamp = START_MS - 3_600_000 + i as i64;
            let payload = serde_json::json!({
                "type": "identify",
                "userId": customer,
                "messageId": format!("ballast-{i}"),
                "timestamp": timestamp,
                "traits": {"country": "DE", "plan": "ballast", "note": padding},
            })
            .to_string()
            .into_bytes();
            InputLine {
                topic: topic.to_string(),
                partition: partition_of(&customer),
                key: Some(customer.into_bytes()),
                payload,
                timestamp_ms: timestamp,
                malformed: false,
            }
        })
        .collect()
}

/// Puts `changelog_topic` into `[state]` if this binary accepts the key (`segmenter check`);
/// leaves it out if it refuses it as an unknown field, so that the tests run (and fail on what
/// the service does, not on its config). Any other refusal is a broken test config.
fn changelog_key(config: &mut TestConfig, dir: &Path, topic: &str) -> ChangelogKey {
    config.state_extra = format!("changelog_topic = {topic:?}\n");
    let probe = config.write(&dir.join("probe.toml"));
    match check_config(&probe) {
        Ok(_) => ChangelogKey::Passed,
        Err(output) if output.contains("unknown field") && output.contains("changelog_topic") => {
            config.state_extra.clear();
            let line = output
                .lines()
                .find(|line| line.contains("changelog_topic"))
                .unwrap_or("unknown field");
            let first = match line.find("unknown field") {
                Some(at) => line[at..].trim().to_string(),
                None => line.trim().to_string(),
            };
            eprintln!(
                "note: this segmenter binary does not know [state] changelog_topic ({first}); \
                 the instances run without it"
            );
            ChangelogKey::Omitted(first)
        }
        Err(output) => panic!("segmenter check refuses the test config:\n{output}"),
    }
}

/// Deterministic pseudo-random numbers (xorshift), for the soak.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Makes `moves` randomised moves (start fresh, restart on an old state dir, SIGTERM, kill -9,
/// kill -9 + delete state dir) with at most `max_live` instances and at least one left running,
/// each followed by a pause of up to 1.5 s; two in three wait for the group to settle first,
/// the rest leave the next move to land in the middle of a rebalance or restore. Returns how many
/// of each kind were made.
pub fn random_moves(
    cluster: &mut Cluster,
    moves: usize,
    max_live: usize,
    rng: &mut Rng,
) -> BTreeMap<MoveKind, usize> {
    let mut counts: BTreeMap<MoveKind, usize> = BTreeMap::new();
    for _ in 0..moves {
        let live = cluster.live();
        let mut kinds = Vec::new();
        if live.len() < max_live {
            kinds.push(MoveKind::StartFresh);
            if !cluster.stopped.is_empty() {
                kinds.push(MoveKind::Restart);
            }
        }
        if live.len() > 1 {
            kinds.extend([MoveKind::Sigterm, MoveKind::Kill9, MoveKind::Kill9Wipe]);
        }
        let kind = kinds[rng.below(kinds.len() as u64) as usize];
        let pick = |rng: &mut Rng, names: &[String]| -> String {
            names[rng.below(names.len() as u64) as usize].clone()
        };
        match kind {
            MoveKind::StartFresh => {
                cluster.start_fresh();
            }
            MoveKind::Restart => {
                let name = pick(rng, &cluster.stopped());
                cluster.restart(&name);
            }
            MoveKind::Sigterm => cluster.stop(&pick(rng, &live)),
            MoveKind::Kill9 => cluster.kill9(&pick(rng, &live), false),
            MoveKind::Kill9Wipe => cluster.kill9(&pick(rng, &live), true),
        }
        *counts.entry(kind).or_default() += 1;
        if rng.below(3) < 2 {
            cluster.wait_balanced(SETTLE);
        }
        thread::sleep(Duration::from_millis(rng.below(1500)));
    }
    counts
}
