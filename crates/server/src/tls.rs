//! TLS for the listener: the certificate chain and key from PEM files, read at start and again
//! on SIGHUP (a renewed certificate is taken up without a restart; connections already open
//! keep the one they began with). rustls with the ring provider, TLS 1.2 and 1.3, HTTP/1.1 by
//! ALPN (WebSockets upgrade from it).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tokio_rustls::TlsAcceptor;

/// The listener's TLS settings, replaceable while the server runs.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
}

/// Why the certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(String);

impl Tls {
    /// Reads the certificate chain and key.
    pub fn load(cert: &Path, key: &Path) -> Result<Tls, TlsError> {
        Ok(Tls {
            current: RwLock::new(server_config(cert, key)?),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        })
    }

    /// Reads the files again; on failure the settings in use stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = server_config(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// An acceptor with the settings in use now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        TlsAcceptor::from(config)
    }
}

fn server_config(cert: &Path, key_path: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| {
            TlsError(format!(
                "cannot read certificates from {}: {e}",
                cert.display()
            ))
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| {
            TlsError(format!(
                "{} is not a PEM certificate chain: {e}",
                cert.display()
            ))
        })?;
    if chain.is_empty() {
        return Err(TlsError(format!(
            "{} holds no certificate (expected PEM blocks \"BEGIN CERTIFICATE\")",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
        TlsError(format!(
            "cannot read a private key (PKCS#8, PKCS#1 or SEC1 PEM) from {}: {e}",
            key_path.display()
        ))
    })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            TlsError(format!(
                "the key in {} does not go with the certificate in {}, or is unusable: {e}",
                key_path.display(),
                cert.display()
            ))
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The ring crypto provider: it builds with nothing beyond a C compiler (aws-lc-rs, rustls'
/// default, wants more), at the cost of the post-quantum key exchange rustls offers with it.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS client for the server's own outgoing connections (the webhook), trusting the system's
/// certificate authorities.
pub fn client_connector() -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system root rustls cannot parse is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err("the system has no trusted certificate authority installed".into());
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
