//! Kafka client secrets (`sasl.password`, `ssl.key.password` …): never written in the config,
//! only named there. `[kafka.secrets]` says where each value comes from — an environment
//! variable or a file — and an inline secret in `[kafka.client]`, `[kafka.consumer]` or
//! `[kafka.producer]` is refused with its position. Values are held in [`Secret`], whose `Debug`
//! is redacted, and no message built here contains one.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;
use crate::rules::error::line_col;

/// librdkafka properties whose values are secrets (its own `_RK_SENSITIVE` list, less the ones
/// that hold only a path or a user name): they may only come from `[kafka.secrets]`.
pub const SECRET_KEYS: &[&str] = &[
    "sasl.password",
    "ssl.key.password",
    "ssl.keystore.password",
    "ssl.key.pem",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem",
];

/// Whether `key` names a librdkafka property that holds a secret.
pub fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS.contains(&key)
}

/// A secret value. `Debug` prints no part of it, and there is deliberately no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value, for handing to librdkafka; nothing else should read it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Where a secret was read from (safe to show).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Env(name) => write!(f, "environment variable {name}"),
            SecretSource::File(path) => write!(f, "file {}", path.display()),
        }
    }
}

/// One resolved `[kafka.secrets]` entry: a librdkafka property, where its value came from, and
/// the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSecret {
    pub key: String,
    pub source: SecretSource,
    pub value: Secret,
}

/// The `kafka` section as written, with positions. Only what the secret checks need; the rest
/// of the file is validated by `raw.rs`.
#[derive(Deserialize)]
struct SpannedFile {
    #[serde(default)]
    kafka: SpannedKafka,
}

#[derive(Default, Deserialize)]
struct SpannedKafka {
    #[serde(default)]
    client: BTreeMap<Spanned<String>, serde::de::IgnoredAny>,
    #[serde(default)]
    consumer: BTreeMap<Spanned<String>, serde::de::IgnoredAny>,
    #[serde(default)]
    producer: BTreeMap<Spanned<String>, serde::de::IgnoredAny>,
    /// Loosely typed on purpose: a malformed entry must be reported without echoing it (it may
    /// be the secret itself, written inline).
    #[serde(default)]
    secrets: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
}

/// The pass-through tables of the merged settings (file + `SEGMENTER__*` overrides).
pub struct PassThrough<'a> {
    pub client: &'a BTreeMap<String, String>,
    pub consumer: &'a BTreeMap<String, String>,
    pub producer: &'a BTreeMap<String, String>,
}

/// Checks that no secret is inline and reads every `[kafka.secrets]` entry. `text` is the config
/// file, `config_dir` the directory relative `file` paths start from, `env` the process
/// environment. Problems go to `errors`; the secrets that could be read are returned.
pub fn resolve(
    file: &str,
    text: &str,
    config_dir: &Path,
    merged: PassThrough<'_>,
    env: &[(String, String)],
    errors: &mut Vec<ConfigError>,
) -> Vec<KafkaSecret> {
    // The file already parsed once (strictly) before this runs, so a failure here only means a
    // shape the strict parse reported already.
    let Ok(spanned) = toml::from_str::<SpannedFile>(text) else {
        return Vec::new();
    };
    let mut problem = |offset: Option<usize>, message: String| {
        errors.push(ConfigError {
            file: file.to_string(),
            position: offset.map(|at| line_col(text, at)),
            message,
        })
    };
    let tables = [
        ("client", merged.client, &spanned.kafka.client),
        ("consumer", merged.consumer, &spanned.kafka.consumer),
        ("producer", merged.producer, &spanned.kafka.producer),
    ];
    for (table, values, written) in tables {
        for key in values.keys().filter(|key| is_secret_key(key)) {
            let place = written.keys().find(|k| k.get_ref() == key);
            let origin = match place {
                Some(_) => "",
                None => " (set by a SEGMENTER__ environment override)",
            };
            problem(
                place.map(|k| k.span().start),
                format!(
                    "kafka.{table}.{key:?}: a secret cannot be written in the config{origin}; \
                     name where it comes from instead: [kafka.secrets] {key:?} = {{ env = \"VARIABLE\" }} \
                     or {{ file = \"/run/secrets/NAME\" }}"
                ),
            );
        }
    }
    let mut resolved = Vec::new();
    for (key, entry) in &spanned.kafka.secrets {
        let name = key.get_ref();
        let at = Some(key.span().start);
        let also_inline = [merged.client, merged.consumer, merged.producer]
            .iter()
            .any(|table| table.contains_key(name));
        if also_inline && !is_secret_key(name) {
            problem(
                at,
                format!("kafka.secrets.{name:?}: also set in [kafka.client], [kafka.consumer] or [kafka.producer]; set it in one place"),
            );
            continue;
        }
        let source = match source_of(entry.get_ref(), config_dir) {
            Ok(source) => source,
            Err(reason) => {
                problem(
                    Some(entry.span().start),
                    format!("kafka.secrets.{name:?}: {reason}"),
                );
                continue;
            }
        };
        match read(&source, env) {
            Ok(value) => resolved.push(KafkaSecret {
                key: name.clone(),
                source,
                value,
            }),
            Err(reason) => problem(at, format!("kafka.secrets.{name:?}: {reason}")),
        }
    }
    resolved
}

