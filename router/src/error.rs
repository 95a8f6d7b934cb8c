//! Every error a client can see, mapped to an HTTP status and its API's error JSON (OpenAI's
//! or Anthropic's) in exactly one place ([`ApiError::into_response_for`]).

use bytes::Bytes;
use http::{header, Response, StatusCode};

use crate::body::ResponseBody;
use crate::proxy::UpstreamError;
use crate::request::{Dialect, InvalidBody};

/// An error answered by the router itself.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body cannot be routed.
    #[error(transparent)]
    InvalidBody(#[from] InvalidBody),
    /// The body is over the limit.
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge {
        /// The configured limit.
        limit: u64,
    },
    /// The client did not send its body in time.
    #[error("request body not received within {0:?}")]
    BodyTimeout(std::time::Duration),
    /// The client's connection failed while sending the body.
    #[error("reading the request body failed")]
    ReadBody(#[source] hyper::Error),
    /// No route at this path.
    #[error("no route for {0}")]
    NotFound(String),
    /// The path exists with other methods (those named, as in an `Allow` header).
    #[error("method not allowed (allowed: {0})")]
    MethodNotAllowed(&'static str),
    /// No endpoint is known.
    #[error("no endpoints are available")]
    NoEndpoints,
    /// Every attempt failed before any response.
    #[error("every endpoint tried failed: {0}")]
    Upstream(#[source] UpstreamError),
}

impl ApiError {
    /// Fixed metric label.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            ApiError::InvalidBody(_) => "bad_request",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::BodyTimeout(_) => "body_timeout",
            ApiError::ReadBody(_) => "client_disconnected",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::NoEndpoints => "no_endpoints",
            ApiError::Upstream(e) => e.metric_label(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidBody(_) => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            // Malformed framing (a bad chunk size), or a client that went away mid-body.
            ApiError::ReadBody(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NoEndpoints => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Upstream(UpstreamError::Timeout(_)) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidBody(_)
            | ApiError::BodyTooLarge { .. }
            | ApiError::BodyTimeout(_)
            | ApiError::ReadBody(_)
            | ApiError::MethodNotAllowed(_) => "invalid_request_error",
            ApiError::NotFound(_) => "not_found_error",
            ApiError::NoEndpoints | ApiError::Upstream(_) => "service_unavailable_error",
        }
    }

    /// Anthropic's name for the error's kind.
    fn anthropic_kind(&self) -> &'static str {
        match self {
            ApiError::BodyTooLarge { .. } => "request_too_large",
            ApiError::NotFound(_) => "not_found_error",
            ApiError::NoEndpoints => "overloaded_error",
            ApiError::Upstream(_) => "api_error",
            _ => self.kind(),
        }
    }

    /// The message, with every source the error does not already say.
    fn message(&self) -> String {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            if !message.contains(&s.to_string()) {
                message = format!("{message}: {s}");
            }
            source = s.source();
        }
        message
    }

    /// The response an OpenAI client gets:
    /// `{"error":{"message":…,"type":…,"param":…,"code":…}}`.
    #[must_use]
    pub fn into_response(self) -> Response<ResponseBody> {
        self.into_response_for(Dialect::OpenAi)
    }

    /// The response a client of `dialect` gets: OpenAI's shape, or Anthropic's
    /// `{"type":"error","error":{"type":…,"message":…}}`.
    #[must_use]
    pub fn into_response_for(self, dialect: Dialect) -> Response<ResponseBody> {
        let status = self.status();
        let message = self.message();
        let body = match dialect {
            Dialect::OpenAi => {
                let param = match &self {
                    ApiError::InvalidBody(e) => e.param(),
                    _ => None,
                };
                serde_json::json!({
                    "error": {
                        "message": message,
                        "type": self.kind(),
                        "param": param,
                        "code": status.as_u16(),
                    }
                })
            }
            Dialect::Anthropic => serde_json::json!({
                "type": "error",
                "error": { "type": self.anthropic_kind(), "message": message },
            }),
        };
        let mut res = json_response(status, Bytes::from(body.to_string()));
        if let ApiError::MethodNotAllowed(allow) = self {
            res.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static(allow));
        }
        res
    }
}

/// A JSON response made by the router.
#[must_use]
pub fn json_response(status: StatusCode, body: Bytes) -> Response<ResponseBody> {
    let mut res = Response::new(ResponseBody::full(body));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    res
}
