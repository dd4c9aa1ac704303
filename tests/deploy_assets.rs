//! The deployment and operations assets checked against the service they describe:
//!
//! - promtool validates the alert rules and the compose scrape config and runs the rules' unit
//!   tests, and parses every dashboard query;
//! - the Grafana dashboard and the alert rules refer only to metrics, labels and label values
//!   that `segmenter::metrics` exports, and cover what operators need;
//! - the Kubernetes manifests and docker-compose.yml hang together (names, ports, paths, probes)
//!   and their config loads with the service's own settings code; both mount the HTTP API's
//!   tokens file from a secret, without which their config is refused;
//! - `docker compose config` where a Docker client with compose is installed.
//!
//! promtool comes from `$PROMTOOL` or PATH (`scripts/install-promtool.sh`, run by scripts/test.sh).

#[path = "support/metric_refs.rs"]
mod metric_refs;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

use metric_refs::Catalogue;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn yaml_docs(relative: &str) -> Vec<Yaml> {
    let text = read(relative);
    let mut docs = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let mut value: Yaml =
            serde::Deserialize::deserialize(document).unwrap_or_else(|e| panic!("{relative}: {e}"));
        value
            .apply_merge()
            .unwrap_or_else(|e| panic!("{relative}: {e}"));
        if !value.is_null() {
            docs.push(value);
        }
    }
    docs
}

fn yaml(relative: &str) -> Yaml {
    let mut docs = yaml_docs(relative);
    assert_eq!(docs.len(), 1, "{relative}: expected one YAML document");
    docs.remove(0)
}

/// `value[a][b]…` as a string, or "" when missing or not a string.
fn text<'a>(value: &'a Yaml, path: &[&str]) -> &'a str {
    let mut at = value;
    for key in path {
        at = &at[*key];
    }
    at.as_str().unwrap_or("")
}

fn seq(value: &Yaml) -> Vec<Yaml> {
    value.as_sequence().cloned().unwrap_or_default()
}

fn dashboard() -> Json {
    serde_json::from_str(&read("deploy/grafana/segmenter.json")).expect("dashboard JSON")
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Json) -> Vec<Json> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        out.push(panel.clone());
        for nested in panel["panels"].as_array().into_iter().flatten() {
            out.push(nested.clone());
        }
    }
    out
}

/// (panel title, expr) of every query of the dashboard.
fn dashboard_queries(dashboard: &Json) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("?").to_string();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.trim().is_empty(),
                "panel {title:?} has a target without expr"
            );
            out.push((title.clone(), expr.to_string()));
        }
    }
    out
}

/// The alert rules of alerts.yml: (name, rule).
fn alert_rules() -> Vec<(String, Yaml)> {
    let alerts = yaml("deploy/prometheus/alerts.yml");
    let mut out = Vec::new();
    for group in seq(&alerts["groups"]) {
        for rule in seq(&group["rules"]) {
            out.push((text(&rule, &["alert"]).to_string(), rule));
        }
    }
    out
}

// ---------------------------------------------------------------------------------- promtool

fn promtool() -> PathBuf {
    if let Some(path) = std::env::var_os("PROMTOOL").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("promtool"))
        .find(|candidate| candidate.is_file());
    on_path.unwrap_or_else(|| {
        panic!("PROMTOOL is not set and promtool is not on PATH: run scripts/install-promtool.sh (scripts/test.sh does)")
    })
}

