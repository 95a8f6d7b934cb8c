//! The HTTP surface of a simulated engine: vLLM's OpenAI server, as far as clients and
//! routers use it. The engine itself runs in `driver.rs`; `/metrics` comes from `metrics.rs`;
//! the response bodies are `server/openai.rs`'s (chat, completions) and `server/agent.rs`'s
//! (Anthropic Messages, OpenAI Responses).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use kvtier_serve::node_tier::NodeTierRoutes;
use kvtier_serve::CancellationToken;

use crate::clock::SimClock;
pub use crate::driver::Snapshot;
use crate::driver::{drive, Msg, Update};
use crate::engine::{Engine, EngineConfig, HostTiers, Strategy, Submission};
use crate::node::SimNode;
use crate::profile::Profile;
use crate::state::Shared;
use crate::sync::lock;
use crate::tokens::{self, Message, Rendered};

mod agent;
mod openai;

use openai::{stream_response, whole_response};

/// Largest request body accepted (vLLM has no fixed limit; agent prompts reach a few MB).
pub const MAX_BODY_BYTES: usize = 64 << 20;

/// How to run a simulated engine.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// The engine's profile.
    pub profile: Profile,
    /// KV strategy.
    pub strategy: Strategy,
    /// Simulated seconds per real second.
    pub time_scale: f64,
    /// Model id served (defaults to the profile's).
    pub served_model: Option<String>,
    /// The length of the model's answers: a request allowing more tokens stops after this many
    /// (`finish_reason` `stop`, `end_turn`, a completed response); `None`: every request
    /// generates its whole limit (`length`).
    pub answer_tokens: Option<u32>,
}

/// A running simulated engine. Dropping it kills it at once, connections and all, as a
/// crashed engine dies; [`Sim::shutdown`] stops it gracefully.
#[derive(Debug)]
pub struct Sim {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    driver: tokio::task::JoinHandle<()>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.driver.abort();
        if let Some(s) = &self.server {
            s.abort();
        }
    }
}

impl Sim {
    /// Starts a simulated engine on `listener`, with its clock at 0 now.
    ///
    /// # Panics
    /// If the listener has no local address.
    #[must_use]
    pub fn serve(listener: TcpListener, options: SimOptions) -> Self {
        Self::serve_with_clock(listener, options.clone(), SimClock::new(options.time_scale))
    }

    /// Starts a simulated engine on `listener` that shares `clock` (several replicas and a
    /// replay in one process keep one notion of simulated time).
    ///
    /// # Panics
    /// If the listener has no local address.
    #[must_use]
    pub fn serve_with_clock(listener: TcpListener, options: SimOptions, clock: SimClock) -> Self {
        let config = options.profile.engine_config(options.strategy);
        let tiers = HostTiers::new(config.dram_blocks, config.nvme_blocks);
        Self::serve_on_node(listener, options, clock, tiers)
    }

    /// As [`Sim::serve_with_clock`], writing through to `tiers`: give the replicas of one
    /// node the same tiers (as they share the node-agent's pool). `GET /residency` streams
    /// the tiers' residency events.
    ///
    /// # Panics
    /// If the listener has no local address.
    #[must_use]
    pub fn serve_on_node(
        listener: TcpListener,
        options: SimOptions,
        clock: SimClock,
        tiers: HostTiers,
    ) -> Self {
        let addr = listener.local_addr().expect("bound listener");
        let config = options.profile.engine_config(options.strategy);
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let node = SimNode {
            tiers: tiers.clone(),
            block_bytes: config.cost.block_bytes,
            nvme_bytes_per_s: config.cost.nvme_bytes_per_s,
            clock,
        };
        let shared = Arc::new(Shared {
            model: options.served_model.unwrap_or_else(|| options.profile.served_model.clone()),
            config,
            clock,
            tx,
            snapshot: Arc::default(),
            next_id: AtomicU64::new(1),
            id_salt: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                ^ (u64::from(addr.port()) << 48),
            profile: options.profile.name.clone(),
            answer_tokens: options.answer_tokens,
            node: NodeTierRoutes::new(Arc::new(node), None, stop.clone()),
            responses: Mutex::default(),
        });
        let driver = tokio::spawn(drive(
            Engine::with_tiers(config, tiers),
            clock,
            shared.snapshot.clone(),
            rx,
        ));
        let st = shared.clone();
        let service = service_fn(move |req| {
            let st = st.clone();
            async move { Ok::<_, Infallible>(handle(&st, req).await) }
        });
        let server = tokio::spawn({
            let stop = stop.clone();
            async move {
                kvtier_serve::run(listener, service, stop, kvtier_serve::Options::default()).await;
            }
        });
        Self { addr, shared, stop, driver, server: Some(server) }
    }

