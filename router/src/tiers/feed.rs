//! Where the router's tier-aware state comes from and goes to: the node-agents' residency
//! streams it follows, the prefetches it asks for, and the conversation key it adds to each
//! request for the connector.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier_api::residency::{prefetch_path, ConversationKey, ResidencyEvent};

use super::{lock, Applied, GapModel, TierRouting};

pub use kvtier_api::residency::CONVERSATION_PARAM;
use kvtier_api::residency::{Hold, HOLD_PARAM};

/// `body` (a JSON object) with `"kv_transfer_params": {"kvtier_conversation": "<key>"}` (and
/// `"kvtier_hold": {…}` when the client asked to keep part of the prompt warm) added as its
/// first member, every other byte as received; `None` when the body is not an object or
/// already carries `kv_transfer_params` (the client's own are left alone).
#[must_use]
pub fn tag_conversation(
    body: &[u8],
    conversation: ConversationKey,
    hold: Option<Hold>,
) -> Option<bytes::Bytes> {
    let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
    let param: &[u8] = b"\"kv_transfer_params\"";
    if body[start] != b'{' || body.windows(param.len()).any(|w| w == param) {
        return None;
    }
    let rest = &body[start + 1..];
    let empty = rest.iter().all(|b| b.is_ascii_whitespace() || *b == b'}');
    let hold = hold.map(|h| format!(",\"{HOLD_PARAM}\":{}", h.to_json())).unwrap_or_default();
    let member = format!(
        "\"kv_transfer_params\":{{\"{CONVERSATION_PARAM}\":\"{}\"{hold}}}{}",
        conversation.to_hex(),
        if empty { "" } else { "," }
    );
    let mut out = Vec::with_capacity(body.len() + member.len());
    out.extend_from_slice(&body[..=start]);
    out.extend_from_slice(member.as_bytes());
    out.extend_from_slice(rest);
    Some(out.into())
}

/// Follows `node`'s residency stream at `url` (`GET`, one JSON event per line) into `t` for
/// as long as the task runs, reconnecting with backoff (250 ms doubling to 10 s). Every
/// (re)connection forgets the node first: the stream restarts with the current residency.
pub async fn follow(node: String, url: String, t: Arc<TierRouting>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        match stream_once(&node, &url, &t).await {
            Ok(()) => backoff = Duration::from_millis(250),
            Err(e) => tracing::debug!(%node, %url, error = %e, "residency stream"),
        }
        t.forget_node(&node);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Follows every node-agent discovery reports, starting and stopping streams as agents come
/// and go (one per node).
pub async fn follow_all(
    mut agents: tokio::sync::watch::Receiver<Vec<crate::endpoint::EndpointSpec>>,
    t: Arc<TierRouting>,
) {
    let mut running: HashMap<String, (String, tokio::task::JoinHandle<()>)> = HashMap::new();
    loop {
        let want: HashMap<String, String> = agents
            .borrow_and_update()
            .iter()
            .filter_map(|a| {
                let url = a.uri("/residency").ok()?.to_string();
                Some((a.node()?.to_owned(), url))
            })
            .collect();
        running.retain(|node, (url, task)| {
            let keep = want.get(node) == Some(url);
            if !keep {
                task.abort();
                t.forget_node(node);
            }
            keep
        });
        for (node, url) in want {
            running.entry(node).or_insert_with_key(|node| {
                let task = tokio::spawn(follow(node.clone(), url.clone(), t.clone()));
                (url, task)
            });
        }
        if agents.changed().await.is_err() {
            break;
        }
    }
    for (_, (_, task)) in running {
        task.abort();
    }
}

async fn stream_once(node: &str, url: &str, t: &TierRouting) -> Result<(), String> {
    use http_body_util::BodyExt;
    let (res, authority) =
        request(http::Method::GET, url, "/residency", t.control_token.as_deref()).await?;
    t.forget_node(node);
    lock(&t.agents).insert(node.to_owned(), format!("http://{authority}"));
    tracing::info!(%node, %url, "following residency");
    let mut body = res.into_body();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Ok(data) = frame.into_data() else { continue };
        buf.extend_from_slice(&data);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let Some(e) = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| ResidencyEvent::from_json_line(l.trim()))
            else {
                continue;
            };
            if t.apply(node, &e) == Applied::Gap {
                return Err("events were missed; resubscribing".into());
            }
        }
        if buf.len() > 1 << 16 {
            return Err("a line longer than 64 KiB".into());
        }
    }
    Ok(())
}

