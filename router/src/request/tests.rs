//! What the router reads from each API's bodies, and the bodies it refuses.

use super::*;

#[test]
fn chat_segments_are_tools_then_messages_as_received() {
    let body = br#"{"messages": [ {"role":"system","content":"S"} ,{"role":"user", "content":"U"}],
        "model":"m","tools":[{"type":"function"}],"stream":true,"max_tokens":9,"user":"alice"}"#;
    let v = parse(Route::Chat, body).expect("valid");
    let mut expected = Segments::new();
    expected.push(br#"[{"type":"function"}]"#);
    expected.push(br#"{"role":"system","content":"S"}"#);
    expected.push(br#"{"role":"user", "content":"U"}"#);
    assert_eq!(v.segments.chunk_hashes(1, 1), expected.chunk_hashes(1, 1));
    assert_eq!(v.model, br#""m""#);
    assert_eq!(v.max_output_tokens, Some(9));
    assert_eq!(v.user.as_deref(), Some("alice"));
}

#[test]
fn completion_prompt_leaves_out_the_closing_quote() {
    let v = parse(Route::Completions, br#"{"prompt":"abc"}"#).expect("valid");
    assert_eq!(v.segments.len(), 4);
    assert!(parse(Route::Completions, br#"{"prompt":[1,2,3]}"#).is_ok());
}

#[test]
fn bad_bodies_name_the_field() {
    let cases: &[(Route, &[u8], Option<&str>)] = &[
        (Route::Chat, b"{not json", None),
        (Route::Chat, b"[]", Some("body")),
        (Route::Chat, b"{}", Some("messages")),
        (Route::Chat, br#"{"messages":"hi"}"#, Some("messages")),
        (Route::Chat, br#"{"messages":[]}"#, Some("messages")),
        (Route::Chat, br#"{"messages":[1]}"#, Some("messages")),
        (Route::Chat, br#"{"messages":[{}],"stream":"yes"}"#, Some("stream")),
        (Route::Chat, br#"{"messages":[{}],"model":3}"#, Some("model")),
        (Route::Chat, br#"{"messages":[{}],"max_tokens":-1}"#, Some("max_tokens")),
        (Route::Chat, br#"{"messages":[{}],"tools":{}}"#, Some("tools")),
        (Route::Chat, br#"{"messages":[{}],"user":{}}"#, Some("user")),
        (Route::Completions, b"{}", Some("prompt")),
        (Route::Completions, br#"{"prompt":7}"#, Some("prompt")),
        (Route::Chat, br#"{"messages":[{}],"messages":[{}]}"#, Some("messages")),
        (Route::Chat, br#"{"messages":[{}]} x"#, None),
    ];
    for (route, body, param) in cases {
        let err = parse(*route, body).expect_err("must be rejected");
        assert_eq!(err.param(), *param, "{}", String::from_utf8_lossy(body));
    }
}

#[test]
fn escaped_keys_are_read_as_the_engine_reads_them() {
    let v = parse(Route::Chat, br#"{"mess\u0061ges":[{"role":"user"}]}"#).expect("valid");
    assert_eq!(v.segments.len(), 15);
}

fn hashes(v: &PromptView<'_>) -> Vec<u64> {
    v.segments.chunk_hashes(1, 16)
}

#[test]
fn anthropic_segments_are_tools_system_then_messages_without_cache_control() {
    let marked = br#"{"model":"m","max_tokens":32000,"stream":true,
        "tools":[{"name":"Bash","input_schema":{}},{"name":"Read","input_schema":{},"cache_control":{"type":"ephemeral"}}],
        "system":[{"type":"text","text":"You are Claude Code."},{"type":"text","text":"Be brief.","cache_control":{"type":"ephemeral","ttl":"1h"}}],
        "messages":[{"role":"user","content":[{"type":"text","text":"fix the bug","cache_control":{"type":"ephemeral"}}]},
                    {"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"Bash","input":{"cmd":"ls"}}]},
                    {"cache_control":{"type":"ephemeral"},"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"a.rs"}]}],
        "metadata":{"user_id":"{\"device_id\":\"d\",\"account_uuid\":\"\",\"session_id\":\"9f1c\"}"}}"#;
    let plain = br#"{"model":"m","max_tokens":32000,"stream":true,
        "tools":[{"name":"Bash","input_schema":{}},{"name":"Read","input_schema":{}}],
        "system":[{"type":"text","text":"You are Claude Code."},{"type":"text","text":"Be brief."}],
        "messages":[{"role":"user","content":[{"type":"text","text":"fix the bug"}]},
                    {"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"Bash","input":{"cmd":"ls"}}]},
                    {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"a.rs"}]}]}"#;
    let a = parse(Route::Messages, marked).expect("valid");
    let b = parse(Route::Messages, plain).expect("valid");
    assert_eq!(hashes(&a), hashes(&b), "breakpoints moved, the prompt did not");
    assert_eq!(a.segments.len(), b.segments.len());
    assert_eq!(a.user.as_deref(), Some("9f1c"), "Claude Code's session_id");
    assert_eq!(a.conversation.as_deref(), Some("9f1c"), "names the conversation too");
    assert_eq!(b.user, None);
    assert_eq!(a.max_output_tokens, Some(32000));
    // The last breakpoint (on the newest message, 5 minutes) covers the whole prompt.
    assert_eq!(a.breakpoint, Some(Breakpoint { end: a.segments.len(), ttl_s: 300 }));
    assert_eq!(b.breakpoint, None);
    // Only the system prompt's, for an hour: it ends where the system prompt does.
    let system_only = String::from_utf8_lossy(plain).replace(
        r#""text":"Be brief."}"#,
        r#""text":"Be brief.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}"#,
    );
    let c = parse(Route::Messages, system_only.as_bytes()).expect("valid");
    let bp = c.breakpoint.expect("a breakpoint");
    assert_eq!(bp.ttl_s, 3600);
    assert!(bp.end < c.segments.len() / 2, "{bp:?} of {}", c.segments.len());

    // The order is tools, system, messages: a changed system prompt changes every chunk
    // after the tools.
    let changed = String::from_utf8_lossy(plain).replace("Be brief.", "Be long.");
    let other = parse(Route::Messages, changed.as_bytes()).expect("valid");
    assert_ne!(hashes(&other), hashes(&b));
    let mut expected = Segments::new();
    expected.push(br#"[{"name":"Bash","input_schema":{}},{"name":"Read","input_schema":{}}]"#);
    assert_eq!(&hashes(&b)[..1], &expected.chunk_hashes(1, 16)[..1], "the tools come first");
}

#[test]
fn an_anthropic_system_string_and_a_plain_user_id() {
    let v = parse(
        Route::Messages,
        br#"{"system":"S","messages":[{"role":"user","content":"hi"}],"metadata":{"user_id":"u-7"}}"#,
    )
    .expect("valid");
    assert_eq!(v.user.as_deref(), Some("u-7"));
    assert_eq!(v.conversation, None, "a user id is not a conversation");
    let mut expected = Segments::new();
    expected.push(br#""S""#);
    expected.push(br#"{"role":"user","content":"hi"}"#);
    assert_eq!(hashes(&v), expected.chunk_hashes(1, 16));
    assert!(parse(Route::CountTokens, br#"{"messages":[{"role":"user","content":"hi"}]}"#).is_ok());
    assert!(!Route::CountTokens.generates());
}

#[test]
fn responses_fields() {
    let v = parse(
        Route::Responses,
        br#"{"model":"m","instructions":"I","input":[{"role":"user","content":"a"},{"type":"function_call_output","call_id":"c","output":"o"}],
            "previous_response_id":"resp_1","prompt_cache_key":"codex-thread","max_output_tokens":64,"user":"u"}"#,
    )
    .expect("valid");
    assert_eq!(v.previous_response.as_deref(), Some("resp_1"));
    assert_eq!(v.user.as_deref(), Some("codex-thread"));
    assert_eq!(v.conversation.as_deref(), Some("codex-thread"));
    assert_eq!(v.max_output_tokens, Some(64));
    let c = parse(Route::Responses, br#"{"input":"hello","conversation":{"id":"conv_1"}}"#)
        .expect("valid");
    assert_eq!(c.user.as_deref(), Some("conv_1"));
    // An open-ended string: a longer input shares this one's chunks.
    let longer = parse(Route::Responses, br#"{"input":"hello world"}"#).expect("valid");
    assert_eq!(c.segments.len(), 6);
    assert_eq!(longer.segments.chunk_hashes(1, 3)[..2], c.segments.chunk_hashes(1, 3)[..2]);
}

#[test]
fn bad_agent_bodies_name_the_field() {
    let cases: &[(Route, &[u8], Option<&str>)] = &[
        (Route::Messages, b"{}", Some("messages")),
        (Route::Messages, br#"{"messages":[{}],"system":3}"#, Some("system")),
        (Route::Messages, br#"{"messages":[{}],"metadata":"x"}"#, Some("metadata")),
        (Route::Messages, br#"{"messages":[{}],"system":"a","system":"b"}"#, Some("system")),
        (Route::Responses, b"{}", Some("input")),
        (Route::Responses, br#"{"input":3}"#, Some("input")),
        (Route::Responses, br#"{"input":"a","instructions":[]}"#, Some("instructions")),
        (
            Route::Responses,
            br#"{"input":"a","previous_response_id":1}"#,
            Some("previous_response_id"),
        ),
        (
            Route::Responses,
            br#"{"input":"a","max_output_tokens":"many"}"#,
            Some("max_output_tokens"),
        ),
    ];
    for (route, body, param) in cases {
        let err = parse(*route, body).expect_err("must be rejected");
        assert_eq!(err.param(), *param, "{}", String::from_utf8_lossy(body));
    }
}

/// The first code every client byte meets: fuzzed for the CI budget
/// (`KVTIER_FUZZ_SECONDS`) from the agents' own request shapes. Never a panic; JSON that
/// serde accepts is never refused as malformed; what parses lies within the body.
#[test]
fn fuzz_parse() {
    use kvtier_testkit::fuzz::{run, Verdict};
    let seeds: Vec<Vec<u8>> = vec![
        br#"{"model":"m","messages":[{"role":"system","content":"S"},{"role":"user","content":[{"type":"text","text":"hi"}]}],"tools":[{"type":"function","function":{"name":"f"}}],"stream":true,"max_tokens":9,"user":"u"}"#.to_vec(),
        br#"{"model":"m","max_tokens":32000,"stream":true,"system":[{"type":"text","text":"You are Claude Code.","cache_control":{"type":"ephemeral"}}],"messages":[{"role":"user","content":[{"type":"text","text":"fix","cache_control":{"type":"ephemeral","ttl":"1h"}}]},{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"Bash","input":{"c":"ls"}}]}],"metadata":{"user_id":"{\"session_id\":\"5e\"}"}}"#.to_vec(),
        br#"{"model":"m","instructions":"I","input":[{"role":"user","content":"a"},{"type":"function_call_output","call_id":"c","output":"o"}],"previous_response_id":"resp_1","prompt_cache_key":"k","conversation":{"id":"c"},"max_output_tokens":64}"#.to_vec(),
        br#"{"prompt":"once upon a time \u00e9\n","model":"m","max_tokens":3}"#.to_vec(),
    ];
    run("router-request", &seeds, |b| {
        let json = serde_json::from_slice::<serde_json::Value>(b).is_ok();
        let mut verdict = Verdict::Refused;
        for route in
            [Route::Chat, Route::Completions, Route::Messages, Route::CountTokens, Route::Responses]
        {
            match parse(route, b) {
                Ok(v) => {
                    assert!(v.segments.len() <= b.len() + 2, "{route:?}");
                    verdict = Verdict::Accepted;
                }
                Err(InvalidBody::Json(e)) => {
                    assert!(!json, "{route:?}: serde takes it, the router says {e}");
                }
                Err(_) => {}
            }
        }
        verdict
    });
}

#[test]
fn nulls_mean_absent() {
    let v = parse(Route::Chat, br#"{"messages":[{}],"tools":null,"user":null,"stream":null}"#)
        .expect("valid");
    assert!(v.user.is_none());
}