    /// Stops taking connections, lets the responses in flight finish (the engine keeps
    /// running until they have), ends open residency streams, then stops the engine.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }

    /// `http://127.0.0.1:port`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The latest figures.
    #[must_use]
    pub fn snapshot(&self) -> Snapshot {
        *lock(&self.shared.snapshot)
    }

    /// The engine's configuration.
    #[must_use]
    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }
}

pub(crate) type Body = BoxBody<Bytes, Infallible>;

pub(crate) fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut res = Response::new(Full::new(body.into()).boxed());
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    res
}

/// An error in vLLM's shape.
pub(crate) fn error(status: StatusCode, message: &str) -> Response<Body> {
    let kind = match status {
        StatusCode::NOT_FOUND => "NotFoundError",
        StatusCode::PAYLOAD_TOO_LARGE => "RequestEntityTooLarge",
        StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowed",
        _ => "BadRequestError",
    };
    let body = serde_json::json!({
        "object": "error",
        "message": message,
        "type": kind,
        "param": null,
        "code": status.as_u16(),
    });
    json(status, body.to_string())
}

async fn handle(st: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/health") => Response::new(Full::new(Bytes::new()).boxed()),
        (&Method::GET, "/v1/models") => models(st),
        (&Method::GET, "/metrics") => metrics(st),
        (_, p) if NodeTierRoutes::<SimNode>::owns(p) => st.node.handle(&req).await,
        (&Method::POST, "/v1/chat/completions") => generate(st, req, Api::Chat).await,
        (&Method::POST, "/v1/completions") => generate(st, req, Api::Completions).await,
        (&Method::POST, "/v1/messages") => generate(st, req, Api::Messages).await,
        (&Method::POST, "/v1/messages/count_tokens") => generate(st, req, Api::CountTokens).await,
        (&Method::POST, "/v1/responses") => generate(st, req, Api::Responses).await,
        (&Method::GET, p) if p.starts_with("/v1/responses/") => {
            agent::get_stored(st, &p["/v1/responses/".len()..])
        }
        (
            _,
            "/health"
            | "/v1/models"
            | "/metrics"
            | "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/messages"
            | "/v1/messages/count_tokens"
            | "/v1/responses",
        ) => error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed"),
        _ => error(StatusCode::NOT_FOUND, "Not Found"),
    }
}

fn models(st: &Shared) -> Response<Body> {
    let body = serde_json::json!({
        "object": "list",
        "data": [{
            "id": st.model,
            "object": "model",
            "created": 0,
            "owned_by": "kvtier-sim",
            "root": st.model,
            "max_model_len": st.config.max_model_len,
        }],
    });
    json(StatusCode::OK, body.to_string())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    Chat,
    Completions,
    /// Anthropic's.
    Messages,
    /// Anthropic's, counting only.
    CountTokens,
    /// OpenAI's Responses.
    Responses,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct GenerateBody<'a> {
    model: Option<String>,
    #[serde(default, borrow)]
    tools: Option<&'a RawValue>,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    prompt: Option<PromptField>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    max_output_tokens: Option<u32>,
    /// Anthropic's system prompt: a string or text blocks.
    #[serde(default, borrow)]
    system: Option<&'a RawValue>,
    /// The Responses API's system prompt.
    #[serde(default)]
    instructions: Option<String>,
    /// The Responses API's input: a string or items.
    #[serde(default, borrow)]
    input: Option<&'a RawValue>,
    #[serde(default)]
    previous_response_id: Option<String>,
    #[serde(default)]
    store: Option<bool>,
    /// Checked as vLLM checks it (a number), otherwise unused.
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// What a router or client passes to the engine's KV connector; the simulator reads the
    /// hold kvtier's router sets from `cache_control` breakpoints.
    #[serde(default)]
    kv_transfer_params: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u64>),
}

