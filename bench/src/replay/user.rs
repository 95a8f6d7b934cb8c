//! One user of the replay: a conversation from a trace, its turns sent in order with the
//! recorded think times between them, subagents in a row run together while the parent
//! waits, and a user who starts partway through their trace (trace advancement).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;

use super::wire::send;
use super::{Ctx, End, Record};
use crate::synth::{self, Conversation, RequestOptions};
use crate::trace::{self, Agent, Step, Trace, Turn};

/// Seed of the canonical warm prefix's text (mixed with the run's seed).
const WARM_SEED: u64 = 0x7761_726d_7072_6566;

/// Seed of the trace advancement draws.
const ADVANCE_SEED: u64 = 0x6164_7661_6e63_6573;

/// Steps of `agent` a user starting a `share` through it skips: the parent's steps before
/// that point, but never all of its turns.
fn advanced_steps(agent: &Agent, share: f64) -> usize {
    if share <= 0.0 {
        return 0;
    }
    let last_turn = agent.steps.iter().rposition(|s| matches!(s, Step::Turn(_))).unwrap_or(0);
    ((share * agent.steps.len() as f64).floor() as usize).min(last_turn)
}

pub(super) async fn run_conversation(ctx: &Ctx, trace: &Trace, conv: u64, user: &str) -> End {
    let seed = synth::mix(&[ctx.opts.seed, synth::name_hash(&trace.id), conv]);
    let session = format!("{}-{conv}-{}", ctx.opts.label, trace.id);
    let (lo, hi) = ctx.opts.advance;
    let share = if hi > 0.0 {
        let u = synth::Rng::new(synth::mix(&[seed, ADVANCE_SEED])).below(1 << 20) as f64;
        lo + (hi - lo) * u / f64::from(1u32 << 20)
    } else {
        0.0
    };
    let skip = advanced_steps(&trace.root, share);
    run_agent(ctx, trace, &trace.root, seed, session, user.to_owned(), conv, skip).await
}

#[allow(clippy::too_many_arguments)]
fn run_agent<'a>(
    ctx: &'a Ctx,
    trace: &'a Trace,
    agent: &'a Agent,
    seed: u64,
    session: String,
    user: String,
    conv: u64,
    skip: usize,
) -> Pin<Box<dyn Future<Output = End> + Send + 'a>> {
    Box::pin(async move {
        let agent_seed = synth::mix(&[seed, synth::name_hash(&agent.id)]);
        let block = trace.block_size.max(1);
        let mut history = Conversation::new(agent_seed, block, agent.preamble_tokens)
            .with_warm_prefix(synth::mix(&[ctx.opts.seed, WARM_SEED]), ctx.warm_tokens / block);
        let mut seen: HashSet<u64> = HashSet::new();
        let mut prev: Option<&Turn> = None;
        let mut idx = agent.steps[..skip].iter().filter(|s| matches!(s, Step::Turn(_))).count();
        let mut i = skip;
        while i < agent.steps.len() {
            match &agent.steps[i] {
                Step::Turn(turn) => {
                    if turn.input > ctx.opts.max_context {
                        return End::Truncated;
                    }
                    let delay = prev
                        .map_or(0.0, |p| ctx.opts.timing.delay(p, turn, ctx.opts.api_time_scale));
                    let delay = delay.min(ctx.opts.max_delay);
                    let before = ctx.now();
                    if delay > 0.0 {
                        tokio::time::sleep(ctx.real(delay)).await;
                    }
                    let delay_actual = ctx.now() - before;
                    let mut hits = trace::known_prefix(&seen, turn) as u64;
                    // Every prompt but the very first finds the warm prefix cached.
                    let warm = (ctx.warm_tokens / block).min(turn.hash_ids.len() as u64);
                    if prev.is_none()
                        && warm > 0
                        && ctx.warm_sent.swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        hits = hits.max(warm);
                    }
                    seen.extend(turn.hash_ids.iter().copied());
                    let opts = RequestOptions {
                        api: ctx.opts.api,
                        model: &ctx.model,
                        stream: true,
                        ignore_eos: ctx.opts.ignore_eos,
                    };
                    let body = history.next_body(turn, prev.map_or(0, |p| p.output), &opts);
                    let mut record = Record {
                        user: user.clone(),
                        conversation: conv,
                        trace_id: trace.id.clone(),
                        agent: agent.id.clone(),
                        request_idx: idx,
                        trace_streamed: turn.streamed,
                        input_tokens: turn.input,
                        output_tokens_expected: turn.output,
                        output_tokens_actual: 0,
                        trace_hit_blocks: hits,
                        trace_miss_blocks: turn.hash_ids.len() as u64 - hits,
                        trace_hit_tokens: (hits * block).min(turn.input),
                        prompt_tokens: None,
                        cached_tokens: None,
                        start: 0.0,
                        first_token: None,
                        end: 0.0,
                        delay_expected: delay,
                        delay_actual,
                        success: false,
                        error: None,
                    };
                    send(ctx, &session, body, &mut record).await;
                    let _ = ctx.records.send(record);
                    prev = Some(turn);
                    idx += 1;
                    i += 1;
                }
                Step::Subagent(_) => {
                    // Subagents in a row run together; the parent waits for all of them.
                    let mut group = Vec::new();
                    while let Some(Step::Subagent(sub)) = agent.steps.get(i) {
                        group.push(run_agent(
                            ctx,
                            trace,
                            sub,
                            seed,
                            format!("{session}-{}", sub.id),
                            user.clone(),
                            conv,
                            0,
                        ));
                        i += 1;
                    }
                    futures_util::future::join_all(group).await;
                }
            }
        }
        End::Completed
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_advanced_user_skips_steps_but_never_every_turn() {
        let a = Agent {
            id: "parent".into(),
            start: 0.0,
            preamble_tokens: 0,
            steps: (0..10)
                .map(|i| {
                    Step::Turn(Turn {
                        t: f64::from(i),
                        streamed: true,
                        model: "m".into(),
                        input: 100,
                        output: 10,
                        hash_ids: vec![1],
                        think_time: None,
                        api_time: None,
                    })
                })
                .collect(),
        };
        assert_eq!(advanced_steps(&a, 0.0), 0);
        assert_eq!(advanced_steps(&a, 0.35), 3);
        assert_eq!(advanced_steps(&a, 1.0), 9, "the last turn is still sent");
    }
}
