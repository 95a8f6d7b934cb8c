//! Where the engines' cached prompt tokens came from, read from their `/metrics` as vLLM
//! reports it (`vllm:prompt_tokens_cached_by_source_total{source=…}`, which the simulator
//! reports under the same names): its prefix cache (`device`, HBM), a connector's host memory
//! (`host`, the node's DRAM), its disk tier (`disk`, NVMe) and a store with no source of its
//! own (`external_unspecified`, kvtier's remote tier); the rest of `vllm:prompt_tokens_total`
//! was computed. And, from a kvtier router's `/metrics`, how often it moved a session off
//! its home ([`SessionMoves`]): a moved conversation leaves its KV behind.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

/// Prompt tokens by where their KV came from, summed over engines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Sources {
    /// The engine's own prefix cache (HBM).
    pub hbm: u64,
    /// The node's DRAM tier.
    pub dram: u64,
    /// The node's NVMe tier.
    pub nvme: u64,
    /// The cluster-wide remote tier.
    pub remote: u64,
    /// Computed by prefill.
    pub recomputed: u64,
}

impl Sources {
    /// Cached tokens from every source.
    #[must_use]
    pub fn hits(&self) -> u64 {
        self.hbm + self.dram + self.nvme + self.remote
    }

    /// Reads one engine's metrics text; `None` when it reports no prompt tokens (not an
    /// engine: a router's metrics, say).
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        let mut s = Self::default();
        let mut prompt = None;
        for (metric, labels, v) in text.lines().filter_map(sample) {
            match metric {
                "vllm:prompt_tokens_total" => *prompt.get_or_insert(0) += v,
                "vllm:prompt_tokens_cached_by_source_total" => match label(labels, "source") {
                    Some("device") => s.hbm += v,
                    Some("host") => s.dram += v,
                    Some("disk") => s.nvme += v,
                    Some("external_unspecified" | "p2p") => s.remote += v,
                    _ => {}
                },
                _ => {}
            }
        }
        let prompt = prompt?;
        s.recomputed = prompt.saturating_sub(s.hits());
        Some(s)
    }

    /// What was counted between `before` and `self` (counters only grow; a restarted engine
    /// counts from zero).
    #[must_use]
    pub fn since(&self, before: &Self) -> Self {
        let d = |a: u64, b: u64| if a >= b { a - b } else { a };
        Self {
            hbm: d(self.hbm, before.hbm),
            dram: d(self.dram, before.dram),
            nvme: d(self.nvme, before.nvme),
            remote: d(self.remote, before.remote),
            recomputed: d(self.recomputed, before.recomputed),
        }
    }

    fn add(&mut self, o: &Self) {
        self.hbm += o.hbm;
        self.dram += o.dram;
        self.nvme += o.nvme;
        self.remote += o.remote;
        self.recomputed += o.recomputed;
    }
}

/// Sessions a kvtier router moved off their home, by reason (`home_overloaded`,
/// `home_unavailable`): `kvtier_router_session_moves_total`.
pub type SessionMoves = std::collections::BTreeMap<String, u64>;

/// Reads a router's metrics text; `None` when it is not a kvtier router's.
#[must_use]
pub fn parse_moves(text: &str) -> Option<SessionMoves> {
    let mut out = SessionMoves::new();
    let mut router = false;
    for (metric, labels, v) in text.lines().filter_map(sample) {
        router |= metric.starts_with("kvtier_router_");
        if metric == "kvtier_router_session_moves_total" {
            if let Some(reason) = label(labels, "reason") {
                *out.entry(reason.to_owned()).or_default() += v;
            }
        }
    }
    router.then_some(out)
}

/// One sample line of a metrics text: its metric name, its labels (`a="x",b="y"`, or empty)
/// and its value (counted in whole units, never below zero); `None` for comments and lines
/// that are not samples.
fn sample(line: &str) -> Option<(&str, &str, u64)> {
    if line.starts_with('#') {
        return None;
    }
    let (name, value) = line.rsplit_once(' ')?;
    let v = value.parse::<f64>().ok()?.max(0.0) as u64;
    let (metric, labels) = match name.split_once('{') {
        Some((m, rest)) => (m, rest.trim_end_matches('}')),
        None => (name, ""),
    };
    Some((metric, labels, v))
}

/// The value of label `key` among `labels`.
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(&format!("{key}=\"")).nth(1)?.split('"').next()
}

/// `url`'s `/metrics` text.
pub async fn metrics_text(url: &str) -> Option<String> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let uri: http::Uri = format!("{}/metrics", url.trim_end_matches('/')).parse().ok()?;
    let req = http::Request::get(uri).body(Full::new(Bytes::new())).ok()?;
    let res =
        tokio::time::timeout(Duration::from_secs(10), client.request(req)).await.ok()?.ok()?;
    if !res.status().is_success() {
        return None;
    }
    let body = res.into_body().collect().await.ok()?.to_bytes();
    Some(String::from_utf8_lossy(&body).into_owned())
}

/// The sum over `urls` (engines' base URLs) of what their `/metrics` report; `None` when one
/// of them cannot be read or is not an engine.
pub async fn scrape(urls: &[String]) -> Option<Sources> {
    let mut total = Sources::default();
    for url in urls {
        total.add(&Sources::parse(&metrics_text(url).await?)?);
    }
    Some(total)
}

/// What the servers of a run reported, for `summary.json`.
#[derive(Clone, Debug, Default)]
pub struct Measured {
    /// The engines' cached tokens by source.
    pub sources: Option<Sources>,
    /// The router's session moves.
    pub session_moves: Option<SessionMoves>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllms_per_source_counters_are_read_and_the_rest_was_computed() {
        let text = "# HELP vllm:prompt_tokens_total x\n\
            vllm:prompt_tokens_total{model_name=\"m\"} 1000.0\n\
            vllm:prompt_tokens_cached_by_source_total{model_name=\"m\",source=\"device\"} 500.0\n\
            vllm:prompt_tokens_cached_by_source_total{model_name=\"m\",source=\"host\"} 200.0\n\
            vllm:prompt_tokens_cached_by_source_total{model_name=\"m\",source=\"disk\"} 50.0\n\
            vllm:prompt_tokens_cached_by_source_total{model_name=\"m\",source=\"external_unspecified\"} 25.0\n";
        let s = Sources::parse(text).expect("an engine");
        assert_eq!(s, Sources { hbm: 500, dram: 200, nvme: 50, remote: 25, recomputed: 225 });
        assert_eq!(s.hits(), 775);
        let before = Sources { hbm: 100, dram: 0, nvme: 0, remote: 0, recomputed: 25 };
        assert_eq!(s.since(&before).hbm, 400);
        assert_eq!(Sources::parse("kvtier_router_requests_total 5\n"), None, "not an engine");
    }

    #[test]
    fn a_routers_session_moves_are_read_by_reason() {
        let text = "# TYPE kvtier_router_session_moves counter\n\
            kvtier_router_session_moves_total{reason=\"home_overloaded\"} 7\n\
            kvtier_router_session_moves_total{reason=\"home_unavailable\"} 2\n";
        let m = parse_moves(text).expect("a router");
        assert_eq!((m["home_overloaded"], m["home_unavailable"]), (7, 2));
        assert_eq!(parse_moves("kvtier_router_requests_total 1\n"), Some(SessionMoves::new()));
        assert_eq!(parse_moves("vllm:prompt_tokens_total 1\n"), None, "not a router");
    }
}
