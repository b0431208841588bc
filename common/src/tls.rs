//! TLS client settings for MQTT links (the simulator's devices, and the gateway's own session):
//! the server certificate is verified against a CA file, never skipped.

use std::{fs, path::Path, sync::Arc};

use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName},
};

/// Why a CA file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Io {
        /// The CA file.
        file: String,
        /// The cause.
        source: std::io::Error,
    },
    /// No certificate could be used from it.
    #[error("{file}: {why}")]
    Certificates {
        /// The CA file.
        file: String,
        /// What was wrong.
        why: String,
    },
}

/// A verified TLS client: its configuration and the name the broker's certificate must carry.
#[derive(Debug, Clone)]
pub struct Tls {
    /// Trust anchors and protocol settings.
    pub config: Arc<ClientConfig>,
    /// The broker's DNS name or IP address, as in its certificate.
    pub server_name: ServerName<'static>,
}

impl Tls {
    /// Trusts the CAs in `ca_file`; the broker must present a certificate for `host`.
    pub fn new(ca_file: &Path, host: &str) -> Result<Self, TlsError> {
        let server_name =
            ServerName::try_from(host.to_owned()).map_err(|e| TlsError::Certificates {
                file: ca_file.display().to_string(),
                why: format!("server name {host:?}: {e}"),
            })?;
        Ok(Tls { config: client_config(ca_file)?, server_name })
    }
}

/// The host part of a broker URL (`mqtts://HOST:PORT`, `[v6]` unbracketed): the name its
/// certificate must carry.
pub fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.rsplit_once(':').map_or(rest, |(h, _)| h).trim_matches(['[', ']'])
}

/// The PEM certificates in `file` (a CA bundle, or a server's chain).
pub fn certificates(file: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let name = file.display().to_string();
    let pem = fs::read(file).map_err(|source| TlsError::Io { file: name.clone(), source })?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificates { file: name.clone(), why: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Certificates {
            file: name,
            why: "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
        });
    }
    Ok(certs)
}

/// A client configuration that trusts only the CAs in `ca_file` (TLS 1.2 and 1.3, ring).
pub fn client_config(ca_file: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let name = ca_file.display().to_string();
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca_file)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Certificates { file: name.clone(), why: e.to_string() })?;
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Certificates { file: name, why: e.to_string() })?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_ca_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("ca.pem");
        let e = client_config(&missing).unwrap_err().to_string();
        assert!(e.contains("ca.pem"), "{e}");
        fs::write(&missing, "not a certificate\n").unwrap();
        let e = client_config(&missing).unwrap_err().to_string();
        assert!(e.contains("ca.pem") && e.contains("no PEM certificate"), "{e}");
    }
}
