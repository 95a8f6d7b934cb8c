//! The protocol's byte form: the header, the bounded reader and writer, and every request's
//! and reply's encoding and decoding.

use super::*;
use crate::wire::{Reader, WireError, Writer};

/// Parses a header.
///
/// # Errors
/// Wrong magic or version, or a body over the limit.
pub fn decode_header(b: &[u8; HEADER]) -> Result<Header, ProtocolError> {
    let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if magic != MAGIC {
        return Err(ProtocolError::Magic(magic));
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != VERSION {
        return Err(ProtocolError::Version(version));
    }
    let op = u16::from_le_bytes([b[6], b[7]]);
    let request_id = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    let body_len = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
    if body_len as usize > MAX_BODY {
        return Err(ProtocolError::TooLarge(body_len));
    }
    Ok(Header { op, request_id, body_len })
}

fn frame(op: u16, request_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&op.to_le_bytes());
    out.extend_from_slice(&request_id.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

impl From<WireError> for ProtocolError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::TooMany { .. } | WireError::Utf8 => ProtocolError::Invalid(e.to_string()),
            _ => ProtocolError::Length(e.to_string()),
        }
    }
}

/// The agent protocol's fields on top of [`Writer`]: keys, and names cut to [`MAX_NAME`].
#[derive(Default)]
struct W(Writer);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.u8(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.u16(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.u32(v);
    }
    fn u64(&mut self, v: u64) {
        self.0.u64(v);
    }
    fn key(&mut self, k: ChunkKey) {
        self.0.u128(k.0);
    }
    fn str(&mut self, s: &str) {
        // Names longer than the limit are cut at a character boundary.
        let mut end = s.len().min(MAX_NAME);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let s = &s.as_bytes()[..end];
        self.u16(s.len() as u16);
        self.0.bytes(s);
    }
    fn keys(&mut self, ks: &[ChunkKey]) {
        self.0.count(ks.len());
        for k in ks {
            self.key(*k);
        }
    }
    fn u32s(&mut self, vs: &[u32]) {
        self.0.u32s(vs);
    }
    fn bytes(self) -> Vec<u8> {
        self.0 .0
    }
}

/// The agent protocol's fields on top of [`Reader`].
struct R<'a>(Reader<'a>);

impl R<'_> {
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.0.u8()?)
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(self.0.u16()?)
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(self.0.u32()?)
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(self.0.u64()?)
    }
    fn key(&mut self) -> Result<ChunkKey, ProtocolError> {
        Ok(ChunkKey(self.0.u128()?))
    }
    fn str(&mut self) -> Result<String, ProtocolError> {
        let n = self.u16()? as usize;
        if n > MAX_NAME {
            return Err(ProtocolError::Invalid(format!("name of {n} bytes")));
        }
        self.0.utf8(n).map_err(|e| match e {
            WireError::Utf8 => ProtocolError::Invalid("name is not UTF-8".into()),
            e => e.into(),
        })
    }
    /// A count of items of `size` bytes each, checked against the limit and the bytes left.
    fn count(&mut self, size: usize) -> Result<usize, ProtocolError> {
        Ok(self.0.count(size, MAX_KEYS)?)
    }
    fn keys(&mut self) -> Result<Vec<ChunkKey>, ProtocolError> {
        let n = self.count(16)?;
        (0..n).map(|_| self.key()).collect()
    }
    fn u32s(&mut self) -> Result<Vec<u32>, ProtocolError> {
        Ok(self.0.u32s(MAX_KEYS)?)
    }
    fn end(&self) -> Result<(), ProtocolError> {
        Ok(self.0.end()?)
    }
}

