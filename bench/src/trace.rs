//! Agent traces in the kv-cache-tester format (`callanjfox/kv-cache-tester`): one JSON file
//! per conversation, with token counts, timings and chained block ids, no prompt text.
//!
//! A file is read whole and checked; one that does not parse or does not hold together is
//! reported with its name and the reason, and the others are still used.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One turn: a request the agent sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// Seconds since its agent started.
    pub t: f64,
    /// Whether the original request was streamed.
    pub streamed: bool,
    /// Model that served it.
    pub model: String,
    /// Input tokens, cached ones included.
    pub input: u64,
    /// Output tokens.
    pub output: u64,
    /// Block ids of the input's full blocks.
    pub hash_ids: Vec<u64>,
    /// Seconds between the previous response and this request, when recorded.
    pub think_time: Option<f64>,
    /// Seconds the original response took, when recorded.
    pub api_time: Option<f64>,
}

/// A step of an agent: a turn, or a subagent run (subagents in a row run concurrently).
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// A request.
    Turn(Turn),
    /// A nested agent.
    Subagent(Agent),
}

/// An agent: the conversation's parent, or a subagent.
#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    /// `parent`, or the subagent's `agent_id`.
    pub id: String,
    /// For a subagent: seconds after the parent's start that it began.
    pub start: f64,
    /// Tokens of tool definitions and system prompt that open its requests.
    pub preamble_tokens: u64,
    /// Its steps, in order.
    pub steps: Vec<Step>,
}

impl Agent {
    /// Turns of this agent alone.
    pub fn turns(&self) -> impl Iterator<Item = &Turn> {
        self.steps.iter().filter_map(|s| match s {
            Step::Turn(t) => Some(t),
            Step::Subagent(_) => None,
        })
    }

    /// Turns of this agent and its subagents.
    #[must_use]
    pub fn all_turns(&self) -> Vec<&Turn> {
        let mut out = Vec::new();
        for s in &self.steps {
            match s {
                Step::Turn(t) => out.push(t),
                Step::Subagent(a) => out.extend(a.all_turns()),
            }
        }
        out
    }
}

/// One conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// `trace_NNNN`.
    pub id: String,
    /// File it came from.
    pub path: PathBuf,
    /// Tokens per block.
    pub block_size: u64,
    /// Tokens of tool definitions at the start of every request.
    pub tool_tokens: u64,
    /// Tokens of system prompt after them.
    pub system_tokens: u64,
    /// The parent agent.
    pub root: Agent,
}

impl Trace {
    /// Input tokens of the first request.
    #[must_use]
    pub fn first_input(&self) -> u64 {
        self.root.turns().next().map_or(0, |t| t.input)
    }
}

/// A file that could not be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct TraceError {
    /// The file.
    pub path: String,
    /// Why.
    pub reason: String,
}

#[derive(Debug, Deserialize)]
struct RawTrace {
    id: String,
    block_size: u64,
    #[serde(default)]
    tool_tokens: u64,
    #[serde(default)]
    system_tokens: u64,
    requests: Vec<RawStep>,
}

#[derive(Debug, Deserialize)]
struct RawStep {
    t: f64,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(rename = "in", default)]
    input: Option<u64>,
    #[serde(default)]
    out: Option<u64>,
    #[serde(default)]
    hash_ids: Option<Vec<u64>>,
    #[serde(default)]
    think_time: Option<f64>,
    #[serde(default)]
    api_time: Option<f64>,
    #[serde(default)]
    agent_id: Option<String>,
    #[serde(default)]
    duration_ms: Option<f64>,
    #[serde(default)]
    requests: Option<Vec<RawStep>>,
    #[serde(default)]
    tool_tokens: Option<u64>,
    #[serde(default)]
    system_tokens: Option<u64>,
}

