//! Volume expansion: a larger `spec.storage.size` grows the nodes' claims.
//!
//! A StatefulSet's volume claim templates cannot change, so the template
//! keeps the size it was created with and the operator resizes each claim
//! itself, where its storage class allows it (`allowVolumeExpansion`). The
//! storage driver then grows the volume, and the claim's `status.capacity`
//! follows. A claim made later by a scale-up starts at the template's size
//! and is resized the same way. A class that does not allow expansion, or a
//! smaller size, leaves every claim as it is; the condition
//! [`CONDITION`] says why.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;

/// The condition that reports a resize; absent until the size changes.
pub const CONDITION: &str = "VolumesResized";

/// The name of the nodes' claim template (`data-<pod>` claims).
const TEMPLATE: &str = "data";

/// Bytes in a Kubernetes quantity (`1Gi`, `500M`, `1.5Gi`, `2e9`, `1500m`),
/// rounded up to a whole byte; `None` for anything else.
pub fn parse_quantity(q: &str) -> Option<u128> {
    let q = q.trim();
    let number_end = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let digits = format!("{whole}{fraction}");
    let mantissa: u128 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    // value = mantissa * num / den, with den carrying the fraction's places
    let mut den: u128 = 10u128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
    let num: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 10u128.pow(3),
        "M" => 10u128.pow(6),
        "G" => 10u128.pow(9),
        "T" => 10u128.pow(12),
        "P" => 10u128.pow(15),
        "E" => 10u128.pow(18),
        "m" => {
            den = den.checked_mul(1000)?;
            1
        }
        s => {
            let exp = s.strip_prefix(['e', 'E'])?;
            10u128.checked_pow(exp.parse().ok()?)?
        }
    };
    mantissa
        .checked_mul(num)?
        .checked_add(den - 1)
        .map(|v| v / den)
}

/// The storage each claim of the StatefulSet's template requests.
pub fn template_size(sts: &StatefulSet) -> Option<String> {
    sts.spec
        .as_ref()?
        .volume_claim_templates
        .as_ref()?
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(TEMPLATE))
        .and_then(requested)
}

/// Give `new`'s claim template the size `live`'s has: the API server
/// refuses any change to a StatefulSet's claim templates.
pub fn keep_template_size(new: &mut StatefulSet, live: &StatefulSet) {
    let Some(size) = template_size(live) else {
        return;
    };
    let claim = new
        .spec
        .as_mut()
        .and_then(|s| s.volume_claim_templates.as_mut())
        .and_then(|cs| {
            cs.iter_mut()
                .find(|c| c.metadata.name.as_deref() == Some(TEMPLATE))
        });
    if let Some(requests) = claim
        .and_then(|c| c.spec.as_mut())
        .and_then(|s| s.resources.as_mut())
        .and_then(|r| r.requests.as_mut())
    {
        requests.insert("storage".to_string(), Quantity(size));
    }
}

/// Whether the claims need looking at: the spec asks for another size than
/// the template was made with (then they do on every reconcile, since the
/// template keeps its size and a scale-up makes claims of that size).
pub fn resize_asked(spec_size: &str, sts: Option<&StatefulSet>) -> bool {
    let Some(template) = sts.and_then(template_size) else {
        return false;
    };
    match (parse_quantity(spec_size), parse_quantity(&template)) {
        (Some(a), Some(b)) => a != b,
        _ => spec_size != template,
    }
}

fn requested(c: &PersistentVolumeClaim) -> Option<String> {
    let q = c
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")?;
    Some(q.0.clone())
}

fn capacity(c: &PersistentVolumeClaim) -> Option<String> {
    let q = c.status.as_ref()?.capacity.as_ref()?.get("storage")?;
    Some(q.0.clone())
}

/// The storage class a claim names (`None`: none, or the empty class).
pub fn class_of(c: &PersistentVolumeClaim) -> Option<String> {
    c.spec
        .as_ref()?
        .storage_class_name
        .clone()
        .filter(|s| !s.is_empty())
}

