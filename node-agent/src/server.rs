//! The agent's Unix socket: one task per attached client, frames in, frames out.
//!
//! The first frame must be `Hello`; its reply carries the pool's memfd, which the kernel lets
//! clients map read-only, and the staging area's, which they write (SCM_RIGHTS). A frame
//! that does not parse gets a `Malformed` error and closes that connection only; other
//! clients never notice. When a client goes away, its reservations and pins go with it.
//!
//! What a client can make the agent hold is bounded before it proves anything: the first
//! frame must be a small `Hello` and arrive within [`Limits::hello_timeout`], a frame's body
//! is read as its bytes arrive (never allocated from the header's word alone) and within
//! [`Limits::frame_timeout`], and at most [`Limits::max_clients`] connections are served.
//!
//! The socket is created `0660` (its group chosen by the operator, see [`SocketOptions`]),
//! and a lock file beside it says a live agent serves it: a second agent refuses to start
//! instead of unlinking the first one's socket.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier_api::agent::{decode_header, ErrorCode, ProtocolError, Request, Response, HEADER};
use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use crate::agent::Agent;
use crate::index::ClientId;

/// The largest `Hello` body (a client name and a pid).
const HELLO_MAX_BODY: u32 = 1024;

/// Bounds on what clients can make the agent hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; more are closed at accept.
    pub max_clients: usize,
    /// Time from connecting to a complete `Hello`.
    pub hello_timeout: Duration,
    /// Time from a frame's header to the end of its body.
    pub frame_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_clients: 256,
            hello_timeout: Duration::from_secs(5),
            frame_timeout: Duration::from_secs(10),
        }
    }
}

/// Who may connect: the socket's mode and group.
#[derive(Clone, Copy, Debug)]
pub struct SocketOptions {
    /// Permission bits of the socket file.
    pub mode: u32,
    /// Group that owns it (the engines' Pods run with it as a supplementary group); `None`:
    /// the agent's own.
    pub gid: Option<u32>,
}

impl Default for SocketOptions {
    fn default() -> Self {
        Self { mode: 0o660, gid: None }
    }
}

/// The agent's bound socket, with the lock that says it is served.
#[derive(Debug)]
pub struct Listener {
    inner: UnixListener,
    path: PathBuf,
    /// Held (an exclusive `flock`) for as long as the agent runs; the kernel drops it when
    /// the process dies, however it dies.
    _lock: std::fs::File,
    limits: Limits,
    /// When set, only processes running as one of these uids may attach.
    peer_uids: Option<Arc<[u32]>>,
}

impl Listener {
    /// The same listener serving under `limits`.
    #[must_use]
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Only processes running as one of `uids` may attach (checked with the peer's
    /// credentials, which the kernel gives and the client cannot forge): a second line behind
    /// the socket's mode and group, for engines whose uid is known.
    #[must_use]
    pub fn peer_uids(mut self, uids: Vec<u32>) -> Self {
        self.peer_uids = Some(uids.into());
        self
    }

    /// The socket's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Binds the agent's socket at `path` (mode `0660`), replacing a stale one.
///
/// # Errors
/// When another agent serves `path`, or the path cannot be bound.
pub fn bind(path: &Path) -> std::io::Result<Listener> {
    bind_with(path, SocketOptions::default())
}

/// As [`bind`], with the socket's mode and group given.
///
/// # Errors
/// When another agent serves `path`, or the path cannot be bound or given its owner.
pub fn bind_with(path: &Path, options: SocketOptions) -> std::io::Result<Listener> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)?;
    if let Err(e) = rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("another node-agent serves {} (it holds {:?}): {e}", path.display(), lock_path),
        ));
    }
    // Locked: whatever is at the path is a dead agent's socket.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let inner = UnixListener::bind(path)?;
    if let Some(gid) = options.gid {
        rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(options.mode))?;
    Ok(Listener {
        inner,
        path: path.to_owned(),
        _lock: lock,
        limits: Limits::default(),
        peer_uids: None,
    })
}

