//! The HTTP transport `object_store`'s S3 client runs on: the workspace's
//! reqwest, the one every kvstore component already uses.
//!
//! object_store's own `reqwest` feature does not build without a TLS backend
//! in reqwest and then picks one (aws-lc-rs) for the whole workspace, whose
//! reqwest every component shares (feature unification). Which TLS backend
//! that reqwest has is the TLS work's decision, not the backup's: through
//! this adapter, request signing, retries and the S3 protocol stay
//! object_store's, https works whenever the workspace's reqwest has TLS, and
//! plain http (a local S3-compatible server) always.

use std::time::Duration;

use http_body_util::BodyExt;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse,
    HttpResponseBody, HttpService,
};

/// Connects object_store to a reqwest client.
#[derive(Debug)]
pub struct ReqwestTransport {
    timeout: Duration,
}

impl ReqwestTransport {
    pub fn new(timeout: Duration) -> ReqwestTransport {
        ReqwestTransport { timeout }
    }
}

impl HttpConnector for ReqwestTransport {
    fn connect(&self, _options: &object_store::ClientOptions) -> object_store::Result<HttpClient> {
        let client = reqwest::Client::builder()
            .connect_timeout(self.timeout)
            .timeout(self.timeout)
            .build()
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })?;
        Ok(HttpClient::new(Service(client)))
    }
}

#[derive(Debug)]
struct Service(reqwest::Client);

fn kind(e: &reqwest::Error) -> HttpErrorKind {
    if e.is_timeout() {
        HttpErrorKind::Timeout
    } else if e.is_connect() {
        HttpErrorKind::Connect
    } else if e.is_decode() || e.is_body() {
        HttpErrorKind::Decode
    } else {
        HttpErrorKind::Request
    }
}

fn http_error(e: reqwest::Error) -> HttpError {
    HttpError::new(kind(&e), e)
}

#[async_trait::async_trait]
impl HttpService for Service {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let (parts, body) = req.into_parts();
        let url = reqwest::Url::parse(&parts.uri.to_string())
            .map_err(|e| HttpError::new(HttpErrorKind::Request, e))?;
        let mut out = reqwest::Request::new(parts.method, url);
        *out.headers_mut() = parts.headers;
        *out.body_mut() = Some(reqwest::Body::wrap(body));
        let resp = self.0.execute(out).await.map_err(http_error)?;
        let resp: http::Response<reqwest::Body> = resp.into();
        let (parts, body) = resp.into_parts();
        Ok(HttpResponse::from_parts(
            parts,
            HttpResponseBody::new(body.map_err(http_error)),
        ))
    }
}
