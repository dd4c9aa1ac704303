//! What the service exports (names, labels, known label values, from `segmenter::metrics`) and
//! what a PromQL expression refers to (metric selectors, label matchers, grouping labels), so
//! dashboards and alert rules can be checked against each other. The scanner is deliberately
//! small: it knows strings, range brackets, selectors and `by`/`without`/`on`/`ignoring`/`group_*`
//! label lists — enough for the queries this repo writes, not a PromQL parser.

use std::collections::{BTreeMap, BTreeSet};

use prometheus::core::Collector;
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use segmenter::metrics::{Metrics, Outcome, ROCKSDB_PROPERTIES};

/// Labels every scraped series may carry besides its own: Prometheus' target labels, and those
/// the Prometheus Operator adds in Kubernetes.
pub const TARGET_LABELS: &[&str] = &[
    "job",
    "instance",
    "namespace",
    "pod",
    "service",
    "container",
    "endpoint",
];

/// Whether a metric type exposes `_bucket`/`_sum`/`_count` series, decided by its Rust type.
trait Kind {
    const HISTOGRAM: bool;
}
impl Kind for Histogram {
    const HISTOGRAM: bool = true;
}
impl Kind for HistogramVec {
    const HISTOGRAM: bool = true;
}
impl Kind for IntCounter {
    const HISTOGRAM: bool = false;
}
impl Kind for IntCounterVec {
    const HISTOGRAM: bool = false;
}
impl Kind for IntGauge {
    const HISTOGRAM: bool = false;
}
impl Kind for IntGaugeVec {
    const HISTOGRAM: bool = false;
}

/// One exported metric family.
#[derive(Debug, Clone)]
pub struct Family {
    pub labels: BTreeSet<String>,
    pub histogram: bool,
}

/// Every family the service exports, with its labels and the label values it can take where
/// those are fixed by the code.
pub struct Catalogue {
    pub families: BTreeMap<String, Family>,
    /// (family, label) → every value the service uses, where that set is closed.
    pub values: BTreeMap<(String, String), BTreeSet<String>>,
}

impl Catalogue {
    pub fn new() -> Catalogue {
        let metrics = Metrics::new("v", &["some_segment".to_string()]);
        let mut families = BTreeMap::new();
        let mut add = |collector: &dyn Collector, histogram: bool| {
            for desc in collector.desc() {
                let labels = desc.variable_labels.iter().cloned().collect();
                families.insert(desc.fq_name.clone(), Family { labels, histogram });
            }
        };
        fn kind<C: Kind>(_: &C) -> bool {
            C::HISTOGRAM
        }
        let m = &metrics;
        add(&m.build_info, kind(&m.build_info));
        add(&m.events_consumed, kind(&m.events_consumed));
        add(&m.dead_letters, kind(&m.dead_letters));
        add(&m.batch_seconds, kind(&m.batch_seconds));
        add(
            &m.event_to_publish_seconds,
            kind(&m.event_to_publish_seconds),
        );
        add(&m.consumer_lag, kind(&m.consumer_lag));
        add(&m.segment_members, kind(&m.segment_members));
        add(&m.segment_changes, kind(&m.segment_changes));
        add(&m.timers_pending, kind(&m.timers_pending));
        add(&m.timers_overdue, kind(&m.timers_overdue));
        add(&m.timers_fired, kind(&m.timers_fired));
        add(&m.timer_lateness_seconds, kind(&m.timer_lateness_seconds));
        add(&m.outbox_pending, kind(&m.outbox_pending));
        add(&m.published, kind(&m.published));
        add(&m.publish_errors, kind(&m.publish_errors));
        add(&m.transactions, kind(&m.transactions));
        add(&m.rebalances, kind(&m.rebalances));
        add(&m.restore_seconds, kind(&m.restore_seconds));
        add(&m.restore_records, kind(&m.restore_records));
        add(&m.restore_remaining, kind(&m.restore_remaining));
        add(&m.standby_lag, kind(&m.standby_lag));
        add(&m.assigned_partitions, kind(&m.assigned_partitions));
        add(&m.ready, kind(&m.ready));
        add(&m.rocksdb, kind(&m.rocksdb));
        add(&m.state_write_errors, kind(&m.state_write_errors));
        let listed: Vec<String> = families.keys().cloned().collect();
        assert_eq!(
            listed,
            metrics.exported_names(),
            "tests/support/metric_refs.rs must list every metric of src/metrics.rs"
        );

        let mut values: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        let mut known = |family: &str, label: &str, value: &str| {
            values
                .entry((family.to_string(), label.to_string()))
                .or_default()
                .insert(value.to_string());
        };
        // Series the service creates up front (rebalance kinds, outputs, error kinds, changes).
        for (family, labels) in rendered_series(&metrics.render()) {
            for (label, value) in labels {
                let closed = !matches!(
                    label.as_str(),
                    "segment" | "version" | "segments_version" | "le"
                );
                if closed && families.contains_key(&family) {
                    known(&family, &label, &value);
                }
            }
        }
        for outcome in [Outcome::Ok, Outcome::DeadLettered, Outcome::Duplicate] {
            known(
                "segmenter_events_consumed_total",
                "outcome",
                outcome.label(),
            );
        }
        for (property, _) in ROCKSDB_PROPERTIES {
            known("segmenter_rocksdb", "property", property);
        }
        Catalogue { families, values }
    }

