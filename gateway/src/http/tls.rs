//! HTTPS for the operators' API: a rustls server configuration from PEM files, and a listener
//! for `axum::serve` that completes TLS handshakes concurrently (a slow or hostile client's
//! handshake never holds up the next connection) with a time limit.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use gridsense_common::tls::{TlsError, certificates};
use rustls::ServerConfig;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

/// Longest a client may take to complete its handshake.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// Most handshakes under way at once; more connections wait in the listen queue.
const HANDSHAKES_AT_ONCE: usize = 256;

/// A server configuration for the certificate chain in `cert_file` and the private key in
/// `key_file` (PEM; PKCS#8, PKCS#1 or SEC1). HTTP/1.1 only, TLS 1.2 and 1.3.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(cert_file)?;
    let key_name = key_file.display().to_string();
    let pem = std::fs::read(key_file)
        .map_err(|source| TlsError::Io { file: key_name.clone(), source })?;
    let key = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| TlsError::Certificates { file: key_name.clone(), why: e.to_string() })?
        .ok_or_else(|| TlsError::Certificates {
            file: key_name.clone(),
            why: "no PEM private key in it".into(),
        })?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Certificates { file: key_name.clone(), why: e.to_string() })?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Certificates {
                file: key_name,
                why: format!("the key does not fit the certificate: {e}"),
            })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts TCP connections and hands over those whose TLS handshake completed.
#[derive(Debug)]
pub struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `listener`.
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, accepted) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_AT_ONCE));
        tokio::spawn(async move {
            while !tx.is_closed() {
                let Ok(permit) = handshakes.clone().acquire_owned().await else { break };
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors and the like: pause instead of spinning.
                        tracing::warn!("https accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_LIMIT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { accepted, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(connection) => connection,
            // The accept task ended (its listener failed for good): serve no more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
