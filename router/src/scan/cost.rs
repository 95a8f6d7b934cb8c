//! Throughput of the scanner against `memcpy` and serde_json on a ~425 KB agent body with
//! code-like escapes. A benchmark, not a test: it asserts nothing about time.
//!
//! `cargo test --release -p kvtier-router --lib scan_cost -- --ignored --nocapture`

use std::hint::black_box;
use std::time::Instant;

/// A chat body of about `size` bytes: many messages of code-like text with escapes.
pub(super) fn agent_body(size: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "fn",
        "let",
        "mut",
        "match",
        "impl",
        "Ok(())",
        "src/lib.rs",
        "\\n",
        "\\\"quoted\\\"",
        "path\\\\to\\\\file",
        "error:",
        "{",
        "}",
        "=>",
        "cargo",
        "test",
        "\\t",
        "é",
        "x",
    ];
    let mut x: u64 = 7;
    let mut body = String::from(r#"{"model":"m","tools":[{"type":"function"}],"messages":["#);
    let mut first = true;
    while body.len() < size {
        if !first {
            body.push(',');
        }
        first = false;
        body.push_str(r#"{"role":"user","content":""#);
        for _ in 0..400 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            body.push_str(WORDS[(x >> 33) as usize % WORDS.len()]);
            body.push(' ');
        }
        body.push_str(r#""}"#);
    }
    body.push_str("]}");
    body.into_bytes()
}

#[test]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
#[allow(clippy::print_stdout, clippy::cast_precision_loss)]
fn scan_cost() {
    let body = agent_body(425_000);
    let runs = 100u32;
    // Best of five rounds: the machine is shared, the minimum is the least disturbed.
    let time = |f: &dyn Fn()| {
        f();
        (0..5)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..runs {
                    f();
                }
                t.elapsed().as_secs_f64() * 1e6 / f64::from(runs)
            })
            .fold(f64::INFINITY, f64::min)
    };
    let memcpy = time(&|| {
        black_box(body.clone());
    });
    let scan = time(&|| {
        black_box(super::scan(&body, |k| k == b"messages").ok());
    });
    let utf8 = time(&|| {
        black_box(simdutf8::basic::from_utf8(&body).is_ok());
    });
    let serde = time(&|| {
        black_box(serde_json::from_slice::<serde::de::IgnoredAny>(&body).ok());
    });
    let parse = time(&|| {
        black_box(crate::request::parse(crate::request::Route::Chat, &body).ok());
    });
    let view = crate::request::parse(crate::request::Route::Chat, &body).expect("valid body");
    let hashes = time(&|| {
        black_box(view.segments.chunk_hashes(1, kvtier_api::prefix::DEFAULT_CHUNK_BYTES));
    });
    let backslashes = body.iter().filter(|&&b| b == b'\\').count();
    println!("body {} bytes, one backslash per {} bytes", body.len(), body.len() / backslashes);
    println!("memcpy            {memcpy:8.1} µs  1.00x");
    println!("utf-8 of all      {utf8:8.1} µs  {:.2}x memcpy", utf8 / memcpy);
    println!("scan              {scan:8.1} µs  {:.2}x memcpy", scan / memcpy);
    println!("request::parse    {parse:8.1} µs  {:.2}x memcpy", parse / memcpy);
    println!("prefix hashes     {hashes:8.1} µs  {:.2}x memcpy", hashes / memcpy);
    println!("serde IgnoredAny  {serde:8.1} µs  {:.2}x memcpy", serde / memcpy);
}
