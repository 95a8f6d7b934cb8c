//! A validating JSON scanner that returns byte ranges instead of values.
//!
//! The router must reject malformed JSON, and must know where the routed fields (tools, each
//! message, the prompt) lie in the received bytes, but never needs their decoded values.
//! A general parser spends most of its time on long strings; an agent prompt is almost all
//! string (400 KB of code and tool output). This scanner validates the whole body (RFC 8259
//! grammar, escapes, no raw control characters, nesting depth, and UTF-8: the grammar admits
//! only ASCII outside strings, and a string holding other bytes is checked with `simdutf8`)
//! and walks strings 64 bytes a step, at a fifth of a general parser's cost
//! (docs/benchmarks.md, ADR 0002).
//!
//! Its verdict agrees with `serde_json`'s grammar plus a UTF-8 check of the whole body (a
//! property test checks it).

use std::ops::Range;

/// Deepest nesting accepted (the same limit as serde_json's).
pub const MAX_DEPTH: u32 = 128;

/// Where and why the body is not JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} at byte {at}")]
pub struct ScanError {
    /// What was wrong.
    pub what: &'static str,
    /// Byte offset.
    pub at: usize,
}

/// One member of the top-level object: its key (raw, without quotes) and its value's range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Raw key bytes between the quotes (escapes not decoded).
    pub key: Range<usize>,
    /// The value's bytes.
    pub value: Range<usize>,
    /// When the value is an array and the key was asked for, each element's bytes.
    pub elements: Option<Vec<Range<usize>>>,
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
    depth: u32,
}

/// Classifying 64 bytes at a time, one bit per byte, so a string is validated and its end
/// found without a branch per escape (agent prompts are code: an escape every ~17 bytes).
/// AVX2 where the CPU has it, else SSE2 (part of the x86-64 baseline); other targets classify
/// byte by byte. These are the router's only `unsafe` calls, each with its reason.
mod block {
    /// Bit masks of one 64-byte block.
    #[derive(Debug, PartialEq, Eq)]
    pub(super) struct Classes {
        pub(super) quote: u64,
        pub(super) backslash: u64,
        /// Bytes below 0x20, which JSON forbids inside strings.
        pub(super) control: u64,
        /// `n` or `t`: with `"` and `\\`, the escapes code is made of. Other escaped bytes
        /// are checked one by one.
        pub(super) common_escape: u64,
        /// Bytes of 0x80 and above: a string holding any gets its UTF-8 checked.
        pub(super) high: u64,
    }