    /// The family a series name belongs to, and the histogram suffix it carries if any.
    pub fn family_of<'a>(&self, series: &'a str) -> Option<(&'a str, &'static str)> {
        if self.families.contains_key(series) {
            return Some((series, ""));
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            let Some(base) = series.strip_suffix(suffix) else {
                continue;
            };
            if self.families.get(base).is_some_and(|f| f.histogram) {
                return Some((base, suffix));
            }
        }
        None
    }

    /// Every problem with the metrics, labels and label values one expression refers to.
    pub fn problems(&self, expr: &str) -> Vec<String> {
        let query = scan(expr);
        let mut problems = query.unreadable.clone();
        let mut in_scope: BTreeSet<String> = TARGET_LABELS.iter().map(|l| l.to_string()).collect();
        for selector in &query.selectors {
            let Some((family_name, suffix)) = self.family_of(&selector.metric) else {
                problems.push(format!("{} is not exported", selector.metric));
                continue;
            };
            let family = &self.families[family_name];
            let mut allowed = family.labels.clone();
            if suffix == "_bucket" {
                allowed.insert("le".to_string());
            }
            for matcher in &selector.matchers {
                let label = &matcher.label;
                if !allowed.contains(label) && !TARGET_LABELS.contains(&label.as_str()) {
                    problems.push(format!("{}: no label {label}", selector.metric));
                    continue;
                }
                let key = (family_name.to_string(), label.clone());
                if let Some(values) = self.values.get(&key) {
                    for value in matcher.plain_values() {
                        if !values.contains(value) {
                            problems.push(format!(
                                "{}: {label} is never {value:?} (known: {values:?})",
                                selector.metric
                            ));
                        }
                    }
                }
            }
            in_scope.extend(allowed);
        }
        for label in &query.grouping {
            if !in_scope.contains(label) {
                problems.push(format!(
                    "grouping by {label}, which none of its metrics has"
                ));
            }
        }
        problems
    }
}

/// (family, labels) of every sample line in a text exposition.
fn rendered_series(text: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        let Some((labels, _)) = rest.split_once('}') else {
            continue;
        };
        let pairs = labels
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(l, v)| (l.to_string(), v.trim_matches('"').to_string()))
            .collect();
        out.push((name.to_string(), pairs));
    }
    out
}

/// One `label op "value"` inside a selector's braces.
#[derive(Debug, Clone, PartialEq)]
pub struct Matcher {
    pub label: String,
    pub op: String,
    pub value: String,
}

