//! Probes: the pure state machine (when a probe is due, what a result means)
//! and the two actions this kubelet can run (`httpGet` over HTTP or HTTPS,
//! `tcpSocket`, both at the pod IP). `exec` and `grpc` probes always fail
//! with a message saying so.

use std::net::Ipv4Addr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Startup,
    Liveness,
    Readiness,
}

/// An `httpGet` probe's scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    /// TLS without verifying the server's certificate, as the real kubelet.
    Https,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Http {
        scheme: Scheme,
        port: u16,
        path: String,
        host: Option<String>,
        headers: Vec<(String, String)>,
    },
    Tcp {
        port: u16,
    },
    Unsupported(String),
}

/// A probe's settings with Kubernetes' defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub kind: Kind,
    pub action: Action,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

fn secs(v: Option<i32>, default: i32) -> Duration {
    Duration::from_secs(v.unwrap_or(default).max(0) as u64)
}

impl Spec {
    pub fn of(kind: Kind, probe: &Probe, container: &Container) -> Spec {
        let port = |p: &IntOrString| -> Result<u16, String> {
            match p {
                IntOrString::Int(n) => {
                    u16::try_from(*n).map_err(|_| format!("port {n} out of range"))
                }
                IntOrString::String(name) => container
                    .ports
                    .iter()
                    .flatten()
                    .find(|cp| cp.name.as_deref() == Some(name))
                    .and_then(|cp| u16::try_from(cp.container_port).ok())
                    .ok_or_else(|| format!("no container port named {name:?}")),
            }
        };
        let action = if let Some(h) = &probe.http_get {
            let scheme = match h.scheme.as_deref().unwrap_or("HTTP") {
                "HTTP" => Ok(Scheme::Http),
                "HTTPS" => Ok(Scheme::Https),
                other => Err(format!(
                    "httpGet scheme {other:?} is neither HTTP nor HTTPS"
                )),
            };
            match scheme.and_then(|scheme| Ok((scheme, port(&h.port)?))) {
                Ok((scheme, port)) => Action::Http {
                    scheme,
                    port,
                    path: h.path.clone().unwrap_or_else(|| "/".into()),
                    host: h.host.clone(),
                    headers: h
                        .http_headers
                        .iter()
                        .flatten()
                        .map(|x| (x.name.clone(), x.value.clone()))
                        .collect(),
                },
                Err(e) => Action::Unsupported(e),
            }
        } else if let Some(t) = &probe.tcp_socket {
            match port(&t.port) {
                Ok(port) => Action::Tcp { port },
                Err(e) => Action::Unsupported(e),
            }
        } else if probe.exec.is_some() {
            Action::Unsupported("exec probes are not supported by the test kubelet".into())
        } else {
            Action::Unsupported("only httpGet and tcpSocket probes are supported".into())
        };
        // Liveness and startup probes must have successThreshold 1 (API validation).
        let success_threshold = match kind {
            Kind::Readiness => probe.success_threshold.unwrap_or(1).max(1) as u32,
            _ => 1,
        };
        Spec {
            kind,
            action,
            initial_delay: secs(probe.initial_delay_seconds, 0),
            period: secs(probe.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: secs(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
            success_threshold,
            failure_threshold: probe.failure_threshold.unwrap_or(3).max(1) as u32,
        }
    }
}

/// The state of one probe of one running container.
#[derive(Clone, Debug)]
pub struct State {
    pub spec: Spec,
    /// The probe's current result: readiness and startup start failing,
    /// liveness starts succeeding (as the real kubelet's result cache does).
    pub ok: bool,
    successes: u32,
    failures: u32,
    next: Instant,
}

/// What a recorded result changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    None,
    /// The result became success (readiness: ready; startup: started).
    Succeeded,
    /// The result became failure (liveness/startup: the container is to be killed).
    Failed,
}

impl State {
    /// A probe for a container that started at `started`.
    pub fn new(spec: Spec, started: Instant) -> State {
        State {
            ok: spec.kind == Kind::Liveness,
            next: started + spec.initial_delay,
            spec,
            successes: 0,
            failures: 0,
        }
    }