/// `{ env = "NAME" }` or `{ file = "PATH" }` (relative to the config file's directory). The
/// reasons never quote the entry: it might be the secret.
fn source_of(entry: &toml::Value, config_dir: &Path) -> Result<SecretSource, String> {
    const SHAPE: &str =
        "write { env = \"VARIABLE\" } or { file = \"/path/to/file\" }, never the secret itself";
    let Some(table) = entry.as_table() else {
        return Err(SHAPE.to_string());
    };
    let env = table.get("env");
    let file = table.get("file");
    if table.len() != 1 || (env.is_none() && file.is_none()) {
        return Err(format!("expected exactly one of `env` or `file`: {SHAPE}"));
    }
    match (
        env.and_then(toml::Value::as_str),
        file.and_then(toml::Value::as_str),
    ) {
        (Some(name), None) if !name.is_empty() => Ok(SecretSource::Env(name.to_string())),
        (None, Some(path)) if !path.is_empty() => Ok(SecretSource::File(config_dir.join(path))),
        _ => Err(format!(
            "`env` and `file` take a non-empty string (a variable name or a path): {SHAPE}"
        )),
    }
}

/// Reads a secret. A file's one trailing newline (as `echo` or an editor leaves) is not part of
/// it.
fn read(source: &SecretSource, env: &[(String, String)]) -> Result<Secret, String> {
    let value = match source {
        SecretSource::Env(name) => match env.iter().find(|(key, _)| key == name) {
            Some((_, value)) => value.clone(),
            None => return Err(format!("environment variable {name} is not set")),
        },
        SecretSource::File(path) => match std::fs::read(path) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => text,
                Err(_) => return Err(format!("{} is not UTF-8 text", path.display())),
            },
            Err(error) => return Err(format!("cannot read {}: {error}", path.display())),
        },
    };
    let trimmed = value
        .strip_suffix("\r\n")
        .or_else(|| value.strip_suffix('\n'))
        .unwrap_or(&value);
    if trimmed.is_empty() {
        return Err(format!("{source} is empty"));
    }
    Ok(Secret(trimmed.to_string()))
}

#[cfg(test)]
mod tests {
    use super::super::load;
    use super::*;

