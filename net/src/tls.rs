//! TLS (rustls) for our servers and the clients that call them, from PEM
//! files that are read again when they change: a certificate rotated on
//! disk is served from the next connection on, without a restart.
//!
//! A server ([`ServerTls`]) presents a certificate and key, and with a client
//! CA accepts only clients presenting a certificate it issued (a node's peer
//! port: mutual TLS). A client ([`client_config`]) trusts one CA and may
//! present its own certificate ([`Identity`]); both are re-read on change.
//!
//! A change is seen by the files' size, modification time and inode, checked
//! at each handshake (a few `stat`s). Files that do not load (a key written
//! before its certificate, a half-written file) leave the last good
//! configuration in use and are tried again once they change again.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::DigitallySignedStruct;
use rustls::SignatureScheme;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM {what}")]
    NoPem { what: &'static str, path: PathBuf },
    #[error("{what} {path}: {source}")]
    Rustls {
        what: &'static str,
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("CA {path}: {message}")]
    Ca { path: PathBuf, message: String },
    /// PEM held in memory (a Kubernetes Secret's data), not in a file.
    #[error("{what}: {message}")]
    Pem { what: &'static str, message: String },
}

/// The one crypto provider we use (aws-lc-rs, rustls' default), named
/// explicitly so that no process-wide default has to be installed first.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A server's certificate and key files, and the CA whose certificates its
/// clients must present (mutual TLS) when there is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// A file as last seen: (size, modification time, inode); `None` when it
/// cannot be read.
type Stamp = Option<(u64, std::time::SystemTime, u64)>;

fn stamps(paths: &[&Path]) -> Vec<Stamp> {
    use std::os::unix::fs::MetadataExt;
    paths
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.len(), m.modified().ok()?, m.ino()))
        })
        .collect()
}

/// A value built from files, built again when they change.
struct Reloading<T> {
    what: &'static str,
    paths: Vec<PathBuf>,
    load: fn(&[PathBuf]) -> Result<T, TlsError>,
    state: Mutex<ReloadState<T>>,
}

struct ReloadState<T> {
    seen: Vec<Stamp>,
    current: Arc<T>,
    /// The stamps of files that last failed to load: not tried (nor logged)
    /// again until they change.
    failed: Option<Vec<Stamp>>,
}

impl<T> Reloading<T> {
    fn new(
        what: &'static str,
        paths: Vec<PathBuf>,
        load: fn(&[PathBuf]) -> Result<T, TlsError>,
    ) -> Result<Self, TlsError> {
        let seen = stamps(&paths.iter().map(PathBuf::as_path).collect::<Vec<_>>());
        let current = Arc::new(load(&paths)?);
        Ok(Reloading {
            what,
            paths,
            load,
            state: Mutex::new(ReloadState {
                seen,
                current,
                failed: None,
            }),
        })
    }