    pub fn due(&self, now: Instant) -> bool {
        now >= self.next
    }

    /// Records one run's result at `now` and schedules the next run.
    pub fn record(&mut self, success: bool, now: Instant) -> Change {
        self.next = now + self.spec.period;
        if success {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.ok && self.successes >= self.spec.success_threshold {
                self.ok = true;
                return Change::Succeeded;
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            // A startup probe that has not succeeded yet fails the container
            // after failureThreshold attempts, as does a liveness probe.
            let was_ok = self.ok || self.spec.kind == Kind::Startup;
            if was_ok && self.failures >= self.spec.failure_threshold {
                self.ok = false;
                self.failures = 0;
                return Change::Failed;
            }
        }
        Change::None
    }
}

/// Runs a probe action against `ip`; `Err` carries why it failed.
pub async fn run(action: &Action, ip: Ipv4Addr, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, run_inner(action, ip)).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {timeout:?}")),
    }
}

async fn run_inner(action: &Action, ip: Ipv4Addr) -> Result<(), String> {
    match action {
        Action::Tcp { port } => TcpStream::connect((ip, *port))
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
        Action::Http {
            scheme,
            port,
            path,
            host,
            headers,
        } => {
            let target = host.clone().unwrap_or_else(|| ip.to_string());
            let tcp = TcpStream::connect((target.as_str(), *port))
                .await
                .map_err(|e| e.to_string())?;
            let mut req = format!(
                "GET {path} HTTP/1.1\r\nHost: {target}:{port}\r\nUser-Agent: kube-probe/kv-test-kubelet\r\nAccept: */*\r\nConnection: close\r\n"
            );
            for (k, v) in headers {
                req.push_str(&format!("{k}: {v}\r\n"));
            }
            req.push_str("\r\n");
            match scheme {
                Scheme::Http => status_of(tcp, &req).await,
                Scheme::Https => {
                    // An IP address is sent no SNI (rustls, like Go's client,
                    // sends a name only), a `host` is sent as one.
                    let name = match host {
                        Some(h) => ServerName::try_from(h.clone())
                            .map_err(|e| format!("host {h:?}: {e}"))?,
                        None => ServerName::IpAddress(std::net::IpAddr::V4(ip).into()),
                    };
                    let tls = tokio_rustls::TlsConnector::from(tls_config()?)
                        .connect(name, tcp)
                        .await
                        .map_err(|e| format!("TLS handshake: {e}"))?;
                    status_of(tls, &req).await
                }
            }
        }
        Action::Unsupported(why) => Err(why.clone()),
    }
}

/// Sends `req` and judges the status line of the answer.
async fn status_of<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, req: &str) -> Result<(), String> {
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before a status line".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {:?}", line.lines().next().unwrap_or("")))?;
    // As the real kubelet: 200..=399 is success.
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP probe failed with statuscode: {code}"))
    }
}

/// The client configuration of every HTTPS probe, built once.
fn tls_config() -> Result<Arc<ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let verifier = AnyServerCert(provider.signature_verification_algorithms);
            let mut config = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS protocol versions: {e}"))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(config))
        })
        .clone()
}

