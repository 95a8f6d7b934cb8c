use super::*;
use proptest::prelude::*;

/// Makes the scanner use its SSE2 path even where AVX2 is present. Results never depend
/// on the path, so tests running at the same time are unaffected.
pub(super) static FORCE_SSE2: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

fn valid(b: &[u8]) -> bool {
    scan(b, |_| false).is_ok()
}

#[test]
fn the_sse2_path_agrees_with_serde_too() {
    FORCE_SSE2.store(true, std::sync::atomic::Ordering::Relaxed);
    let body = kvtier_testkit::bodies::agent_body(20_000);
    assert!(valid(&body));
    for at in (0..body.len()).step_by(97) {
        let mut b = body.clone();
        b[at] = b"\\\"\x01n"[at % 4];
        assert_eq!(valid(&b), serde_valid(&b), "mutation at {at}");
    }
    FORCE_SSE2.store(false, std::sync::atomic::Ordering::Relaxed);
}

/// serde_json's grammar; serde_json skips ignored strings without checking UTF-8, which
/// the scanner (like the engine's JSON decoder) does check.
fn serde_valid(b: &[u8]) -> bool {
    std::str::from_utf8(b).is_ok() && serde_json::from_slice::<serde::de::IgnoredAny>(b).is_ok()
}

#[test]
fn members_and_elements_are_located() {
    let body = br#" {"a": 1, "messages": [ {"x":"y"} , [2] ,"s"], "b":{"messages":[1]}} "#;
    let m = scan(body, |k| k == b"messages").expect("valid").expect("object");
    assert_eq!(m.len(), 3);
    assert_eq!(&body[m[1].key.clone()], b"messages");
    let el = m[1].elements.clone().expect("elements");
    let texts: Vec<&[u8]> = el.into_iter().map(|r| &body[r]).collect();
    assert_eq!(texts, vec![&br#"{"x":"y"}"#[..], b"[2]", br#""s""#]);
    assert!(m[2].elements.is_none(), "only top-level keys are split");
}

#[test]
fn agrees_with_serde_on_tricky_inputs() {
    let cases: &[&[u8]] = &[
        b"{}",
        b"[]",
        b"\"\"",
        b"0",
        b"-0.5e+3",
        b"01",
        b"1.",
        b".5",
        b"-",
        b"1e",
        b"tru",
        b"nul",
        b"[1,]",
        b"{\"a\":1,}",
        b"{\"a\" 1}",
        b"{a:1}",
        b"[1 2]",
        b"\"\\x\"",
        b"\"\\u12g4\"",
        b"\"\\u00e9\"",
        b"\"a\tb\"",
        b"\"a\x7fb\"",
        b"\"\xc3\xa9\"",
        b"\"\xff\"",
        b"  [ ]  ",
        b"[] []",
        b"\"abc",
        b"{\"a\":\"\\\\\"}",
        b"[\"\\/\"]",
        b"1 ",
        b"",
        b" ",
        b"{\"k\":[{\"k\":[true,false,null]}]}",
    ];
    for c in cases {
        assert_eq!(valid(c), serde_valid(c), "{}", String::from_utf8_lossy(c));
    }
    let deep = "[".repeat(200) + &"]".repeat(200);
    assert!(!valid(deep.as_bytes()));
    let ok = "[".repeat(100) + &"]".repeat(100);
    assert!(valid(ok.as_bytes()));
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        (-1e9f64..1e9).prop_map(|n| serde_json::json!(n)),
        ".{0,40}".prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map(".{0,8}", inner, 0..8)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    #[allow(unsafe_code)]
    fn simd_classifiers_agree_with_the_portable_one(
        bytes in proptest::collection::vec(
            prop_oneof![Just(b'"'), Just(b'\\'), Just(b'n'), Just(b't'), 0u8..0x20, any::<u8>()],
            64,
        ),
    ) {
        let b: &[u8; 64] = bytes.as_slice().try_into().expect("64 bytes");
        let reference = block::classify_portable(b);
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: SSE2 is part of the x86-64 baseline.
            prop_assert_eq!(unsafe { block::classify_sse2(b) }, block::classify_portable(b));
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 support was just checked.
                prop_assert_eq!(unsafe { block::classify_avx2(b) }, block::classify_portable(b));
            }
        }
        prop_assert_eq!(reference, block::classify_portable(b));
    }

    #[test]
    fn escape_heavy_strings_spanning_blocks_agree_with_serde(
        parts in proptest::collection::vec(
            prop_oneof![
                Just("\\\\"), Just("\\\""), Just("\\n"), Just("\\u00e9"), Just("\\"),
                Just("\""), Just("a"), Just("u12"), Just("\\u12"), Just("\u{1}"), Just("é"),
                Just("xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"),
            ],
            0..60,
        ),
        tail in 0usize..70,
    ) {
        let text = format!("[\"{}\"{}]", parts.concat(), " ".repeat(tail));
        prop_assert_eq!(valid(text.as_bytes()), serde_valid(text.as_bytes()), "{}", text);
    }

    #[test]
    fn every_serialised_value_is_valid(v in json_value(), pretty in any::<bool>()) {
        let text = if pretty { serde_json::to_vec_pretty(&v) } else { serde_json::to_vec(&v) };
        prop_assert!(valid(&text.expect("serialise")));
    }

    #[test]
    fn verdict_matches_serde_on_mutated_json(
        v in json_value(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut text = serde_json::to_vec(&v).expect("serialise");
        for (at, byte) in edits {
            if text.is_empty() { break; }
            let i = at.index(text.len());
            // Mostly JSON punctuation, so mutations hit the grammar, not just UTF-8.
            let alphabet = b"{}[]\",:\\ 0e-.tnu\x01";
            text[i] = alphabet[usize::from(byte) % alphabet.len()];
        }
        prop_assert_eq!(valid(&text), serde_valid(&text), "{}", String::from_utf8_lossy(&text));
    }
}