/// Asks the agents to promote conversations whose next turn is likely soon, every `every`,
/// for as long as the task runs (one request per conversation and pause).
pub async fn prefetch_loop(t: Arc<TierRouting>, p: PrefetchConfig) {
    loop {
        tokio::time::sleep(p.every).await;
        for (c, node, url) in t.prefetch_due(Instant::now(), &p.gaps, p.horizon, p.threshold) {
            let token = t.control_token.clone();
            tokio::spawn(async move {
                let target = format!("{url}{}", prefetch_path(c));
                if let Err(e) = request(http::Method::POST, &target, "/", token.as_deref()).await {
                    tracing::debug!(%node, error = %e, "prefetch");
                }
            });
        }
    }
}

/// Sends `method url` (path `default_path` when the URL has none) with an empty body on a
/// fresh connection; a status other than success is an error. Returns the response (its body
/// still streaming) and the host it came from.
async fn request(
    method: http::Method,
    url: &str,
    default_path: &str,
    token: Option<&str>,
) -> Result<(http::Response<hyper::body::Incoming>, http::uri::Authority), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let authority = uri.authority().ok_or("no host")?.clone();
    let tcp =
        tokio::net::TcpStream::connect(authority.as_str()).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(uri.path_and_query().map_or(default_path, |p| p.as_str()))
        .header(http::header::HOST, authority.as_str());
    if let Some(token) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req.body(http_body_util::Empty::<bytes::Bytes>::new()).map_err(|e| e.to_string())?;
    let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if !res.status().is_success() {
        return Err(format!("{url}: {}", res.status()));
    }
    Ok((res, authority))
}

/// Proactive prefetch settings.
#[derive(Clone, Debug)]
pub struct PrefetchConfig {
    /// The pause distribution.
    pub gaps: GapModel,
    /// How far ahead a turn counts (the promotion's duration and a margin).
    pub horizon: Duration,
    /// The chance of a turn within the horizon that triggers a prefetch.
    pub threshold: f64,
    /// Between checks.
    pub every: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiers::{Holding, TierCosts};
    use kvtier_api::agent::Tier;

    fn study() -> TierCosts {
        TierCosts::from_rates(126_976.0, 2400.0, [20e9, 6e9, 3e9])
    }

    #[test]
    fn events_parse_from_the_agents_lines_and_holdings_use_the_last_prompt() {
        let line = ResidencyEvent {
            seq: 3,
            conversation: ConversationKey::of_session("s"),
            tier: Tier::Nvme,
            entered: true,
            chunks: 9,
            ttl_s: 0,
        }
        .to_json_line();
        let e = ResidencyEvent::from_json_line(line.trim()).expect("parses");
        assert_eq!((e.seq, e.tier, e.entered, e.chunks), (3, Tier::Nvme, true, 9));
        assert!(ResidencyEvent::from_json_line("{\"seq\":1}").is_none());
        let t = TierRouting::new(study(), 256);
        let c = ConversationKey::of_session("s");
        assert_eq!(t.holding_for(c, "n1", 50_000), Holding::default());
        t.saw(c, 40_000);
        assert_eq!(t.apply("n1", &e), Applied::Ok);
        assert_eq!(
            t.holding_for(c, "n1", 50_000),
            Holding { nvme_tokens: 40_000, ..Holding::default() }
        );
        assert_eq!(t.holding_for(c, "n2", 50_000), Holding::default());
    }

