//! `spec.tls.mode: Generated`: the cluster CA and the nodes' certificate,
//! kept in two Secrets.
//!
//! - `<name>-ca` (`ca.crt`, `ca.key`): made once and never replaced while
//!   present, so every certificate ever issued for the cluster chains to it.
//!   Its key is in no pod: only the operator reads this Secret.
//! - `<name>-tls` (`tls.crt`, `tls.key`, `ca.crt`): one certificate naming
//!   every pod's stable DNS names and the client Service's names, good as a
//!   server's (both ports) and as a client's (a node calling its peers, the
//!   operator calling the nodes). The pods mount it; the kubelet updates the
//!   files when the Secret changes and the nodes read them again.
//!
//! One certificate rather than one per pod: every pod mounts the whole
//! Secret, so per-pod keys would separate nothing. The certificate is issued
//! again (a pure decision, [`reissue_reason`]) when it is missing, chains to
//! another CA, does not name a pod the StatefulSet will run, or has less
//! than a third of its validity left. What it names and how long it is
//! valid are kept in its Secret's annotations, written with it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kv_net::pki::{Ca, PkiError};

use super::crd::{KvCluster, TlsMode};
use super::objects;

/// Where the pods mount `<name>-tls`.
pub const TLS_DIR: &str = "/etc/kvstore/tls";
pub const CA_CERT_KEY: &str = "ca.crt";
pub const CA_KEY_KEY: &str = "ca.key";
pub const CERT_KEY: &str = "tls.crt";
pub const KEY_KEY: &str = "tls.key";
/// How long a certificate is valid; it is renewed after two thirds of it.
pub const VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// Issued this long before now, for nodes whose clocks run a little behind.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// The certificate's validity and how many pods (ordinals `0..n`) it names.
pub const NOT_BEFORE_ANNOTATION: &str = "kvstore.dev/not-before";
pub const NOT_AFTER_ANNOTATION: &str = "kvstore.dev/not-after";
pub const ORDINALS_ANNOTATION: &str = "kvstore.dev/ordinals";

pub fn enabled(kvc: &KvCluster) -> bool {
    kvc.spec.tls.mode != TlsMode::Disabled
}

pub fn ca_secret_name(kvc: &KvCluster) -> String {
    format!("{}-ca", kvc.name_any())
}

/// The Secret the pods mount: `<name>-tls`, or the user's with `Provided`.
pub fn tls_secret_name(kvc: &KvCluster) -> String {
    match (&kvc.spec.tls.mode, &kvc.spec.tls.secret_name) {
        (TlsMode::Provided, Some(name)) => name.clone(),
        _ => format!("{}-tls", kvc.name_any()),
    }
}

/// `spec.tls.mode: Provided`: is the user's Secret one the nodes can use for
/// pods `0..pods` at `now`? Its three keys are there, the key belongs to the
/// certificate, and the certificate chains to its `ca.crt` for every pod's
/// name (what peers and the operator check) and as a client certificate.
/// The error says what to fix.
pub fn check_provided(
    kvc: &KvCluster,
    secret: Option<&Secret>,
    pods: u32,
    now: SystemTime,
) -> Result<(), String> {
    let name = tls_secret_name(kvc);
    let Some(secret) = secret else {
        return Err(format!(
            "spec.tls.secretName: Secret {name} does not exist (a cert-manager Certificate writes it once issued)"
        ));
    };
    let key = |k: &str| {
        text(secret, k).ok_or_else(|| {
            format!("Secret {name} has no {k}: it needs {CERT_KEY}, {KEY_KEY} and {CA_CERT_KEY}")
        })
    };
    let (cert, private, ca) = (key(CERT_KEY)?, key(KEY_KEY)?, key(CA_CERT_KEY)?);
    let names: Vec<String> = (0..pods).map(|o| objects::pod_host(kvc, o)).collect();
    kv_net::tls::check_identity_pem(
        ca.as_bytes(),
        cert.as_bytes(),
        private.as_bytes(),
        &names,
        now,
    )
    .map_err(|e| format!("Secret {name}: {e}"))
}

/// The CA's name, a function of the cluster's only: a CA read back from its
/// Secret issues under exactly the name its certificate carries.
fn ca_name(kvc: &KvCluster) -> String {
    format!(
        "kvstore cluster CA {}/{}",
        objects::namespace(kvc),
        kvc.name_any()
    )
}

/// The names the certificate carries for pods `0..pods`: each pod's name
/// through the headless Service (what the topology, the peers and the
/// operator call it by) with and without `.cluster.local`, and the client
/// Service's names.
pub fn dns_names(kvc: &KvCluster, pods: u32) -> Vec<String> {
    let mut names = Vec::new();
    for o in 0..pods {
        let host = objects::pod_host(kvc, o);
        names.push(format!("{host}.cluster.local"));
        names.push(host);
    }
    let client = objects::client_service_name(kvc);
    let ns = objects::namespace(kvc);
    names.push(format!("{client}.{ns}.svc.cluster.local"));
    names.push(format!("{client}.{ns}.svc"));
    names.push(format!("{client}.{ns}"));
    names.push(client);
    names
}

