//! Classifying 64 bytes at a time, one bit per byte, so a string is validated and its end
//! found without a branch per escape (agent prompts are code: an escape every ~17 bytes).
//! AVX2 where the CPU has it, else SSE2 (part of the x86-64 baseline); other targets classify
//! byte by byte. These are the router's only `unsafe` calls, each with its reason.

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
