//! End-to-end fixtures for `segmenter replay` and `segmenter check`, run against the real binary.
//!
//! `tests/fixtures/replay/<case>/` holds `segments.toml`, `input.ndjson`, `expected.ndjson`, and
//! optionally `args` (extra CLI args on one line) and `expected_stderr.txt`; each case's README.md
//! explains every expected change. `tests/fixtures/config_errors/<case>.toml` are broken configs
//! with the stderr patterns of `<case>.expect` (format in that directory's README.md).
//! `FIXTURE=<name>` runs only the cases whose name contains `<name>`.

use serde_json::{Map, Value};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_segmenter");
const PROJECTED_FIELDS: [&str; 6] = ["customer_id", "segment", "change", "at", "seq", "cause"];
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
const SUMMARY_WORDS: [&str; 5] = ["read", "rejected", "duplicates", "changes", "events/s"];

struct RunOutput {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn fixtures_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(kind)
}

fn selected(name: &str) -> bool {
    match std::env::var("FIXTURE") {
        Ok(filter) => name.contains(filter.as_str()),
        Err(_) => true,
    }
}

fn read_text(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn read_optional(path: &Path) -> Result<Option<String>, String> {
    if path.exists() {
        return read_text(path).map(Some);
    }
    Ok(None)
}

/// Runs the binary with `args` from the crate root, feeding `stdin` if given, with a timeout.
fn run_segmenter(args: &[String], stdin: Option<Vec<u8>>) -> Result<RunOutput, String> {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {BIN}: {e}"))?;
    // Feed and drain the pipes on their own threads so a full pipe never deadlocks us.
    let writer = match (stdin, child.stdin.take()) {
        (Some(bytes), Some(mut pipe)) => Some(thread::spawn(move || {
            let _ignored_if_child_stops_reading = pipe.write_all(&bytes);
        })),
        _ => None,
    };
    let stdout_reader = child.stdout.take().map(drain);
    let stderr_reader = child.stderr.take().map(drain);
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _already_exited_is_fine = child.kill();
                let _reaped = child.wait();
                return Err(format!(
                    "`segmenter {}` still running after {RUN_TIMEOUT:?}",
                    args.join(" ")
                ));
            }
            Err(e) => return Err(format!("waiting for segmenter: {e}")),
        }
    };
    if let Some(handle) = writer {
        let _ = handle.join();
    }
    let stdout = stdout_reader
        .map(|h| h.join().unwrap_or_default())
        .unwrap_or_default();
    let stderr = stderr_reader
        .map(|h| h.join().unwrap_or_default())
        .unwrap_or_default();
    Ok(RunOutput {
        code: status.code(),
        stdout,
        stderr,
    })
}

fn drain<R: Read + Send + 'static>(mut pipe: R) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _partial_output_is_still_useful = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

fn parse_ndjson(text: &str, what: &str) -> Result<Vec<Map<String, Value>>, String> {
    let mut objects = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(object)) => objects.push(object),
            Ok(other) => {
                return Err(format!(
                    "{what} line {}: not a JSON object: {other}",
                    index + 1
                ))
            }
            Err(e) => return Err(format!("{what} line {}: {e}: {line}", index + 1)),
        }
    }
    Ok(objects)
}

/// The fields a fixture pins down; `message_id` only when present and not null.
fn project(change: &Map<String, Value>) -> Map<String, Value> {
    let mut projected = Map::new();
    for field in PROJECTED_FIELDS.iter().chain(["message_id"].iter()) {
        match change.get(*field) {
            Some(Value::Null) | None => {}
            Some(value) => {
                projected.insert((*field).to_string(), value.clone());
            }
        }
    }
    projected
}

/// One change as JSON with the projected fields first, in contract order.
fn render(object: &Map<String, Value>) -> String {
    let mut fields: Vec<String> = Vec::new();
    let ordered = PROJECTED_FIELDS
        .iter()
        .chain(["message_id"].iter())
        .map(|f| (*f).to_string());
    let rest = object
        .keys()
        .filter(|k| !PROJECTED_FIELDS.contains(&k.as_str()) && k.as_str() != "message_id")
        .cloned();
    for key in ordered.chain(rest) {
        if let Some(value) = object.get(&key) {
            fields.push(format!("{}:{value}", Value::String(key.clone())));
        }
    }
    format!("{{{}}}", fields.join(","))
}

