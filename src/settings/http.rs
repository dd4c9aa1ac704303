//! The `[http]` section validated: who may call the API (bearer tokens from a file, the config
//! or the environment, or explicitly nobody checked), request limits, preview bounds and TLS.
//! The one hard rule: protected routes are never reachable off loopback without a token unless
//! the operator wrote `http.auth = "none"`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::raw::RawHttp;
use super::{parse_duration, ConfigError};
use crate::auth::{parse_file, TokenEntry, Tokens};

/// Who may call the protected routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpAccess {
    /// No token is asked for: `http.auth = "none"` (`explicit`), or no token is configured and
    /// the API listens on loopback only.
    Open { explicit: bool },
    /// A bearer token with the route's role is required.
    Tokens(Arc<Tokens>),
}

/// Bounds of `POST /segments/preview`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreviewLimits {
    /// Previews running at once; one more is answered 429.
    pub concurrency: usize,
    /// Stored customer states one preview reads at most; the answer says when it stopped.
    pub max_scan: u64,
}

impl Default for PreviewLimits {
    fn default() -> PreviewLimits {
        PreviewLimits {
            concurrency: DEFAULT_PREVIEW_CONCURRENCY,
            max_scan: DEFAULT_PREVIEW_MAX_SCAN,
        }
    }
}

/// Certificate chain and private key (PEM) for HTTPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The validated `[http]` section (the address is `Settings::http_listen`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    pub access: HttpAccess,
    /// Largest request body; larger ones are answered 413.
    pub max_body_bytes: usize,
    /// From a request's first byte to its answer, TLS handshake and body included; a client
    /// that stalls is answered 408 or disconnected.
    pub request_timeout: Duration,
    pub preview: PreviewLimits,
    pub tls: Option<TlsFiles>,
}

/// Where the API listens when `http.listen` is not set: loopback, so that a config without an
/// `[http]` section (a replay config, a first try) never exposes customer data; listening on
/// another address is a decision written down together with tokens.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9898";
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;
pub const DEFAULT_REQUEST_TIMEOUT_MS: i64 = 30_000;
pub const DEFAULT_PREVIEW_CONCURRENCY: usize = 2;
pub const DEFAULT_PREVIEW_MAX_SCAN: u64 = 1_000_000;

/// Whether `listen` (`host:port`) accepts connections from this machine only.
pub fn is_loopback(listen: &str) -> bool {
    if let Ok(address) = listen.parse::<SocketAddr>() {
        return address.ip().is_loopback();
    }
    let host = listen.rsplit_once(':').map_or(listen, |(host, _)| host);
    host.eq_ignore_ascii_case("localhost")
}