/// Output tokens when the request names none.
const DEFAULT_MAX_TOKENS: u32 = 256;

async fn generate(st: &Arc<Shared>, req: Request<Incoming>, api: Api) -> Response<Body> {
    let conversation = crate::node::conversation_of(&req);
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("request body exceeds {MAX_BODY_BYTES} bytes"),
                );
            }
            return error(StatusCode::BAD_REQUEST, &format!("reading the body: {e}"));
        }
    };
    let parsed: GenerateBody<'_> = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}")),
    };
    if let Some(m) = &parsed.model {
        if *m != st.model {
            return error(StatusCode::NOT_FOUND, &format!("The model `{m}` does not exist."));
        }
    }
    let bt = st.config.block_tokens;
    let prompt = match api {
        Api::Chat => {
            let Some(messages) = parsed.messages.as_deref() else {
                return error(StatusCode::BAD_REQUEST, "`messages` is required");
            };
            if messages.is_empty() {
                return error(StatusCode::BAD_REQUEST, "`messages` must not be empty");
            }
            let mut r = Rendered::default();
            let s = r.chat(parsed.tools, None, messages);
            tokens::measure(&st.model, &s, bt)
        }
        Api::Messages | Api::CountTokens => {
            let Some(messages) = parsed.messages.as_deref() else {
                return error(StatusCode::BAD_REQUEST, "`messages` is required");
            };
            let mut r = Rendered::default();
            let s = r.chat(parsed.tools, parsed.system, messages);
            tokens::measure(&st.model, &s, bt)
        }
        Api::Responses => {
            let Some(input) = parsed.input else {
                return error(StatusCode::BAD_REQUEST, "`input` is required");
            };
            if let Some(prev) = &parsed.previous_response_id {
                if !lock(&st.responses).contains(prev) {
                    return error(
                        StatusCode::NOT_FOUND,
                        &format!("Response with id '{prev}' not found."),
                    );
                }
            }
            let text: Option<String> = serde_json::from_str(input.get()).ok();
            let mut s = kvtier_api::prefix::Segments::new();
            if let Some(t) = parsed.tools {
                s.push(t.get().as_bytes());
            }
            if let Some(i) = &parsed.instructions {
                s.push(i.as_bytes());
            }
            s.push(text.as_deref().unwrap_or(input.get()).as_bytes());
            tokens::measure(&st.model, &s, bt)
        }
        Api::Completions => {
            let mut owned = Vec::new();
            let mut s = kvtier_api::prefix::Segments::new();
            match &parsed.prompt {
                Some(PromptField::Text(t)) => s.push(t.as_bytes()),
                Some(PromptField::Texts(ts)) => {
                    for t in ts {
                        s.push(t.as_bytes());
                    }
                }
                Some(PromptField::Ids(ids)) => {
                    // One token per id.
                    owned = ids.iter().map(|i| format!("{i:>4}")).collect();
                }
                None => return error(StatusCode::BAD_REQUEST, "`prompt` is required"),
            }
            for o in &owned {
                s.push(o.as_bytes());
            }
            if s.is_empty() {
                return error(StatusCode::BAD_REQUEST, "`prompt` must not be empty");
            }
            let mut p = tokens::measure(&st.model, &s, bt);
            if let Some(PromptField::Ids(ids)) = &parsed.prompt {
                p.tokens = u32::try_from(ids.len()).unwrap_or(u32::MAX);
            }
            p
        }
    };
    if api == Api::CountTokens {
        return agent::count_tokens(prompt.tokens);
    }
    let limit = parsed
        .max_completion_tokens
        .or(parsed.max_tokens)
        .or(parsed.max_output_tokens)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    if limit == 0 {
        return error(StatusCode::BAD_REQUEST, "max_tokens must be at least 1, got 0.");
    }
    if parsed.temperature.is_some_and(|t| t < 0.0) {
        return error(StatusCode::BAD_REQUEST, "temperature must be non-negative.");
    }
    if parsed.n.is_some_and(|n| n != 1) {
        return error(StatusCode::BAD_REQUEST, "n must be 1: the simulator generates one choice.");
    }
    let (max_tokens, stopped) = match st.answer_tokens {
        Some(n) if n < limit => (n.max(1), true),
        _ => (limit, false),
    };
    // The engine checks the limit asked for, not what the answer turns out to be.
    let check = Engine::check_config(&st.config, prompt.tokens, limit);
    if let Err(refusal) = check {
        return error(StatusCode::BAD_REQUEST, &refusal.to_string());
    }
    let id = st.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::unbounded_channel();
    let sub = Submission {
        id,
        prompt_tokens: prompt.tokens,
        blocks: prompt.blocks,
        max_tokens,
        arrival: st.clock.now(),
        conversation,
        hold: parsed
            .kv_transfer_params
            .as_ref()
            .and_then(|p| p.get(kvtier_api::residency::HOLD_PARAM))
            .and_then(kvtier_api::residency::Hold::from_json),
    };
    if st.tx.send(Msg::Submit(sub, tx)).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped");
    }
    let guard = AbortOnDrop { id, tx: st.tx.clone(), armed: true };
    let meta = Meta {
        id: match api {
            Api::Chat => format!("chatcmpl-{id}"),
            Api::Completions | Api::CountTokens => format!("cmpl-{id}"),
            Api::Messages => format!("msg_{id:032x}"),
            Api::Responses => format!("resp_{:016x}{id:016x}", st.id_salt),
        },
        model: st.model.clone(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        prompt_tokens: prompt.tokens,
        api,
        stopped,
    };
    let store = parsed.store != Some(false);
    match (api, parsed.stream) {
        (Api::Messages | Api::Responses, true) => agent::stream(st.clone(), meta, rx, guard, store),
        (_, true) => {
            let include_usage = parsed.stream_options.is_some_and(|o| o.include_usage);
            stream_response(meta, rx, guard, include_usage)
        }
        (_, false) => match finish(rx, guard).await {
            Err(refused) => refused,
            Ok((generated, cached)) if matches!(api, Api::Messages | Api::Responses) => {
                agent::whole(st, &meta, generated, cached, store)
            }
            Ok((generated, cached)) => whole_response(&meta, generated, cached),
        },
    }
}