/// A longest-common-subsequence diff of two change lists; `None` when they are equal.
fn diff(expected: &[Map<String, Value>], actual: &[Map<String, Value>]) -> Option<String> {
    if expected == actual {
        return None;
    }
    let (n, m) = (expected.len(), actual.len());
    // common[i][j] = length of the longest common subsequence of expected[i..] and actual[j..]
    let mut common = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            common[i][j] = if expected[i] == actual[j] {
                common[i + 1][j + 1] + 1
            } else {
                common[i + 1][j].max(common[i][j + 1])
            };
        }
    }
    let mut out = format!("expected {n} changes, got {m} (`-` only expected, `+` only actual):\n");
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && expected[i] == actual[j] {
            out.push_str(&format!("    {}\n", render(&expected[i])));
            i += 1;
            j += 1;
        } else if i < n && (j == m || common[i + 1][j] >= common[i][j + 1]) {
            out.push_str(&format!("  - {}\n", render(&expected[i])));
            i += 1;
        } else {
            out.push_str(&format!("  + {}\n", render(&actual[j])));
            j += 1;
        }
    }
    Some(out)
}

/// `id` is 32+ hex digits, `segment_version` a non-empty string, ids unique in one run.
fn check_change_envelope(changes: &[Map<String, Value>]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen_ids = std::collections::HashSet::new();
    for (index, change) in changes.iter().enumerate() {
        let line = index + 1;
        match change.get("id").and_then(Value::as_str) {
            Some(id) if id.len() >= 32 && id.chars().all(|c| c.is_ascii_hexdigit()) => {
                if !seen_ids.insert(id.to_string()) {
                    problems.push(format!(
                        "stdout line {line}: id {id} repeats an earlier change's id"
                    ));
                }
            }
            other => problems.push(format!(
                "stdout line {line}: `id` must be a string of 32+ hex digits, got {other:?}"
            )),
        }
        match change.get("segment_version").and_then(Value::as_str) {
            Some(version) if !version.is_empty() => {}
            _ => problems.push(format!(
                "stdout line {line}: `segment_version` must be a non-empty string"
            )),
        }
    }
    problems
}

fn ids(changes: &[Map<String, Value>]) -> Vec<Value> {
    changes
        .iter()
        .map(|c| c.get("id").cloned().unwrap_or(Value::Null))
        .collect()
}

/// Pattern lines: `#` comments and blank lines skipped.
fn pattern_lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// `A || B`: any alternative; `A ... B`: fragments in order within one line; case-insensitive.
fn pattern_matches(pattern: &str, haystack: &str) -> bool {
    let lines: Vec<String> = haystack.lines().map(str::to_lowercase).collect();
    pattern.split(" || ").any(|alternative| {
        let fragments: Vec<String> = alternative
            .split(" ... ")
            .map(|f| f.trim().to_lowercase())
            .filter(|f| !f.is_empty())
            .collect();
        lines
            .iter()
            .any(|line| fragments_in_order(line, &fragments))
    })
}

fn fragments_in_order(line: &str, fragments: &[String]) -> bool {
    let mut rest = line;
    for fragment in fragments {
        match rest.find(fragment.as_str()) {
            Some(at) => rest = &rest[at + fragment.len()..],
            None => return false,
        }
    }
    true
}

/// True when some line holds `line <digits>:`, the shape of a rejected-input report.
fn reports_a_rejected_line(stderr: &str) -> bool {
    stderr.lines().any(|line| {
        line.match_indices("line ").any(|(at, _)| {
            let rest = &line[at + "line ".len()..];
            let digits = rest.chars().take_while(char::is_ascii_digit).count();
            digits > 0 && rest[digits..].starts_with(':')
        })
    })
}

fn replay_case_dirs() -> Vec<PathBuf> {
    let root = fixtures_dir("replay");
    let mut dirs: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", root.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.join("segments.toml").is_file())
        .collect();
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "no replay fixtures under {}",
        root.display()
    );
    dirs
}

fn case_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn check_replay_case(dir: &Path) -> Vec<String> {
    match run_replay_case(dir) {
        Ok(problems) => problems,
        Err(problem) => vec![problem],
    }
}

