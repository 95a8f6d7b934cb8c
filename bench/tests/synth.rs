//! Prompt synthesis: deterministic bytes, and exactly the trace's reuse as an engine's
//! prefix cache sees it (measured with the simulator's tokenizer rule).

use std::collections::HashSet;

use kvtier_bench::demo;
use kvtier_bench::synth::{Api, Conversation, RequestOptions};
use kvtier_bench::trace::{self, Trace};
use kvtier_sim::tokens::{self, Message, Rendered};
use serde::Deserialize;
use serde_json::value::RawValue;

const OPTS: RequestOptions<'static> =
    RequestOptions { api: Api::Chat, model: "m", stream: true, ignore_eos: false };

fn bodies(t: &Trace, seed: u64) -> Vec<Vec<u8>> {
    let mut c = Conversation::new(seed, t.block_size, t.root.preamble_tokens);
    let mut prev = 0;
    t.root
        .turns()
        .map(|turn| {
            let b = c.next_body(turn, prev, &OPTS);
            prev = turn.output;
            b
        })
        .collect()
}

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
    messages: Vec<Message>,
    max_tokens: u64,
}

fn measure(body: &[u8]) -> (tokens::Prompt, u64) {
    let b: Body<'_> = serde_json::from_slice(body).expect("valid JSON body");
    let mut r = Rendered::default();
    let s = r.chat(b.tools, None, &b.messages);
    (tokens::measure("m", &s, 64), b.max_tokens)
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let t = &demo::shipped_traces()[0];
    let a = bodies(t, 7);
    assert_eq!(a, bodies(t, 7));
    let b = bodies(t, 8);
    assert!(a.iter().zip(&b).all(|(x, y)| x != y));
}

#[test]
fn requests_hold_the_traces_tokens_and_reuse() {
    for t in demo::shipped_traces() {
        let turns: Vec<_> = t.root.turns().collect();
        let mut seen_blocks: HashSet<u64> = HashSet::new();
        let mut seen_ids = HashSet::new();
        for (turn, body) in turns.iter().zip(bodies(&t, 3)) {
            let (p, max_tokens) = measure(&body);
            assert_eq!(max_tokens, turn.output.max(1));
            // The padding makes the prompt exactly the trace's size (role names and
            // newlines included), unless the messages alone already exceed it slightly.
            let diff = i64::from(p.tokens) - turn.input as i64;
            assert!(
                (0..=2 * 64).contains(&diff),
                "{}: {} tokens for {}",
                t.id,
                p.tokens,
                turn.input
            );
            // What an unbounded prefix cache would hit, by the engine's keys, matches the
            // trace's reuse to within two blocks (the message framing shifts block edges).
            let engine_hits =
                p.blocks.iter().take_while(|b| seen_blocks.contains(*b)).count() as i64;
            let trace_hits = trace::known_prefix(&seen_ids, turn) as i64;
            assert!(
                (engine_hits - trace_hits).abs() <= 2,
                "{}: engine {engine_hits} vs trace {trace_hits} blocks",
                t.id
            );
            seen_blocks.extend(p.blocks.iter().copied());
            seen_ids.extend(turn.hash_ids.iter().copied());
        }
    }
}