/// A new CA for the cluster and its Secret `<name>-ca`.
pub fn new_ca(kvc: &KvCluster) -> Result<(Ca, Secret), PkiError> {
    let ca = Ca::generate(&ca_name(kvc))?;
    let data = BTreeMap::from([
        (CA_CERT_KEY.to_string(), bytes(ca.cert_pem())),
        (CA_KEY_KEY.to_string(), bytes(&ca.key_pem())),
    ]);
    let secret = Secret {
        metadata: objects::meta(kvc, ca_secret_name(kvc), "ca"),
        type_: Some("Opaque".to_string()),
        data: Some(data),
        ..Secret::default()
    };
    Ok((ca, secret))
}

/// The CA kept in `<name>-ca`; `None` when the Secret lacks a key or holds
/// no usable CA (then nothing is issued: the CA is never replaced).
pub fn ca_of(kvc: &KvCluster, secret: &Secret) -> Option<Ca> {
    let cert = text(secret, CA_CERT_KEY)?;
    let key = text(secret, CA_KEY_KEY)?;
    Ca::from_pem(&ca_name(kvc), cert, key).ok()
}

/// `<name>-tls`: a certificate from `ca` for pods `0..pods`, valid from a
/// little before `now` for [`VALIDITY`], with `ca`'s certificate beside it.
pub fn cert_secret(
    kvc: &KvCluster,
    ca: &Ca,
    pods: u32,
    now: SystemTime,
) -> Result<Secret, PkiError> {
    let names = dns_names(kvc, pods);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let not_before = now.checked_sub(BACKDATE).unwrap_or(now);
    let not_after = now + VALIDITY;
    let (cert, key) = ca.issue_valid(&kvc.name_any(), &names, not_before, not_after)?;
    let mut metadata = objects::meta(kvc, tls_secret_name(kvc), "tls");
    metadata.annotations = Some(BTreeMap::from([
        (NOT_BEFORE_ANNOTATION.to_string(), stamp(not_before)),
        (NOT_AFTER_ANNOTATION.to_string(), stamp(not_after)),
        (ORDINALS_ANNOTATION.to_string(), pods.to_string()),
    ]));
    Ok(Secret {
        metadata,
        type_: Some("kubernetes.io/tls".to_string()),
        data: Some(BTreeMap::from([
            (CERT_KEY.to_string(), bytes(&cert)),
            (KEY_KEY.to_string(), bytes(&key)),
            (CA_CERT_KEY.to_string(), bytes(ca.cert_pem())),
        ])),
        ..Secret::default()
    })
}

/// Why `<name>-tls` must be issued again for pods `0..pods` under the CA
/// whose certificate is `ca_pem`, at `now`; `None` while it is good.
pub fn reissue_reason(
    secret: Option<&Secret>,
    ca_pem: &str,
    pods: u32,
    now: SystemTime,
) -> Option<String> {
    let Some(secret) = secret else {
        return Some("no certificate yet".into());
    };
    if [CERT_KEY, KEY_KEY]
        .iter()
        .any(|k| text(secret, k).is_none())
    {
        return Some(format!("the Secret lacks {CERT_KEY} or {KEY_KEY}"));
    }
    if text(secret, CA_CERT_KEY) != Some(ca_pem) {
        return Some("issued by another CA".into());
    }
    let annotation = |k: &str| secret.annotations().get(k).map(String::as_str);
    let named = annotation(ORDINALS_ANNOTATION).and_then(|n| n.parse::<u32>().ok());
    if named.is_none_or(|n| n < pods) {
        return Some(format!("it does not name all {pods} pods"));
    }
    let time = |k: &str| -> Option<SystemTime> {
        let t: Timestamp = annotation(k)?.parse().ok()?;
        Some(SystemTime::from(t))
    };
    let (Some(not_before), Some(not_after)) =
        (time(NOT_BEFORE_ANNOTATION), time(NOT_AFTER_ANNOTATION))
    else {
        return Some("its validity is not recorded".into());
    };
    let validity = not_after.duration_since(not_before).unwrap_or_default();
    let left = not_after.duration_since(now).unwrap_or_default();
    if left < validity / 3 {
        return Some(format!(
            "less than a third of its validity is left (valid until {})",
            stamp(not_after)
        ));
    }
    None
}

/// A client configuration for the operator's calls to the nodes: trusting
/// the CA of `ca_secret` only and presenting the certificate of
/// `tls_secret` (the peer port wants one of the cluster CA).
pub fn client_config(
    ca_secret: &Secret,
    tls_secret: &Secret,
) -> Result<rustls::ClientConfig, kv_net::tls::TlsError> {
    let missing = |what| kv_net::tls::TlsError::Pem {
        what,
        message: "missing from its Secret".into(),
    };
    let ca = text(ca_secret, CA_CERT_KEY).ok_or(missing("cluster CA"))?;
    let cert = text(tls_secret, CERT_KEY).ok_or(missing("certificate"))?;
    let key = text(tls_secret, KEY_KEY).ok_or(missing("key"))?;
    kv_net::tls::client_config_pem(ca.as_bytes(), Some((cert.as_bytes(), key.as_bytes())))
}

