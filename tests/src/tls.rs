//! Self-signed certificates for TLS listeners.

use std::path::Path;

/// Writes `cert.pem` and `key.pem` for `localhost` and `127.0.0.1` into `dir`; returns the
/// certificate PEM for clients to trust.
pub fn write_self_signed(dir: &Path) -> String {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("generate a certificate");
    let cert = certified.cert.pem();
    std::fs::write(dir.join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem()).unwrap();
    cert
}