/// What to do with the claims, and the condition that says so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assessment {
    /// Claims to patch to the new size.
    pub expand: Vec<String>,
    /// The condition's status, reason and message.
    pub done: bool,
    pub reason: &'static str,
    pub message: String,
}

/// Compare every claim with `want` (spec.storage.size). `allows` says which
/// storage classes allow expansion (a class absent from it does not).
pub fn assess(
    want: &str,
    claims: &[PersistentVolumeClaim],
    allows: &BTreeMap<String, bool>,
) -> Assessment {
    let refuse = |reason, message: String| Assessment {
        expand: vec![],
        done: false,
        reason,
        message,
    };
    let Some(want_bytes) = parse_quantity(want) else {
        return refuse(
            "InvalidSize",
            format!("spec.storage.size {want:?} is not a quantity"),
        );
    };
    let mut expand = Vec::new();
    let mut unsupported = Vec::new();
    let mut waiting = Vec::new();
    for c in claims {
        let name = c.name_any();
        let req = requested(c);
        let Some(req_bytes) = req.as_deref().and_then(parse_quantity) else {
            return refuse(
                "InvalidSize",
                format!("claim {name} requests {req:?}, which is not a quantity"),
            );
        };
        if req_bytes > want_bytes {
            return refuse(
                "ShrinkRefused",
                format!(
                    "volumes cannot shrink: claim {name} requests {}, spec.storage.size is {want}; no claim was changed",
                    req.unwrap_or_default()
                ),
            );
        }
        if req_bytes < want_bytes {
            match class_of(c) {
                Some(class) if allows.get(&class) == Some(&true) => expand.push(name),
                Some(class) => unsupported.push(format!(
                    "{name} (storage class {class} does not allow volume expansion)"
                )),
                None => unsupported.push(format!(
                    "{name} (no storage class: only a claim of a class that allows expansion can grow)"
                )),
            }
            continue;
        }
        let cap_bytes = capacity(c).as_deref().and_then(parse_quantity).unwrap_or(0);
        if cap_bytes < want_bytes {
            waiting.push(format!(
                "{name} has {}",
                capacity(c).unwrap_or_else(|| "no capacity yet".into())
            ));
        }
    }
    if !unsupported.is_empty() {
        return Assessment {
            expand,
            done: false,
            reason: "ExpansionNotSupported",
            message: format!("cannot grow to {want}: {}", unsupported.join(", ")),
        };
    }
    if !expand.is_empty() || !waiting.is_empty() {
        let mut parts = Vec::new();
        if !expand.is_empty() {
            parts.push(format!("resizing {}", expand.join(", ")));
        }
        if !waiting.is_empty() {
            parts.push(format!(
                "waiting for the storage driver: {}",
                waiting.join(", ")
            ));
        }
        return Assessment {
            expand,
            done: false,
            reason: "Resizing",
            message: format!("growing the volumes to {want}: {}", parts.join("; ")),
        };
    }
    Assessment {
        expand,
        done: true,
        reason: "Resized",
        message: format!(
            "every volume has at least {want} (the StatefulSet's claim template keeps the size it was created with; each claim is resized)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(
        name: &str,
        class: Option<&str>,
        requested: &str,
        capacity: Option<&str>,
    ) -> PersistentVolumeClaim {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"storageClassName": class, "resources": {"requests": {"storage": requested}}},
            "status": {"capacity": capacity.map(|c| serde_json::json!({"storage": c}))},
        }))
        .expect("claim")
    }

    #[test]
    fn quantities_are_bytes() {
        assert_eq!(parse_quantity("1Gi"), Some(1 << 30));
        assert_eq!(parse_quantity("1.5Gi"), Some(3 << 29));
        assert_eq!(parse_quantity("64Mi"), Some(64 << 20));
        assert_eq!(parse_quantity("500M"), Some(500_000_000));
        assert_eq!(parse_quantity("2e3"), Some(2000));
        assert_eq!(parse_quantity("1500m"), Some(2), "rounded up to a byte");
        assert_eq!(parse_quantity("1024"), Some(1024));
        for bad in ["", "Gi", "1Xi", "1.2.3G", "-1Gi", "1e"] {
            assert_eq!(parse_quantity(bad), None, "{bad:?}");
        }
        assert_eq!(parse_quantity("1024Mi"), parse_quantity("1Gi"));
    }

    #[test]
    fn claims_below_the_size_are_resized_where_the_class_allows() {
        let allows = BTreeMap::from([("fast".to_string(), true)]);
        let claims = [
            claim("data-demo-0", Some("fast"), "1Gi", Some("1Gi")),
            claim("data-demo-1", Some("fast"), "2Gi", Some("1Gi")),
        ];
        let a = assess("2Gi", &claims, &allows);
        assert_eq!(a.expand, ["data-demo-0"]);
        assert!(!a.done);
        assert_eq!(a.reason, "Resizing");
        assert!(a.message.contains("data-demo-1 has 1Gi"), "{}", a.message);
    }

    #[test]
    fn the_condition_turns_true_once_every_capacity_is_there() {
        let allows = BTreeMap::from([("fast".to_string(), true)]);
        let claims = [
            claim("data-demo-0", Some("fast"), "2Gi", Some("2Gi")),
            claim("data-demo-1", Some("fast"), "2048Mi", Some("3Gi")),
        ];
        let a = assess("2Gi", &claims, &allows);
        assert_eq!((a.done, a.reason, a.expand.len()), (true, "Resized", 0));
    }

    #[test]
    fn a_class_without_expansion_or_no_class_is_named_and_not_patched() {
        let allows = BTreeMap::from([("slow".to_string(), false)]);
        let claims = [
            claim("data-demo-0", Some("slow"), "1Gi", Some("1Gi")),
            claim("data-demo-1", None, "1Gi", Some("1Gi")),
            claim("data-demo-2", Some("gone"), "1Gi", Some("1Gi")),
        ];
        let a = assess("2Gi", &claims, &allows);
        assert!(a.expand.is_empty());
        assert_eq!((a.done, a.reason), (false, "ExpansionNotSupported"));
        for name in ["data-demo-0", "data-demo-1", "data-demo-2"] {
            assert!(a.message.contains(name), "{}", a.message);
        }
    }

    #[test]
    fn a_smaller_size_changes_no_claim() {
        let allows = BTreeMap::from([("fast".to_string(), true)]);
        let claims = [
            claim("data-demo-0", Some("fast"), "1Gi", Some("1Gi")),
            claim("data-demo-1", Some("fast"), "4Gi", Some("4Gi")),
        ];
        let a = assess("2Gi", &claims, &allows);
        assert!(a.expand.is_empty(), "not even the claim below the size");
        assert_eq!((a.done, a.reason), (false, "ShrinkRefused"));
    }

    #[test]
    fn only_a_size_other_than_the_templates_asks_for_a_resize() {
        let sts: StatefulSet = serde_json::from_value(serde_json::json!({
            "spec": {"selector": {}, "template": {}, "serviceName": "x",
                     "volumeClaimTemplates": [{"metadata": {"name": "data"},
                         "spec": {"resources": {"requests": {"storage": "1Gi"}}}}]}
        }))
        .expect("sts");
        assert!(!resize_asked("1Gi", Some(&sts)));
        assert!(
            !resize_asked("1024Mi", Some(&sts)),
            "the same size spelled otherwise"
        );
        assert!(resize_asked("2Gi", Some(&sts)));
        assert!(
            !resize_asked("2Gi", None),
            "nothing to resize before the StatefulSet"
        );
        let mut new = sts.clone();
        if let Some(r) = new
            .spec
            .as_mut()
            .and_then(|s| s.volume_claim_templates.as_mut())
        {
            r[0] = serde_json::from_value(serde_json::json!({"metadata": {"name": "data"},
                "spec": {"resources": {"requests": {"storage": "2Gi"}}}}))
            .expect("claim");
        }
        keep_template_size(&mut new, &sts);
        assert_eq!(template_size(&new).as_deref(), Some("1Gi"));
    }
}
