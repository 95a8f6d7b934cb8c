//! What reading an agent's request costs the router, against `memcpy` of the same body and
//! against serde_json walking it: a ~425 KB chat body of code-like text with escapes. Times
//! are the best of five rounds (the machines are shared; the minimum is the least disturbed)
//! and are reported as ratios to `memcpy`.
//!
//! `cargo bench -p kvtier-router --bench scan_cost`

#![allow(clippy::print_stdout)]

use std::hint::black_box;
use std::time::Instant;

use kvtier_router::request::{parse, Route};

fn main() {
    let body = kvtier_testkit::bodies::agent_body(425_000);
    let runs = 100u32;
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
    let utf8 = time(&|| {
        black_box(simdutf8::basic::from_utf8(&body).is_ok());
    });
    let serde = time(&|| {
        black_box(serde_json::from_slice::<serde::de::IgnoredAny>(&body).ok());
    });
    let parsed = time(&|| {
        black_box(parse(Route::Chat, &body).ok());
    });
    let view = parse(Route::Chat, &body).expect("valid body");
    let hashes = time(&|| {
        black_box(view.segments.chunk_hashes(1, kvtier_api::prefix::DEFAULT_CHUNK_BYTES));
    });
    let backslashes = body.iter().filter(|&&b| b == b'\\').count().max(1);
    println!("body {} bytes, one backslash per {} bytes", body.len(), body.len() / backslashes);
    println!("memcpy            {memcpy:8.1} µs  1.00x");
    println!("utf-8 of all      {utf8:8.1} µs  {:.2}x memcpy", utf8 / memcpy);
    println!("request::parse    {parsed:8.1} µs  {:.2}x memcpy", parsed / memcpy);
    println!("prefix hashes     {hashes:8.1} µs  {:.2}x memcpy", hashes / memcpy);
    println!("serde IgnoredAny  {serde:8.1} µs  {:.2}x memcpy", serde / memcpy);
}
