//! Pooled HTTP/1.1 client connections to one server, plaintext or TLS.
//!
//! A node calls its peers many thousand times a second; reqwest's client
//! (URL parsing, its pool's bookkeeping, a request built through a builder)
//! cost more CPU per request than the request itself on loopback
//! (bench/profile.md). This is the part of it the peers need: keep-alive
//! connections to one `host:port`, a request on an idle one or on a new one,
//! the whole answer read, the connection put back.
//!
//! A request that times out or fails drops its connection (hyper closes a
//! connection whose answer was abandoned, and we abort its task too), so a
//! late answer can never be read as the next request's. A request that a
//! pooled connection could not even start to send (the server closed the
//! connection while it sat idle) is sent again once on a new connection:
//! nothing of it reached the server.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use warp::http::{HeaderMap, Request, StatusCode};

/// Idle connections kept per server; more are closed when they come back.
const MAX_IDLE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Transport(String),
}

/// A whole answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

struct Conn {
    send: SendRequest<Full<Bytes>>,
    /// The task driving the connection: stopped with the connection, so one
    /// dropped with an answer outstanding holds no socket.
    task: tokio::task::AbortHandle,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Keep-alive HTTP/1.1 connections to one server.
pub struct H1Pool {
    authority: String,
    /// The `Host` header of every request: the authority.
    host: Option<warp::http::HeaderValue>,
    connect_timeout: Duration,
    /// TLS on every connection (its handshake within `connect_timeout`),
    /// the server named by the authority's host.
    tls: Option<tokio_rustls::TlsConnector>,
    idle: Mutex<Vec<Conn>>,
}

impl H1Pool {
    /// Connections to `authority` (`host:port`), each opened within
    /// `connect_timeout`.
    pub fn new(authority: &str, connect_timeout: Duration) -> H1Pool {
        H1Pool {
            authority: authority.to_string(),
            host: warp::http::HeaderValue::from_str(authority).ok(),
            connect_timeout,
            tls: None,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// [`H1Pool::new`] over TLS with `config` (its ALPN should offer
    /// `http/1.1` only: this pool speaks nothing else).
    pub fn with_tls(
        authority: &str,
        connect_timeout: Duration,
        config: Arc<rustls::ClientConfig>,
    ) -> H1Pool {
        H1Pool {
            tls: Some(tokio_rustls::TlsConnector::from(config)),
            ..H1Pool::new(authority, connect_timeout)
        }
    }

    /// Idle connections now in the pool.
    pub fn idle(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Sends `req` (origin-form URI; the `Host` header is added) and reads
    /// the whole answer, all within `timeout`.
    pub async fn send(
        &self,
        req: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<Answer, H1Error> {
        tokio::time::timeout(timeout, self.send_now(req))
            .await
            .map_err(|_| H1Error::Timeout(timeout))?
    }

    async fn send_now(&self, mut req: Request<Full<Bytes>>) -> Result<Answer, H1Error> {
        if let Some(host) = &self.host {
            req.headers_mut()
                .insert(warp::http::header::HOST, host.clone());
        }
        let (mut conn, pooled) = match self.take_idle() {
            Some(c) => (c, true),
            None => (self.connect().await?, false),
        };
        let resp = match conn.send.try_send_request(req).await {
            Ok(resp) => resp,
            Err(mut e) => match e.take_message() {
                // never sent: the idle connection had been closed under us
                Some(req) if pooled => {
                    conn = self.connect().await?;
                    conn.send
                        .send_request(req)
                        .await
                        .map_err(|e| H1Error::Transport(crate::error_chain(&e)))?
                }
                _ => return Err(H1Error::Transport(crate::error_chain(e.error()))),
            },
        };
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| H1Error::Transport(crate::error_chain(&e)))?
            .to_bytes();
        self.put_back(conn);
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// An idle connection that can take a request now.
    fn take_idle(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop() {
            if c.send.is_ready() {
                return Some(c);
            }
        }
        None
    }

    fn put_back(&self, conn: Conn) {
        if !conn.send.is_ready() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    async fn connect(&self) -> Result<Conn, H1Error> {
        tokio::time::timeout(self.connect_timeout, self.connect_now())
            .await
            .map_err(|_| {
                H1Error::Connect(
                    self.authority.clone(),
                    format!("no connection within {:?}", self.connect_timeout),
                )
            })?
    }

    async fn connect_now(&self) -> Result<Conn, H1Error> {
        let fail = |e: String| H1Error::Connect(self.authority.clone(), e);
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| fail(e.to_string()))?;
        stream.set_nodelay(true).map_err(|e| fail(e.to_string()))?;
        match &self.tls {
            None => self.handshake(stream).await,
            Some(tls) => {
                let host = host_of(&self.authority);
                let name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| fail(format!("{host:?} cannot be a TLS server name: {e}")))?;
                let stream = tls
                    .connect(name, stream)
                    .await
                    .map_err(|e| fail(format!("TLS: {}", crate::error_chain(&e))))?;
                self.handshake(stream).await
            }
        }
    }

    async fn handshake<I>(&self, io: I) -> Result<Conn, H1Error>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| H1Error::Connect(self.authority.clone(), crate::error_chain(&e)))?;
        // ends when the server closes the connection or `Conn` is dropped
        let task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "client connection ended");
            }
        })
        .abort_handle();
        Ok(Conn { send, task })
    }
}

