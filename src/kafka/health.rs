//! What the Kafka clients last reported about reaching the brokers, for logs and `/readyz`: a
//! refused TLS handshake, a failed SASL login, an unreachable broker. librdkafka says only
//! "certificate verify failed" when it rejects a broker's certificate, so on that error a
//! one-off TLS handshake of our own (OpenSSL, the same CA settings) finds out why — expired,
//! not signed by the configured CA, wrong host name — and that is what gets reported.
//!
//! Nothing here stops the service: librdkafka keeps reconnecting with backoff, and the service
//! stays up and not ready until Kafka can be reached.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openssl::ssl::{HandshakeError, SslConnector, SslMethod, SslVerifyMode};
use openssl::x509::{X509VerifyResult, X509};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::settings::KafkaSettings;

/// A reported problem is dropped when no client has repeated it for this long (librdkafka
/// reports a persisting failure again at each reconnect, at most `reconnect.backoff.max.ms`,
/// 10 s by default, apart).
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// A TLS or SASL problem is not replaced by the less telling "all brokers are down" that
/// follows it.
const SPECIFIC_WINS_FOR: Duration = Duration::from_secs(30);

/// A client's errors of one kind are logged at most this often (the rest are counted).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// At most one certificate diagnosis per this interval.
const DIAGNOSE_EVERY: Duration = Duration::from_secs(30);

/// How long the diagnostic connection and handshake may take.
const DIAGNOSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tls,
    Authentication,
    Transport,
}

#[derive(Debug, Clone)]
struct Problem {
    kind: Kind,
    text: String,
    at: Instant,
}

/// The CA settings the diagnosis verifies a broker certificate with (librdkafka's).
#[derive(Debug, Clone, Default)]
struct TlsTrust {
    ca_location: Option<String>,
    ca_pem: Option<String>,
    verify_hostname: bool,
}

/// Shared by every Kafka client of the service (their `error` callbacks report here).
pub struct ClientHealth {
    problem: Mutex<Option<Problem>>,
    trust: TlsTrust,
    diagnosing: AtomicBool,
    last_diagnosis: Mutex<Option<Instant>>,
    /// When each (client, kind) was last logged, and how many reports were not logged since:
    /// librdkafka reports a persisting failure many times a second across its brokers.
    logged: Mutex<Vec<(String, Kind, Instant, u64)>>,
}

impl ClientHealth {
    pub fn new(settings: &KafkaSettings) -> Arc<ClientHealth> {
        let get = |key: &str| {
            let secret = settings.secrets.iter().find(|s| s.key == key);
            secret
                .map(|s| s.value.expose().to_string())
                .or_else(|| settings.client.get(key).cloned())
        };
        let trust = TlsTrust {
            ca_location: get("ssl.ca.location"),
            ca_pem: get("ssl.ca.pem"),
            verify_hostname: get("ssl.endpoint.identification.algorithm")
                .is_none_or(|algorithm| algorithm.eq_ignore_ascii_case("https")),
        };
        Arc::new(ClientHealth {
            problem: Mutex::new(None),
            trust,
            diagnosing: AtomicBool::new(false),
            last_diagnosis: Mutex::new(None),
            logged: Mutex::new(Vec::new()),
        })
    }

