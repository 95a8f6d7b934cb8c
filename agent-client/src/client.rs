//! A blocking client of the agent: what the connector (and the tests) use. It attaches,
//! receives and maps the pool (read-only) and the staging area, and sends one request at a time.

use std::io::{IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::unix::net::UnixStream;
use std::path::Path;

use kvtier_api::agent::{decode_header, Commit, Request, Response, Stats, Tier, HEADER, MAX_KEYS};
use kvtier_api::chunk::ChunkKey;
use kvtier_api::residency::ConversationKey;
use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

use crate::pool::{MappedPool, MappedStaging};

/// Copies `src` into `dst` and returns the xxh3-64 of the bytes, hashing each piece while it
/// is still in cache: one pass over memory instead of two.
#[must_use]
pub fn copy_and_checksum(dst: &mut [u8], src: &[u8]) -> u64 {
    const PIECE: usize = 64 * 1024;
    let mut h = twox_hash::XxHash3_64::with_seed(0);
    for (d, s) in dst.chunks_mut(PIECE).zip(src.chunks(PIECE)) {
        d.copy_from_slice(s);
        std::hash::Hasher::write(&mut h, d);
    }
    std::hash::Hasher::finish(&h)
}

/// Sends `Hello` as `name` on a fresh connection and reads the reply with the descriptors that
/// came with it (the pool's memfd, then the staging area's). [`Client::connect`] maps them; the
/// tests use it to see what a client receives.
///
/// # Errors
/// Socket or protocol trouble.
pub fn hello(
    stream: &mut UnixStream,
    name: &str,
) -> Result<(Response, Vec<std::os::fd::OwnedFd>), ClientError> {
    let hello = Request::Hello { client: name.to_owned(), pid: std::process::id() };
    stream.write_all(&hello.encode(0))?;
    // The reply's first bytes carry the memfds.
    let mut header = [0u8; HEADER];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let got =
        recvmsg(&*stream, &mut [IoSliceMut::new(&mut header)], &mut anc, RecvFlags::CMSG_CLOEXEC)
            .map_err(std::io::Error::from)?
            .bytes;
    let mut fds = Vec::new();
    for msg in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(got) = msg {
            fds.extend(got);
        }
    }
    if got < HEADER {
        stream.read_exact(&mut header[got..])?;
    }
    let h = decode_header(&header)?;
    let mut body = vec![0u8; h.body_len as usize];
    stream.read_exact(&mut body)?;
    Ok((Response::decode(h.op, &body)?, fds))
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket trouble.
    #[error("agent socket: {0}")]
    Io(#[from] std::io::Error),
    /// The agent sent something that is not a reply.
    #[error("agent reply: {0}")]
    Protocol(#[from] kvtier_api::agent::ProtocolError),
    /// The agent refused.
    #[error("agent refused ({code:?}): {message}")]
    Refused {
        /// Class.
        code: kvtier_api::agent::ErrorCode,
        /// Reason.
        message: String,
    },
    /// A reply of another kind than asked for.
    #[error("unexpected reply {0:?}")]
    Unexpected(Box<Response>),
}

/// An attached client.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    next_id: u32,
    pool: MappedPool,
    staging: MappedStaging,
    slots: u32,
    staging_slots: u32,
    slot_bytes: u32,
    pool_id: u64,
    checksums: bool,
}

/// Result of a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// Keys from the start held in DRAM.
    pub prefix: u32,
    /// Tier per key.
    pub tiers: Vec<Tier>,
    /// Slot per key.
    pub slots: Vec<u32>,
}

impl Client {
    /// Attaches to the agent at `path` as `name`, and maps its pool (read-only) and staging
    /// area.
    ///
    /// # Errors
    /// When the socket cannot be reached, the agent refuses, or no pool comes with the reply.
    pub fn connect(path: &Path, name: &str) -> Result<Self, ClientError> {
        let mut stream = UnixStream::connect(path)?;
        match hello(&mut stream, name)? {
            (Response::Hello { pool_bytes, slot_bytes, slots, pool_id, staging_slots }, fds) => {
                let mut fds = fds.into_iter();
                let (Some(pool_fd), Some(staging_fd)) = (fds.next(), fds.next()) else {
                    return Err(
                        std::io::Error::other("the agent sent no pool and staging area").into()
                    );
                };
                let pool = MappedPool::map(pool_fd, pool_bytes, slot_bytes)?;
                let staging_bytes = u64::from(staging_slots) * u64::from(slot_bytes);
                let staging = MappedStaging::map(staging_fd, staging_bytes, slot_bytes)?;
                Ok(Self {
                    stream,
                    next_id: 1,
                    pool,
                    staging,
                    slots,
                    staging_slots,
                    slot_bytes,
                    pool_id,
                    checksums: true,
                })
            }
            (Response::Error { code, message }, _) => Err(ClientError::Refused { code, message }),
            (other, _) => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Whether commits carry checksums (on by default). Off, stores skip the hash pass and
    /// the agent checksums a chunk only when it writes it to NVMe.
    pub fn set_checksums(&mut self, on: bool) {
        self.checksums = on;
    }

    /// Slots in the pool.
    #[must_use]
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Bytes per slot.
    #[must_use]
    pub fn slot_bytes(&self) -> u32 {
        self.slot_bytes
    }

    /// The pool's identity (a restarted agent's pool has another).
    #[must_use]
    pub fn pool_id(&self) -> u64 {
        self.pool_id
    }

    /// Slots in the staging area.
    #[must_use]
    pub fn staging_slots(&self) -> u32 {
        self.staging_slots
    }

    /// The mapped pool (read-only: committed chunks, at the slots lookups name).
    #[must_use]
    pub fn pool(&self) -> &MappedPool {
        &self.pool
    }

    /// The mapped staging area (write only into the slots [`Client::reserve`] returned).
    pub fn staging_mut(&mut self) -> &mut MappedStaging {
        &mut self.staging
    }

    /// Sends `req` and reads its reply.
    ///
    /// # Errors
    /// Socket or protocol trouble, or the agent's refusal.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.stream.write_all(&req.encode(id))?;
        let mut header = [0u8; HEADER];
        self.stream.read_exact(&mut header)?;
        let h = decode_header(&header)?;
        let mut body = vec![0u8; h.body_len as usize];
        self.stream.read_exact(&mut body)?;
        match Response::decode(h.op, &body)? {
            Response::Error { code, message } => Err(ClientError::Refused { code, message }),
            r => Ok(r),
        }
    }

    /// Where each key is. A list longer than a frame may carry ([`MAX_KEYS`]: a long prompt
    /// of a model whose chunks span many slots on many ranks) goes in several frames, and the
    /// answers are joined as one.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn lookup(&mut self, keys: &[ChunkKey]) -> Result<Lookup, ClientError> {
        let mut out =
            Lookup { prefix: 0, tiers: Vec::with_capacity(keys.len()), slots: Vec::new() };
        out.slots.reserve(keys.len());
        let mut leading = true;
        // (An empty list is still asked, as one empty frame.)
        for part in keys.chunks(MAX_KEYS).chain(keys.is_empty().then_some(&[][..])) {
            match self.call(&Request::Lookup { keys: part.to_vec() })? {
                Response::Lookup { prefix, tiers, slots } => {
                    if leading {
                        out.prefix += prefix;
                        leading = prefix as usize == part.len();
                    }
                    out.tiers.extend(tiers);
                    out.slots.extend(slots);
                }
                r => return Err(ClientError::Unexpected(Box::new(r))),
            }
        }
        Ok(out)
    }

