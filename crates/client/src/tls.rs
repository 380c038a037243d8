//! TLS for `wss://` servers: the system's trusted roots, plus the certificates of a private CA
//! given in a PEM file. rustls with the ring provider, as the server uses.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use std::path::Path;
use std::sync::Arc;

/// The TLS settings for connecting to `wss://` servers, trusting the system's roots and the
/// certificates in `ca` (PEM), if given. The error says what could not be read.
pub fn client_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A system root rustls cannot parse is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    if let Some(ca) = ca {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .map_err(|e| format!("cannot read CA certificates from {}: {e}", ca.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{} is not a PEM certificate file: {e}", ca.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "{} holds no certificate (expected PEM blocks \"BEGIN CERTIFICATE\")",
                ca.display()
            ));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("a certificate in {} cannot be trusted: {e}", ca.display()))?;
        }
    }
    if roots.is_empty() {
        return Err(
            "no trusted certificate authority: the system has none installed; give the server's CA with --ca FILE".into(),
        );
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The ring crypto provider (see the server's TLS module for why ring).
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