    fn get(&self) -> Arc<T> {
        let now = stamps(&self.paths.iter().map(PathBuf::as_path).collect::<Vec<_>>());
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now == st.seen || st.failed.as_ref() == Some(&now) {
            return st.current.clone();
        }
        match (self.load)(&self.paths) {
            Ok(v) => {
                tracing::info!(what = self.what, files = ?self.paths, "TLS files changed; reloaded");
                st.current = Arc::new(v);
                st.seen = now;
                st.failed = None;
            }
            Err(e) => {
                tracing::warn!(what = self.what, error = %e, "TLS files changed but do not load; keeping the previous ones");
                st.failed = Some(now);
            }
        }
        st.current.clone()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The certificates of a PEM file (a chain, or a CA bundle).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read("certificate", path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoPem {
            what: "certificate",
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("private key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::NoPem {
        what: "private key",
        path: path.to_path_buf(),
    })
}

/// A CA bundle as a trust store.
pub fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::Ca {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// A certificate chain and the key it certifies; refused when they do not
/// belong together (a rotation seen between writing the two files).
fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    CertifiedKey::from_der(read_certs(cert)?, read_key(key)?, &provider()).map_err(|source| {
        TlsError::Rustls {
            what: "certificate and key",
            path: cert.to_path_buf(),
            source,
        }
    })
}

fn load_server(paths: &[PathBuf]) -> Result<ServerConfig, TlsError> {
    let (cert, key) = (&paths[0], &paths[1]);
    let ck = Arc::new(certified_key(cert, key)?);
    let rustls_err = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Rustls { what, path, source }
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_err("protocol versions", cert))?;
    let builder = match paths.get(2) {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(read_roots(ca)?),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::Ca {
                path: ca.clone(),
                message: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(ck)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A server's TLS configuration, built again from its files when they change.
pub struct ServerTls(Reloading<ServerConfig>);

impl ServerTls {
    /// Loads the files now: an error here is a configuration error.
    pub fn load(files: &ServerFiles) -> Result<Arc<ServerTls>, TlsError> {
        let mut paths = vec![files.cert.clone(), files.key.clone()];
        paths.extend(files.client_ca.clone());
        Ok(Arc::new(ServerTls(Reloading::new(
            "server",
            paths,
            load_server,
        )?)))
    }

    /// The configuration for the next handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.0.get()
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.0.paths)
            .finish()
    }
}

/// A client certificate and key (what a node presents to its peers), read
/// again when they change.
pub struct Identity(Reloading<CertifiedKey>);

impl Identity {
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Identity>, TlsError> {
        let load = |p: &[PathBuf]| certified_key(&p[0], &p[1]);
        Ok(Arc::new(Identity(Reloading::new(
            "client identity",
            vec![cert.to_path_buf(), key.to_path_buf()],
            load,
        )?)))
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("files", &self.0.paths)
            .finish()
    }
}

impl rustls::client::ResolvesClientCert for Identity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn load_verifier(paths: &[PathBuf]) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    let ca = &paths[0];
    WebPkiServerVerifier::builder_with_provider(Arc::new(read_roots(ca)?), provider())
        .build()
        .map_err(|e| TlsError::Ca {
            path: ca.clone(),
            message: e.to_string(),
        })
}

/// Server certificates checked against the CA file as it is now: the file
/// is read again when it changes (checked at each handshake), so a client
/// that lives long (a node calling its peers, the gateway, `kvctl bench`)
/// trusts a rotated CA from its next connection on. A CA file that does not
/// load keeps the last good one.
struct ReloadingVerifier(Reloading<Arc<WebPkiServerVerifier>>);

impl std::fmt::Debug for ReloadingVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingVerifier")
            .field("ca", &self.0.paths)
            .finish()
    }
}

impl ServerCertVerifier for ReloadingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0
            .get()
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.get().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.get().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.get().supported_verify_schemes()
    }
}

/// A client configuration trusting the CA in `ca` only (read again when the
/// file changes), presenting `identity` when a server asks for a client
/// certificate.
pub fn client_config(ca: &Path, identity: Option<Arc<Identity>>) -> Result<ClientConfig, TlsError> {
    let verifier = ReloadingVerifier(Reloading::new(
        "trusted CA",
        vec![ca.to_path_buf()],
        load_verifier,
    )?);
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            what: "protocol versions",
            path: ca.to_path_buf(),
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match identity {
        Some(id) => builder.with_client_cert_resolver(id),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A client configuration trusting the CA certificates of `ca_pem` only,
/// presenting `identity` (a certificate chain and its key, PEM) when a
/// server asks for a client certificate: for clients that hold their TLS
/// material in memory rather than in files (kv-operator, which reads it from
/// Secrets at each reconcile).
pub fn client_config_pem(
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Result<ClientConfig, TlsError> {
    let pem = |what: &'static str| {
        move |e: &dyn std::fmt::Display| TlsError::Pem {
            what,
            message: e.to_string(),
        }
    };
    let roots = roots_pem("trusted CA", ca_pem)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| pem("protocol versions")(&e))?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert_pem, key_pem)) => {
            let certs = CertificateDer::pem_slice_iter(cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem("client certificate")(&e))?;
            if certs.is_empty() {
                return Err(pem("client certificate")(&"no PEM certificate"));
            }
            let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| pem("client key")(&e))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| pem("client certificate and key")(&e))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A trust store of the certificates of `ca_pem` (`what` names it in errors);
/// refused when it holds none.
fn roots_pem(what: &'static str, ca_pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let pem = |e: &dyn std::fmt::Display| TlsError::Pem {
        what,
        message: e.to_string(),
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.map_err(|e| pem(&e))?).map_err(|e| pem(&e))?;
    }
    if roots.is_empty() {
        return Err(pem(&"no PEM certificate"));
    }
    Ok(roots)
}