impl Request {
    /// The whole frame.
    #[must_use]
    pub fn encode(&self, request_id: u32) -> Vec<u8> {
        let mut w = W::default();
        let op = match self {
            Request::Hello { client, pid } => {
                w.str(client);
                w.u32(*pid);
                op::HELLO
            }
            Request::Lookup { keys } => {
                w.keys(keys);
                op::LOOKUP
            }
            Request::Reserve { n } => {
                w.u32(*n);
                op::RESERVE
            }
            Request::Commit { chunks } => {
                w.u32(chunks.len() as u32);
                for c in chunks {
                    w.key(c.key);
                    w.u32(c.slot);
                    w.u32(c.len);
                    w.u64(c.checksum);
                    w.u64(c.conversation.0);
                }
                op::COMMIT
            }
            Request::Release { slots } => {
                w.u32s(slots);
                op::RELEASE
            }
            Request::Pin { keys, lease_ms } => {
                w.u32(*lease_ms);
                w.keys(keys);
                op::PIN
            }
            Request::Unpin { keys } => {
                w.keys(keys);
                op::UNPIN
            }
            Request::Prefetch { keys } => {
                w.keys(keys);
                op::PREFETCH
            }
            Request::Stats => op::STATS,
            Request::Hold { keys, ttl_ms } => {
                w.u32(*ttl_ms);
                w.keys(keys);
                op::HOLD
            }
        };
        frame(op, request_id, &w.bytes())
    }

    /// Parses a request body.
    ///
    /// # Errors
    /// Unknown operation, a body that is too short or too long, or a field out of range.
    pub fn decode(op: u16, body: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = R(Reader::new(body));
        let req = match op {
            op::HELLO => Request::Hello { client: r.str()?, pid: r.u32()? },
            op::LOOKUP => Request::Lookup { keys: r.keys()? },
            op::RESERVE => {
                let n = r.u32()?;
                if n as usize > MAX_KEYS {
                    return Err(ProtocolError::Invalid(format!("reserve {n}, at most {MAX_KEYS}")));
                }
                Request::Reserve { n }
            }
            op::COMMIT => {
                let n = r.count(40)?;
                let mut chunks = Vec::with_capacity(n);
                for _ in 0..n {
                    chunks.push(Commit {
                        key: r.key()?,
                        slot: r.u32()?,
                        len: r.u32()?,
                        checksum: r.u64()?,
                        conversation: crate::residency::ConversationKey(r.u64()?),
                    });
                }
                Request::Commit { chunks }
            }
            op::RELEASE => Request::Release { slots: r.u32s()? },
            op::PIN => {
                let lease_ms = r.u32()?;
                if lease_ms == 0 || lease_ms > MAX_LEASE_MS {
                    return Err(ProtocolError::Invalid(format!(
                        "lease {lease_ms} ms, must be 1..={MAX_LEASE_MS}"
                    )));
                }
                Request::Pin { lease_ms, keys: r.keys()? }
            }
            op::UNPIN => Request::Unpin { keys: r.keys()? },
            op::PREFETCH => Request::Prefetch { keys: r.keys()? },
            op::STATS => Request::Stats,
            op::HOLD => {
                let ttl_ms = r.u32()?;
                if ttl_ms == 0 || ttl_ms > MAX_HOLD_MS {
                    return Err(ProtocolError::Invalid(format!(
                        "hold {ttl_ms} ms, must be 1..={MAX_HOLD_MS}"
                    )));
                }
                Request::Hold { ttl_ms, keys: r.keys()? }
            }
            other => return Err(ProtocolError::Op(other)),
        };
        r.end()?;
        Ok(req)
    }

    /// Operation code of this request.
    #[must_use]
    pub fn op(&self) -> u16 {
        match self {
            Request::Hello { .. } => op::HELLO,
            Request::Lookup { .. } => op::LOOKUP,
            Request::Reserve { .. } => op::RESERVE,
            Request::Commit { .. } => op::COMMIT,
            Request::Release { .. } => op::RELEASE,
            Request::Pin { .. } => op::PIN,
            Request::Unpin { .. } => op::UNPIN,
            Request::Prefetch { .. } => op::PREFETCH,
            Request::Stats => op::STATS,
            Request::Hold { .. } => op::HOLD,
        }
    }
}