fn run_ok(mut command: Command) -> Output {
    let shown = format!("{command:?}");
    let output = command
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("running {shown}: {e}"));
    assert!(
        output.status.success(),
        "{shown} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn promtool_ok(args: &[&str]) -> String {
    let mut command = Command::new(promtool());
    command.args(args);
    let output = run_ok(command);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let out = promtool_ok(&["check", "rules", "deploy/prometheus/alerts.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn promtool_accepts_the_compose_scrape_config_and_its_rule_files() {
    let out = promtool_ok(&["check", "config", "deploy/prometheus/prometheus.yml"]);
    assert!(out.contains("1 rule files found"), "{out}");
}

#[test]
fn promtool_unit_tests_of_the_alerts_pass() {
    let out = promtool_ok(&["test", "rules", "deploy/prometheus/alerts_test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Each dashboard query, with Grafana's variables replaced, as a recording rule: promtool parses
/// them all.
#[test]
fn promtool_parses_every_dashboard_query() {
    let queries = dashboard_queries(&dashboard());
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (index, (_, expr)) in queries.iter().enumerate() {
        let concrete = expr
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*");
        let quoted = serde_json::to_string(&concrete).expect("string");
        rules.push_str(&format!(
            "      - record: dashboard:query_{index}\n        expr: {quoted}\n"
        ));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dashboard_rules.yml");
    std::fs::write(&path, rules).expect("write");
    let out = promtool_ok(&["check", "rules", path.to_str().expect("utf8 path")]);
    assert!(
        out.contains(&format!("{} rules found", queries.len())),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------- dashboard

#[test]
fn dashboard_refers_only_to_exported_metrics_labels_and_values() {
    let catalogue = Catalogue::new();
    let dashboard = dashboard();
    let mut problems = Vec::new();
    let mut queries = dashboard_queries(&dashboard);
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if let Some(query) = variable["query"]["query"].as_str() {
            queries.push((format!("variable {}", variable["name"]), query.to_string()));
        }
    }
    for (title, expr) in &queries {
        for problem in catalogue.problems(expr) {
            problems.push(format!("{title}: {problem}\n    {expr}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn dashboard_shows_every_exported_metric_and_each_required_view() {
    let catalogue = Catalogue::new();
    let queries = dashboard_queries(&dashboard());
    let mut shown = BTreeSet::new();
    for (_, expr) in &queries {
        for selector in metric_refs::scan(expr).selectors {
            if let Some((family, _)) = catalogue.family_of(&selector.metric) {
                shown.insert(family.to_string());
            }
        }
    }
    let missing: Vec<&String> = catalogue
        .families
        .keys()
        .filter(|f| !shown.contains(*f))
        .collect();
    assert!(missing.is_empty(), "not on the dashboard: {missing:?}");

    let normalized: Vec<String> = queries
        .iter()
        .map(|(_, e)| e.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let has = |parts: &[&str]| {
        normalized
            .iter()
            .any(|e| parts.iter().all(|p| e.contains(p)))
    };
    let quantile = |q: &str, metric: &str| {
        has(&[
            &format!("histogram_quantile({q},"),
            &format!("{metric}_bucket"),
        ])
    };
    let required: &[(&str, bool)] = &[
        (
            "events/s by topic and outcome",
            has(&[
                "rate(segmenter_events_consumed_total",
                "by (topic, outcome)",
            ]),
        ),
        (
            "consumer lag per partition",
            has(&["segmenter_consumer_lag", "partition)"]),
        ),
        (
            "event→publish p50",
            quantile("0.5", "segmenter_event_to_publish_seconds"),
        ),
        (
            "event→publish p99",
            quantile("0.99", "segmenter_event_to_publish_seconds"),
        ),
        (
            "event→publish p99.9",
            quantile("0.999", "segmenter_event_to_publish_seconds"),
        ),
        (
            "batch latency percentiles",
            quantile("0.99", "segmenter_batch_processing_seconds"),
        ),
        (
            "members per segment",
            has(&["by (segment)", "segmenter_segment_members"]),
        ),
        (
            "entered per segment",
            has(&[
                "by (segment)",
                "segmenter_segment_changes_total{change=\"entered\"",
            ]),
        ),
        (
            "exited per segment",
            has(&[
                "by (segment)",
                "segmenter_segment_changes_total{change=\"exited\"",
            ]),
        ),
        ("timers pending", has(&["segmenter_timers_pending"])),
        (
            "timers fired rate",
            has(&["rate(segmenter_timers_fired_total"]),
        ),
        (
            "timer lateness p99",
            quantile("0.99", "segmenter_timer_lateness_seconds"),
        ),
        (
            "dead letters by reason",
            has(&["by (reason)", "segmenter_dead_letters_total"]),
        ),
        ("outbox pending", has(&["segmenter_outbox_pending"])),
        (
            "publish errors",
            has(&["rate(segmenter_publish_errors_total"]),
        ),
        (
            "rocksdb sizes",
            has(&["segmenter_rocksdb{property=~", "live_sst_bytes"]),
        ),
        (
            "rocksdb compactions",
            has(&["segmenter_rocksdb{property=~", "running_compactions"]),
        ),
        ("rebalances", has(&["segmenter_rebalances_total"])),
        (
            "restore duration",
            quantile("0.99", "segmenter_restore_seconds"),
        ),
        ("ready", has(&["segmenter_ready"])),
        (
            "assigned partitions",
            has(&["segmenter_assigned_partitions"]),
        ),
    ];
    let absent: Vec<&str> = required
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(n, _)| *n)
        .collect();
    assert!(absent.is_empty(), "the dashboard lacks: {absent:?}");
}

#[test]
fn dashboard_is_importable_with_a_prometheus_datasource_variable() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "segmenter");
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 30));
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating");
    let datasource = variables
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    let mut ids = BTreeSet::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or_default().to_string();
        assert!(!title.is_empty(), "a panel without title: {panel}");
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64(), grid["w"].as_u64());
        assert!(
            x.zip(w).is_some_and(|(x, w)| w > 0 && x + w <= 24) && grid["h"].as_u64().is_some(),
            "{title}: gridPos {grid}"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
        }
    }
}

#[test]
fn grafana_provisioning_points_at_the_compose_prometheus_and_dashboard() {
    let datasources = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    let prometheus = &seq(&datasources["datasources"])[0];
    assert_eq!(text(prometheus, &["type"]), "prometheus");
    assert_eq!(text(prometheus, &["url"]), "http://prometheus:9090");
    let providers = yaml("deploy/grafana/provisioning/dashboards/segmenter.yml");
    let provider = &seq(&providers["providers"])[0];
    assert_eq!(text(provider, &["type"]), "file");
    let compose = yaml("docker-compose.yml");
    let grafana = &compose["services"]["grafana"];
    let dashboard_dir = text(provider, &["options", "path"]);
    let mounts = seq(&grafana["volumes"]);
    let mounted = |source: &str, target: &str| {
        mounts.iter().any(|m| {
            m.as_str()
                .is_some_and(|m| m.starts_with(&format!("{source}:{target}")))
        })
    };
    assert!(
        mounted(
            "./deploy/grafana/segmenter.json",
            &format!("{dashboard_dir}/segmenter.json")
        ),
        "{mounts:?}"
    );
    assert!(mounted(
        "./deploy/grafana/provisioning",
        "/etc/grafana/provisioning"
    ));
}

// ---------------------------------------------------------------------------------- alerts

#[test]
fn alerts_refer_only_to_exported_metrics_and_have_runbooks() {
    let catalogue = Catalogue::new();
    let readme = read("README.md");
    let anchors: BTreeSet<String> = readme
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .replace(' ', "-")
        })
        .collect();
    let rules = alert_rules();
    let mut problems = Vec::new();
    for (name, rule) in &rules {
        for problem in catalogue.problems(text(rule, &["expr"])) {
            problems.push(format!("{name}: {problem}"));
        }
        for key in ["summary", "description", "runbook_url"] {
            if text(rule, &["annotations", key]).trim().is_empty() {
                problems.push(format!("{name}: no {key} annotation"));
            }
        }
        let anchor = text(rule, &["annotations", "runbook_url"])
            .split_once('#')
            .map(|(_, a)| a.to_string())
            .unwrap_or_default();
        if !anchors.contains(&anchor) {
            problems.push(format!(
                "{name}: runbook anchor #{anchor} is no README heading"
            ));
        }
        let severity = text(rule, &["labels", "severity"]);
        if !["warning", "critical"].contains(&severity) {
            problems.push(format!("{name}: severity {severity:?}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let names: BTreeSet<&str> = rules.iter().map(|(n, _)| n.as_str()).collect();
    for required in [
        "SegmenterConsumerLagGrowing",
        "SegmenterNoEventsConsumed",
        "SegmenterDeadLetterRateHigh",
        "SegmenterTimerLatenessHigh",
        "SegmenterPublishErrors",
        "SegmenterNotReady",
        "SegmenterOutboxBacklogGrowing",
    ] {
        assert!(names.contains(required), "no alert {required}");
    }
}

/// Every alert has a unit test in which it fires, and one showing healthy series that do not
/// make it fire (an empty expectation, or series of instances it is not expected for).
#[test]
fn every_alert_has_firing_and_healthy_unit_tests() {
    let tests = yaml("deploy/prometheus/alerts_test.yml");
    let mut fires: BTreeSet<String> = BTreeSet::new();
    let mut healthy: BTreeSet<String> = BTreeSet::new();
    for case in seq(&tests["tests"]) {
        let instances: BTreeSet<String> = seq(&case["input_series"])
            .iter()
            .filter_map(|s| s["series"].as_str())
            .filter_map(|s| s.split("instance=\"").nth(1))
            .filter_map(|rest| rest.split('"').next())
            .map(str::to_string)
            .collect();
        for check in seq(&case["alert_rule_test"]) {
            let name = text(&check, &["alertname"]).to_string();
            let expected = seq(&check["exp_alerts"]);
            let alerted: BTreeSet<String> = expected
                .iter()
                .map(|a| text(a, &["exp_labels", "instance"]).to_string())
                .collect();
            if expected.is_empty() || instances.iter().any(|i| !alerted.contains(i)) {
                healthy.insert(name.clone());
            }
            if !expected.is_empty() {
                fires.insert(name);
            }
        }
    }
    for (name, _) in alert_rules() {
        assert!(fires.contains(&name), "{name}: no unit test where it fires");
        assert!(
            healthy.contains(&name),
            "{name}: no unit test with healthy series"
        );
    }
}

// ---------------------------------------------------------------------------------- kubernetes

const K8S: &str = "deploy/k8s";

/// Every object of the kustomization, by kind and name.
fn k8s_objects() -> BTreeMap<(String, String), Yaml> {
    let kustomization = yaml(&format!("{K8S}/kustomization.yaml"));
    let mut objects = BTreeMap::new();
    for resource in seq(&kustomization["resources"]) {
        let file = resource.as_str().expect("resource path");
        for doc in yaml_docs(&format!("{K8S}/{file}")) {
            let key = (
                text(&doc, &["kind"]).to_string(),
                text(&doc, &["metadata", "name"]).to_string(),
            );
            assert!(objects.insert(key.clone(), doc).is_none(), "{key:?} twice");
        }
    }
    objects
}

#[test]
fn kustomization_lists_every_manifest_and_none_names_a_namespace() {
    let kustomization = yaml(&format!("{K8S}/kustomization.yaml"));
    assert!(kustomization["namespace"].is_null(), "namespace-agnostic");
    let listed: BTreeSet<String> = seq(&kustomization["resources"])
        .iter()
        .filter_map(|r| r.as_str().map(str::to_string))
        .collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(root().join(K8S))
        .expect("deploy/k8s")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, on_disk);
    let objects = k8s_objects();
    for ((kind, name), object) in &objects {
        assert!(!kind.is_empty() && !name.is_empty(), "{object:?}");
        assert!(!text(object, &["apiVersion"]).is_empty(), "{kind}/{name}");
        assert!(
            object["metadata"]["namespace"].is_null(),
            "{kind}/{name} names a namespace"
        );
    }
    let kinds: BTreeSet<&str> = objects.keys().map(|(k, _)| k.as_str()).collect();
    let expected = [
        "ConfigMap",
        "PodDisruptionBudget",
        "PrometheusRule",
        "Service",
        "ServiceMonitor",
        "StatefulSet",
    ];
    assert_eq!(kinds, expected.into_iter().collect());
}

#[test]
fn k8s_configmap_and_prometheusrule_are_the_repo_files() {
    let objects = k8s_objects();
    let config = &objects[&("ConfigMap".into(), "segmenter-config".into())];
    for (key, file) in [
        ("segmenter.toml", "config/segmenter.toml"),
        ("segments.toml", "config/segments.toml"),
    ] {
        assert!(
            text(config, &["data", key]) == read(file),
            "{K8S}/configmap.yaml {key} differs from {file}: run scripts/gen-k8s.sh"
        );
    }
    let rule = &objects[&("PrometheusRule".into(), "segmenter".into())];
    assert_eq!(text(rule, &["apiVersion"]), "monitoring.coreos.com/v1");
    let alerts = yaml("deploy/prometheus/alerts.yml");
    assert!(
        rule["spec"]["groups"] == alerts["groups"],
        "{K8S}/prometheusrule.yaml differs from deploy/prometheus/alerts.yml: run scripts/gen-k8s.sh"
    );
}

/// The StatefulSet's container: env overrides as pairs.
fn container_env(container: &Yaml) -> Vec<(String, String)> {
    seq(&container["env"])
        .iter()
        .map(|e| {
            let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                // What the first pod of the StatefulSet sees.
                Some("metadata.name") => "segmenter-0".to_string(),
                Some(other) => panic!("env from an unexpected field: {other}"),
                None => text(e, &["value"]).to_string(),
            };
            (text(e, &["name"]).to_string(), value)
        })
        .collect()
}

/// Scaled out (issue 11): three pods in one group, each with its own static member id, its own
/// volume, and a disruption budget of one pod.
#[test]
fn statefulset_scales_out_with_static_membership_and_a_disruption_budget() {
    let objects = k8s_objects();
    let set = &objects[&("StatefulSet".into(), "segmenter".into())];
    assert_eq!(set["spec"]["replicas"].as_u64(), Some(3));
    let container = &seq(&set["spec"]["template"]["spec"]["containers"])[0];
    let env = container_env(container);
    let config = &objects[&("ConfigMap".into(), "segmenter-config".into())];
    let settings = settings_from(config, &env);
    assert_eq!(settings.kafka.instance_id.as_deref(), Some("segmenter-0"));
    assert_eq!(
        settings.state.changelog_topic, "segmenter-changelog",
        "the changelog the pods share"
    );
    let pdb = &objects[&("PodDisruptionBudget".into(), "segmenter".into())];
    assert_eq!(pdb["spec"]["maxUnavailable"].as_u64(), Some(1));
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"], set["spec"]["selector"]["matchLabels"],
        "the budget covers the StatefulSet's pods"
    );
}

/// The environment variable naming the HTTP API's tokens file.
const TOKENS_FILE_ENV: &str = "SEGMENTER__HTTP__TOKENS_FILE";

/// Loads segmenter.toml + segments.toml as the pod sees them, with its env overrides, through
/// the service's own settings code. The tokens file the env names lives in a Secret that is not
/// in the repo: a freshly minted one stands in for it.
fn settings_from(config: &Yaml, env: &[(String, String)]) -> segmenter::settings::Settings {
    let dir = tempfile::tempdir().expect("tempdir");
    for key in ["segmenter.toml", "segments.toml"] {
        std::fs::write(dir.path().join(key), text(config, &["data", key])).expect("write");
    }
    let (_, entry) = segmenter::auth::mint("ops", segmenter::auth::Role::Admin).expect("mint");
    let stand_in = dir.path().join("tokens");
    std::fs::write(&stand_in, format!("{}\n", entry.line())).expect("write tokens");
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(key, value)| match key.as_str() {
            TOKENS_FILE_ENV => (key.clone(), stand_in.display().to_string()),
            _ => (key.clone(), value.clone()),
        })
        .collect();
    segmenter::settings::load(&dir.path().join("segmenter.toml"), &env)
        .unwrap_or_else(|e| panic!("the pod's config does not load: {e}"))
}

fn value_of<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter()
        .find(|(name, _)| name == key)
        .map(|(_, value)| value.as_str())
}

#[test]
fn statefulset_mounts_the_http_tokens_from_a_secret_and_needs_them() {
    let objects = k8s_objects();
    let set = &objects[&("StatefulSet".into(), "segmenter".into())];
    let pod = &set["spec"]["template"]["spec"];
    let container = &seq(&pod["containers"])[0];
    let env = container_env(container);
    let tokens_file = value_of(&env, TOKENS_FILE_ENV)
        .unwrap_or_else(|| panic!("no {TOKENS_FILE_ENV} in {env:?}"));
    let tokens_dir = Path::new(tokens_file).parent().expect("a directory");
    let mount = seq(&container["volumeMounts"])
        .into_iter()
        .find(|m| Path::new(text(m, &["mountPath"])) == tokens_dir)
        .unwrap_or_else(|| panic!("nothing mounted at {}", tokens_dir.display()));
    assert_eq!(mount["readOnly"].as_bool(), Some(true), "{mount:?}");
    let volume = seq(&pod["volumes"])
        .into_iter()
        .find(|v| text(v, &["name"]) == text(&mount, &["name"]))
        .expect("the tokens volume");
    assert_eq!(
        text(&volume, &["secret", "secretName"]),
        "segmenter-http-tokens",
        "the tokens come from a Secret"
    );
    let mode = volume["secret"]["defaultMode"]
        .as_u64()
        .expect("defaultMode");
    assert_eq!(mode & 0o007, 0, "tokens file readable by others: {mode:o}");
    assert!(
        !objects.keys().any(|(kind, _)| kind == "Secret"),
        "no Secret (with token hashes) is committed in the manifests"
    );
    // The pod's config enforces tokens; without the file it is refused (listen = 0.0.0.0).
    let config = &objects[&("ConfigMap".into(), "segmenter-config".into())];
    let settings = settings_from(config, &env);
    assert!(
        matches!(
            settings.http.access,
            segmenter::settings::HttpAccess::Tokens(_)
        ),
        "{:?}",
        settings.http.access
    );
    assert!(!segmenter::settings::is_loopback(&settings.http_listen));
    let without: Vec<(String, String)> = env
        .iter()
        .filter(|(key, _)| key != TOKENS_FILE_ENV)
        .cloned()
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    for key in ["segmenter.toml", "segments.toml"] {
        std::fs::write(dir.path().join(key), text(config, &["data", key])).expect("write");
    }
    let refused = segmenter::settings::load(&dir.path().join("segmenter.toml"), &without)
        .expect_err("no tokens on 0.0.0.0 is refused")
        .to_string();
    assert!(refused.contains("http.auth = \"none\""), "{refused}");
}

fn port_of(listen: &str) -> u64 {
    listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("host:port")
}

#[test]
fn statefulset_runs_the_service_safely_with_its_state_on_a_volume() {
    let objects = k8s_objects();
    let set = &objects[&("StatefulSet".into(), "segmenter".into())];
    let pod = &set["spec"]["template"]["spec"];
    let container = &seq(&pod["containers"])[0];
    let env = container_env(container);
    let names: BTreeSet<&str> = env.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains("SEGMENTER__KAFKA__BROKERS"), "{names:?}");
    let config = &objects[&("ConfigMap".into(), "segmenter-config".into())];
    let settings = settings_from(config, &env);

    // Drains within the grace period.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace period");
    assert!(
        grace > settings.pipeline.shutdown_timeout.as_secs() + 5,
        "terminationGracePeriodSeconds {grace} leaves no margin over shutdown_timeout {:?}",
        settings.pipeline.shutdown_timeout
    );
    // State dir on the claim template's volume; config from the ConfigMap.
    let claims: Vec<String> = seq(&set["spec"]["volumeClaimTemplates"])
        .iter()
        .map(|c| text(c, &["metadata", "name"]).to_string())
        .collect();
    let mounts = seq(&container["volumeMounts"]);
    let mount_of = |path: &Path| {
        mounts
            .iter()
            .find(|m| Path::new(text(m, &["mountPath"])) == path)
            .map(|m| text(m, &["name"]).to_string())
    };
    let state_volume = mount_of(&settings.state.dir).expect("the state dir is mounted");
    assert!(
        claims.contains(&state_volume),
        "state on {state_volume}, claims {claims:?}"
    );
    let args: Vec<String> = seq(&container["args"])
        .iter()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    let config_file = Path::new(args.last().expect("args"));
    let config_volume = mount_of(config_file.parent().expect("dir")).expect("config mounted");
    let volume = seq(&pod["volumes"])
        .into_iter()
        .find(|v| text(v, &["name"]) == config_volume)
        .expect("config volume");
    assert_eq!(text(&volume, &["configMap", "name"]), "segmenter-config");
    assert_eq!(args[0], "run");

    // Probes on the HTTP port the service listens on.
    let port = seq(&container["ports"])
        .into_iter()
        .find(|p| text(p, &["name"]) == "http")
        .expect("http port");
    assert_eq!(
        port["containerPort"].as_u64(),
        Some(port_of(&settings.http_listen))
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(
            text(container, &[probe, "httpGet", "path"]),
            path,
            "{probe}"
        );
        assert_eq!(
            text(container, &[probe, "httpGet", "port"]),
            "http",
            "{probe}"
        );
    }
    // Not root, resources bounded.
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert!(pod["securityContext"]["runAsUser"]
        .as_u64()
        .is_some_and(|u| u > 0));
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"].as_bool(),
        Some(false)
    );
    for key in [
        ["requests", "memory"],
        ["requests", "cpu"],
        ["limits", "memory"],
    ] {
        assert!(
            !text(container, &["resources", key[0], key[1]]).is_empty(),
            "{key:?}"
        );
    }
    // The pod template carries the selector's labels.
    let selector = &set["spec"]["selector"]["matchLabels"];
    for (key, value) in selector.as_mapping().expect("matchLabels") {
        assert_eq!(&set["spec"]["template"]["metadata"]["labels"][key], value);
    }
}