impl Matcher {
    /// The literal values the matcher names: the value of `=`/`!=`, the alternatives of a
    /// `=~`/`!~` made only of plain words. Template variables (`$x`) are not literal.
    fn plain_values(&self) -> Vec<&str> {
        let plain = |v: &str| {
            !v.is_empty()
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        };
        if self.op.contains('~') {
            let alternatives: Vec<&str> = self.value.split('|').collect();
            if alternatives.iter().all(|a| plain(a)) {
                return alternatives;
            }
            return Vec::new();
        }
        if plain(&self.value) {
            vec![self.value.as_str()]
        } else {
            Vec::new()
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Selector {
    pub metric: String,
    pub matchers: Vec<Matcher>,
}

/// What one expression refers to.
#[derive(Debug, Default)]
pub struct Query {
    pub selectors: Vec<Selector>,
    /// Labels in `by`, `without`, `on`, `ignoring`, `group_left`, `group_right` lists.
    pub grouping: Vec<String>,
    /// Parts the scanner could not read (reported as problems, never skipped silently).
    pub unreadable: Vec<String>,
}

/// The metric selectors and grouping labels of a PromQL expression (Grafana's `$variables`
/// are left as they are).
pub fn scan(expr: &str) -> Query {
    let chars: Vec<char> = expr.chars().collect();
    let mut query = Query::default();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = string_end(&chars, i);
            continue;
        }
        if c == '[' {
            i = chars[i..]
                .iter()
                .position(|&x| x == ']')
                .map_or(chars.len(), |p| i + p + 1);
            continue;
        }
        let starts_word = c.is_ascii_alphabetic() || c == '_';
        let after_word_char =
            i > 0 && (chars[i - 1].is_ascii_alphanumeric() || chars[i - 1] == '.');
        if !starts_word || after_word_char {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len()
            && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
        {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        let next = skip_spaces(&chars, i);
        let grouping = [
            "by",
            "without",
            "on",
            "ignoring",
            "group_left",
            "group_right",
        ];
        if grouping.contains(&word.as_str()) && chars.get(next) == Some(&'(') {
            let close = chars[next..]
                .iter()
                .position(|&x| x == ')')
                .map_or(chars.len(), |p| next + p);
            let list: String = chars[next + 1..close].iter().collect();
            query.grouping.extend(
                list.split(',')
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty()),
            );
            i = close + 1;
            continue;
        }
        if word.starts_with("segmenter_") {
            let mut selector = Selector {
                metric: word,
                matchers: Vec::new(),
            };
            if chars.get(next) == Some(&'{') {
                match matchers(&chars, next + 1) {
                    Ok((matchers, end)) => {
                        selector.matchers = matchers;
                        i = end;
                    }
                    Err(at) => {
                        query.unreadable.push(format!(
                            "cannot read the label matchers of {} at offset {at}",
                            selector.metric
                        ));
                        i = chars.len();
                    }
                }
            }
            query.selectors.push(selector);
        }
    }
    query
}

fn skip_spaces(chars: &[char], mut i: usize) -> usize {
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    i
}

/// Index just past the string literal starting at `start`.
fn string_end(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        if chars[i] == '\\' && quote != '`' {
            i += 2;
            continue;
        }
        if chars[i] == quote {
            return i + 1;
        }
        i += 1;
    }
    chars.len()
}

/// The matchers from just after `{` to the closing `}`, and the index past it; `Err` with the
/// position of anything else.
fn matchers(chars: &[char], mut i: usize) -> Result<(Vec<Matcher>, usize), usize> {
    let mut out = Vec::new();
    loop {
        i = skip_spaces(chars, i);
        match chars.get(i) {
            None => return Err(i),
            Some('}') => return Ok((out, i + 1)),
            Some(',') => {
                i += 1;
                continue;
            }
            Some(_) => {}
        }
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
            i += 1;
        }
        let label: String = chars[start..i].iter().collect();
        i = skip_spaces(chars, i);
        let op_start = i;
        while i < chars.len() && matches!(chars[i], '=' | '!' | '~') {
            i += 1;
        }
        let op: String = chars[op_start..i].iter().collect();
        i = skip_spaces(chars, i);
        let quoted = matches!(chars.get(i), Some('"' | '\'' | '`'));
        if label.is_empty() || op.is_empty() || !quoted {
            return Err(start);
        }
        let value_end = string_end(chars, i);
        let value: String = chars[i + 1..value_end.saturating_sub(1).max(i + 1)]
            .iter()
            .collect();
        i = value_end;
        out.push(Matcher { label, op, value });
    }
}

#[test]
fn scanner_reads_selectors_matchers_and_grouping() {
    let query = scan(
        r#"sum by (topic, outcome) (rate(segmenter_events_consumed_total{outcome="dead_lettered", instance=~"$instance"}[5m])) / ignoring(x) segmenter_ready"#,
    );
    assert_eq!(query.grouping, vec!["topic", "outcome", "x"]);
    assert_eq!(query.selectors.len(), 2);
    assert_eq!(query.selectors[0].metric, "segmenter_events_consumed_total");
    assert_eq!(
        query.selectors[0].matchers,
        vec![
            Matcher {
                label: "outcome".into(),
                op: "=".into(),
                value: "dead_lettered".into()
            },
            Matcher {
                label: "instance".into(),
                op: "=~".into(),
                value: "$instance".into()
            },
        ]
    );
    assert_eq!(query.selectors[1].metric, "segmenter_ready");
}

#[test]
fn catalogue_flags_unknown_metrics_labels_values_and_grouping() {
    let catalogue = Catalogue::new();
    let ok = r#"histogram_quantile(0.99, sum by (le, cause) (rate(segmenter_event_to_publish_seconds_bucket{instance=~"$instance"}[1m])))"#;
    assert_eq!(catalogue.problems(ok), Vec::<String>::new());
    let cases = [
        ("segmenter_events_total", "is not exported"),
        ("segmenter_ready_bucket", "is not exported"),
        (r#"segmenter_published_total{topic="x"}"#, "no label topic"),
        (
            r#"segmenter_rocksdb{property="background_error"}"#,
            "is never",
        ),
        (
            r#"segmenter_rocksdb{property=~"live_sst_bytes|sst_bytes"}"#,
            "is never",
        ),
        (
            r#"segmenter_events_consumed_total{outcome="dlq"}"#,
            "is never",
        ),
        (
            "sum by (segment) (segmenter_consumer_lag)",
            "grouping by segment",
        ),
        ("segmenter_ready{instance=~$instance}", "cannot read"),
    ];
    for (expr, expected) in cases {
        let problems = catalogue.problems(expr);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{expr}: {problems:?}"
        );
    }
}