    /// Classifies `b` with AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) fn classify_avx2(b: &[u8; 64]) -> Classes {
        use std::arch::x86_64::{
            __m256i, _mm256_and_si256, _mm256_cmpeq_epi8, _mm256_movemask_epi8, _mm256_or_si256,
            _mm256_set1_epi8, _mm256_set_epi64x, _mm256_setzero_si256,
        };
        let lane = |k: usize| -> __m256i {
            let w = |j: usize| {
                let at = 32 * k + 8 * j;
                i64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
            };
            _mm256_set_epi64x(w(3), w(2), w(1), w(0))
        };
        let bits = |v: __m256i, k: usize| -> u64 {
            u64::from(_mm256_movemask_epi8(v).cast_unsigned()) << (32 * k)
        };
        let splat = |x: u8| _mm256_set1_epi8(x.cast_signed());
        let (quote, backslash) = (splat(b'"'), splat(b'\\'));
        let (n, t) = (splat(b'n'), splat(b't'));
        let (high3, zero) = (splat(0xE0), _mm256_setzero_si256());
        let mut c = Classes { quote: 0, backslash: 0, control: 0, common_escape: 0, high: 0 };
        for k in 0..2 {
            let v = lane(k);
            c.quote |= bits(_mm256_cmpeq_epi8(v, quote), k);
            c.backslash |= bits(_mm256_cmpeq_epi8(v, backslash), k);
            c.common_escape |=
                bits(_mm256_or_si256(_mm256_cmpeq_epi8(v, n), _mm256_cmpeq_epi8(v, t)), k);
            c.control |= bits(_mm256_cmpeq_epi8(_mm256_and_si256(v, high3), zero), k);
            c.high |= bits(v, k);
        }
        c
    }

    /// Classifies `b` with SSE2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "sse2")]
    #[inline]
    pub(super) fn classify_sse2(b: &[u8; 64]) -> Classes {
        use std::arch::x86_64::{
            __m128i, _mm_and_si128, _mm_cmpeq_epi8, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
            _mm_set_epi64x, _mm_setzero_si128,
        };
        let lane = |k: usize| -> __m128i {
            let lo = i64::from_le_bytes(b[16 * k..16 * k + 8].try_into().unwrap_or([0; 8]));
            let hi = i64::from_le_bytes(b[16 * k + 8..16 * k + 16].try_into().unwrap_or([0; 8]));
            _mm_set_epi64x(hi, lo)
        };
        let bits = |v: __m128i, k: usize| -> u64 {
            u64::from(_mm_movemask_epi8(v).cast_unsigned() & 0xFFFF) << (16 * k)
        };
        let splat = |x: u8| _mm_set1_epi8(x.cast_signed());
        let (quote, backslash) = (splat(b'"'), splat(b'\\'));
        let (n, t) = (splat(b'n'), splat(b't'));
        let (high3, zero) = (splat(0xE0), _mm_setzero_si128());
        let mut c = Classes { quote: 0, backslash: 0, control: 0, common_escape: 0, high: 0 };
        for k in 0..4 {
            let v = lane(k);
            c.quote |= bits(_mm_cmpeq_epi8(v, quote), k);
            c.backslash |= bits(_mm_cmpeq_epi8(v, backslash), k);
            c.common_escape |= bits(_mm_or_si128(_mm_cmpeq_epi8(v, n), _mm_cmpeq_epi8(v, t)), k);
            c.control |= bits(_mm_cmpeq_epi8(_mm_and_si128(v, high3), zero), k);
            c.high |= bits(v, k);
        }
        c
    }

    /// Classifies `b`, one byte at a time (other targets, and the reference in tests).
    #[cfg(any(test, not(target_arch = "x86_64")))]
    #[inline]
    pub(super) fn classify_portable(b: &[u8; 64]) -> Classes {
        let mut c = Classes { quote: 0, backslash: 0, control: 0, common_escape: 0, high: 0 };
        for (k, &x) in b.iter().enumerate() {
            c.quote |= u64::from(x == b'"') << k;
            c.backslash |= u64::from(x == b'\\') << k;
            c.control |= u64::from(x < 0x20) << k;
            c.common_escape |= u64::from(x == b'n' || x == b't') << k;
            c.high |= u64::from(x >= 0x80) << k;
        }
        c
    }

    /// Which bytes are escaped (follow an odd run of backslashes), given the backslashes of
    /// this block and whether its first byte is escaped by the previous block. Returns the
    /// mask and whether the next block's first byte is escaped. Branch-free, after simdjson.
    pub(super) fn escaped(backslash: u64, first_escaped: bool) -> (u64, bool) {
        const EVEN: u64 = 0x5555_5555_5555_5555;
        let prev = u64::from(first_escaped);
        let backslash = backslash & !prev;
        let follows = (backslash << 1) | prev;
        let odd_starts = backslash & !EVEN & !follows;
        let (even_starts, carry) = odd_starts.overflowing_add(backslash);
        let escaped = (EVEN ^ (even_starts << 1)) & follows;
        (escaped, carry)
    }
}

/// How a string's 64-byte blocks ended; `non_ascii` says whether any byte so far was.
enum Blocks {
    /// The closing quote was found.
    Done { non_ascii: bool },
    /// Fewer than 64 bytes are left; `first_escaped` says whether the next byte is escaped.
    Tail { first_escaped: bool, non_ascii: bool },
}