    /// Up to `n` staging slots to write.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn reserve(&mut self, n: u32) -> Result<Vec<u32>, ClientError> {
        match self.call(&Request::Reserve { n })? {
            Response::Reserve { slots } => Ok(slots),
            r => Err(ClientError::Unexpected(Box::new(r))),
        }
    }

    /// Copies `data` into reserved staging `slot` and commits it under `key` (no conversation);
    /// true when accepted.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn put(&mut self, key: ChunkKey, slot: u32, data: &[u8]) -> Result<bool, ClientError> {
        Ok(self.put_many(ConversationKey(0), &[(key, slot, data)])? == 1)
    }

    /// Copies each chunk of `conversation` into its reserved staging slot and commits them in
    /// one frame; returns how many were accepted.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn put_many(
        &mut self,
        conversation: ConversationKey,
        chunks: &[(ChunkKey, u32, &[u8])],
    ) -> Result<u32, ClientError> {
        let mut commits = Vec::with_capacity(chunks.len());
        for (key, slot, data) in chunks {
            let dst = &mut self.staging.slot_mut(*slot)[..data.len()];
            let sum = if self.checksums {
                copy_and_checksum(dst, data)
            } else {
                dst.copy_from_slice(data);
                kvtier_api::agent::NO_CHECKSUM
            };
            commits.push(Commit {
                key: *key,
                slot: *slot,
                len: data.len() as u32,
                checksum: sum,
                conversation,
            });
        }
        self.ack(&Request::Commit { chunks: commits })
    }

    /// Sends a request answered by an acknowledgement; returns how many items it applied to.
    /// A pin, unpin, hold or prefetch of more keys than a frame may carry ([`MAX_KEYS`]) goes
    /// in several frames, in order.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn ack(&mut self, req: &Request) -> Result<u32, ClientError> {
        let keys = match req {
            Request::Pin { keys, .. }
            | Request::Unpin { keys }
            | Request::Prefetch { keys }
            | Request::Hold { keys, .. } => keys,
            _ => return self.ack_one(req),
        };
        if keys.len() <= MAX_KEYS {
            return self.ack_one(req);
        }
        let mut applied = 0u32;
        for part in keys.chunks(MAX_KEYS) {
            let keys = part.to_vec();
            let one = match req {
                Request::Pin { lease_ms, .. } => Request::Pin { keys, lease_ms: *lease_ms },
                Request::Unpin { .. } => Request::Unpin { keys },
                Request::Prefetch { .. } => Request::Prefetch { keys },
                Request::Hold { ttl_ms, .. } => Request::Hold { keys, ttl_ms: *ttl_ms },
                _ => unreachable!("matched above"),
            };
            applied = applied.saturating_add(self.ack_one(&one)?);
        }
        Ok(applied)
    }

    fn ack_one(&mut self, req: &Request) -> Result<u32, ClientError> {
        match self.call(req)? {
            Response::Ack { applied } => Ok(applied),
            r => Err(ClientError::Unexpected(Box::new(r))),
        }
    }

    /// Counters.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn stats(&mut self) -> Result<Stats, ClientError> {
        match self.call(&Request::Stats)? {
            Response::Stats(s) => Ok(s),
            r => Err(ClientError::Unexpected(Box::new(r))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_copy_gives_the_oneshot_checksum() {
        for len in [0, 1, 65_535, 65_536, 65_537, 3 * 65_536 + 17, 2 << 20] {
            let src: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
            let mut dst = vec![0u8; len];
            assert_eq!(copy_and_checksum(&mut dst, &src), crate::pool::checksum(&src), "len {len}");
            assert_eq!(dst, src);
        }
    }
}