fn selects(selector: &Yaml, labels: &Yaml) -> bool {
    selector
        .as_mapping()
        .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| &labels[k] == v))
}

#[test]
fn services_and_servicemonitor_reach_the_pods_once() {
    let objects = k8s_objects();
    let set = &objects[&("StatefulSet".into(), "segmenter".into())];
    let pod_labels = &set["spec"]["template"]["metadata"]["labels"];
    let services: Vec<&Yaml> = objects
        .iter()
        .filter(|((kind, _), _)| kind == "Service")
        .map(|(_, s)| s)
        .collect();
    for service in &services {
        let name = text(service, &["metadata", "name"]);
        assert!(
            selects(&service["spec"]["selector"], pod_labels),
            "{name} misses the pods"
        );
        for port in seq(&service["spec"]["ports"]) {
            assert_eq!(text(&port, &["targetPort"]), "http", "{name}");
        }
    }
    let governing = text(set, &["spec", "serviceName"]);
    let headless = &objects[&("Service".into(), governing.to_string())];
    assert_eq!(text(headless, &["spec", "clusterIP"]), "None");

    let monitor = &objects[&("ServiceMonitor".into(), "segmenter".into())];
    assert_eq!(text(monitor, &["apiVersion"]), "monitoring.coreos.com/v1");
    let selector = &monitor["spec"]["selector"]["matchLabels"];
    let scraped: Vec<&&Yaml> = services
        .iter()
        .filter(|s| selects(selector, &s["metadata"]["labels"]))
        .collect();
    assert_eq!(
        scraped.len(),
        1,
        "the ServiceMonitor must select exactly one Service"
    );
    let port_names: Vec<String> = seq(&scraped[0]["spec"]["ports"])
        .iter()
        .map(|p| text(p, &["name"]).to_string())
        .collect();
    for endpoint in seq(&monitor["spec"]["endpoints"]) {
        assert!(port_names.contains(&text(&endpoint, &["port"]).to_string()));
        assert_eq!(text(&endpoint, &["path"]), "/metrics");
    }
}