    #[test]
    fn the_conversation_rides_in_kv_transfer_params_and_the_rest_is_untouched() {
        let c = ConversationKey(0xabc);
        let body = br#"  {"model":"m","messages":[{"role":"user","content":"{x}"}]}"#;
        let out = tag_conversation(body, c, None).expect("tagged");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("still JSON");
        assert_eq!(v["kv_transfer_params"][CONVERSATION_PARAM], "0000000000000abc");
        assert_eq!(v["messages"][0]["content"], "{x}");
        assert!(out.ends_with(&body[3..]), "the client's bytes follow unchanged");
        let e = tag_conversation(b"{}", c, None).expect("tagged");
        assert!(serde_json::from_slice::<serde_json::Value>(&e).is_ok(), "{e:?}");
        assert!(tag_conversation(br#"{"kv_transfer_params":{"a":1}}"#, c, None).is_none());
        assert!(tag_conversation(b"[1]", c, None).is_none());
        // A hold rides beside the conversation.
        let hold = Hold { ttl_s: 3600, upto: 0.25 };
        let out = tag_conversation(body, c, Some(hold)).expect("tagged");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("still JSON");
        assert_eq!(Hold::from_json(&v["kv_transfer_params"][HOLD_PARAM]), Some(hold));
        assert_eq!(v["kv_transfer_params"][CONVERSATION_PARAM], "0000000000000abc");
    }

    #[tokio::test]
    async fn the_residency_stream_is_asked_for_with_the_control_token() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/residency", listener.local_addr().expect("addr"));
        let agent = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut b).await.expect("head");
                head.push(b[0]);
            }
            let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
            let line = ResidencyEvent {
                seq: 1,
                conversation: ConversationKey::of_session("s"),
                tier: Tier::Dram,
                entered: true,
                chunks: 4,
                ttl_s: 0,
            }
            .to_json_line();
            let reply = if head.contains("authorization: bearer s3cret\r\n") {
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{line}", line.len())
            } else {
                "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n".to_owned()
            };
            s.write_all(reply.as_bytes()).await.expect("reply");
        });
        let t = TierRouting::new(study(), 256).with_control_token(Some("s3cret".into()));
        let c = ConversationKey::of_session("s");
        t.saw(c, 1024);
        stream_once("n1", &url, &t).await.expect("followed");
        agent.await.expect("agent");
        assert_eq!(t.holding_for(c, "n1", 2048).dram_tokens, 1024);
    }

    /// A node tier served by the one surface the node-agent and the simulator serve.
    #[derive(Debug, Default)]
    struct Node(std::sync::Mutex<kvtier_serve::node_tier::ResidencyFeed>);

    impl kvtier_serve::node_tier::NodeTier for Node {
        fn subscribe(&self) -> kvtier_serve::node_tier::Subscription {
            self.0.lock().expect("lock").subscribe()
        }
        async fn prefetch(
            self: Arc<Self>,
            _: ConversationKey,
        ) -> kvtier_api::residency::PrefetchReply {
            kvtier_api::residency::PrefetchReply { dram_chunks: 0 }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_router_follows_the_agents_discovery_reports_and_drops_the_ones_that_go() {
        use kvtier_serve::node_tier::NodeTierRoutes;
        let node = Arc::new(Node::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = kvtier_serve::CancellationToken::new();
        let routes = NodeTierRoutes::new(node.clone(), None, stop.clone());
        let service = hyper::service::service_fn(move |req| {
            let routes = routes.clone();
            async move { Ok::<_, std::convert::Infallible>(routes.handle(&req).await) }
        });
        let server = tokio::spawn(kvtier_serve::run(
            listener,
            service,
            stop.clone(),
            kvtier_serve::Options::default(),
        ));
        let t = Arc::new(TierRouting::new(study(), 64));
        let spec = crate::EndpointSpec::parse(&format!("gpu-1=http://{addr}")).expect("spec");
        let (tx, rx) = tokio::sync::watch::channel(vec![spec]);
        let task = tokio::spawn(follow_all(rx, t.clone()));
        let c = ConversationKey::of_session("s-1");
        t.saw(c, 4_000);
        // A chunk of the conversation lands in the node's DRAM.
        node.0.lock().expect("lock").change(c, Tier::Dram, true);
        let mut held = 0;
        for _ in 0..100 {
            held = t.holding_for(c, "gpu-1", 5_000).dram_tokens;
            if held > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(held, 4_000, "the node's DRAM holds the conversation");
        // The agent goes away from discovery: what it said is forgotten.
        tx.send_replace(Vec::new());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(t.holding_for(c, "gpu-1", 5_000).dram_tokens, 0);
        task.abort();
        stop.cancel();
        assert!(server.await.expect("server"), "the agent's stream ended at its shutdown");
    }
}