/// The block loop of [`Scanner::string`], instantiated once per classifier so that the
/// classifier is inlined into it (a function with a target feature is only inlined into
/// functions with the same feature).
macro_rules! string_blocks {
    ($self:ident, $classify:expr) => {{
        let mut first_escaped = false;
        let mut high = 0u64;
        while let Some(bytes) = $self.b.get($self.i..$self.i + 64) {
            let Ok(bytes) = <&[u8; 64]>::try_from(bytes) else { break };
            let c = $classify(bytes);
            let (escaped, carry) = block::escaped(c.backslash, first_escaped);
            let ends = c.quote & !escaped;
            let inside = if ends == 0 { u64::MAX } else { (1u64 << ends.trailing_zeros()) - 1 };
            high |= c.high & inside;
            let control = c.control & inside;
            if control != 0 {
                $self.i += control.trailing_zeros() as usize;
                return $self.err("control character in string");
            }
            // Escaped `"`, `\\`, `n`, `t` are valid; anything else is looked at one by one.
            let mut rare = escaped & inside & !(c.common_escape | c.quote | c.backslash);
            while rare != 0 {
                let at = $self.i + rare.trailing_zeros() as usize;
                match bytes[rare.trailing_zeros() as usize] {
                    b'/' | b'b' | b'f' | b'r' => {}
                    b'u' => $self.hex4(at + 1)?,
                    _ => {
                        $self.i = at;
                        return $self.err("invalid escape");
                    }
                }
                rare &= rare - 1;
            }
            if ends != 0 {
                $self.i += ends.trailing_zeros() as usize + 1;
                return Ok(Blocks::Done { non_ascii: high != 0 });
            }
            first_escaped = carry;
            $self.i += 64;
        }
        Ok(Blocks::Tail { first_escaped, non_ascii: high != 0 })
    }};
}