fn command_works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn kustomize_renders_the_manifests_when_kubectl_is_installed() {
    if !command_works("kubectl", &["version", "--client"]) {
        eprintln!("kubectl not installed: `kubectl kustomize` not run");
        return;
    }
    let mut command = Command::new("kubectl");
    command.args(["kustomize", K8S]);
    let rendered = String::from_utf8(run_ok(command).stdout).expect("utf8");
    let kinds = rendered.lines().filter(|l| l.starts_with("kind: ")).count();
    assert_eq!(kinds, k8s_objects().len(), "{rendered}");
}

// ---------------------------------------------------------------------------------- compose

/// Compose runs two instances in one group (issue 11): each with its own state volume, static
/// member id and host port, both scraped by Prometheus.
#[test]
fn compose_runs_two_instances_with_their_own_state() {
    let compose = yaml("docker-compose.yml");
    let services = &compose["services"];
    let env = |name: &str, key: &str| text(&services[name], &["environment", key]).to_string();
    let volume = |name: &str| {
        seq(&services[name]["volumes"])
            .iter()
            .filter_map(|v| v.as_str())
            .find(|v| v.ends_with(":/var/lib/segmenter"))
            .map(str::to_string)
            .expect("a state volume")
    };
    assert_ne!(volume("segmenter"), volume("segmenter-2"));
    assert_ne!(
        env("segmenter", "SEGMENTER__KAFKA__INSTANCE_ID"),
        env("segmenter-2", "SEGMENTER__KAFKA__INSTANCE_ID")
    );
    assert_eq!(
        env("segmenter", "SEGMENTER__KAFKA__BROKERS"),
        env("segmenter-2", "SEGMENTER__KAFKA__BROKERS")
    );
    let scrape = yaml("deploy/prometheus/prometheus.yml");
    let targets: Vec<String> = seq(&seq(&scrape["scrape_configs"])[0]["static_configs"])
        .iter()
        .flat_map(|c| seq(&c["targets"]))
        .filter_map(|t| t.as_str().map(str::to_string))
        .collect();
    assert_eq!(targets, vec!["segmenter:9898", "segmenter-2:9898"]);
}

