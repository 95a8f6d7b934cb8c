//! The node-agent's wire protocol: versioned, length-prefixed binary frames over a Unix
//! socket (design.md, "Node-agent protocol").
//!
//! Every frame is a 16-byte header — magic `KVTA`, version, operation, request id, body
//! length, all little-endian — and a body of at most [`MAX_BODY`] bytes. Every count in a
//! body is bounded ([`MAX_KEYS`], [`MAX_NAME`]) and checked against the bytes that remain
//! before anything is allocated, so a malformed or hostile frame costs the agent one error
//! and that connection only. A reply carries the request's id and its operation with the
//! high bit set; failures come back as [`Response::Error`].
//!
//! The memory travels once, with the reply to [`Request::Hello`], as `SCM_RIGHTS` ancillary
//! data: two memfds of slots of one size, the **pool** of committed chunks, which the kernel
//! lets clients map read-only, then the **staging area** clients write new chunks into.
//! Everything after names slots by index: [`Response::Lookup`] names pool slots (to load
//! from); [`Response::Reserve`], [`Commit::slot`] and [`Request::Release`] name staging slots
//! (to save into). At commit the agent copies a chunk from its staging slot into the pool.

use crate::chunk::ChunkKey;

mod codec;

pub use codec::{decode_header, split_frame};

/// `KVTA`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"KVTA");
/// Protocol version this build speaks (2: the staging area, and the remote tier in lookups;
/// 3: holds).
pub const VERSION: u16 = 3;
/// Header bytes.
pub const HEADER: usize = 16;

/// A pool slot's size unless the agent is told otherwise (one chunk per DMA).
pub const DEFAULT_SLOT_BYTES: u32 = 2 << 20;

/// The fewest staging slots a default staging area has (a step's saves of a few workers).
pub const MIN_DEFAULT_STAGING_SLOTS: u32 = 32;

/// Staging slots the agent gives a pool of `slots` unless told otherwise: an eighth of it,
/// at least [`MIN_DEFAULT_STAGING_SLOTS`], never more than the pool. Saves that find it full
/// wait for the ones in flight to commit, as they do for a full pool. (The operator sizes the
/// agent's memory with it.)
#[must_use]
pub fn default_staging_slots(slots: u32) -> u32 {
    (slots / 8).max(MIN_DEFAULT_STAGING_SLOTS).min(slots)
}
/// Largest body.
pub const MAX_BODY: usize = 4 << 20;
/// Most keys (or slots) in one frame: a scheduler step's worth of long contexts.
pub const MAX_KEYS: usize = 65_536;
/// Longest name.
pub const MAX_NAME: usize = 256;
/// A commit's checksum when the client computed none.
pub const NO_CHECKSUM: u64 = 0;
/// Longest lease.
pub const MAX_LEASE_MS: u32 = 10 * 60 * 1000;
/// Longest hold: Anthropic's longest `cache_control` TTL, an hour.
pub const MAX_HOLD_MS: u32 = 60 * 60 * 1000;

/// A frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Operation code.
    pub op: u16,
    /// Chosen by the client, echoed in the reply.
    pub request_id: u32,
    /// Body bytes that follow.
    pub body_len: u32,
}

/// Where a chunk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Tier {
    /// Not held.
    Absent = 0,
    /// In a DRAM pool slot.
    Dram = 1,
    /// On NVMe only (a prefetch brings it to DRAM).
    Nvme = 2,
    /// Being written or loaded; not yet readable.
    Busy = 3,
    /// In the cluster-wide remote tier only (a prefetch brings it to DRAM).
    Remote = 4,
}

impl Tier {
    fn from_u8(v: u8) -> Result<Self, ProtocolError> {
        Ok(match v {
            0 => Tier::Absent,
            1 => Tier::Dram,
            2 => Tier::Nvme,
            3 => Tier::Busy,
            4 => Tier::Remote,
            _ => return Err(ProtocolError::Invalid(format!("tier {v}"))),
        })
    }
}

/// One chunk to commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Commit {
    /// Its key.
    pub key: ChunkKey,
    /// The reserved staging slot it was written to.
    pub slot: u32,
    /// Bytes written.
    pub len: u32,
    /// xxh3-64 of those bytes, or [`NO_CHECKSUM`]: then the agent does not check the bytes
    /// at commit and computes the checksum itself before the chunk goes to NVMe (a connector
    /// whose bytes arrive by DMA saves the CPU a pass over every chunk).
    pub checksum: u64,
    /// The conversation the chunk belongs to (0: unknown), for residency events.
    pub conversation: crate::residency::ConversationKey,
}

