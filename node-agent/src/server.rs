//! The agent's Unix socket: one task per attached client, frames in, frames out.
//!
//! The first frame must be `Hello`; its reply carries the pool's memfd (SCM_RIGHTS). A frame
//! that does not parse gets a `Malformed` error and closes that connection only; other
//! clients never notice. When a client goes away, its reservations and pins go with it.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvtier_api::agent::{self, decode_header, ErrorCode, ProtocolError, Request, Response, HEADER};
use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use crate::index::{ClientId, Index, Millis};
use crate::pool::{checksum, DramPool};

/// What every connection shares.
#[derive(Debug)]
pub struct Agent {
    pool: DramPool,
    index: Mutex<Index>,
    epoch: Instant,
    next_client: AtomicU64,
    verify_commits: bool,
}

impl Agent {
    /// An agent over `pool`, evicting in `index`'s order.
    #[must_use]
    pub fn new(pool: DramPool, index: Index) -> Self {
        Self {
            pool,
            index: Mutex::new(index),
            epoch: Instant::now(),
            next_client: AtomicU64::new(1),
            verify_commits: true,
        }
    }

    /// Whether a commit is checked against the slot's bytes before the chunk becomes
    /// readable (on by default). Off, the client's checksum is recorded as given: a pass
    /// over every stored byte is saved, and a client that writes the wrong bytes is no longer
    /// caught at commit.
    #[must_use]
    pub fn verify_commits(mut self, on: bool) -> Self {
        self.verify_commits = on;
        self
    }

    fn now(&self) -> Millis {
        self.epoch.elapsed().as_millis() as Millis
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counters (for metrics and tests).
    #[must_use]
    pub fn stats(&self) -> agent::Stats {
        self.index().stats()
    }

    /// The pool.
    #[must_use]
    pub fn pool(&self) -> &DramPool {
        &self.pool
    }

    /// Answers one request of `client`.
    pub fn handle(&self, client: ClientId, req: Request) -> Response {
        let now = self.now();
        match req {
            Request::Hello { .. } => Response::Error {
                code: ErrorCode::State,
                message: "hello was already received".into(),
            },
            Request::Lookup { keys } => {
                let (prefix, tiers, slots) = self.index().lookup(&keys);
                Response::Lookup { prefix, tiers, slots }
            }
            Request::Reserve { n } => {
                Response::Reserve { slots: self.index().reserve(client, n, now) }
            }
            Request::Commit { chunks } => {
                // Checksums are computed outside the lock: a slot is only ever written by
                // the client that reserved it, and a wrong slot fails the commit anyway.
                let slots = self.pool.slots();
                let slot_bytes = self.pool.slot_bytes();
                let verified: Vec<bool> = chunks
                    .iter()
                    .map(|c| {
                        c.slot < slots
                            && c.len <= slot_bytes
                            && (!self.verify_commits
                                || checksum(self.pool.bytes_of(c.slot, c.len)) == c.checksum)
                    })
                    .collect();
                let mut ix = self.index();
                let mut applied = 0;
                for (c, ok) in chunks.iter().zip(verified) {
                    match ix.commit(client, c.key, c.slot, c.len, c.checksum, |_, _, _| ok) {
                        Ok(()) => applied += 1,
                        Err(e) => debug!(client, "commit refused: {e}"),
                    }
                }
                Response::Ack { applied }
            }
            Request::Release { slots } => {
                Response::Ack { applied: self.index().release(client, &slots) }
            }
            Request::Pin { keys, lease_ms } => {
                Response::Ack { applied: self.index().pin(client, &keys, now, lease_ms) }
            }
            Request::Unpin { keys } => Response::Ack { applied: self.index().unpin(client, &keys) },
            Request::Prefetch { keys } => {
                // No NVMe tier yet: what is in DRAM is already "prefetched".
                let (_, tiers, _) = self.index().lookup(&keys);
                let applied = tiers.iter().filter(|t| **t == agent::Tier::Dram).count() as u32;
                Response::Ack { applied }
            }
            Request::Stats => Response::Stats(self.stats()),
        }
    }
}

/// Binds the agent's socket at `path`, replacing a stale one.
///
/// # Errors
/// When the path cannot be bound.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

/// Serves clients until the task is dropped.
pub async fn serve(listener: UnixListener, agent: Arc<Agent>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("accept: {e}");
                continue;
            }
        };
        let agent = agent.clone();
        conns.spawn(async move {
            let client = agent.next_client.fetch_add(1, Ordering::Relaxed);
            match connection(&agent, client, stream).await {
                Ok(()) => debug!(client, "client left"),
                Err(reason) => warn!(client, "closing connection: {reason}"),
            }
            agent.index().client_gone(client);
        });
        while conns.try_join_next().is_some() {}
    }
}