#[test]
fn compose_wires_kafka_topics_service_generator_prometheus_and_grafana() {
    let compose = yaml("docker-compose.yml");
    let services = &compose["services"];
    let service_names: BTreeSet<&str> = services
        .as_mapping()
        .expect("services")
        .keys()
        .filter_map(|k| k.as_str())
        .collect();
    for name in [
        "kafka",
        "topics",
        "segmenter",
        "generator",
        "prometheus",
        "grafana",
    ] {
        assert!(service_names.contains(name), "no {name} service");
    }
    let kafka = &services["kafka"];
    assert!(text(kafka, &["image"]).starts_with("apache/kafka:"));
    assert!(
        text(kafka, &["environment", "KAFKA_PROCESS_ROLES"]).contains("controller"),
        "KRaft"
    );

    // The segmenter's config as the image has it (config/ → /etc/segmenter) with compose's env.
    let segmenter = &services["segmenter"];
    let env: Vec<(String, String)> = segmenter["environment"]
        .as_mapping()
        .expect("environment")
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap_or("").to_string(),
                v.as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(env.iter().any(|(k, _)| k == "SEGMENTER__HTTP__LISTEN"));
    // The tokens file is the compose secret, mounted where compose mounts secrets.
    let secret_names: Vec<String> = seq(&segmenter["secrets"])
        .iter()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect();
    assert_eq!(secret_names, vec!["http-tokens".to_string()]);
    assert_eq!(
        value_of(&env, TOKENS_FILE_ENV),
        Some("/run/secrets/http-tokens")
    );
    let secret_file = text(&compose, &["secrets", "http-tokens", "file"]);
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(key, value)| match key.as_str() {
            TOKENS_FILE_ENV => (key.clone(), root().join(secret_file).display().to_string()),
            _ => (key.clone(), value.clone()),
        })
        .collect();
    let settings = segmenter::settings::load(&root().join("config/segmenter.toml"), &env)
        .unwrap_or_else(|e| panic!("compose's segmenter config does not load: {e}"));
    let segmenter::settings::HttpAccess::Tokens(tokens) = &settings.http.access else {
        panic!("compose's API is not guarded: {:?}", settings.http.access);
    };
    // The file's comment names its (public, local-only) token; it is the admin token.
    let comment = read(secret_file);
    let token = comment
        .split_whitespace()
        .find(|word| word.starts_with("sgt_"))
        .expect("the local token in the comment");
    assert_eq!(
        tokens.verify(token).map(|caller| caller.role),
        Some(segmenter::auth::Role::Admin)
    );
    assert_eq!(
        text(segmenter, &["build", "dockerfile"]),
        "deploy/Dockerfile"
    );
    let state_mount = format!(":{}", settings.state.dir.display());
    assert!(
        seq(&segmenter["volumes"])
            .iter()
            .any(|v| v.as_str().is_some_and(|v| v.ends_with(&state_mount))),
        "the state dir is a volume"
    );

    // Every input topic is created, and the generator produces to exactly those.
    let topics_script = seq(&services["topics"]["command"])
        .iter()
        .filter_map(|c| c.as_str().map(str::to_string))
        .collect::<String>();
    for topic in &settings.input.topics {
        assert!(
            topics_script.contains(topic.as_str()),
            "topic {topic} not created"
        );
    }
    let generator: Vec<String> = seq(&services["generator"]["command"])
        .iter()
        .filter_map(|c| c.as_str().map(str::to_string))
        .collect();
    let flag = |name: &str| {
        let at = generator.iter().position(|a| a == name);
        at.and_then(|i| generator.get(i + 1))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(generator.first().map(String::as_str), Some("generate"));
    assert_eq!(flag("--topics"), settings.input.topics.join(","));
    assert_eq!(flag("--brokers"), settings.kafka.brokers);

    // Prometheus scrapes the segmenter's listen port and loads the rules it mounts.
    let scrape = yaml("deploy/prometheus/prometheus.yml");
    let job = &seq(&scrape["scrape_configs"])[0];
    let target = seq(&seq(&job["static_configs"])[0]["targets"])[0]
        .as_str()
        .expect("target")
        .to_string();
    assert_eq!(
        target,
        format!("segmenter:{}", port_of(&settings.http_listen))
    );
    let prometheus_mounts: Vec<String> = seq(&services["prometheus"]["volumes"])
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    for rule_file in seq(&scrape["rule_files"]) {
        let name = rule_file.as_str().expect("rule file");
        let wanted = format!("./deploy/prometheus/{name}:/etc/prometheus/{name}");
        assert!(
            prometheus_mounts.iter().any(|m| m.starts_with(&wanted)),
            "{wanted}"
        );
    }
    let grafana = &services["grafana"];
    assert!(text(grafana, &["image"]).starts_with("grafana/grafana"));
    assert_eq!(
        text(grafana, &["environment", "GF_AUTH_ANONYMOUS_ENABLED"]),
        "true"
    );
    assert!(text(&services["prometheus"], &["image"]).starts_with("prom/prometheus"));
}

