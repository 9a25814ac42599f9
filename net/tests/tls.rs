//! kv-net's accept loop over TLS, with real handshakes on loopback: who is
//! refused, who is served, and certificate files replaced under load.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kv_net::pki::{Ca, write_private};
use kv_net::tls::{Identity, ServerFiles, ServerTls, client_config};
use rustls::pki_types::pem::PemObject;
use warp::Filter;

struct Server {
    url: String,
    _stop: tokio::sync::watch::Sender<bool>,
}

async fn start(files: &ServerFiles) -> Server {
    let tls = ServerTls::load(files).expect("the server's TLS files load");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("loopback");
    let port = listener.local_addr().expect("bound").port();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let filter = warp::any().map(|| "ok");
    tokio::spawn(kv_net::serve_tls(
        "test",
        filter,
        listener,
        Some(tls),
        stopped,
    ));
    Server {
        url: format!("https://127.0.0.1:{port}/"),
        _stop: stop,
    }
}

/// `name.crt` and `name.key` issued by `ca` in `dir`, for loopback.
fn issue(ca: &Ca, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = ca
        .issue(name, &["127.0.0.1", "localhost"])
        .expect("a certificate");
    let (c, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert).expect("write");
    write_private(&k, key.as_bytes()).expect("write");
    (c, k)
}

fn write_ca(ca: &Ca, dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, ca.cert_pem()).expect("write");
    p
}

/// A client trusting `ca` only (reqwest's own rustls setup).
fn trusting(ca: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca).expect("CA file");
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).expect("PEM")])
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a client")
}

/// A client trusting `ca` and presenting `id` (kv-net's client config).
fn presenting(ca: &Path, id: Option<(&Path, &Path)>) -> reqwest::Client {
    let id = id.map(|(c, k)| Identity::load(c, k).expect("identity"));
    reqwest::Client::builder()
        .tls_backend_preconfigured(client_config(ca, id).expect("client config"))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a client")
}

async fn status(client: &reqwest::Client, url: &str) -> Result<u16, String> {
    client
        .get(url)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test]
async fn a_client_without_the_ca_is_refused_and_one_with_it_is_served() {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let ca = Ca::generate("test CA").expect("CA");
    let ca_file = write_ca(&ca, dir.path(), "ca.crt");
    let (cert, key) = issue(&ca, dir.path(), "server");
    let s = start(&ServerFiles {
        cert,
        key,
        client_ca: None,
    })
    .await;
    assert_eq!(status(&trusting(&ca_file), &s.url).await, Ok(200));
    let other = Ca::generate("another CA").expect("CA");
    let other_file = write_ca(&other, dir.path(), "other.crt");
    assert!(status(&trusting(&other_file), &s.url).await.is_err());
    let default = reqwest::Client::builder().build().expect("a client");
    assert!(status(&default, &s.url).await.is_err(), "platform roots");
    let plain = s.url.replace("https://", "http://");
    assert!(status(&default, &plain).await.is_err(), "plaintext");
}