    const SEGMENT: &str = "[[segment]]\nid = \"s\"\nrule = 'count(any) > 0'\n";

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("writing a test file");
        path
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn errors_of(text: &str, environment: &[(String, String)]) -> Vec<ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "c.toml", text);
        match load(&path, environment) {
            Ok(_) => panic!("expected errors for:\n{text}"),
            Err(errors) => errors.0,
        }
    }

    #[test]
    fn an_inline_secret_is_refused_with_its_position_and_without_its_value() {
        let text = format!(
            "{SEGMENT}[kafka.client]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.password\" = \"hunter2-inline\"\n\n\
             [kafka.producer]\n\"ssl.key.password\" = \"key-pass-inline\"\n"
        );
        let errors = errors_of(&text, &[]);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].position, Some((6, 1)), "{errors:?}");
        assert!(
            errors[0].message.contains(
                "kafka.client.\"sasl.password\": a secret cannot be written in the config"
            ),
            "{errors:?}"
        );
        assert!(errors[0].message.contains("[kafka.secrets]"), "{errors:?}");
        assert_eq!(errors[1].position, Some((9, 1)), "{errors:?}");
        let shown = format!("{errors:?} {}", super::super::ConfigErrors(errors.clone()));
        assert!(!shown.contains("hunter2-inline"), "{shown}");
        assert!(!shown.contains("key-pass-inline"), "{shown}");
    }

    #[test]
    fn secrets_come_from_the_environment_and_files_and_debug_hides_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(&dir, "key-password", "file-secret-value\n");
        let text = format!(
            "{SEGMENT}[kafka.client]\n\"sasl.username\" = \"segmenter\"\n\n[kafka.secrets]\n\
             \"sasl.password\" = {{ env = \"TEST_KAFKA_PASSWORD\" }}\n\
             \"ssl.key.password\" = {{ file = \"key-password\" }}\n"
        );
        let path = write(&dir, "c.toml", &text);
        let environment = env(&[("TEST_KAFKA_PASSWORD", "env-secret-value")]);
        let settings = load(&path, &environment).expect("a valid config");
        let config = crate::kafka::base_config(&settings.kafka);
        assert_eq!(config.get("sasl.password"), Some("env-secret-value"));
        assert_eq!(
            config.get("ssl.key.password"),
            Some("file-secret-value"),
            "one trailing newline is not part of a file's secret"
        );
        assert_eq!(config.get("sasl.username"), Some("segmenter"));
        let sources: Vec<String> = settings
            .kafka
            .secrets
            .iter()
            .map(|s| format!("{} {}", s.key, s.source))
            .collect();
        assert_eq!(
            sources,
            vec![
                "sasl.password environment variable TEST_KAFKA_PASSWORD".to_string(),
                format!(
                    "ssl.key.password file {}",
                    dir.path().join("key-password").display()
                ),
            ]
        );
        for shown in [
            format!("{settings:?}"),
            format!("{:?}", settings.kafka),
            format!("{config:?}"),
        ] {
            assert!(!shown.contains("env-secret-value"), "{shown}");
            assert!(!shown.contains("file-secret-value"), "{shown}");
        }
    }

    #[test]
    fn a_secret_that_cannot_be_read_is_an_error_naming_its_source_only() {
        let text = format!(
            "{SEGMENT}[kafka.secrets]\n\"sasl.password\" = {{ env = \"NOT_SET_ANYWHERE\" }}\n\
             \"ssl.key.password\" = {{ file = \"/nonexistent/segmenter/secret\" }}\n\
             \"ssl.keystore.password\" = \"inline-in-secrets\"\n\
             \"sasl.oauthbearer.client.secret\" = {{ env = \"EMPTY_ONE\" }}\n\
             \"ssl.key.pem\" = {{ env = \"A\", file = \"b\" }}\n"
        );
        let environment = env(&[("EMPTY_ONE", "")]);
        let errors = errors_of(&text, &environment);
        let messages: Vec<String> = errors
            .iter()
            .map(|e| format!("{:?} {}", e.position, e.message))
            .collect();
        assert_eq!(messages.len(), 5, "{messages:#?}");
        let find = |needle: &str| {
            messages
                .iter()
                .find(|m| m.contains(needle))
                .unwrap_or_else(|| panic!("no error with {needle:?} in {messages:#?}"))
        };
        assert!(
            find("environment variable NOT_SET_ANYWHERE is not set").starts_with("Some((5, 1))")
        );
        find("cannot read /nonexistent/segmenter/secret");
        let inline = find("kafka.secrets.\"ssl.keystore.password\": write");
        assert!(inline.starts_with("Some((7, 27))"), "{inline}");
        find("environment variable EMPTY_ONE is empty");
        find("expected exactly one of `env` or `file`");
        assert!(!format!("{messages:?}").contains("inline-in-secrets"));
    }

    #[test]
    fn a_secret_key_may_be_named_in_secrets_only_once() {
        let text = format!(
            "{SEGMENT}[kafka.client]\n\"sasl.username\" = \"a\"\n\n[kafka.secrets]\n\
             \"sasl.username\" = {{ env = \"USER_FROM_ENV\" }}\n"
        );
        let errors = errors_of(&text, &env(&[("USER_FROM_ENV", "b")]));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].message.contains("set it in one place"),
            "{errors:?}"
        );
    }

    /// `SEGMENTER__KAFKA__CLIENT__…` cannot carry a dotted librdkafka key (the `config` crate
    /// splits keys on `.`), and whatever such an override does, the value is not echoed.
    #[test]
    fn a_secret_cannot_arrive_through_an_environment_override() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "c.toml", SEGMENT);
        for key in [
            "SEGMENTER__KAFKA__CLIENT__SASL.PASSWORD",
            "SEGMENTER__KAFKA__CLIENT__sasl.password",
        ] {
            let environment = env(&[(key, "override-secret-value")]);
            let errors = load(&path, &environment).expect_err("refused").0;
            let shown = format!("{errors:?}");
            assert!(!shown.contains("override-secret-value"), "{shown}");
        }
    }
}
