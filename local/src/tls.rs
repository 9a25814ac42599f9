//! `kvctl up --tls`: a CA of the cluster's own in `<data-dir>/tls/`, a
//! certificate per node (`node-N.crt`, `node-N.key`) and one for the platform
//! (`platform.crt`, `platform.key`: the gateway serves it, and the platform
//! presents it when it pushes topologies to the nodes' peer ports). Files
//! already there are kept, so a restart serves the same CA; keys are
//! owner-only. Every certificate names `127.0.0.1` and `localhost`, where
//! the local platform runs everything.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kv_net::pki::{Ca, write_private};
use kv_net::tls::{Identity, ServerFiles, ServerTls, client_config};

use crate::LocalError;

/// The CA's name; a CA read back from its files issues under it.
const CA_NAME: &str = "kvstore local CA (kvctl up)";
const NAMES: [&str; 2] = ["127.0.0.1", "localhost"];

/// The platform's TLS: where the files are, what the gateway serves, and
/// what its clients (the supervisor, the gateway's forwarding) trust and
/// present.
pub struct LocalTls {
    dir: PathBuf,
    ca: Ca,
    /// The gateway's server configuration (read again on change).
    pub server: Arc<ServerTls>,
    /// Trusting the CA, presenting the platform's certificate.
    pub client: rustls::ClientConfig,
}

impl LocalTls {
    /// Creates what is missing in `<data_dir>/tls/` and loads it.
    pub fn prepare(data_dir: &Path) -> Result<LocalTls, LocalError> {
        let dir = data_dir.join("tls");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LocalError::DataDir { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let (ca_cert, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
        let ca = if ca_cert.exists() && ca_key.exists() {
            let cert = std::fs::read_to_string(&ca_cert).map_err(io(&ca_cert))?;
            let key = std::fs::read_to_string(&ca_key).map_err(io(&ca_key))?;
            Ca::from_pem(CA_NAME, &cert, &key).map_err(|e| bad(&ca_key, e))?
        } else {
            let ca = Ca::generate(CA_NAME).map_err(|e| bad(&ca_cert, e))?;
            write_private(&ca_key, ca.key_pem().as_bytes()).map_err(io(&ca_key))?;
            std::fs::write(&ca_cert, ca.cert_pem()).map_err(io(&ca_cert))?;
            ca
        };
        let (cert, key) = issued(&ca, &dir, "platform")?;
        let server = ServerTls::load(&ServerFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: None,
        })
        .map_err(|e| bad(&cert, e))?;
        let id = Identity::load(&cert, &key).map_err(|e| bad(&cert, e))?;
        let client = client_config(&ca_cert, Some(id)).map_err(|e| bad(&ca_cert, e))?;
        Ok(LocalTls {
            dir,
            ca,
            server,
            client,
        })
    }

    /// The CA certificate clients are told to trust (`kvctl --cacert`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Node `o`'s certificate and key, issued now if missing.
    pub fn node_files(&self, o: u32) -> Result<(PathBuf, PathBuf), LocalError> {
        issued(&self.ca, &self.dir, &format!("node-{o}"))
    }
}

/// `name.crt` and `name.key` in `dir`, issued by `ca` now if missing.
fn issued(ca: &Ca, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), LocalError> {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    let (cert_pem, key_pem) = ca.issue(name, &NAMES).map_err(|e| bad(&cert, e))?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LocalError::DataDir { path, source }
    };
    // The key first: a certificate without its key is never left behind.
    write_private(&key, key_pem.as_bytes()).map_err(io(&key))?;
    std::fs::write(&cert, cert_pem).map_err(io(&cert))?;
    Ok((cert, key))
}

/// A reqwest client builder that, with `tls`, trusts the local CA and
/// presents the platform's certificate.
pub fn client_builder(tls: Option<&LocalTls>) -> reqwest::ClientBuilder {
    let b = reqwest::Client::builder();
    match tls {
        Some(t) => b.tls_backend_preconfigured(t.client.clone()),
        None => b,
    }
}

fn bad(path: &Path, e: impl std::fmt::Display) -> LocalError {
    LocalError::BadState {
        path: path.to_path_buf(),
        message: format!("TLS: {e}"),
    }
}