#[tokio::test]
async fn with_a_client_ca_only_clients_with_its_certificates_are_served() {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let ca = Ca::generate("cluster CA").expect("CA");
    let ca_file = write_ca(&ca, dir.path(), "ca.crt");
    let (cert, key) = issue(&ca, dir.path(), "node-0");
    let s = start(&ServerFiles {
        cert,
        key,
        client_ca: Some(ca_file.clone()),
    })
    .await;
    let (peer_c, peer_k) = issue(&ca, dir.path(), "node-1");
    assert_eq!(
        status(&presenting(&ca_file, Some((&peer_c, &peer_k))), &s.url).await,
        Ok(200)
    );
    assert!(
        status(&presenting(&ca_file, None), &s.url).await.is_err(),
        "no client certificate"
    );
    let other = Ca::generate("cluster CA").expect("CA");
    let (stranger_c, stranger_k) = issue(&other, dir.path(), "stranger");
    assert!(
        status(
            &presenting(&ca_file, Some((&stranger_c, &stranger_k))),
            &s.url
        )
        .await
        .is_err(),
        "a certificate of another CA, same CA name"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotated_on_disk_are_served_without_a_failed_request() {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let ca = Ca::generate("test CA").expect("CA");
    let ca_file = write_ca(&ca, dir.path(), "ca.crt");
    let (cert, key) = issue(&ca, dir.path(), "server");
    let s = start(&ServerFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: None,
    })
    .await;
    // A new connection per request: every request is a handshake with the
    // configuration of its moment.
    let pem = std::fs::read(&ca_file).expect("CA file");
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).expect("PEM")])
        .pool_max_idle_per_host(0)
        .tls_info(true)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a client");
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (stop_load, load_stopped) = tokio::sync::watch::channel(false);
    let mut load = Vec::new();
    for _ in 0..4 {
        let (client, url, ok, failed) = (client.clone(), s.url.clone(), ok.clone(), failed.clone());
        let stopped = load_stopped.clone();
        load.push(tokio::spawn(async move {
            while !*stopped.borrow() {
                match status(&client, &url).await {
                    Ok(200) => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("failed request: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    for round in 0..5 {
        let before = ok.load(Ordering::Relaxed);
        let (new_cert, new_key) = ca
            .issue(&format!("server-{round}"), &["127.0.0.1", "localhost"])
            .expect("a certificate");
        // In place and key first: a handshake may see the new key with the
        // old certificate, or a half-written file, and must still succeed.
        write_private(&key, new_key.as_bytes()).expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::fs::write(&cert, &new_cert).expect("write");
        let want =
            rustls::pki_types::CertificateDer::from_pem_slice(new_cert.as_bytes()).expect("PEM");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let served = client.get(&s.url).send().await.ok().and_then(|r| {
                r.extensions()
                    .get::<reqwest::tls::TlsInfo>()
                    .and_then(|i| i.peer_certificate().map(<[u8]>::to_vec))
            });
            if served.as_deref() == Some(want.as_ref()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: the new certificate is not served"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The load goes on across the rotation, not only before it.
        while ok.load(Ordering::Relaxed) < before + 10 {
            assert!(
                Instant::now() < deadline,
                "round {round}: requests stopped being served"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let _ = stop_load.send(true);
    for l in load {
        l.await.expect("a load task");
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("{ok} requests served across 5 rotations, {failed} failed");
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
}

#[tokio::test]
async fn a_client_trusts_a_rotated_ca_from_its_next_connection_without_being_rebuilt() {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let old = Ca::generate("old CA").expect("CA");
    let ca_file = write_ca(&old, dir.path(), "ca.crt");
    let (cert, key) = issue(&old, dir.path(), "server");
    let s = start(&ServerFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: None,
    })
    .await;
    // One client for the whole test, as a node or the gateway keeps one;
    // no pooled connection, so that each request makes a handshake.
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(client_config(&ca_file, None).expect("client config"))
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a client");
    assert_eq!(status(&client, &s.url).await, Ok(200), "the first CA");

    // The server moves to a certificate of a new CA and the client's CA
    // file is replaced by the new CA (a rename, as a mounted Secret changes).
    let new = Ca::generate("new CA").expect("CA");
    let fresh = dir.path().join("fresh");
    std::fs::create_dir(&fresh).expect("mkdir");
    let (new_cert, new_key) = issue(&new, &fresh, "server");
    std::fs::rename(&new_key, &key).expect("the new key");
    std::fs::rename(&new_cert, &cert).expect("the new certificate");
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&client, &s.url).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the server never served the new certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let new_ca = write_ca(&new, &fresh, "ca.crt");
    std::fs::rename(&new_ca, &ca_file).expect("the new CA file");
    assert_eq!(
        status(&client, &s.url).await,
        Ok(200),
        "the same client trusts the new CA"
    );

    // A CA file that does not load keeps the last good CA.
    std::fs::write(&ca_file, "not PEM").expect("write");
    assert_eq!(
        status(&client, &s.url).await,
        Ok(200),
        "after a bad CA file"
    );
}