fn text<'a>(secret: &'a Secret, key: &str) -> Option<&'a str> {
    let raw = secret.data.as_ref()?.get(key)?;
    std::str::from_utf8(&raw.0).ok().filter(|t| !t.is_empty())
}

fn bytes(text: &str) -> ByteString {
    ByteString(text.as_bytes().to_vec())
}

fn stamp(t: SystemTime) -> String {
    Timestamp::try_from(t)
        .map(|t| t.round(k8s_openapi::jiff::Unit::Second).unwrap_or(t))
        .map(|t| t.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> KvCluster {
        let mut kvc = KvCluster::new("demo", Default::default());
        kvc.metadata.namespace = Some("ns".into());
        kvc
    }

    #[test]
    fn the_names_cover_each_pod_and_the_client_service() {
        let names = dns_names(&cluster(), 2);
        for n in [
            "demo-0.demo-peers.ns.svc",
            "demo-1.demo-peers.ns.svc.cluster.local",
            "demo.ns.svc",
            "demo.ns.svc.cluster.local",
            "demo",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
        }
        assert!(!names.iter().any(|x| x.starts_with("demo-2.")));
    }

    #[test]
    fn a_certificate_is_reissued_when_a_third_of_its_validity_is_left_or_it_falls_short() {
        let kvc = cluster();
        let (ca, _) = new_ca(&kvc).expect("CA");
        let issued = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let s = cert_secret(&kvc, &ca, 3, issued).expect("certificate");
        let pem = ca.cert_pem();
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(reissue_reason(Some(&s), pem, 3, issued), None);
        assert_eq!(reissue_reason(Some(&s), pem, 2, issued + 59 * day), None);
        let due = reissue_reason(Some(&s), pem, 3, issued + 61 * day).expect("due");
        assert!(due.contains("a third"), "{due}");
        let short = reissue_reason(Some(&s), pem, 4, issued).expect("short");
        assert!(short.contains("4 pods"), "{short}");
        let (other, _) = new_ca(&kvc).expect("CA");
        assert_eq!(
            reissue_reason(Some(&s), other.cert_pem(), 3, issued).as_deref(),
            Some("issued by another CA")
        );
        assert!(reissue_reason(None, pem, 3, issued).is_some());
    }

    #[test]
    fn a_provided_secret_must_name_every_pod_and_carry_its_ca() {
        let mut kvc = cluster();
        kvc.spec.tls = crate::k8s::crd::TlsSettings {
            mode: TlsMode::Provided,
            secret_name: Some("demo-cert".into()),
        };
        assert_eq!(tls_secret_name(&kvc), "demo-cert");
        let ca = Ca::generate("someone else's CA").expect("CA");
        let secret = |names: &[&str]| {
            let (cert, key) = ca.issue("demo", names).expect("certificate");
            Secret {
                data: Some(BTreeMap::from([
                    (CERT_KEY.to_string(), bytes(&cert)),
                    (KEY_KEY.to_string(), bytes(&key)),
                    (CA_CERT_KEY.to_string(), bytes(ca.cert_pem())),
                ])),
                ..Secret::default()
            }
        };
        let now = SystemTime::now();
        // A wildcard over the headless Service names every pod, also later ones.
        let wild = secret(&["*.demo-peers.ns.svc"]);
        assert_eq!(check_provided(&kvc, Some(&wild), 5, now), Ok(()));
        let two = secret(&["demo-0.demo-peers.ns.svc", "demo-1.demo-peers.ns.svc"]);
        assert_eq!(check_provided(&kvc, Some(&two), 2, now), Ok(()));
        let short = check_provided(&kvc, Some(&two), 3, now).expect_err("pod 2 not named");
        assert!(short.contains("demo-2.demo-peers.ns.svc"), "{short}");
        let mut no_ca = wild.clone();
        if let Some(d) = no_ca.data.as_mut() {
            d.remove(CA_CERT_KEY);
        }
        let e = check_provided(&kvc, Some(&no_ca), 3, now).expect_err("no ca.crt");
        assert!(e.contains("has no ca.crt"), "{e}");
        let e = check_provided(&kvc, None, 3, now).expect_err("no Secret");
        assert!(e.contains("demo-cert does not exist"), "{e}");
    }

    #[test]
    fn a_ca_read_back_from_its_secret_issues_under_the_same_certificate() {
        let kvc = cluster();
        let (_, secret) = new_ca(&kvc).expect("CA");
        let ca = ca_of(&kvc, &secret).expect("the CA reads back");
        assert_eq!(Some(ca.cert_pem()), text(&secret, CA_CERT_KEY));
        let mut broken = secret.clone();
        if let Some(d) = broken.data.as_mut() {
            d.remove(CA_KEY_KEY);
        }
        assert!(ca_of(&kvc, &broken).is_none());
    }
}
