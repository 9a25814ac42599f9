//! ConfigMap and Secret volumes as files, written the way the real kubelet's
//! atomic writer does: the files go to a fresh timestamped directory, the
//! `..data` symlink is swapped to it in one rename, and each top-level entry
//! is a symlink through `..data`. A reader that re-opens the path sees either
//! the old or the new contents, never a mix; one that holds a file open, or
//! watches the inode, keeps seeing the old one (as in a real pod).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::KeyToPath;

/// Files of one volume: relative path -> (contents, mode).
pub type Payload = BTreeMap<String, (Vec<u8>, u32)>;

/// The files a ConfigMap or Secret volume shows: every key, or only `items`
/// (each at its `path`, with its `mode` or `defaultMode`).
pub fn project(
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: Option<i32>,
) -> Result<Payload> {
    let default_mode = default_mode.unwrap_or(0o644) as u32 & 0o777;
    let mut out = Payload::new();
    match items {
        None => {
            for (k, v) in data {
                out.insert(k.clone(), (v.clone(), default_mode));
            }
        }
        Some(items) => {
            for item in items {
                let Some(v) = data.get(&item.key) else {
                    bail!("key {:?} not found", item.key);
                };
                if item.path.starts_with('/') || item.path.split('/').any(|c| c == "..") {
                    bail!(
                        "item path {:?} must be relative and must not contain '..'",
                        item.path
                    );
                }
                let mode = item.mode.map(|m| m as u32 & 0o777).unwrap_or(default_mode);
                out.insert(item.path.clone(), (v.clone(), mode));
            }
        }
    }
    Ok(out)
}

/// What `..data` in `dir` holds now (empty when nothing was written yet).
fn current(dir: &Path, payload_paths: &Payload) -> Option<Payload> {
    let data = dir.join("..data");
    let mut out = Payload::new();
    for path in payload_paths.keys() {
        let p = data.join(path);
        let bytes = fs::read(&p).ok()?;
        let mode = fs::metadata(&p).ok()?.permissions().mode() & 0o777;
        out.insert(path.clone(), (bytes, mode));
    }
    Some(out)
}

fn top_level(path: &str) -> &str {
    path.split('/').next().unwrap_or(path)
}

/// Writes `payload` into `dir` atomically; `Ok(false)` when it was already there.
pub fn write_atomic(dir: &Path, payload: &Payload, stamp: &str) -> io::Result<bool> {
    fs::create_dir_all(dir)?;
    let old_target = fs::read_link(dir.join("..data")).ok();
    if old_target.is_some() {
        let same_keys = fs::read_dir(dir.join("..data"))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect::<std::collections::BTreeSet<_>>()
            == payload.keys().map(|k| top_level(k).to_string()).collect();
        if same_keys && current(dir, payload).as_ref() == Some(payload) {
            return Ok(false);
        }
    }
    let ts_name = format!("..{stamp}");
    let ts_dir = dir.join(&ts_name);
    if ts_dir.exists() {
        fs::remove_dir_all(&ts_dir)?;
    }
    fs::create_dir(&ts_dir)?;
    for (path, (bytes, mode)) in payload {
        let p = ts_dir.join(path);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&p, bytes)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode))?;
    }
    let tmp = dir.join("..data_tmp");
    let _ = fs::remove_file(&tmp);
    symlink(&ts_name, &tmp)?;
    fs::rename(&tmp, dir.join("..data"))?;
    // Top-level names: a symlink through ..data each; stale ones removed.
    let wanted: std::collections::BTreeSet<&str> = payload.keys().map(|k| top_level(k)).collect();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !wanted.contains(name.as_str()) {
            fs::remove_file(dir.join(&name))?;
        }
    }
    for name in &wanted {
        let link = dir.join(name);
        if fs::symlink_metadata(&link).is_err() {
            symlink(format!("..data/{name}"), &link)?;
        }
    }
    if let Some(old) = old_target
        && old.to_string_lossy() != ts_name
    {
        let _ = fs::remove_dir_all(dir.join(old));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> BTreeMap<String, Vec<u8>> {
        [
            ("token".to_string(), b"t1".to_vec()),
            ("cluster-token".to_string(), b"c1".to_vec()),
        ]
        .into()
    }

    #[test]
    fn every_key_becomes_a_file_with_the_default_mode() {
        let p = project(&data(), None, Some(0o440)).unwrap();
        assert_eq!(p.get("token"), Some(&(b"t1".to_vec(), 0o440)));
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn items_select_keys_rename_them_and_set_modes() {
        let items = [KeyToPath {
            key: "token".into(),
            path: "auth/tok".into(),
            mode: Some(0o400),
        }];
        let p = project(&data(), Some(&items), None).unwrap();
        assert_eq!(
            p.into_iter().collect::<Vec<_>>(),
            vec![("auth/tok".to_string(), (b"t1".to_vec(), 0o400))]
        );
        let bad = [KeyToPath {
            key: "nope".into(),
            path: "x".into(),
            mode: None,
        }];
        assert!(project(&data(), Some(&bad), None).is_err());
        let escape = [KeyToPath {
            key: "token".into(),
            path: "../x".into(),
            mode: None,
        }];
        assert!(project(&data(), Some(&escape), None).is_err());
    }

    #[test]
    fn an_update_swaps_the_data_link_and_drops_removed_keys() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let p1 = project(&data(), None, None).unwrap();
        assert!(write_atomic(d, &p1, "1").unwrap());
        assert_eq!(fs::read(d.join("token")).unwrap(), b"t1");
        assert!(
            !write_atomic(d, &p1, "2").unwrap(),
            "unchanged: nothing written"
        );
        let mut changed = data();
        changed.insert("token".into(), b"t2".to_vec());
        changed.remove("cluster-token");
        let p2 = project(&changed, None, None).unwrap();
        assert!(write_atomic(d, &p2, "3").unwrap());
        assert_eq!(fs::read(d.join("token")).unwrap(), b"t2");
        assert!(fs::symlink_metadata(d.join("cluster-token")).is_err());
        assert_eq!(fs::read_link(d.join("..data")).unwrap(), Path::new("..3"));
        assert!(!d.join("..1").exists(), "the old generation is removed");
    }
}