    /// A client's error callback (a librdkafka thread: this never blocks on the network).
    pub fn report(self: &Arc<Self>, client: &str, error: &KafkaError, reason: &str) {
        let kind = match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::SSL) => Kind::Tls,
            Some(RDKafkaErrorCode::Authentication) => Kind::Authentication,
            _ if reason.contains("certificate verify failed") => Kind::Tls,
            _ => Kind::Transport,
        };
        if let Some(suppressed) = self.due_for_log(client, kind) {
            tracing::warn!(client, %error, reason, suppressed, "kafka client error (retrying)");
        }
        let text = match kind {
            Kind::Tls => format!("TLS handshake refused: {reason}"),
            Kind::Authentication => format!("SASL authentication failed: {reason}"),
            Kind::Transport => format!("cannot reach the brokers: {reason}"),
        };
        self.record(kind, text);
        if kind == Kind::Tls && reason.contains("certificate verify failed") {
            self.diagnose_in_background(reason);
        }
    }

    /// `Some(reports not logged since the last line)` when this (client, kind) may be logged
    /// again: at most once per [`LOG_EVERY`].
    fn due_for_log(&self, client: &str, kind: Kind) -> Option<u64> {
        let Ok(mut logged) = self.logged.lock() else {
            return Some(0);
        };
        let now = Instant::now();
        let found = logged
            .iter_mut()
            .find(|(c, k, _, _)| c == client && *k == kind);
        match found {
            None => {
                logged.push((client.to_string(), kind, now, 0));
                Some(0)
            }
            Some((_, _, at, skipped)) if now.duration_since(*at) >= LOG_EVERY => {
                let suppressed = *skipped;
                *at = now;
                *skipped = 0;
                Some(suppressed)
            }
            Some((_, _, _, skipped)) => {
                *skipped += 1;
                None
            }
        }
    }

    fn record(&self, kind: Kind, text: String) {
        let Ok(mut problem) = self.problem.lock() else {
            return;
        };
        let now = Instant::now();
        let keep_specific = problem.as_ref().is_some_and(|p| {
            p.kind != Kind::Transport
                && kind == Kind::Transport
                && now.duration_since(p.at) < SPECIFIC_WINS_FOR
        });
        if keep_specific {
            return;
        }
        // A diagnosis says more than librdkafka's words for the same failure: keep it, just
        // note that the failure goes on.
        if let Some(current) = problem
            .as_mut()
            .filter(|p| p.kind == kind && kind == Kind::Tls)
        {
            if current.text.starts_with("TLS: ") {
                current.at = now;
                return;
            }
        }
        *problem = Some(Problem {
            kind,
            text,
            at: now,
        });
    }

    /// Kafka answered (metadata, an assignment): whatever was wrong is over.
    pub fn clear(&self) {
        if let Ok(mut problem) = self.problem.lock() {
            *problem = None;
        }
    }

    /// The current problem in plain words, if a client reported one recently.
    pub fn problem(&self) -> Option<String> {
        let problem = self.problem.lock().ok()?;
        problem
            .as_ref()
            .filter(|p| p.at.elapsed() < FORGET_AFTER)
            .map(|p| p.text.clone())
    }

    /// Runs [`diagnose_certificate`] on a thread of its own, at most once per
    /// [`DIAGNOSE_EVERY`], and records what it finds.
    fn diagnose_in_background(self: &Arc<Self>, reason: &str) {
        let Some(broker) = broker_of(reason) else {
            return;
        };
        if let Ok(mut last) = self.last_diagnosis.lock() {
            if last.is_some_and(|at| at.elapsed() < DIAGNOSE_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        if self.diagnosing.swap(true, Ordering::AcqRel) {
            return;
        }
        let health = self.clone();
        let spawned = std::thread::Builder::new()
            .name("kafka-tls-diagnosis".into())
            .spawn(move || {
                let finding = diagnose_certificate(&broker, &health.trust);
                health.diagnosing.store(false, Ordering::Release);
                let Some(finding) = finding else {
                    return;
                };
                tracing::error!(
                    %broker,
                    problem = %finding,
                    "kafka broker certificate rejected"
                );
                health.record(
                    Kind::Tls,
                    format!("TLS: broker {broker} certificate rejected: {finding}"),
                );
            });
        if spawned.is_err() {
            self.diagnosing.store(false, Ordering::Release);
        }
    }
}

/// `host:port` of the broker a librdkafka error is about (`ssl://HOST:PORT/ID: …`).
fn broker_of(reason: &str) -> Option<String> {
    let (_, rest) = reason.split_once("://")?;
    let end = rest.find('/')?;
    let address = &rest[..end];
    address.contains(':').then(|| address.to_string())
}

/// Connects to `broker` and verifies its certificate as librdkafka would; returns why it is
/// refused (OpenSSL's verify result, with the certificate's subject and validity), or `None`
/// if it is accepted here or the broker cannot be reached.
fn diagnose_certificate(broker: &str, trust: &TlsTrust) -> Option<String> {
    let (host, _) = broker.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut builder = SslConnector::builder(SslMethod::tls_client()).ok()?;
    // After a failed handshake OpenSSL no longer holds the peer's certificate: note the first
    // one that fails verification (and why) while it is being verified.
    let refused: Arc<Mutex<Option<(X509VerifyResult, String)>>> = Arc::new(Mutex::new(None));
    let noted = refused.clone();
    builder.set_verify_callback(SslVerifyMode::PEER, move |preverified, context| {
        if !preverified {
            if let (Some(cert), Ok(mut slot)) = (context.current_cert(), noted.lock()) {
                slot.get_or_insert((context.error(), describe(cert)));
            }
        }
        preverified
    });
    load_trust(&mut builder, trust)?;
    let connector = builder.build();
    let mut config = connector.configure().ok()?;
    config.set_verify_hostname(trust.verify_hostname);
    let address = broker.to_socket_addrs().ok()?.next()?;
    let stream = TcpStream::connect_timeout(&address, DIAGNOSE_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(DIAGNOSE_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(DIAGNOSE_TIMEOUT)).ok()?;
    match config.connect(host, stream) {
        Ok(_) => None,
        Err(HandshakeError::Failure(failed)) => {
            let noted = refused.lock().ok().and_then(|slot| slot.clone());
            if let Some((verdict, certificate)) = noted {
                return Some(format!("{}{certificate}", verdict.error_string()));
            }
            let verdict = failed.ssl().verify_result();
            if verdict == X509VerifyResult::OK {
                return Some(failed.error().to_string());
            }
            Some(verdict.error_string().to_string())
        }
        Err(other) => Some(other.to_string()),
    }
}

/// Trusts what librdkafka would: `ssl.ca.pem`, else `ssl.ca.location` (a file or a directory
/// of PEM files; `probe` or unset means the system's default locations).
fn load_trust(builder: &mut openssl::ssl::SslConnectorBuilder, trust: &TlsTrust) -> Option<()> {
    if let Some(pem) = &trust.ca_pem {
        for cert in X509::stack_from_pem(pem.as_bytes()).ok()? {
            builder.cert_store_mut().add_cert(cert).ok()?;
        }
        return Some(());
    }
    match trust.ca_location.as_deref() {
        None | Some("probe") => builder.set_default_verify_paths().ok(),
        Some(location) if Path::new(location).is_dir() => {
            for entry in std::fs::read_dir(location).ok()?.flatten() {
                let Ok(pem) = std::fs::read(entry.path()) else {
                    continue;
                };
                for cert in X509::stack_from_pem(&pem).unwrap_or_default() {
                    // A certificate present twice is not an error worth stopping for.
                    let _ = builder.cert_store_mut().add_cert(cert);
                }
            }
            Some(())
        }
        Some(file) => builder.set_ca_file(file).ok(),
    }
}

/// ` (certificate CN=…, issued by CN=…, valid from … until …)`.
fn describe(cert: &openssl::x509::X509Ref) -> String {
    format!(
        " (certificate {}, issued by {}, valid from {} until {})",
        name_of(cert.subject_name()),
        name_of(cert.issuer_name()),
        cert.not_before(),
        cert.not_after()
    )
}

fn name_of(name: &openssl::x509::X509NameRef) -> String {
    let parts: Vec<String> = name
        .entries()
        .filter_map(|entry| {
            let key = entry.object().nid().short_name().ok()?;
            let value = entry.data().to_string().ok()?;
            Some(format!("{key}={value}"))
        })
        .collect();
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_is_read_from_librdkafkas_message() {
        let reason = "ssl://127.0.0.1:29102/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed";
        assert_eq!(broker_of(reason).as_deref(), Some("127.0.0.1:29102"));
        assert_eq!(
            broker_of("sasl_ssl://kafka-1.example.com:9093/1: x").as_deref(),
            Some("kafka-1.example.com:9093")
        );
        assert_eq!(broker_of("1/1 brokers are down"), None);
    }

    #[test]
    fn a_tls_problem_is_not_replaced_by_the_outage_that_follows_it_and_clears() {
        let settings = KafkaSettings {
            brokers: "b:1".into(),
            group_id: "g".into(),
            instance_id: None,
            client: Default::default(),
            consumer: Default::default(),
            producer: Default::default(),
            secrets: Vec::new(),
            guarantee: Default::default(),
            read_committed: false,
        };
        let health = ClientHealth::new(&settings);
        assert_eq!(health.problem(), None);
        health.report(
            "consumer",
            &KafkaError::Global(RDKafkaErrorCode::SSL),
            "ssl://b:1/bootstrap: SSL handshake failed: unexpected eof",
        );
        health.report(
            "consumer",
            &KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
        let problem = health.problem().expect("a problem");
        assert!(problem.starts_with("TLS handshake refused"), "{problem}");
        health.clear();
        assert_eq!(health.problem(), None);
    }
}
