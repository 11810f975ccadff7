//! Certificates and TLS configurations: a run's own certificate authority, server and client
//! certificates issued by it (rcgen), and the rustls configurations both ends use — TLS 1.3 only,
//! ALPN [`ALPN`](crate::protocol::ALPN), the ring provider only, mutual authentication unless the
//! server is explicitly configured to accept clients without certificates.
//!
//! A client's identity is the common name of its verified certificate: the name the operator
//! issued it to with `fl-server issue-client`.

use crate::protocol::ALPN;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// Errors building certificates or TLS configurations.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration (e.g. a key that does not match its certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built (e.g. an empty CA file).
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The rustls configuration cannot carry QUIC (no TLS 1.3 suite with an initial cipher).
    #[error("QUIC over this TLS configuration: {0}")]
    Quic(String),
    /// A name cannot go into a certificate.
    #[error("`{0}` is not a valid certificate name (use letters, digits, `-`, `_` and `.`)")]
    InvalidName(String),
}

/// A certificate and its private key, as PEM text.
#[derive(Debug, Clone)]
pub struct PemPair {
    /// The certificate (PEM).
    pub cert: String,
    /// Its private key (PKCS#8 PEM).
    pub key: String,
}

/// Names accepted in certificates we issue: DNS-like labels, so they are safe as file names too.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
}

/// Validity window for certificates issued now: from January 1st of this year for `years` years.
fn set_validity(params: &mut CertificateParams, years: i32) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let year = 1970 + (now / 31_556_952) as i32;
    params.not_before = rcgen::date_time_ymd(year, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + years, 1, 1);
}

fn common_name(params: &mut CertificateParams, name: &str) {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "Shoal");
    params.distinguished_name = dn;
}

/// A new certificate authority named `name` (valid 10 years), able to sign leaf certificates only.
pub fn generate_ca(name: &str) -> Result<PemPair, TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    common_name(&mut params, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut params, 10);
    let cert = params.self_signed(&key)?;
    Ok(PemPair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// What a leaf certificate is for.
#[derive(Debug, Clone)]
pub enum Leaf<'a> {
    /// A server reachable at these DNS names and IP addresses.
    Server {
        /// The server's name (common name).
        name: &'a str,
        /// DNS names and IP addresses (as text) clients connect to.
        subject_alt_names: &'a [String],
    },
    /// A client named `name` (its identity on the server).
    Client {
        /// The client's name.
        name: &'a str,
    },
}

/// Issues a leaf certificate (valid 5 years) signed by the CA in `ca`.
pub fn issue(ca: &PemPair, leaf: Leaf<'_>) -> Result<PemPair, TlsError> {
    let ca_key = KeyPair::from_pem(&ca.key)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = match leaf {
        Leaf::Server {
            name,
            subject_alt_names,
        } => {
            let mut params = CertificateParams::new(subject_alt_names.to_vec())?;
            common_name(&mut params, name);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            params
        }
        Leaf::Client { name } => {
            if !is_valid_name(name) {
                return Err(TlsError::InvalidName(name.to_string()));
            }
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            common_name(&mut params, name);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            params
        }
    };
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, 5);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(PemPair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Reads a PEM pair from files.
pub fn read_pem_pair(cert: &Path, key: &Path) -> Result<PemPair, TlsError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    Ok(PemPair {
        cert: read(cert)?,
        key: read(key)?,
    })
}

fn certificates(pem: &str, what: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: what.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: what.to_path_buf(),
            reason: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

fn private_key(pem: &str, what: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        path: what.to_path_buf(),
        reason: format!("no usable private key: {e}"),
    })
}

fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certificates(ca_pem, Path::new("the CA certificate"))? {
        store.add(cert)?;
    }
    Ok(store)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How a server treats clients without a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client must present a certificate issued by the run's CA (the default).
    Required,
    /// Clients may connect without a certificate (named by their Hello); those that present one
    /// must still present a valid one. Only when the operator configures it explicitly.
    Optional,
}

/// The server's rustls configuration for QUIC.
pub fn server_crypto(
    ca_pem: &str,
    server: &PemPair,
    auth: ClientAuth,
) -> Result<rustls::ServerConfig, TlsError> {
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider());
    let verifier = match auth {
        ClientAuth::Required => builder.build()?,
        ClientAuth::Optional => builder.allow_unauthenticated().build()?,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certificates(&server.cert, Path::new("the server certificate"))?,
            private_key(&server.key, Path::new("the server key"))?,
        )?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.max_early_data_size = u32::MAX;
    Ok(config)
}

/// The client's rustls configuration for QUIC: trusts only the run's CA, and presents `identity`
/// when it has one.
pub fn client_crypto(ca_pem: &str, identity: Option<&PemPair>) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_pem)?);
    let mut config = match identity {
        Some(pair) => builder.with_client_auth_cert(
            certificates(&pair.cert, Path::new("the client certificate"))?,
            private_key(&pair.key, Path::new("the client key"))?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The common name of the first certificate in a verified chain, if it has one.
pub fn certificate_common_name(chain: &[CertificateDer<'static>]) -> Option<String> {
    let first = chain.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(first.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// The common name of the certificate a connected peer presented (verified by the handshake),
/// or `None` for a peer without one.
pub fn peer_name(conn: &quinn::Connection) -> Option<String> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    certificate_common_name(&chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_chain_to_the_ca_and_carry_the_name() {
        let ca = generate_ca("test CA").unwrap();
        let client = issue(&ca, Leaf::Client { name: "phone-7" }).unwrap();
        let chain = certificates(&client.cert, Path::new("x")).unwrap();
        assert_eq!(certificate_common_name(&chain).as_deref(), Some("phone-7"));
        let server = issue(
            &ca,
            Leaf::Server {
                name: "server",
                subject_alt_names: &["localhost".into(), "127.0.0.1".into()],
            },
        )
        .unwrap();
        server_crypto(&ca.cert, &server, ClientAuth::Required).unwrap();
        client_crypto(&ca.cert, Some(&client)).unwrap();
        // A key that is not the certificate's is refused.
        let wrong = PemPair {
            cert: server.cert.clone(),
            key: client.key.clone(),
        };
        assert!(server_crypto(&ca.cert, &wrong, ClientAuth::Required).is_err());
    }

    #[test]
    fn names_that_are_not_labels_are_refused() {
        let ca = generate_ca("test CA").unwrap();
        for bad in ["", "../x", "a b", ".hidden", "é"] {
            assert!(matches!(
                issue(&ca, Leaf::Client { name: bad }),
                Err(TlsError::InvalidName(_))
            ));
        }
    }
}