/// Validates `raw`; paths are relative to the config file `file`. Problems go to `errors`.
pub fn build(
    file: &str,
    listen: &str,
    raw: RawHttp,
    errors: &mut Vec<ConfigError>,
) -> HttpSettings {
    let base = Path::new(file).parent().unwrap_or(Path::new("."));
    let mut problem = |message: String| {
        errors.push(ConfigError {
            file: file.to_string(),
            position: None,
            message,
        })
    };
    let mut entries: Vec<TokenEntry> = Vec::new();
    if let Some(tokens_file) = &raw.tokens_file {
        let path = base.join(tokens_file);
        match std::fs::read_to_string(&path) {
            Ok(text) => match parse_file(&text) {
                Ok(found) => entries.extend(found),
                Err(bad) => {
                    for (line, reason) in bad {
                        problem(format!(
                            "http.tokens_file {}:{line}: {reason}",
                            path.display()
                        ));
                    }
                }
            },
            Err(error) => problem(format!(
                "http.tokens_file: cannot read {}: {error}",
                path.display()
            )),
        }
    }
    for (idx, text) in raw.tokens.iter().flatten().enumerate() {
        match TokenEntry::parse(text) {
            Ok(entry) => entries.push(entry),
            Err(reason) => problem(format!("http.tokens[{idx}]: {reason}")),
        }
    }
    for (idx, entry) in entries.iter().enumerate() {
        if entries[..idx].iter().any(|other| other.name == entry.name) {
            problem(format!(
                "http tokens: the name {:?} is used twice (names identify callers in the audit log)",
                entry.name
            ));
        }
    }
    let access = match raw.auth.as_deref() {
        Some("none") if !entries.is_empty() => {
            problem(
                "http.auth = \"none\" but tokens are configured: remove one or the other".into(),
            );
            HttpAccess::Open { explicit: true }
        }
        Some("none") => HttpAccess::Open { explicit: true },
        Some("tokens") | None if !entries.is_empty() => {
            HttpAccess::Tokens(Arc::new(Tokens::new(entries)))
        }
        Some("tokens") => {
            problem("http.auth = \"tokens\" but no token is configured: set http.tokens_file (mint one with `segmenter token new --name NAME --role read|admin`)".into());
            HttpAccess::Open { explicit: false }
        }
        None if is_loopback(listen) => HttpAccess::Open { explicit: false },
        None => {
            problem(format!(
                "http.listen = {listen:?} would expose customer data and erasure with no access control: configure tokens (http.tokens_file; mint them with `segmenter token new --name NAME --role read|admin`), listen on 127.0.0.1, or set http.auth = \"none\" explicitly"
            ));
            HttpAccess::Open { explicit: false }
        }
        Some(other) => {
            problem(format!("http.auth = {other:?}: use \"tokens\" or \"none\""));
            HttpAccess::Open { explicit: false }
        }
    };
    let max_body_bytes = match raw.max_body_bytes {
        Some(0) => {
            problem("http.max_body_bytes must be at least 1".into());
            DEFAULT_MAX_BODY_BYTES
        }
        Some(bytes) => bytes,
        None => DEFAULT_MAX_BODY_BYTES,
    };
    let request_timeout_ms = match raw.request_timeout.as_deref().map(parse_duration) {
        None => DEFAULT_REQUEST_TIMEOUT_MS,
        Some(Some(ms)) if ms > 0 => ms,
        Some(_) => {
            problem(format!(
                "http.request_timeout = {:?} is not a positive duration like 30s or 500ms",
                raw.request_timeout.unwrap_or_default()
            ));
            DEFAULT_REQUEST_TIMEOUT_MS
        }
    };
    let concurrency = raw
        .preview_concurrency
        .unwrap_or(DEFAULT_PREVIEW_CONCURRENCY);
    if concurrency == 0 {
        problem("http.preview_concurrency must be at least 1".into());
    }
    let max_scan = raw.preview_max_scan.unwrap_or(DEFAULT_PREVIEW_MAX_SCAN);
    if max_scan == 0 {
        problem("http.preview_max_scan must be at least 1".into());
    }
    let tls = match (raw.tls_cert, raw.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: base.join(cert),
            key: base.join(key),
        }),
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            problem("http.tls_cert and http.tls_key go together: set both or neither".into());
            None
        }
    };
    HttpSettings {
        access,
        max_body_bytes,
        request_timeout: Duration::from_millis(request_timeout_ms as u64),
        preview: PreviewLimits {
            concurrency: concurrency.max(1),
            max_scan: max_scan.max(1),
        },
        tls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{mint, Role};

    fn raw() -> RawHttp {
        toml::from_str("").expect("an empty section")
    }

    fn built(listen: &str, raw: RawHttp) -> (HttpSettings, Vec<String>) {
        let mut errors = Vec::new();
        let settings = build("/etc/segmenter/segmenter.toml", listen, raw, &mut errors);
        (
            settings,
            errors.into_iter().map(|e| e.to_string()).collect(),
        )
    }

    #[test]
    fn no_token_off_loopback_is_refused_unless_auth_none() {
        let (_, errors) = built("0.0.0.0:9898", raw());
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("http.auth = \"none\""), "{errors:?}");
        assert!(
            errors[0].starts_with("/etc/segmenter/segmenter.toml: "),
            "{errors:?}"
        );
        let mut open = raw();
        open.auth = Some("none".into());
        let (settings, errors) = built("0.0.0.0:9898", open);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(settings.access, HttpAccess::Open { explicit: true });
    }

    #[test]
    fn loopback_without_tokens_is_open() {
        for listen in [
            "127.0.0.1:9898",
            "[::1]:9898",
            "localhost:9898",
            "127.0.0.1:0",
        ] {
            let (settings, errors) = built(listen, raw());
            assert!(errors.is_empty(), "{listen}: {errors:?}");
            assert_eq!(settings.access, HttpAccess::Open { explicit: false });
        }
        assert!(!is_loopback("[::]:9898"));
        assert!(!is_loopback("segmenter:9898"));
    }

    #[test]
    fn tokens_from_a_file_and_inline_are_enforced_everywhere() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, ops) = mint("ops", Role::Admin).expect("mint");
        let (ci_token, ci) = mint("ci", Role::Read).expect("mint");
        std::fs::write(
            dir.path().join("tokens"),
            format!("# ours\n{}\n", ops.line()),
        )
        .expect("write");
        let mut with_tokens = raw();
        with_tokens.tokens_file = Some("tokens".into());
        with_tokens.tokens = Some(vec![ci.line()]);
        let mut errors = Vec::new();
        let config = dir.path().join("segmenter.toml").display().to_string();
        let settings = build(&config, "0.0.0.0:9898", with_tokens, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let HttpAccess::Tokens(tokens) = settings.access else {
            panic!("not token access: {:?}", settings.access);
        };
        assert_eq!(tokens.len(), 2);
        assert_eq!(tokens.verify(&ci_token).map(|c| c.role), Some(Role::Read));
    }

    #[test]
    fn bad_values_are_all_reported() {
        let mut bad = raw();
        bad.auth = Some("basic".into());
        bad.tokens_file = Some("missing-tokens".into());
        bad.tokens = Some(vec!["ops:admin:sha256:abc".into()]);
        bad.max_body_bytes = Some(0);
        bad.request_timeout = Some("soon".into());
        bad.preview_concurrency = Some(0);
        bad.preview_max_scan = Some(0);
        bad.tls_cert = Some("cert.pem".into());
        let (_, errors) = built("127.0.0.1:9898", bad);
        for needle in [
            "cannot read /etc/segmenter/missing-tokens",
            "http.tokens[0]: token \"ops\": the hash must be 64 hex digits",
            "http.auth = \"basic\"",
            "http.max_body_bytes",
            "http.request_timeout = \"soon\"",
            "http.preview_concurrency",
            "http.preview_max_scan",
            "http.tls_cert and http.tls_key",
        ] {
            assert!(
                errors.iter().any(|e| e.contains(needle)),
                "no {needle:?} in {errors:#?}"
            );
        }
    }

    #[test]
    fn duplicate_names_and_contradictions_are_refused() {
        let (_, first) = mint("ops", Role::Admin).expect("mint");
        let (_, second) = mint("ops", Role::Read).expect("mint");
        let mut twice = raw();
        twice.tokens = Some(vec![first.line(), second.line()]);
        let (_, errors) = built("127.0.0.1:9898", twice);
        assert!(
            errors.iter().any(|e| e.contains("used twice")),
            "{errors:?}"
        );
        let mut both = raw();
        both.auth = Some("none".into());
        both.tokens = Some(vec![first.line()]);
        let (_, errors) = built("127.0.0.1:9898", both);
        assert!(
            errors.iter().any(|e| e.contains("remove one")),
            "{errors:?}"
        );
        let mut none = raw();
        none.auth = Some("tokens".into());
        let (_, errors) = built("127.0.0.1:9898", none);
        assert!(errors.iter().any(|e| e.contains("no token")), "{errors:?}");
    }
}
