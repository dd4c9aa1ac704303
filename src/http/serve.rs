//! The HTTP port itself: an accept loop over plain TCP or TLS (rustls with the `ring`
//! provider), one HTTP/1.1 connection task per client with a deadline on reading request
//! headers and on the TLS handshake, and graceful shutdown. What a request gets is the
//! router's business (`http.rs`).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::settings::TlsFiles;

/// A TLS setup that cannot be used, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("http.tls_cert {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("http.tls_key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("http.tls_cert / http.tls_key: {0}")]
    Config(String),
}

/// The rustls server configuration of `files` (HTTP/1.1, TLS 1.2 and 1.3, no client certs).
pub fn tls_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let cert_error = |reason: String| TlsError::Cert {
        path: files.cert.display().to_string(),
        reason,
    };
    let chain = read_certs(&files.cert).map_err(cert_error)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|error| TlsError::Key {
        path: files.key.display().to_string(),
        reason: format!("no usable PEM private key ({error})"),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Config(error.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|error| {
            TlsError::Config(format!("the key does not fit the certificate: {error}"))
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|error| format!("cannot read PEM certificates ({error})"))?
        .collect::<Result<_, _>>()
        .map_err(|error| format!("bad PEM certificate ({error})"))?;
    if chain.is_empty() {
        return Err("no PEM certificate in the file".into());
    }
    Ok(chain)
}

/// Serves `router` on `listener` (TLS when `tls` is set) until `shutdown` completes; then stops
/// accepting, lets each open connection finish its request, and waits for them at most
/// `timeout`. `timeout` also bounds a TLS handshake and the reading of a request's headers.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let acceptor = tls.map(TlsAcceptor::from);
    // Every connection task holds a receiver; `closing` tells them to finish, and
    // `closed()` resolves once all are gone.
    let (closing, connections) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "http accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let connection = Connection {
            router: router.clone(),
            timeout,
            closing: connections.clone(),
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            match acceptor {
                None => connection.serve(stream).await,
                Some(acceptor) => connection.serve_tls(stream, &acceptor, peer).await,
            }
        });
    }
    drop(connections);
    let _ = closing.send(true);
    let _ = tokio::time::timeout(timeout, closing.closed()).await;
    Ok(())
}

/// One client connection.
struct Connection {
    router: Router,
    timeout: Duration,
    /// Turns true at shutdown; dropped when the connection ends.
    closing: watch::Receiver<bool>,
}

impl Connection {
    async fn serve_tls(
        self,
        stream: TcpStream,
        acceptor: &TlsAcceptor,
        peer: std::net::SocketAddr,
    ) {
        match tokio::time::timeout(self.timeout, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => self.serve(tls).await,
            Ok(Err(error)) => tracing::debug!(%peer, %error, "tls handshake failed"),
            Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
        }
    }

    async fn serve<IO>(mut self, io: IO)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let service = TowerToHyperService::new(self.router);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.timeout);
        let connection = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(connection);
        let mut shutting_down = false;
        loop {
            tokio::select! {
                outcome = connection.as_mut() => {
                    if let Err(error) = outcome {
                        tracing::debug!(%error, "http connection ended with an error");
                    }
                    return;
                }
                changed = self.closing.changed(), if !shutting_down => {
                    shutting_down = true;
                    if changed.is_ok() {
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}
