//! A plaintext client must build where the system has no CA certificates
//! (the `FROM scratch` images): reqwest's own TLS setup fails there, and
//! the node's peer client and the operator's node client fell back to a
//! constructor that panics (the node image crashed at start).
//! Its own test binary: it empties the system's certificate paths for the
//! whole process.

#[test]
fn a_plaintext_client_builds_without_system_ca_certificates() {
    let empty = tempfile::tempdir().expect("a scratch directory");
    // SAFETY: this test binary has this one test; no other thread reads
    // the environment while it is changed.
    unsafe {
        std::env::set_var("SSL_CERT_FILE", empty.path().join("none.pem"));
        std::env::set_var("SSL_CERT_DIR", empty.path());
    }
    assert!(
        reqwest::Client::builder().build().is_err(),
        "reqwest's default TLS setup needs system certificates (so this test shows the case)"
    );
    let config = kv_net::tls::plaintext_client_config().expect("a client configuration");
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .build()
        .expect("a plaintext client builds without system certificates");
}