impl Response {
    /// The whole frame, answering request `request_id`.
    #[must_use]
    pub fn encode(&self, request_id: u32) -> Vec<u8> {
        let mut w = W::default();
        let op = match self {
            Response::Hello { pool_bytes, slot_bytes, slots, pool_id, staging_slots } => {
                w.u64(*pool_bytes);
                w.u32(*slot_bytes);
                w.u32(*slots);
                w.u64(*pool_id);
                w.u32(*staging_slots);
                op::HELLO | op::REPLY
            }
            Response::Lookup { prefix, tiers, slots } => {
                w.u32(*prefix);
                w.u32(tiers.len() as u32);
                for t in tiers {
                    w.u8(*t as u8);
                }
                w.u32s(slots);
                op::LOOKUP | op::REPLY
            }
            Response::Reserve { slots } => {
                w.u32s(slots);
                op::RESERVE | op::REPLY
            }
            Response::Ack { applied } => {
                w.u32(*applied);
                op::ACK | op::REPLY
            }
            Response::Stats(s) => {
                for v in [s.slots, s.used, s.reserved, s.pinned, s.held] {
                    w.u32(v);
                }
                for v in [s.hits, s.misses, s.evictions] {
                    w.u64(v);
                }
                op::STATS | op::REPLY
            }
            Response::Error { code, message } => {
                w.u16(*code as u16);
                w.str(message);
                op::ERROR | op::REPLY
            }
        };
        frame(op, request_id, &w.bytes())
    }

    /// Parses a reply body.
    ///
    /// # Errors
    /// As [`Request::decode`].
    pub fn decode(op: u16, body: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = R(Reader::new(body));
        if op & op::REPLY == 0 {
            return Err(ProtocolError::Op(op));
        }
        let res = match op & !op::REPLY {
            op::HELLO => Response::Hello {
                pool_bytes: r.u64()?,
                slot_bytes: r.u32()?,
                slots: r.u32()?,
                pool_id: r.u64()?,
                staging_slots: r.u32()?,
            },
            op::LOOKUP => {
                let prefix = r.u32()?;
                let n = r.count(1)?;
                let tiers = (0..n)
                    .map(|_| r.u8().and_then(Tier::from_u8))
                    .collect::<Result<Vec<_>, _>>()?;
                let slots = r.u32s()?;
                if slots.len() != tiers.len() || prefix as usize > tiers.len() {
                    return Err(ProtocolError::Invalid("lookup reply lengths disagree".into()));
                }
                Response::Lookup { prefix, tiers, slots }
            }
            op::RESERVE => Response::Reserve { slots: r.u32s()? },
            op::ACK => Response::Ack { applied: r.u32()? },
            op::STATS => Response::Stats(Stats {
                slots: r.u32()?,
                used: r.u32()?,
                reserved: r.u32()?,
                pinned: r.u32()?,
                held: r.u32()?,
                hits: r.u64()?,
                misses: r.u64()?,
                evictions: r.u64()?,
            }),
            op::ERROR => {
                let code = match r.u16()? {
                    1 => ErrorCode::Malformed,
                    2 => ErrorCode::Invalid,
                    3 => ErrorCode::Full,
                    4 => ErrorCode::State,
                    c => return Err(ProtocolError::Invalid(format!("error code {c}"))),
                };
                Response::Error { code, message: r.str()? }
            }
            other => return Err(ProtocolError::Op(other | op::REPLY)),
        };
        r.end()?;
        Ok(res)
    }
}

/// Splits a buffer holding one whole frame into its header and body.
///
/// # Errors
/// A bad header, or a buffer whose length disagrees with it.
pub fn split_frame(buf: &[u8]) -> Result<(Header, &[u8]), ProtocolError> {
    let Some(h) = buf.get(..HEADER) else {
        return Err(ProtocolError::Length(format!("{} bytes, a header is {HEADER}", buf.len())));
    };
    let mut a = [0u8; HEADER];
    a.copy_from_slice(h);
    let header = decode_header(&a)?;
    let body = &buf[HEADER..];
    if body.len() != header.body_len as usize {
        return Err(ProtocolError::Length(format!(
            "header says {} body bytes, frame has {}",
            header.body_len,
            body.len()
        )));
    }
    Ok((header, body))
}