/// Client to agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// First frame: who is attaching. The reply brings the pool.
    Hello {
        /// Client name, for logs.
        client: String,
        /// Client process id, for logs.
        pid: u32,
    },
    /// Where each key is, and how many lead the list in DRAM.
    Lookup {
        /// Keys, in prefix order.
        keys: Vec<ChunkKey>,
    },
    /// Staging slots to write new chunks into.
    Reserve {
        /// How many.
        n: u32,
    },
    /// Chunks written into reserved slots.
    Commit {
        /// The chunks.
        chunks: Vec<Commit>,
    },
    /// Reserved staging slots not used.
    Release {
        /// The slots.
        slots: Vec<u32>,
    },
    /// Keep these chunks in DRAM until unpinned or the lease runs out.
    Pin {
        /// Keys.
        keys: Vec<ChunkKey>,
        /// Lease in milliseconds.
        lease_ms: u32,
    },
    /// Drop pins.
    Unpin {
        /// Keys.
        keys: Vec<ChunkKey>,
    },
    /// Keep these chunks in DRAM for `ttl_ms` on the client's behalf, past its connection:
    /// what a client said it will resend (an Anthropic `cache_control` breakpoint, ADR 0013).
    /// The agent owns the hold, within its own share of the pool (not the client's pin
    /// quota); it holds the chunks DRAM has, in order, while the share has room, and a hold
    /// on a chunk already held keeps the later deadline. The reply's `applied` counts the
    /// chunks held.
    Hold {
        /// Keys, in prefix order (the front is worth most).
        keys: Vec<ChunkKey>,
        /// How long, in milliseconds (at most [`MAX_HOLD_MS`]).
        ttl_ms: u32,
    },
    /// Bring these from NVMe to DRAM ahead of the next turn.
    Prefetch {
        /// Keys.
        keys: Vec<ChunkKey>,
    },
    /// Counters.
    Stats,
}

/// Agent counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Pool slots.
    pub slots: u32,
    /// Slots holding committed chunks.
    pub used: u32,
    /// Slots reserved and not yet committed.
    pub reserved: u32,
    /// Chunks pinned (by clients or holds).
    pub pinned: u32,
    /// Chunks held ([`Request::Hold`]).
    pub held: u32,
    /// Lookups of keys found in DRAM.
    pub hits: u64,
    /// Lookups of keys not found.
    pub misses: u64,
    /// Chunks evicted from DRAM.
    pub evictions: u64,
}

/// Agent to client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// The pool and the staging area: their sizes (the two memfds come as ancillary data).
    Hello {
        /// Pool bytes.
        pool_bytes: u64,
        /// Bytes per slot.
        slot_bytes: u32,
        /// Slots.
        slots: u32,
        /// This pool's identity, for the agent's life: a restarted agent has another, so slot
        /// numbers learnt from one pool are never applied to another.
        pool_id: u64,
        /// Slots of the staging area (of `slot_bytes` each).
        staging_slots: u32,
    },
    /// Per key: tier and, in DRAM, its slot; and the length of the leading run in DRAM.
    Lookup {
        /// Keys from the start that are in DRAM.
        prefix: u32,
        /// Tier per key.
        tiers: Vec<Tier>,
        /// Slot per key (`u32::MAX` when not in DRAM).
        slots: Vec<u32>,
    },
    /// Staging slots granted, each with a pool slot set aside for its commit (fewer than
    /// asked when the pool is full of pinned chunks or the staging area is busy).
    Reserve {
        /// The slots.
        slots: Vec<u32>,
    },
    /// Done; how many items it applied to.
    Ack {
        /// Items applied.
        applied: u32,
    },
    /// Counters.
    Stats(Stats),
    /// The request failed.
    Error {
        /// Error class.
        code: ErrorCode,
        /// For humans.
        message: String,
    },
}

/// Error classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame was malformed; the agent closes the connection after this reply.
    Malformed = 1,
    /// The request names slots or keys it may not use.
    Invalid = 2,
    /// No room.
    Full = 3,
    /// Hello was not the first frame, or came twice.
    State = 4,
}

/// Why a frame cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Not a kvtier frame.
    #[error("bad magic {0:#010x}")]
    Magic(u32),
    /// Another version.
    #[error("protocol version {0}, this agent speaks {VERSION}")]
    Version(u16),
    /// Body over [`MAX_BODY`].
    #[error("body of {0} bytes exceeds {MAX_BODY}")]
    TooLarge(u32),
    /// Unknown operation.
    #[error("unknown operation {0:#06x}")]
    Op(u16),
    /// The body ended early or has bytes left over.
    #[error("body length: {0}")]
    Length(String),
    /// A count or value out of range.
    #[error("invalid field: {0}")]
    Invalid(String),
}

mod op {
    pub const HELLO: u16 = 1;
    pub const LOOKUP: u16 = 2;
    pub const RESERVE: u16 = 3;
    pub const COMMIT: u16 = 4;
    pub const RELEASE: u16 = 5;
    pub const PIN: u16 = 6;
    pub const UNPIN: u16 = 7;
    pub const PREFETCH: u16 = 8;
    pub const STATS: u16 = 9;
    pub const HOLD: u16 = 10;
    pub const REPLY: u16 = 0x8000;
    pub const ACK: u16 = 0x7ff0;
    pub const ERROR: u16 = 0x7fff;
}
