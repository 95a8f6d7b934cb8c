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
    /// A key to look out for at any depth, and whether it was seen.
    note: Option<&'a [u8]>,
    noted: bool,
}

mod block;

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
                $self.escaped_char($self.i + rare.trailing_zeros() as usize)?;
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

    /// Checks the character at `at`, which follows a backslash (and, for `\\u`, its four hex
    /// digits).
    fn escaped_char(&self, at: usize) -> Result<(), ScanError> {
        match self.b.get(at) {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(()),
            Some(b'u') => {
                if self.b.get(at + 1..at + 5).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                    Ok(())
                } else {
                    Err(ScanError { what: "invalid \\u escape", at: at + 1 })
                }
            }
            _ => Err(ScanError { what: "invalid escape", at }),
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
                self.escaped_char(self.i)?;
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

    /// At an opening bracket: steps in. True when the container closes at once (`close`).
    fn enter(&mut self, close: u8) -> Result<bool, ScanError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.err("nesting too deep");
        }
        self.i += 1;
        self.ws();
        if self.peek() == Some(close) {
            self.i += 1;
            self.depth -= 1;
            return Ok(true);
        }
        Ok(false)
    }

    /// After an element: true on `,` (another follows), false on `close` (stepped out).
    fn next_or_close(&mut self, close: u8, what: &'static str) -> Result<bool, ScanError> {
        self.ws();
        match self.peek() {
            Some(b',') => {
                self.i += 1;
                Ok(true)
            }
            Some(c) if c == close => {
                self.i += 1;
                self.depth -= 1;
                Ok(false)
            }
            _ => self.err(what),
        }
    }

    /// At `[`. Records element ranges into `elements` when given.
    fn array(&mut self, mut elements: Option<&mut Vec<Range<usize>>>) -> Result<(), ScanError> {
        if self.enter(b']')? {
            return Ok(());
        }
        loop {
            self.ws();
            let start = self.i;
            self.value()?;
            if let Some(e) = elements.as_deref_mut() {
                e.push(start..self.i);
            }
            if !self.next_or_close(b']', "expected ',' or ']'")? {
                return Ok(());
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
        if self.enter(b'}')? {
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
            if !self.noted && self.note.is_some_and(|n| n == &self.b[key.clone()]) {
                self.noted = true;
            }
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
            if !self.next_or_close(b'}', "expected ',' or '}'")? {
                return Ok(());
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
    scan_noting(body, wants, None).map(|(members, _)| members)
}

/// As [`scan`], and says whether any object, at any depth, has the key `note` (raw bytes,
/// escapes not decoded): what a caller would otherwise search the whole body for again.
///
/// # Errors
/// When `body` is not valid UTF-8 JSON.
pub fn scan_noting<'a>(
    body: &'a [u8],
    wants: impl Fn(&[u8]) -> bool,
    note: Option<&'a [u8]>,
) -> Result<(Option<Vec<Member>>, bool), ScanError> {
    let mut s = Scanner { b: body, i: 0, depth: 0, note, noted: false };
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
    Ok((members, s.noted))
}

#[cfg(test)]
mod tests;