/// The host of `host:port` (`[v6]:port` gives `v6`).
fn host_of(authority: &str) -> &str {
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A listener on a free loopback port, and its address.
    async fn listen() -> (tokio::net::TcpListener, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        (listener, addr)
    }

    /// A server that answers each request on a connection with `200` and
    /// the connection's number, closing every connection after `per_conn`
    /// answers (0: never), and counts connections.
    async fn server(per_conn: usize) -> (String, Arc<AtomicUsize>) {
        let (listener, addr) = listen().await;
        let conns = Arc::new(AtomicUsize::new(0));
        let counted = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut answered = 0;
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(read) = s.read(&mut chunk).await else {
                            return;
                        };
                        if read == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..read]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let body = n.to_string();
                            let answer = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if s.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                            answered += 1;
                            if per_conn > 0 && answered == per_conn {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, conns)
    }

    fn get() -> Request<Full<Bytes>> {
        Request::get("/x")
            .body(Full::new(Bytes::new()))
            .expect("request")
    }

    #[tokio::test]
    async fn requests_reuse_one_idle_connection() {
        let (addr, conns) = server(0).await;
        let pool = H1Pool::new(&addr, Duration::from_secs(2));
        for _ in 0..5 {
            let a = pool
                .send(get(), Duration::from_secs(2))
                .await
                .expect("answer");
            assert_eq!(a.status, StatusCode::OK);
            assert_eq!(&a.body[..], b"1");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle(), 1);
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_while_idle_is_replaced() {
        let (addr, conns) = server(1).await;
        let pool = H1Pool::new(&addr, Duration::from_secs(2));
        for i in 1..=3 {
            let a = pool
                .send(get(), Duration::from_secs(2))
                .await
                .expect("answer");
            assert_eq!(a.body, Bytes::from(i.to_string()));
            // the server's close reaches the idle connection
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn concurrent_requests_get_connections_of_their_own() {
        let (addr, conns) = server(0).await;
        let pool = Arc::new(H1Pool::new(&addr, Duration::from_secs(2)));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                pool.send(get(), Duration::from_secs(2))
                    .await
                    .map(|a| a.status)
            }));
        }
        for t in tasks {
            assert_eq!(t.await.expect("task").expect("answer"), StatusCode::OK);
        }
        let opened = conns.load(Ordering::SeqCst);
        assert!((1..=4).contains(&opened), "{opened} connections");
        assert_eq!(pool.idle(), opened);
    }

    #[tokio::test]
    async fn a_request_without_an_answer_times_out_and_its_connection_is_not_reused() {
        // accepts and reads, never answers
        let (listener, addr) = listen().await;
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                held.push(s);
            }
        });
        let pool = H1Pool::new(&addr, Duration::from_secs(2));
        for _ in 0..2 {
            let e = pool
                .send(get(), Duration::from_millis(100))
                .await
                .expect_err("no answer");
            assert!(matches!(e, H1Error::Timeout(_)), "{e}");
        }
        assert_eq!(pool.idle(), 0);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").to_string()
        };
        let pool = H1Pool::new(&addr, Duration::from_secs(2));
        let e = pool
            .send(get(), Duration::from_secs(2))
            .await
            .expect_err("refused");
        assert!(matches!(e, H1Error::Connect(..)), "{e}");
    }

    /// A TLS server (certificate for 127.0.0.1 from a new CA) that answers
    /// 200 `tls`; its address and the CA's certificate.
    async fn tls_server(dir: &std::path::Path) -> (String, String) {
        let ca = crate::pki::Ca::generate("h1 test CA").expect("a CA");
        let (cert, key) = ca.issue("server", &["127.0.0.1"]).expect("a certificate");
        let files = crate::tls::ServerFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            client_ca: None,
        };
        std::fs::write(&files.cert, cert).expect("write");
        std::fs::write(&files.key, key).expect("write");
        let tls = crate::tls::ServerTls::load(&files).expect("the files load");
        let (listener, addr) = listen().await;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let routes = crate::http::request_filter(
            |_: &crate::http::Incoming| 0,
            |_, _| async { crate::http::Response::new("tls".into()) },
        );
        tokio::spawn(async move {
            let _stop = stop;
            crate::serve_tls("test", routes, listener, Some(tls), stopped).await
        });
        (addr, ca.cert_pem().to_string())
    }

    #[tokio::test]
    async fn a_tls_pool_verifies_the_server_and_reuses_its_connection() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let (addr, ca) = tls_server(dir.path()).await;
        let trusting = crate::tls::client_config_pem(ca.as_bytes(), None).expect("a config");
        let pool = H1Pool::with_tls(&addr, Duration::from_secs(5), Arc::new(trusting));
        for _ in 0..3 {
            let a = pool
                .send(get(), Duration::from_secs(5))
                .await
                .expect("answer");
            assert_eq!((a.status, &a.body[..]), (StatusCode::OK, &b"tls"[..]));
        }
        assert_eq!(pool.idle(), 1);

        let other = crate::pki::Ca::generate("another CA").expect("a CA");
        let stranger =
            crate::tls::client_config_pem(other.cert_pem().as_bytes(), None).expect("a config");
        let pool = H1Pool::with_tls(&addr, Duration::from_secs(5), Arc::new(stranger));
        let e = pool
            .send(get(), Duration::from_secs(5))
            .await
            .expect_err("a server this client does not trust");
        assert!(matches!(e, H1Error::Connect(..)), "{e}");
    }

    #[test]
    fn the_tls_server_name_is_the_authoritys_host() {
        assert_eq!(host_of("127.0.0.1:7001"), "127.0.0.1");
        assert_eq!(host_of("kv-0.kv.default.svc:7001"), "kv-0.kv.default.svc");
        assert_eq!(host_of("[::1]:7001"), "::1");
        assert_eq!(host_of("node"), "node");
    }
}
