//! The bounded little-endian byte form of kvtier's binary protocols: the node-agent's frames
//! ([`crate::agent`]) and the connector's step plans. One writer, one reader: every count is
//! checked against a limit and against the bytes left before anything is allocated for it,
//! so a hostile length allocates nothing.

/// Appends little-endian values.
#[derive(Debug, Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    /// A writer with room for `n` bytes.
    #[must_use]
    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }
    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    /// Two bytes.
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Four bytes.
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Eight bytes.
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Sixteen bytes.
    pub fn u128(&mut self, v: u128) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Raw bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    /// A count as four bytes.
    ///
    /// # Panics
    /// Past `u32::MAX`: the protocols bound their lists far below that.
    pub fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).expect("a bounded list"));
    }
    /// A counted list of four-byte values.
    pub fn u32s(&mut self, vs: &[u32]) {
        self.count(vs.len());
        for v in vs {
            self.u32(*v);
        }
    }
}

/// What a malformed input is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The input ended early.
    #[error("needs {need} more bytes, has {have}")]
    Truncated {
        /// Bytes the next field needs.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// A count over its limit.
    #[error("{n} items, at most {max}")]
    TooMany {
        /// The count.
        n: usize,
        /// Its limit.
        max: usize,
    },
    /// A count whose items cannot fit in what is left.
    #[error("{n} items of {size} bytes in {have}")]
    Overrun {
        /// The count.
        n: usize,
        /// Bytes per item, at least.
        size: usize,
        /// Bytes left.
        have: usize,
    },
    /// Text that is not UTF-8.
    #[error("text is not UTF-8")]
    Utf8,
    /// Bytes after the last field.
    #[error("{0} bytes left over")]
    Trailing(usize),
}

/// Reads little-endian values, each checked against what is left.
#[derive(Debug)]
pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// A reader over `bytes`.
    #[must_use]
    pub fn new(bytes: &'a [u8]) -> Self {
        Self(bytes)
    }
    /// Bytes left.
    #[must_use]
    pub fn left(&self) -> usize {
        self.0.len()
    }
    /// The next `n` bytes.
    ///
    /// # Errors
    /// When fewer are left.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated { need: n, have: self.0.len() });
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    /// One byte.
    ///
    /// # Errors
    /// At the end of the input.
    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    /// Two bytes.
    ///
    /// # Errors
    /// When fewer are left.
    pub fn u16(&mut self) -> Result<u16, WireError> {
        self.array().map(u16::from_le_bytes)
    }
    /// Four bytes.
    ///
    /// # Errors
    /// When fewer are left.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        self.array().map(u32::from_le_bytes)
    }
    /// Eight bytes.
    ///
    /// # Errors
    /// When fewer are left.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        self.array().map(u64::from_le_bytes)
    }
    /// Sixteen bytes.
    ///
    /// # Errors
    /// When fewer are left.
    pub fn u128(&mut self) -> Result<u128, WireError> {
        self.array().map(u128::from_le_bytes)
    }
    /// A four-byte count of items of at least `size` bytes each, at most `max`.
    ///
    /// # Errors
    /// Over `max`, or more items than the bytes left can hold.
    pub fn count(&mut self, size: usize, max: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(WireError::TooMany { n, max });
        }
        if n.saturating_mul(size) > self.0.len() {
            return Err(WireError::Overrun { n, size, have: self.0.len() });
        }
        Ok(n)
    }
    /// A counted list of four-byte values, at most `max`.
    ///
    /// # Errors
    /// As [`Reader::count`].
    pub fn u32s(&mut self, max: usize) -> Result<Vec<u32>, WireError> {
        let n = self.count(4, max)?;
        (0..n).map(|_| self.u32()).collect()
    }
    /// `n` bytes of UTF-8 text.
    ///
    /// # Errors
    /// When fewer are left, or they are not UTF-8.
    pub fn utf8(&mut self, n: usize) -> Result<String, WireError> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| WireError::Utf8)
    }
    /// Checks that nothing is left.
    ///
    /// # Errors
    /// When something is.
    pub fn end(&self) -> Result<(), WireError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.0.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_bad_counts_allocate_nothing() {
        let mut w = Writer::default();
        w.u8(1);
        w.u16(2);
        w.u64(3);
        w.u128(u128::MAX - 4);
        w.u32s(&[5, 6]);
        let mut r = Reader::new(&w.0);
        assert_eq!(r.u8(), Ok(1));
        assert_eq!(r.u16(), Ok(2));
        assert_eq!(r.u64(), Ok(3));
        assert_eq!(r.u128(), Ok(u128::MAX - 4));
        assert_eq!(r.u32s(8), Ok(vec![5, 6]));
        assert_eq!(r.end(), Ok(()));
        assert_eq!(r.u8(), Err(WireError::Truncated { need: 1, have: 0 }));

        let mut w = Writer::default();
        w.u32(u32::MAX);
        assert!(matches!(Reader::new(&w.0).count(1, 10), Err(WireError::TooMany { .. })));
        assert!(matches!(Reader::new(&w.0).count(1, usize::MAX), Err(WireError::Overrun { .. })));
    }
}
