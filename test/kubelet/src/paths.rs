//! Mount-path and address rewriting: how a process without a mount namespace
//! or a network namespace still finds its volumes and binds its pod IP.
//!
//! A container sees its volumes at `volumeMounts[].mountPath`; a process run by
//! this kubelet cannot mount anything, so every occurrence of a mount path in
//! the command, the args and the env values is replaced with the host
//! directory that holds the volume. A mount path is replaced only where it
//! starts a path (at the start of the string or after one of `= : , ' "` or a
//! space) and ends one (end of string, `/`, or one of those separators):
//! `--data-dir=/data` and `/data/x` are rewritten, `/database` is not. The
//! longest mount path wins, so `/etc/kvstore/secret` beats `/etc/kvstore`.
//!
//! Inside a pod's network namespace, a wildcard bind (`0.0.0.0:PORT`) takes only
//! the pod's own addresses. Here every pod shares the host's network, so the
//! same rewriting replaces the host `0.0.0.0` of an `ADDRESS:PORT` with the pod
//! IP; otherwise two pods listening on the same port would collide.

use std::net::Ipv4Addr;
use std::path::PathBuf;

/// One volume mount: where the container expects it, where it is on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub container_path: String,
    pub host_path: PathBuf,
}

const SEPARATORS: &[char] = &['=', ':', ',', ' ', '\'', '"'];

fn starts_token(s: &str, i: usize) -> bool {
    i == 0 || s[..i].ends_with(SEPARATORS)
}

fn ends_path(rest: &str) -> bool {
    rest.is_empty() || rest.starts_with('/') || rest.starts_with(SEPARATORS)
}

/// Replaces every mount path in `s` that stands as a path with its host path.
pub fn rewrite_mounts(s: &str, mounts: &[Mount]) -> String {
    let mut sorted: Vec<&Mount> = mounts
        .iter()
        // "/" would turn every absolute path into a host path: not emulated.
        .filter(|m| m.container_path.trim_end_matches('/').len() > 1)
        .collect();
    sorted.sort_by_key(|m| std::cmp::Reverse(m.container_path.len()));
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    'scan: while i < s.len() {
        if starts_token(s, i) {
            for m in &sorted {
                let path = m.container_path.trim_end_matches('/');
                if s[i..].starts_with(path) && ends_path(&s[i + path.len()..]) {
                    out.push_str(&m.host_path.to_string_lossy());
                    i += path.len();
                    continue 'scan;
                }
            }
        }
        let c = s[i..].chars().next().expect("i is on a char boundary");
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// Replaces the host `0.0.0.0` of every `0.0.0.0:PORT` in `s` with `ip`.
pub fn rewrite_wildcard(s: &str, ip: Ipv4Addr) -> String {
    const WILDCARD: &str = "0.0.0.0:";
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while let Some(at) = s[i..].find(WILDCARD) {
        let at = i + at;
        out.push_str(&s[i..at]);
        let boundary = at == 0 || s[..at].ends_with(['=', ' ', '/', ',', '@']);
        if boundary {
            out.push_str(&format!("{ip}:"));
        } else {
            out.push_str(WILDCARD);
        }
        i = at + WILDCARD.len();
    }
    out.push_str(&s[i..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mounts() -> Vec<Mount> {
        vec![
            Mount {
                container_path: "/data".into(),
                host_path: "/srv/pvc-1".into(),
            },
            Mount {
                container_path: "/etc/kvstore".into(),
                host_path: "/k/etc".into(),
            },
            Mount {
                container_path: "/etc/kvstore/secret/".into(),
                host_path: "/k/secret".into(),
            },
        ]
    }

    #[test]
    fn a_flag_value_that_is_a_mount_path_is_rewritten() {
        assert_eq!(
            rewrite_mounts("--data-dir=/data", &mounts()),
            "--data-dir=/srv/pvc-1"
        );
        assert_eq!(rewrite_mounts("/data", &mounts()), "/srv/pvc-1");
        assert_eq!(
            rewrite_mounts("/data/db.sqlite", &mounts()),
            "/srv/pvc-1/db.sqlite"
        );
    }

    #[test]
    fn the_longest_mount_path_wins() {
        assert_eq!(
            rewrite_mounts("--token-file=/etc/kvstore/secret/token", &mounts()),
            "--token-file=/k/secret/token"
        );
        assert_eq!(
            rewrite_mounts(
                "--topology-file=/etc/kvstore/topology/topology.json",
                &mounts()
            ),
            "--topology-file=/k/etc/topology/topology.json"
        );
    }

    #[test]
    fn a_path_that_only_begins_like_a_mount_path_is_left_alone() {
        assert_eq!(rewrite_mounts("/database", &mounts()), "/database");
        assert_eq!(rewrite_mounts("x/data", &mounts()), "x/data");
        assert_eq!(
            rewrite_mounts("--url=http://h/data", &mounts()),
            "--url=http://h/data"
        );
    }

    #[test]
    fn every_path_in_a_list_is_rewritten() {
        assert_eq!(
            rewrite_mounts("/data:/bin:/etc/kvstore", &mounts()),
            "/srv/pvc-1:/bin:/k/etc"
        );
        assert_eq!(
            rewrite_mounts("a=/data,b='/data'", &mounts()),
            "a=/srv/pvc-1,b='/srv/pvc-1'"
        );
    }

    #[test]
    fn a_root_mount_is_not_rewritten() {
        let root = [Mount {
            container_path: "/".into(),
            host_path: "/h".into(),
        }];
        assert_eq!(rewrite_mounts("/data", &root), "/data");
    }

    #[test]
    fn non_ascii_text_survives() {
        assert_eq!(rewrite_mounts("é=/data ü", &mounts()), "é=/srv/pvc-1 ü");
    }

    #[test]
    fn a_wildcard_listen_address_becomes_the_pod_ip() {
        let ip = Ipv4Addr::new(127, 0, 1, 7);
        assert_eq!(
            rewrite_wildcard("--listen=0.0.0.0:7400", ip),
            "--listen=127.0.1.7:7400"
        );
        assert_eq!(rewrite_wildcard("0.0.0.0:1", ip), "127.0.1.7:1");
        assert_eq!(
            rewrite_wildcard("http://0.0.0.0:80/x", ip),
            "http://127.0.1.7:80/x"
        );
        assert_eq!(rewrite_wildcard("10.0.0.0:80", ip), "10.0.0.0:80");
        assert_eq!(rewrite_wildcard("--listen=0.0.0.0", ip), "--listen=0.0.0.0");
    }
}
