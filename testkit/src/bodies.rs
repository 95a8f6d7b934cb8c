//! Request bodies shaped like an agent's, for tests and benchmarks of the router's scanner.

/// A chat body of about `size` bytes: many messages of code-like text with escapes.
pub fn agent_body(size: usize) -> Vec<u8> {
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