/// Checks a certificate someone else issued (a Secret a cert-manager
/// `Certificate` writes) before nodes are given it: `key_pem` belongs to the
/// first certificate of `cert_pem`, and that chain is valid at `now` under
/// `ca_pem` as a server for each of `names` and as a client (the peer port
/// wants mutual TLS, so every node also presents it to its peers). The
/// error names the first thing that fails.
pub fn check_identity_pem(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
    names: &[String],
    now: std::time::SystemTime,
) -> Result<(), TlsError> {
    let pem = |what: &'static str, e: &dyn std::fmt::Display| TlsError::Pem {
        what,
        message: e.to_string(),
    };
    let roots = Arc::new(roots_pem("ca.crt", ca_pem)?);
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem("tls.crt", &e))?;
    let Some((end, intermediates)) = chain.split_first() else {
        return Err(pem("tls.crt", &"no PEM certificate"));
    };
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| pem("tls.key", &e))?;
    CertifiedKey::from_der(chain.clone(), key, &provider())
        .map_err(|e| pem("tls.crt and tls.key", &e))?;
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| pem("the clock", &e))?;
    let at = UnixTime::since_unix_epoch(secs);
    let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| pem("ca.crt", &e))?;
    for name in names {
        let server_name =
            ServerName::try_from(name.clone()).map_err(|e| pem("a node's DNS name", &e))?;
        server
            .verify_server_cert(end, intermediates, &server_name, &[], at)
            .map_err(|e| TlsError::Pem {
                what: "tls.crt",
                message: format!("not valid for {name}: {e}"),
            })?;
    }
    let client = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| pem("ca.crt", &e))?;
    client
        .verify_client_cert(end, intermediates, at)
        .map_err(|e| TlsError::Pem {
            what: "tls.crt",
            message: format!(
                "not valid as a client certificate (peers present it to each other): {e}"
            ),
        })?;
    Ok(())
}

/// A client configuration that trusts no certificate, for clients that
/// speak plain HTTP only. reqwest's own TLS setup loads the system's CA
/// certificates when a client is built and fails where there are none (the
/// `FROM scratch` images): a plaintext client must not depend on them.
pub fn plaintext_client_config() -> Result<ClientConfig, rustls::Error> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_issued_elsewhere_is_checked_for_every_name_its_key_and_its_ca() {
        let ca = crate::pki::Ca::generate("test CA").expect("CA");
        let (cert, key) = ca
            .issue("node", &["a.peers.ns.svc", "*.wild.ns.svc"])
            .expect("certificate");
        let now = std::time::SystemTime::now();
        let check = |ca_pem: &str, cert: &str, key: &str, names: &[&str]| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            check_identity_pem(
                ca_pem.as_bytes(),
                cert.as_bytes(),
                key.as_bytes(),
                &names,
                now,
            )
            .map_err(|e| e.to_string())
        };
        let pem = ca.cert_pem();
        check(pem, &cert, &key, &["a.peers.ns.svc", "x-3.wild.ns.svc"]).expect("valid");
        let e = check(pem, &cert, &key, &["b.peers.ns.svc"]).expect_err("a name it lacks");
        assert!(e.contains("not valid for b.peers.ns.svc"), "{e}");
        let other = crate::pki::Ca::generate("other CA").expect("CA");
        let e = check(other.cert_pem(), &cert, &key, &["a.peers.ns.svc"]).expect_err("other CA");
        assert!(e.contains("a.peers.ns.svc"), "{e}");
        let (_, other_key) = ca.issue("x", &["a.peers.ns.svc"]).expect("certificate");
        let e = check(pem, &cert, &other_key, &[]).expect_err("another key");
        assert!(e.contains("tls.key"), "{e}");
        let e = check(pem, "", &key, &[]).expect_err("no certificate");
        assert!(e.contains("tls.crt"), "{e}");
    }

    #[test]
    fn files_that_do_not_load_are_a_configuration_error() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let files = ServerFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: None,
        };
        assert!(matches!(
            ServerTls::load(&files),
            Err(TlsError::Read { .. })
        ));
        std::fs::write(&cert, "not PEM").expect("write");
        std::fs::write(&key, "not PEM").expect("write");
        assert!(matches!(
            ServerTls::load(&files),
            Err(TlsError::NoPem { .. })
        ));
    }
}