fn run_replay_case(dir: &Path) -> Result<Vec<String>, String> {
    let config = dir.join("segments.toml");
    let input = dir.join("input.ndjson");
    let expected_text = read_text(&dir.join("expected.ndjson"))?;
    let expected = parse_ndjson(&expected_text, "expected.ndjson")?;
    let extra_args: Vec<String> = read_optional(&dir.join("args"))?
        .map(|line| line.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let stderr_patterns = read_optional(&dir.join("expected_stderr.txt"))?;

    let args_with_input = |input_arg: String| -> Vec<String> {
        let mut args = vec![
            "replay".to_string(),
            "--config".to_string(),
            config.display().to_string(),
        ];
        args.extend(["--input".to_string(), input_arg]);
        args.extend(extra_args.iter().cloned());
        args
    };
    let file_args = args_with_input(input.display().to_string());
    let first = run_segmenter(&file_args, None)?;
    let mut problems = Vec::new();
    if first.code != Some(0) {
        problems.push(format!("exit status {:?}, expected 0", first.code));
    }
    let actual = parse_ndjson(&first.stdout, "stdout")?;
    let projected: Vec<Map<String, Value>> = actual.iter().map(project).collect();
    if let Some(difference) = diff(&expected, &projected) {
        problems.push(difference);
    }
    problems.extend(check_change_envelope(&actual));

    let second = run_segmenter(&file_args, None)?;
    let second_changes = parse_ndjson(&second.stdout, "stdout of the second run")?;
    if ids(&second_changes) != ids(&actual) {
        problems.push("a second run with the same input produced different `id`s".to_string());
    } else if second.stdout != first.stdout {
        problems.push("a second run with the same input produced different output".to_string());
    }

    let input_bytes =
        fs::read(&input).map_err(|e| format!("cannot read {}: {e}", input.display()))?;
    let piped = run_segmenter(&args_with_input("-".to_string()), Some(input_bytes))?;
    if piped.stdout != first.stdout {
        problems.push(format!(
            "`--input -` (stdin) output differs from `--input FILE`:\n--- file\n{}--- stdin\n{}",
            first.stdout, piped.stdout
        ));
    }

    match &stderr_patterns {
        Some(patterns) => {
            for pattern in pattern_lines(patterns) {
                if !pattern_matches(pattern, &first.stderr) {
                    problems.push(format!("stderr lacks `{pattern}`"));
                }
            }
        }
        None if reports_a_rejected_line(&first.stderr) => {
            problems.push("stderr reports a rejected line but the case expects none".to_string());
        }
        None => {}
    }
    let summary = first
        .stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let missing: Vec<&str> = SUMMARY_WORDS
        .iter()
        .copied()
        .filter(|word| !summary.to_lowercase().contains(word))
        .collect();
    if !missing.is_empty() {
        problems.push(format!(
            "last stderr line should be a summary with {missing:?}, got `{summary}`"
        ));
    }
    if !problems.is_empty() {
        problems.push(format!("full stderr:\n{}", first.stderr));
    }
    Ok(problems)
}

#[test]
fn replay_fixtures_match_expected_output() {
    let mut failures = Vec::new();
    let mut ran = 0;
    for dir in replay_case_dirs() {
        let name = case_name(&dir);
        if !selected(&name) {
            continue;
        }
        ran += 1;
        let problems = check_replay_case(&dir);
        if !problems.is_empty() {
            failures.push(format!(
                "=== replay case `{name}`:\n{}",
                problems.join("\n")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {ran} replay cases failed\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// The expected files themselves obey the output contract (catches fixture typos).
#[test]
fn expected_outputs_are_consistent() {
    let mut failures = Vec::new();
    for dir in replay_case_dirs() {
        let name = case_name(&dir);
        let changes = match read_text(&dir.join("expected.ndjson"))
            .and_then(|t| parse_ndjson(&t, "expected.ndjson"))
        {
            Ok(changes) => changes,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let mut last_at: std::collections::HashMap<String, String> = Default::default();
        let mut last_seq: std::collections::HashMap<(String, String), (u64, String)> =
            Default::default();
        for (index, change) in changes.iter().enumerate() {
            let line = index + 1;
            let text = |field: &str| {
                change
                    .get(field)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            let (customer, segment, kind, at, cause) = (
                text("customer_id"),
                text("segment"),
                text("change"),
                text("at"),
                text("cause"),
            );
            let keys: Vec<&String> = change.keys().collect();
            let allowed =
                |k: &&String| PROJECTED_FIELDS.contains(&k.as_str()) || k.as_str() == "message_id";
            if keys.iter().any(|k| !allowed(k))
                || PROJECTED_FIELDS.iter().any(|f| !change.contains_key(*f))
            {
                failures.push(format!(
                    "{name} line {line}: fields must be {PROJECTED_FIELDS:?} (+ message_id)"
                ));
            }
            if change.contains_key("message_id") && cause != "event" {
                failures.push(format!(
                    "{name} line {line}: message_id on a `{cause}` change"
                ));
            }
            let at_shape = at.len() == 24 && at.ends_with('Z') && at.as_bytes()[19] == b'.';
            if !at_shape {
                failures.push(format!(
                    "{name} line {line}: `at` must look like 2026-11-01T10:00:00.000Z"
                ));
            }
            if let Some(previous) = last_at.insert(customer.clone(), at.clone()) {
                if previous > at {
                    failures.push(format!(
                        "{name} line {line}: {customer}'s changes go back in time"
                    ));
                }
            }
            let seq = change.get("seq").and_then(Value::as_u64).unwrap_or(0);
            let (previous_seq, previous_kind) = last_seq
                .get(&(customer.clone(), segment.clone()))
                .cloned()
                .unwrap_or((0, "exited".to_string()));
            if seq != previous_seq + 1
                || kind == previous_kind
                || !["entered", "exited"].contains(&kind.as_str())
            {
                failures.push(format!(
                    "{name} line {line}: seq/change do not continue {customer}/{segment}"
                ));
            }
            last_seq.insert((customer, segment), (seq, kind));
        }
    }
    assert!(
        failures.is_empty(),
        "inconsistent fixtures:\n{}",
        failures.join("\n")
    );
}

#[test]
fn broken_configs_are_rejected_by_check() {
    let root = fixtures_dir("config_errors");
    let mut cases: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", root.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    cases.sort();
    assert!(
        !cases.is_empty(),
        "no config error fixtures under {}",
        root.display()
    );
    let mut failures = Vec::new();
    for config in cases {
        let name = config
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !selected(&name) {
            continue;
        }
        let expect = match read_text(&config.with_extension("expect")) {
            Ok(text) => text,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        let relative = format!("tests/fixtures/config_errors/{name}.toml");
        let args = vec!["check".to_string(), "--config".to_string(), relative];
        let output = match run_segmenter(&args, None) {
            Ok(output) => output,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let mut problems = Vec::new();
        if output.code != Some(1) {
            problems.push(format!("exit status {:?}, expected 1", output.code));
        }
        for pattern in pattern_lines(&expect) {
            if !pattern_matches(pattern, &output.stderr) {
                problems.push(format!("stderr lacks `{pattern}`"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "=== {name}: {}\nstderr:\n{}",
                problems.join("\n"),
                output.stderr
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn fixture_configs_pass_check() {
    let mut failures = Vec::new();
    for dir in replay_case_dirs() {
        let name = case_name(&dir);
        if !selected(&name) {
            continue;
        }
        let config = dir.join("segments.toml");
        let segment_ids: Vec<String> = match read_text(&config) {
            Ok(text) => text
                .lines()
                .filter_map(|l| {
                    l.trim()
                        .strip_prefix("id = \"")
                        .and_then(|rest| rest.strip_suffix('"'))
                })
                .map(String::from)
                .collect(),
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        let args = vec![
            "check".to_string(),
            "--config".to_string(),
            config.display().to_string(),
        ];
        match run_segmenter(&args, None) {
            Ok(output) if output.code == Some(0) => {
                let missing: Vec<&String> = segment_ids
                    .iter()
                    .filter(|id| !output.stdout.contains(id.as_str()))
                    .collect();
                if !missing.is_empty() {
                    failures.push(format!(
                        "{name}: `check` stdout does not name {missing:?}:\n{}",
                        output.stdout
                    ));
                }
            }
            Ok(output) => failures.push(format!(
                "{name}: `check` exit status {:?}:\n{}",
                output.code, output.stderr
            )),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn pattern_syntax_works_as_documented() {
    let stderr = "x.toml:7:9: segment 'a': unknown function `cnt`\nline 4: no customer id\nread 3";
    assert!(
        pattern_matches("x.toml:7:9: segment 'a': ... cnt", stderr),
        "fragments in order on one line"
    );
    assert!(
        !pattern_matches("cnt ... x.toml", stderr),
        "fragments out of order must not match"
    );
    assert!(
        !pattern_matches("line 4: ... function", stderr),
        "fragments must share one line"
    );
    assert!(
        pattern_matches("nothing || LINE 4: ... No Customer", stderr),
        "alternatives, case-insensitive"
    );
    assert!(
        reports_a_rejected_line(stderr),
        "`line 4:` is a rejection report"
    );
    assert!(
        !reports_a_rejected_line("read 3 lines: 0 rejected"),
        "a summary is not a rejection report"
    );
}
