//! A certificate authority of our own (rcgen), for clusters that have no
//! other: `kvctl up --tls` keeps one in its data directory and issues each
//! node, and the platform itself, a certificate for both TLS roles (server
//! on the node's ports, client towards its peers). Tests use it too.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct PkiError {
    what: &'static str,
    source: rcgen::Error,
}

fn err(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError { what, source }
}

/// A CA: its certificate (PEM) and the key it signs with.
pub struct Ca {
    cert_pem: String,
    key: KeyPair,
    common_name: String,
}

/// The CA certificate's parameters, a function of its name only, so that a
/// CA read back from its files issues certificates naming it exactly as its
/// own certificate does.
fn ca_params(common_name: &str) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err("CA parameters"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

impl Ca {
    /// A new CA named `common_name`.
    pub fn generate(common_name: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate().map_err(err("CA key"))?;
        let cert = ca_params(common_name)?
            .self_signed(&key)
            .map_err(err("CA certificate"))?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key,
            common_name: common_name.to_string(),
        })
    }

    /// A CA made by [`Ca::generate`] with the same name, from its files.
    pub fn from_pem(common_name: &str, cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            key: KeyPair::from_pem(key_pem).map_err(err("CA key"))?,
            common_name: common_name.to_string(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A certificate (PEM) and its new key (PEM) for `names` (DNS names or
    /// IP addresses), good as a server's and as a client's.
    pub fn issue(&self, common_name: &str, names: &[&str]) -> Result<(String, String), PkiError> {
        self.issue_params(common_name, names, None)
    }

    /// [`Ca::issue`], valid from `not_before` to `not_after` only (rcgen's
    /// default is a validity without end): for certificates that are
    /// renewed, such as those kv-operator generates on Kubernetes.
    pub fn issue_valid(
        &self,
        common_name: &str,
        names: &[&str],
        not_before: std::time::SystemTime,
        not_after: std::time::SystemTime,
    ) -> Result<(String, String), PkiError> {
        self.issue_params(common_name, names, Some((not_before, not_after)))
    }

    fn issue_params(
        &self,
        common_name: &str,
        names: &[&str],
        validity: Option<(std::time::SystemTime, std::time::SystemTime)>,
    ) -> Result<(String, String), PkiError> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut p = CertificateParams::new(names).map_err(err("certificate names"))?;
        p.distinguished_name.push(DnType::CommonName, common_name);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        if let Some((not_before, not_after)) = validity {
            p.not_before = not_before.into();
            p.not_after = not_after.into();
        }
        let key = KeyPair::generate().map_err(err("certificate key"))?;
        let ca = ca_params(&self.common_name)?;
        let issuer = Issuer::from_params(&ca, &self.key);
        let cert = p.signed_by(&key, &issuer).map_err(err("certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Writes `bytes` to `path` readable by its owner only (private keys).
pub fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()
}