#[test]
fn compose_bind_mounts_exist() {
    let compose = yaml("docker-compose.yml");
    let mut checked = 0;
    for (_, service) in compose["services"].as_mapping().expect("services") {
        for volume in seq(&service["volumes"]) {
            let Some(source) = volume.as_str().and_then(|v| v.split(':').next()) else {
                continue;
            };
            if source.starts_with("./") {
                assert!(
                    root().join(source).exists(),
                    "{source} is mounted but missing"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 4, "only {checked} bind mounts");
}

#[test]
fn compose_file_passes_docker_compose_config_when_available() {
    if !command_works("docker", &["compose", "version"]) {
        eprintln!("`docker compose` is not available here: compose config not run");
        return;
    }
    let mut command = Command::new("docker");
    command.args(["compose", "-f", "docker-compose.yml", "config", "-q"]);
    run_ok(command);
}

// ---------------------------------------------------------------------------------- Dockerfile

#[test]
fn dockerfile_is_multi_stage_non_root_with_the_state_dir_as_a_volume() {
    let dockerfile = read("deploy/Dockerfile");
    let instructions: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let from = instructions
        .iter()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert!(from >= 2, "multi-stage");
    let user = instructions
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER");
    assert!(
        !["root", "0", "0:0"].contains(&user.trim()),
        "runs as {user}"
    );
    let settings = segmenter::settings::load(&root().join("config/segmenter.toml"), &[])
        .unwrap_or_else(|e| panic!("{e}"));
    let volume = instructions
        .iter()
        .find_map(|l| l.strip_prefix("VOLUME "))
        .expect("a VOLUME");
    assert!(
        volume.contains(&settings.state.dir.display().to_string()),
        "{volume}"
    );
    let exposed = instructions
        .iter()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .expect("EXPOSE");
    assert_eq!(exposed.trim(), port_of(&settings.http_listen).to_string());
}
