use super::*;

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

fn errors_of(text: &str) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(&dir, "c.toml", text);
    match load(&path, &[]) {
        Ok(_) => Vec::new(),
        Err(errors) => errors
            .0
            .iter()
            .map(|e| format!("{:?}: {}", e.position, e.message))
            .collect(),
    }
}

#[test]
fn rule_errors_point_into_the_file() {
    let text = "[[segment]]\nid = \"a\"\nrule = 'count(\"X\") >= 1h'\n";
    let errors = errors_of(text);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("Some((3, 9))"), "{errors:?}");
    assert!(
        errors[0].contains("segment 'a': cannot compare a number with a duration"),
        "{errors:?}"
    );
}

#[test]
fn escapes_in_basic_strings_are_followed() {
    let text = "[[segment]]\nid = \"a\"\nrule = \"count(\\\"X\\\") > 1 and lst(any)\"\n";
    let errors = errors_of(text);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("Some((3, 30))"), "{errors:?}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = "[[segment]]\nid = \"Bad-Id\"\nrule = 'count(any) > 1'\n\n[[segment]]\nid = \"ok\"\nrule = 'count(any) > 1'\n\n[[segment]]\nid = \"ok\"\nrule = 'count(any) > 2'\n";
    let errors = errors_of(text);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].contains("must match [a-z0-9_]+"));
    assert!(errors[1].contains("duplicate id"));
}

#[test]
fn toml_and_unknown_key_errors_have_positions() {
    let errors = errors_of("[[segment]\nid = 1\n");
    assert!(errors[0].starts_with("Some((1,"), "{errors:?}");
    let errors = errors_of("[engine]\nclok = \"wall\"\n");
    assert!(
        errors[0].starts_with("Some((2, 1))") && errors[0].contains("unknown field"),
        "{errors:?}"
    );
}

#[test]
fn environment_overrides_apply() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        &dir,
        "c.toml",
        "[kafka]\nbrokers = \"a:1\"\n[[segment]]\nid = \"s\"\nrule = 'count(any) > 0'\n",
    );
    let env = vec![
        (
            "SEGMENTER__KAFKA__BROKERS".to_string(),
            "kafka:9092".to_string(),
        ),
        (
            "SEGMENTER__INPUT__TOPICS".to_string(),
            "clicks,orders".to_string(),
        ),
        ("SEGMENTER__ENGINE__CLOCK".to_string(), "event".to_string()),
    ];
    let settings = load(&path, &env).expect("loads");
    assert_eq!(settings.kafka.brokers, "kafka:9092");
    assert_eq!(
        settings.input.topics,
        vec!["clicks".to_string(), "orders".to_string()]
    );
    assert_eq!(settings.engine.clock, ClockMode::Event);
    assert_eq!(settings.program.segments.len(), 1);
}

#[test]
fn segments_file_is_loaded_relative_to_the_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        &dir,
        "segs.toml",
        "[[segment]]\nid = \"x\"\nrule = 'lst(any)'\n",
    );
    let path = write(&dir, "main.toml", "segments_file = \"segs.toml\"\n");
    let errors = load(&path, &[])
        .expect_err("bad rule in the segments file")
        .0;
    assert!(errors[0].file.ends_with("segs.toml"), "{errors:?}");
    assert_eq!(errors[0].position, Some((3, 9)));
}

#[test]
fn a_rule_nested_30000_deep_is_an_error_at_its_position() {
    let rule = format!("{}count(any) > 0{}", "(".repeat(30_000), ")".repeat(30_000));
    let errors = errors_of(&format!("[[segment]]\nid = \"deep\"\nrule = '{rule}'\n"));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("Some((3, ")
            && errors[0].contains("segment 'deep': the rule is nested too deeply"),
        "{errors:?}"
    );
}

#[test]
fn a_segments_file_without_end_is_refused_not_read_forever() {
    let errors = errors_of("segments_file = \"/dev/zero\"\n");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("/dev/zero") && e.contains("larger than")),
        "{errors:?}"
    );
}

#[test]
fn load_str_reads_the_same_as_load() {
    let text = "[[segment]]\nid = \"a\"\nrule = 'count(any) > 1'\n";
    let settings = load_str("inline.toml", text, Path::new("."), &[]).expect("valid");
    assert_eq!(settings.program.segments[0].id, "a");
    let errors =
        load_str("inline.toml", "[[segment]]\nid = 1\n", Path::new("."), &[]).expect_err("invalid");
    assert_eq!(errors.0[0].file, "inline.toml");
}

#[test]
fn the_isolation_level_follows_the_guarantee_unless_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let segment = "[[segment]]\nid = \"s\"\nrule = 'count(any) > 0'\n";
    let read_committed = |processing: &str| {
        let path = write(
            &dir,
            "c.toml",
            &format!("[processing]\n{processing}\n{segment}"),
        );
        load(&path, &[])
            .expect("a valid config")
            .kafka
            .read_committed
    };
    assert!(!read_committed(""), "at-least-once reads everything");
    assert!(read_committed("guarantee = \"exactly_once\""));
    assert!(!read_committed(
        "guarantee = \"exactly_once\"\nisolation = \"read_uncommitted\""
    ));
    assert!(read_committed("isolation = \"read_committed\""));
    let errors = errors_of(&format!(
        "[processing]\nisolation = \"committed\"\n{segment}"
    ));
    assert!(
        errors[0].starts_with("Some((2, 13))") && errors[0].contains("read_committed"),
        "{errors:?}"
    );
}