async fn connection(agent: &Agent, client: ClientId, mut s: UnixStream) -> Result<(), String> {
    let mut hello = false;
    let mut header = [0u8; HEADER];
    loop {
        match s.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(format!("read: {e}")),
        }
        let h = match decode_header(&header) {
            Ok(h) => h,
            Err(e) => return refuse(&mut s, 0, &e).await,
        };
        let mut body = vec![0u8; h.body_len as usize];
        s.read_exact(&mut body).await.map_err(|e| format!("read: {e}"))?;
        let req = match Request::decode(h.op, &body) {
            Ok(r) => r,
            Err(e) => return refuse(&mut s, h.request_id, &e).await,
        };
        if !hello {
            let Request::Hello { client: name, pid } = req else {
                let reply = Response::Error {
                    code: ErrorCode::State,
                    message: "the first frame must be hello".into(),
                };
                let _ = s.write_all(&reply.encode(h.request_id)).await;
                let _ = s.shutdown().await;
                return Err("first frame was not hello".into());
            };
            info!(client, name = %name, pid, "client attached");
            let reply = Response::Hello {
                pool_bytes: agent.pool.bytes(),
                slot_bytes: agent.pool.slot_bytes(),
                slots: agent.pool.slots(),
            };
            send_with_fd(&s, &reply.encode(h.request_id), agent)
                .await
                .map_err(|e| format!("hello: {e}"))?;
            hello = true;
            continue;
        }
        let reply = agent.handle(client, req);
        s.write_all(&reply.encode(h.request_id)).await.map_err(|e| format!("write: {e}"))?;
    }
}

async fn refuse(s: &mut UnixStream, request_id: u32, e: &ProtocolError) -> Result<(), String> {
    let reply = Response::Error { code: ErrorCode::Malformed, message: e.to_string() };
    let _ = s.write_all(&reply.encode(request_id)).await;
    // Closing with unread input would reset the connection and lose the reply: stop
    // writing, then discard a bounded amount of what the client still sends.
    let _ = s.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut left = 64 * 1024;
        while left > 0 {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n.min(left),
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_millis(200), drain).await;
    Err(format!("malformed frame: {e}"))
}

/// Writes `frame` with the pool's memfd attached to its first byte.
async fn send_with_fd(s: &UnixStream, frame: &[u8], agent: &Agent) -> std::io::Result<()> {
    let mut sent = 0;
    while sent == 0 {
        s.writable().await?;
        let r = s.try_io(Interest::WRITABLE, || {
            let fds = [agent.pool.fd()];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut anc = SendAncillaryBuffer::new(&mut space);
            anc.push(SendAncillaryMessage::ScmRights(&fds));
            sendmsg(s, &[IoSlice::new(frame)], &mut anc, SendFlags::NOSIGNAL)
                .map_err(std::io::Error::from)
        });
        match r {
            Ok(n) => sent = n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    let mut rest = &frame[sent..];
    while !rest.is_empty() {
        s.writable().await?;
        match s.try_write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