/// Tells the engine to drop a request whose client went away before it finished.
#[derive(Debug)]
struct AbortOnDrop {
    id: u64,
    tx: mpsc::UnboundedSender<Msg>,
    armed: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.tx.send(Msg::Abort(self.id));
        }
    }
}

#[derive(Debug, Clone)]
struct Meta {
    id: String,
    model: String,
    created: u64,
    prompt_tokens: u32,
    api: Api,
    /// The answer ended before the request's token limit (the model's own stop).
    stopped: bool,
}

impl Meta {
    /// OpenAI's `finish_reason`.
    fn finish_reason(&self) -> &'static str {
        if self.stopped {
            "stop"
        } else {
            "length"
        }
    }
}

/// Text for `n` generated tokens.
fn text_of(n: u32) -> String {
    "tok ".repeat(n as usize)
}

/// Waits for the request to finish: (tokens generated, prompt tokens cached), or the error the
/// client gets.
async fn finish(
    mut rx: mpsc::UnboundedReceiver<Update>,
    mut guard: AbortOnDrop,
) -> Result<(u32, u64), Response<Body>> {
    let (mut generated, mut cached) = (0u32, 0u64);
    loop {
        match rx.recv().await {
            Some(Update::First { cached: c }) => cached = c,
            Some(Update::Tokens(n)) => generated += n,
            Some(Update::Done) => break,
            None => {
                return Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the engine dropped the request",
                ))
            }
        }
    }
    guard.armed = false;
    Ok((generated, cached))
}

fn metrics(st: &Shared) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from(crate::metrics::text(st))).boxed());
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res
}
