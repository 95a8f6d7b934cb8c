//! `GET /v1/models`: the union of every reachable endpoint's model list.

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::{Response, StatusCode};
use serde_json::Value;

use crate::app::App;
use crate::body::ResponseBody;
use crate::error::{json_response, ApiError};
use crate::proxy::Upstream;

const LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks every endpoint for its models and merges the lists by model id (first seen wins).
pub(crate) async fn list(
    app: &App,
    upstream: &Upstream,
) -> Result<Response<ResponseBody>, ApiError> {
    let endpoints = app.dispatcher.endpoints();
    if endpoints.is_empty() {
        return Err(ApiError::NoEndpoints);
    }
    let answers =
        join_all(endpoints.iter().map(|e| upstream.get(e, "/v1/models", LIST_TIMEOUT))).await;
    let mut data: Vec<Value> = Vec::new();
    let mut last_error = None;
    let mut any = false;
    for answer in answers {
        match answer {
            Ok(bytes) => {
                let Ok(list) = serde_json::from_slice::<Value>(&bytes) else { continue };
                any = true;
                for model in list.get("data").and_then(Value::as_array).into_iter().flatten() {
                    let id = model.get("id");
                    if !data.iter().any(|m| m.get("id") == id) {
                        data.push(model.clone());
                    }
                }
            }
            Err(e) => last_error = Some(e),
        }
    }
    if !any {
        return Err(last_error.map_or(ApiError::NoEndpoints, ApiError::Upstream));
    }
    let body = serde_json::json!({ "object": "list", "data": data });
    Ok(json_response(StatusCode::OK, Bytes::from(body.to_string())))
}
