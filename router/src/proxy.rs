//! Sending a request to one endpoint: the received body bytes as they are, the client's
//! headers minus hop-by-hop ones, TCP_NODELAY, pooled keep-alive connections.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::UpstreamConfig;
use crate::endpoint::Endpoint;

/// Why an attempt on an endpoint produced no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made (refused, unreachable, connect timeout).
    #[error("connecting to the endpoint failed")]
    Connect(#[source] hyper_util::client::legacy::Error),
    /// The connection broke before a response head arrived.
    #[error("the endpoint closed the connection before answering")]
    Send(#[source] hyper_util::client::legacy::Error),
    /// No response head within the configured time.
    #[error("the endpoint did not answer within {0:?}")]
    Timeout(Duration),
    /// A probe or listing got a non-2xx answer.
    #[error("the endpoint answered {0}")]
    Status(http::StatusCode),
    /// The endpoint URI could not be formed from the request path.
    #[error("the request path cannot be forwarded")]
    Uri(#[source] http::Error),
    /// A streamed response broke before it carried any model output.
    #[error("the endpoint's stream broke before its first output")]
    BrokeBeforeOutput(#[source] hyper::Error),
}

impl UpstreamError {
    /// Fixed metric label.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "upstream_connect",
            UpstreamError::Send(_) => "upstream_closed",
            UpstreamError::Timeout(_) => "upstream_timeout",
            UpstreamError::Status(_) => "upstream_status",
            UpstreamError::Uri(_) => "bad_path",
            UpstreamError::BrokeBeforeOutput(_) => "upstream_broke",
        }
    }

    /// Whether the endpoint is certainly down (rather than slow or flaky).
    #[must_use]
    pub fn endpoint_down(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }
}

/// Headers that describe one connection, not the request (RFC 9110 §7.6.1), plus those the
/// router sets itself. `Expect: 100-continue` was answered by the router when it read the
/// body; the endpoint gets the whole body at once.
const NOT_FORWARDED: &[HeaderName] = &[
    header::CONNECTION,
    header::EXPECT,
    header::HOST,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// Most bytes held back while waiting for a streamed response's first output; past this the
/// response is passed on as it is.
const HOLD_BYTES: usize = 1 << 20;

/// Waits, up to `limit`, for the first of `markers` (the model's first output, see
/// [`crate::request::Route::first_output_markers`]) in a streamed response's body, keeping
/// what arrived before it. The response comes back with those frames when the output shows,
/// when the body ended whole, or when `limit` or [`HOLD_BYTES`] ran out.
///
/// # Errors
/// When the body breaks first: nothing has reached the client, so the request can go to
/// another endpoint.
pub async fn hold_until_output(
    res: Response<Incoming>,
    markers: [&[u8]; 2],
    limit: Duration,
) -> Result<(Response<Incoming>, Vec<Bytes>), UpstreamError> {
    use http_body_util::BodyExt;
    let (head, mut body) = res.into_parts();
    let mut seen: Vec<Bytes> = Vec::new();
    let mut held = 0;
    // The end of the previous frame, for a marker split across frames.
    let keep = markers.iter().map(|m| m.len()).max().unwrap_or(0);
    let mut window: Vec<u8> = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(Err(e))) => return Err(UpstreamError::BrokeBeforeOutput(e)),
            Ok(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else { continue };
                window.extend_from_slice(&data);
                let found = markers.iter().any(|m| memchr::memmem::find(&window, m).is_some());
                window.drain(..window.len().saturating_sub(keep));
                held += data.len();
                seen.push(data);
                if found || held > HOLD_BYTES {
                    break;
                }
            }
        }
    }
    Ok((Response::from_parts(head, body), seen))
}

/// The HTTP client to endpoints.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
    response_timeout: Duration,
}

impl Upstream {
    /// A client with the given timeouts.
    #[must_use]
    pub fn new(config: &UpstreamConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .build(connector);
        Self { client, response_timeout: config.response_timeout }
    }

    /// Sends one request to `endpoint` and waits for the response head.
    ///
    /// # Errors
    /// When no response head arrives; a 5xx head is a response, not an error.
    pub async fn send(
        &self,
        endpoint: &Endpoint,
        method: Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let uri = endpoint.spec.uri(path_and_query).map_err(UpstreamError::Uri)?;
        let mut req = Request::new(Full::new(body.clone()));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        let out = req.headers_mut();
        out.reserve(headers.len());
        let connection_named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::try_from(n.trim()).ok())
            .collect();
        for (name, value) in headers {
            if !NOT_FORWARDED.contains(name)
                && name.as_str() != "keep-alive"
                && !connection_named.contains(name)
            {
                out.append(name.clone(), value.clone());
            }
        }
        if !body.is_empty() || headers.contains_key(header::CONTENT_LENGTH) {
            out.insert(header::CONTENT_LENGTH, header::HeaderValue::from(body.len()));
        }
        match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
            Err(_) => Err(UpstreamError::Timeout(self.response_timeout)),
            Ok(Err(e)) if e.is_connect() => Err(UpstreamError::Connect(e)),
            Ok(Err(e)) => Err(UpstreamError::Send(e)),
            Ok(Ok(res)) => Ok(res),
        }
    }

    /// `GET path` on `endpoint` within `timeout`, body collected (probes and `/v1/models`).
    ///
    /// # Errors
    /// On any failure, including a slow or non-2xx answer.
    pub async fn get(
        &self,
        endpoint: &Endpoint,
        path: &str,
        timeout: Duration,
    ) -> Result<Bytes, UpstreamError> {
        use http_body_util::BodyExt;
        let fut = async {
            let res =
                self.send(endpoint, Method::GET, path, &HeaderMap::new(), Bytes::new()).await?;
            if !res.status().is_success() {
                return Err(UpstreamError::Status(res.status()));
            }
            res.into_body()
                .collect()
                .await
                .map(http_body_util::Collected::to_bytes)
                .map_err(|_| UpstreamError::Status(http::StatusCode::BAD_GATEWAY))
        };
        tokio::time::timeout(timeout, fut).await.unwrap_or(Err(UpstreamError::Timeout(timeout)))
    }
}