/// Serves clients until the task is dropped.
pub async fn serve(listener: Listener, agent: Arc<Agent>) {
    let limits = listener.limits;
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let stream = match listener.inner.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("accept: {e}");
                continue;
            }
        };
        while conns.try_join_next().is_some() {}
        if conns.len() >= limits.max_clients {
            warn!(max = limits.max_clients, "connection refused: too many clients");
            drop(stream);
            continue;
        }
        let peer = stream.peer_cred().ok();
        if let Some(allowed) = &listener.peer_uids {
            if !peer.is_some_and(|p| allowed.contains(&p.uid())) {
                warn!(
                    uid = peer.map(|p| p.uid()),
                    pid = peer.and_then(|p| p.pid()),
                    "connection refused: the peer's uid is not allowed"
                );
                drop(stream);
                continue;
            }
        }
        let agent = agent.clone();
        conns.spawn(async move {
            let client = agent.attach();
            debug!(
                client,
                uid = peer.map(|p| p.uid()),
                pid = peer.and_then(|p| p.pid()),
                "client connected"
            );
            let malformed = match connection(&agent, client, stream, limits).await {
                Ok(()) => {
                    debug!(client, "client left");
                    false
                }
                Err(reason) => {
                    warn!(client, "closing connection: {reason}");
                    reason.starts_with("malformed")
                }
            };
            agent.detach(client, malformed);
        });
        while conns.try_join_next().is_some() {}
    }
}

async fn connection(
    agent: &Arc<Agent>,
    client: ClientId,
    mut s: UnixStream,
    limits: Limits,
) -> Result<(), String> {
    let mut hello = false;
    let mut header = [0u8; HEADER];
    let connected = tokio::time::Instant::now();
    loop {
        let read = s.read_exact(&mut header);
        let read = if hello {
            read.await
        } else {
            tokio::time::timeout_at(connected + limits.hello_timeout, read)
                .await
                .map_err(|_| "no hello in time".to_owned())?
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(format!("read: {e}")),
        }
        let h = match decode_header(&header) {
            Ok(h) => h,
            Err(e) => return refuse(&mut s, 0, &e).await,
        };
        if !hello && h.body_len > HELLO_MAX_BODY {
            let e = ProtocolError::Invalid(format!(
                "a first frame of {} bytes; hello is at most {HELLO_MAX_BODY}",
                h.body_len
            ));
            return refuse(&mut s, h.request_id, &e).await;
        }
        // Read as the bytes arrive: a header's word alone allocates nothing.
        let want = u64::from(h.body_len);
        let mut body = Vec::with_capacity((h.body_len as usize).min(64 << 10));
        let deadline = if hello {
            tokio::time::Instant::now() + limits.frame_timeout
        } else {
            connected + limits.hello_timeout
        };
        let got = tokio::time::timeout_at(deadline, (&mut s).take(want).read_to_end(&mut body))
            .await
            .map_err(|_| "a frame's body did not arrive in time".to_owned())?
            .map_err(|e| format!("read: {e}"))?;
        if got as u64 != want {
            return Err("the client closed mid-frame".into());
        }
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
                pool_bytes: agent.pool().bytes(),
                slot_bytes: agent.pool().slot_bytes(),
                slots: agent.pool().slots(),
                pool_id: agent.pool_id(),
                staging_slots: agent.pool().staging_slots(),
            };
            send_with_fd(&s, &reply.encode(h.request_id), agent)
                .await
                .map_err(|e| format!("hello: {e}"))?;
            hello = true;
            continue;
        }
        // Requests that may touch NVMe run on the blocking pool, so one client's disk I/O
        // never stalls the others; the rest are answered in place (microseconds).
        let op = req.op();
        let started = Instant::now();
        let reply = if agent.may_block(&req) {
            let agent = agent.clone();
            tokio::task::spawn_blocking(move || agent.handle(client, req))
                .await
                .map_err(|e| format!("request task: {e}"))?
        } else {
            agent.handle(client, req)
        };
        agent.count_op(op, started.elapsed());
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

/// Writes `frame` with the pool's memfd and the staging area's attached to its first byte.
async fn send_with_fd(s: &UnixStream, frame: &[u8], agent: &Agent) -> std::io::Result<()> {
    let mut sent = 0;
    while sent == 0 {
        s.writable().await?;
        let r = s.try_io(Interest::WRITABLE, || {
            let fds = [agent.pool().fd(), agent.pool().staging_fd()];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
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