/// Accepts any server certificate: the real kubelet's HTTPS probes set
/// `InsecureSkipVerify` (a probe checks that the container answers, not who
/// it is), and this is what that amounts to in rustls. The handshake's
/// signatures are still checked, as Go's client does: the server must hold
/// the key of the certificate it shows, whatever that certificate is.
#[derive(Debug)]
struct AnyServerCert(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, HTTPGetAction};

    fn spec(kind: Kind, success: u32, failure: u32) -> Spec {
        Spec {
            kind,
            action: Action::Tcp { port: 1 },
            initial_delay: Duration::from_secs(5),
            period: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            success_threshold: success,
            failure_threshold: failure,
        }
    }

    #[test]
    fn a_probe_waits_for_its_initial_delay_then_runs_every_period() {
        let t0 = Instant::now();
        let mut s = State::new(spec(Kind::Readiness, 1, 3), t0);
        assert!(!s.due(t0 + Duration::from_secs(4)));
        assert!(s.due(t0 + Duration::from_secs(5)));
        s.record(true, t0 + Duration::from_secs(5));
        assert!(!s.due(t0 + Duration::from_secs(6)));
        assert!(s.due(t0 + Duration::from_secs(7)));
    }

    #[test]
    fn readiness_needs_success_threshold_successes_and_failure_threshold_failures() {
        let t = Instant::now();
        let mut s = State::new(spec(Kind::Readiness, 2, 3), t);
        assert!(!s.ok);
        assert_eq!(s.record(true, t), Change::None);
        assert_eq!(s.record(true, t), Change::Succeeded);
        assert!(s.ok);
        assert_eq!(s.record(false, t), Change::None);
        assert_eq!(
            s.record(true, t),
            Change::None,
            "a success resets the failure count"
        );
        assert_eq!(s.record(false, t), Change::None);
        assert_eq!(s.record(false, t), Change::None);
        assert_eq!(s.record(false, t), Change::Failed);
        assert!(!s.ok);
        assert_eq!(
            s.record(false, t),
            Change::None,
            "already failed: no new change"
        );
    }

    #[test]
    fn liveness_starts_ok_and_fails_after_the_threshold() {
        let t = Instant::now();
        let mut s = State::new(spec(Kind::Liveness, 1, 2), t);
        assert!(s.ok);
        assert_eq!(s.record(false, t), Change::None);
        assert_eq!(s.record(false, t), Change::Failed);
    }

    #[test]
    fn a_startup_probe_that_never_succeeds_fails_the_container() {
        let t = Instant::now();
        let mut s = State::new(spec(Kind::Startup, 1, 3), t);
        assert!(!s.ok);
        assert_eq!(s.record(false, t), Change::None);
        assert_eq!(s.record(false, t), Change::None);
        assert_eq!(s.record(false, t), Change::Failed);
        let mut s = State::new(spec(Kind::Startup, 1, 3), t);
        assert_eq!(s.record(false, t), Change::None);
        assert_eq!(s.record(true, t), Change::Succeeded);
    }

    #[test]
    fn defaults_and_named_ports_follow_kubernetes() {
        let c = Container {
            name: "kv-node".into(),
            ports: Some(vec![ContainerPort {
                name: Some("client".into()),
                container_port: 7400,
                ..Default::default()
            }]),
            ..Default::default()
        };
        let p = Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/readyz".into()),
                port: IntOrString::String("client".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = Spec::of(Kind::Readiness, &p, &c);
        assert_eq!(
            s.action,
            Action::Http {
                scheme: Scheme::Http,
                port: 7400,
                path: "/readyz".into(),
                host: None,
                headers: vec![]
            }
        );
        assert_eq!(
            (
                s.period,
                s.timeout,
                s.success_threshold,
                s.failure_threshold
            ),
            (Duration::from_secs(10), Duration::from_secs(1), 1, 3)
        );
        let bad = Probe {
            http_get: Some(HTTPGetAction {
                port: IntOrString::String("nope".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(
            matches!(Spec::of(Kind::Liveness, &bad, &c).action, Action::Unsupported(m) if m.contains("nope"))
        );
        let with_scheme = |scheme: &str| {
            let p = Probe {
                http_get: Some(HTTPGetAction {
                    port: IntOrString::Int(7400),
                    scheme: Some(scheme.into()),
                    ..Default::default()
                }),
                ..Default::default()
            };
            Spec::of(Kind::Readiness, &p, &c).action
        };
        assert!(matches!(
            with_scheme("HTTPS"),
            Action::Http {
                scheme: Scheme::Https,
                ..
            }
        ));
        assert!(
            matches!(with_scheme("FTP"), Action::Unsupported(m) if m.contains("FTP")),
            "the API allows HTTP and HTTPS only"
        );
    }

    #[tokio::test]
    async fn http_and_tcp_actions_reach_a_listener() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            for answer in [
                "HTTP/1.1 200 OK\r\n\r\n",
                "HTTP/1.1 503 Service Unavailable\r\n\r\n",
            ] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                s.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let ip = Ipv4Addr::LOCALHOST;
        let http = Action::Http {
            scheme: Scheme::Http,
            port,
            path: "/readyz".into(),
            host: None,
            headers: vec![],
        };
        assert_eq!(run(&http, ip, Duration::from_secs(2)).await, Ok(()));
        let err = run(&http, ip, Duration::from_secs(2)).await.unwrap_err();
        assert!(err.contains("503"), "{err}");
        assert!(
            run(&Action::Tcp { port }, ip, Duration::from_secs(2))
                .await
                .is_err(),
            "listener gone after two accepts"
        );
    }

    /// A server on 127.0.0.1 that answers each of `answers` to one request,
    /// over TLS with a certificate from a CA the probe has never seen when
    /// `tls` (the probe must not verify it), in plain text otherwise.
    async fn server(tls: bool, answers: &'static [&'static str]) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        // The directory lives as long as the server: the acceptor reads the
        // files again when they change.
        let tls = tls.then(|| {
            let ca = kv_net::pki::Ca::generate("a CA the probe does not trust").unwrap();
            let (cert, key) = ca.issue("kv-node", &["kv-0.example"]).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let files = kv_net::tls::ServerFiles {
                cert: dir.path().join("tls.crt"),
                key: dir.path().join("tls.key"),
                client_ca: None,
            };
            std::fs::write(&files.cert, cert).unwrap();
            std::fs::write(&files.key, key).unwrap();
            let server = kv_net::tls::ServerTls::load(&files).unwrap();
            (server, dir)
        });
        tokio::spawn(async move {
            let acceptor = tls
                .as_ref()
                .map(|(server, _dir)| tokio_rustls::TlsAcceptor::from(server.config()));
            for answer in answers {
                let (s, _) = l.accept().await.unwrap();
                let answer_on = async |mut s: Box<dyn Stream>| {
                    let mut buf = [0u8; 512];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(answer.as_bytes()).await;
                    let _ = s.shutdown().await;
                };
                match &acceptor {
                    // A failed handshake (a plaintext client) gets no answer.
                    Some(a) => {
                        if let Ok(s) = a.accept(s).await {
                            answer_on(Box::new(s)).await
                        }
                    }
                    None => answer_on(Box::new(s)).await,
                }
            }
        });
        port
    }

    trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

    fn get(scheme: Scheme, port: u16) -> Action {
        Action::Http {
            scheme,
            port,
            path: "/readyz".into(),
            host: None,
            headers: vec![],
        }
    }

    #[tokio::test]
    async fn https_probes_pass_on_any_certificate_and_judge_the_status() {
        const OK: &str = "HTTP/1.1 200 OK\r\n\r\n";
        const UNAVAILABLE: &str = "HTTP/1.1 503 Service Unavailable\r\n\r\n";
        let ip = Ipv4Addr::LOCALHOST;
        let t = Duration::from_secs(5);
        let port = server(true, &[OK, UNAVAILABLE, OK]).await;
        assert_eq!(run(&get(Scheme::Https, port), ip, t).await, Ok(()));
        let err = run(&get(Scheme::Https, port), ip, t).await.unwrap_err();
        assert!(err.contains("503"), "{err}");
        let err = run(&get(Scheme::Http, port), ip, t).await.unwrap_err();
        assert!(
            !err.contains("statuscode"),
            "plain HTTP to a TLS port gets no status line: {err}"
        );

        let plain = server(false, &[OK, OK]).await;
        let err = run(&get(Scheme::Https, plain), ip, t).await.unwrap_err();
        assert!(err.contains("TLS handshake"), "{err}");
        assert_eq!(
            run(&get(Scheme::Http, plain), ip, t).await,
            Ok(()),
            "the plaintext server does answer 200 over HTTP"
        );
    }
}