impl Scanner<'_> {
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[allow(unsafe_code)]
    fn string_blocks(&mut self) -> Result<Blocks, ScanError> {
        #[cfg(test)]
        let avx2 = std::is_x86_feature_detected!("avx2")
            && !tests::FORCE_SSE2.load(std::sync::atomic::Ordering::Relaxed);
        #[cfg(not(test))]
        let avx2 = std::is_x86_feature_detected!("avx2");
        if avx2 {
            // SAFETY: the CPU was just checked to support AVX2, the only requirement of
            // `string_blocks_avx2`; it touches memory only through safe slices.
            unsafe { self.string_blocks_avx2() }
        } else {
            // SAFETY: SSE2 is part of the x86-64 baseline, so every CPU running this code
            // has it; `string_blocks_sse2` touches memory only through safe slices.
            unsafe { self.string_blocks_sse2() }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn string_blocks_avx2(&mut self) -> Result<Blocks, ScanError> {
        string_blocks!(self, block::classify_avx2)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "sse2")]
    fn string_blocks_sse2(&mut self) -> Result<Blocks, ScanError> {
        string_blocks!(self, block::classify_sse2)
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn string_blocks(&mut self) -> Result<Blocks, ScanError> {
        string_blocks!(self, block::classify_portable)
    }
}

impl Scanner<'_> {
    fn err<T>(&self, what: &'static str) -> Result<T, ScanError> {
        Err(ScanError { what, at: self.i })
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(c) = self.b.get(self.i) {
            if !matches!(c, b' ' | b'\n' | b'\r' | b'\t') {
                break;
            }
            self.i += 1;
        }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn expect(&mut self, c: u8, what: &'static str) -> Result<(), ScanError> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            self.err(what)
        }
    }

    fn value(&mut self) -> Result<(), ScanError> {
        match self.peek() {
            Some(b'"') => self.string(),
            Some(b'{') => self.object(|_, _| false, &mut |_| {}),
            Some(b'[') => self.array(None),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => self.err("expected a value"),
            None => self.err("unexpected end of input"),
        }
    }

    fn literal(&mut self, lit: &[u8]) -> Result<(), ScanError> {
        if self.b[self.i..].starts_with(lit) {
            self.i += lit.len();
            Ok(())
        } else {
            self.err("invalid literal")
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<(), ScanError> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return self.err("invalid number"),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return self.err("invalid number");
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return self.err("invalid number");
            }
        }
        Ok(())
    }

    fn hex4(&self, at: usize) -> Result<(), ScanError> {
        if self.b.get(at..at + 4).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
            Ok(())
        } else {
            Err(ScanError { what: "invalid \\u escape", at })
        }
    }

    /// At an opening quote; leaves `i` after the closing one.
    fn string(&mut self) -> Result<(), ScanError> {
        self.i += 1;
        let start = self.i;
        let (mut escaped, mut non_ascii) = match self.string_blocks()? {
            Blocks::Done { non_ascii } => return self.utf8(start, non_ascii),
            Blocks::Tail { first_escaped, non_ascii } => (first_escaped, non_ascii),
        };
        // The last < 64 bytes, one at a time.
        loop {
            let Some(x) = self.peek() else { return self.err("unterminated string") };
            if escaped {
                match x {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                    b'u' => self.hex4(self.i + 1)?,
                    _ => return self.err("invalid escape"),
                }
                escaped = false;
            } else {
                match x {
                    b'"' => {
                        self.i += 1;
                        return self.utf8(start, non_ascii);
                    }
                    b'\\' => escaped = true,
                    0..0x20 => return self.err("control character in string"),
                    0x80.. => non_ascii = true,
                    _ => {}
                }
            }
            self.i += 1;
        }
    }

    /// Checks the UTF-8 of the string that started at `start` and just ended, when it held
    /// bytes above ASCII (outside strings the grammar admits only ASCII).
    fn utf8(&self, start: usize, non_ascii: bool) -> Result<(), ScanError> {
        let text = &self.b[start..self.i - 1];
        if non_ascii && simdutf8::basic::from_utf8(text).is_err() {
            let at = start + std::str::from_utf8(text).err().map_or(0, |e| e.valid_up_to());
            return Err(ScanError { what: "invalid UTF-8", at });
        }
        Ok(())
    }

    fn enter(&mut self) -> Result<(), ScanError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.err("nesting too deep");
        }
        self.i += 1;
        self.ws();
        Ok(())
    }

    /// At `[`. Records element ranges into `elements` when given.
    fn array(&mut self, mut elements: Option<&mut Vec<Range<usize>>>) -> Result<(), ScanError> {
        self.enter()?;
        if self.peek() == Some(b']') {
            self.i += 1;
            self.depth -= 1;
            return Ok(());
        }
        loop {
            self.ws();
            let start = self.i;
            self.value()?;
            if let Some(e) = elements.as_deref_mut() {
                e.push(start..self.i);
            }
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return self.err("expected ',' or ']'"),
            }
        }
    }

    /// At `{`. `wants(key)` says whether an array value's elements are wanted;
    /// `member` receives each member of this object.
    fn object(
        &mut self,
        wants: impl Fn(&[u8], u32) -> bool,
        member: &mut dyn FnMut(Member),
    ) -> Result<(), ScanError> {
        self.enter()?;
        if self.peek() == Some(b'}') {
            self.i += 1;
            self.depth -= 1;
            return Ok(());
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return self.err("expected a string key");
            }
            let key_start = self.i + 1;
            self.string()?;
            let key = key_start..self.i - 1;
            self.ws();
            self.expect(b':', "expected ':'")?;
            self.ws();
            let start = self.i;
            let elements = if self.peek() == Some(b'[') && wants(&self.b[key.clone()], self.depth) {
                let mut e = Vec::new();
                self.array(Some(&mut e))?;
                Some(e)
            } else {
                self.value()?;
                None
            };
            member(Member { key, value: start..self.i, elements });
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return self.err("expected ',' or '}'"),
            }
        }
    }
}

/// Validates `body` as one JSON value. When it is an object, returns its members; the
/// elements of array members whose key `wants` are listed too.
///
/// # Errors
/// When `body` is not valid UTF-8 JSON.
pub fn scan(body: &[u8], wants: impl Fn(&[u8]) -> bool) -> Result<Option<Vec<Member>>, ScanError> {
    let mut s = Scanner { b: body, i: 0, depth: 0 };
    s.ws();
    let members = if s.peek() == Some(b'{') {
        let mut out = Vec::new();
        s.object(|k, depth| depth == 1 && wants(k), &mut |m| out.push(m))?;
        Some(out)
    } else {
        s.value()?;
        None
    };
    s.ws();
    if s.i != body.len() {
        return s.err("trailing characters");
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
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
        let body = cost::agent_body(20_000);
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
}

/// Throughput of the scanner against `memcpy` and serde_json on a ~425 KB agent body with
/// code-like escapes. A benchmark, not a test: it asserts nothing about time.
///
/// `cargo test --release -p kvtier-router --lib scan_cost -- --ignored --nocapture`
#[cfg(test)]
pub(crate) mod cost {
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
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
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
}