/// Parses one trace from its text.
///
/// # Errors
/// When the text is not a trace, or its figures contradict each other.
pub fn parse(path: &Path, text: &str) -> Result<Trace, TraceError> {
    let err = |reason: String| TraceError { path: path.display().to_string(), reason };
    let raw: RawTrace = serde_json::from_str(text).map_err(|e| err(format!("not a trace: {e}")))?;
    if raw.block_size == 0 {
        return Err(err("block_size is 0".into()));
    }
    let preamble = raw.tool_tokens + raw.system_tokens;
    let root = agent("parent", 0.0, preamble, raw.requests, raw.block_size, 0).map_err(err)?;
    if root.turns().next().is_none() {
        return Err(err("no requests".into()));
    }
    Ok(Trace {
        id: raw.id,
        path: path.to_owned(),
        block_size: raw.block_size,
        tool_tokens: raw.tool_tokens,
        system_tokens: raw.system_tokens,
        root,
    })
}

fn agent(
    id: &str,
    start: f64,
    preamble_tokens: u64,
    raw: Vec<RawStep>,
    bs: u64,
    depth: u32,
) -> Result<Agent, String> {
    let mut steps = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let at = |what: &str| format!("{id} request {i}: {what}");
        if !r.t.is_finite() || r.t < 0.0 {
            return Err(at("t must be a non-negative number"));
        }
        match r.kind.as_str() {
            "s" | "n" => {
                let (Some(input), Some(output), Some(hash_ids)) = (r.input, r.out, r.hash_ids)
                else {
                    return Err(at("needs in, out and hash_ids"));
                };
                if input == 0 {
                    return Err(at("in is 0"));
                }
                if hash_ids.len() as u64 != input / bs {
                    return Err(at(&format!(
                        "{} hash_ids for {input} tokens (expected in / block_size = {})",
                        hash_ids.len(),
                        input / bs
                    )));
                }
                let finite = |v: Option<f64>| v.filter(|x| x.is_finite() && *x >= 0.0);
                steps.push(Step::Turn(Turn {
                    t: r.t,
                    streamed: r.kind == "s",
                    model: r.model.unwrap_or_default(),
                    input,
                    output,
                    hash_ids,
                    think_time: finite(r.think_time),
                    api_time: finite(r.api_time),
                }));
            }
            "subagent" => {
                if depth > 0 {
                    return Err(at("subagents nested deeper than one level"));
                }
                let sub_id = r.agent_id.unwrap_or_else(|| format!("agent_{i}"));
                let duration = r.duration_ms.unwrap_or(0.0).max(0.0) / 1000.0;
                let sub = agent(
                    &sub_id,
                    (r.t - duration).max(0.0),
                    r.tool_tokens.unwrap_or(0) + r.system_tokens.unwrap_or(0),
                    r.requests.unwrap_or_default(),
                    bs,
                    depth + 1,
                )?;
                steps.push(Step::Subagent(sub));
            }
            other => return Err(at(&format!("unknown type {other:?}"))),
        }
    }
    Ok(Agent { id: id.to_owned(), start, preamble_tokens, steps })
}

/// Reads every `*.json` trace in `dir`, in name order. Files that cannot be used are
/// returned beside the good ones, each with its reason.
///
/// # Errors
/// When the directory itself cannot be read.
pub fn load_dir(dir: &Path) -> std::io::Result<(Vec<Trace>, Vec<TraceError>)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for p in paths {
        match std::fs::read_to_string(&p) {
            Ok(text) => match parse(&p, &text) {
                Ok(t) => good.push(t),
                Err(e) => bad.push(e),
            },
            Err(e) => bad.push(TraceError { path: p.display().to_string(), reason: e.to_string() }),
        }
    }
    Ok((good, bad))
}

/// Blocks of `turn` already seen in earlier turns of the same agent (an unbounded prefix
/// cache's hits), counted as the trace counts them: the leading run of known blocks.
#[must_use]
pub fn known_prefix(seen: &std::collections::HashSet<u64>, turn: &Turn) -> usize {
    turn.hash_ids.iter().take_while(|h| seen.contains(h)).count()
}
