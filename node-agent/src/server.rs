//! The agent's Unix socket: one task per attached client, frames in, frames out.
//!
//! The first frame must be `Hello`; its reply carries the pool's memfd (SCM_RIGHTS). A frame
//! that does not parse gets a `Malformed` error and closes that connection only; other
//! clients never notice. When a client goes away, its reservations and pins go with it.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use kvtier_api::agent::{decode_header, ErrorCode, ProtocolError, Request, Response, HEADER};
use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use crate::agent::Agent;
use crate::index::ClientId;

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
            let client = agent.attach();
            let malformed = match connection(&agent, client, stream).await {
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

async fn connection(agent: &Arc<Agent>, client: ClientId, mut s: UnixStream) -> Result<(), String> {
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
                pool_bytes: agent.pool().bytes(),
                slot_bytes: agent.pool().slot_bytes(),
                slots: agent.pool().slots(),
                pool_id: agent.pool_id(),
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
        let reply = if agent.may_do_io(&req) {
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

/// Writes `frame` with the pool's memfd attached to its first byte.
async fn send_with_fd(s: &UnixStream, frame: &[u8], agent: &Agent) -> std::io::Result<()> {
    let mut sent = 0;
    while sent == 0 {
        s.writable().await?;
        let r = s.try_io(Interest::WRITABLE, || {
            let fds = [agent.pool().fd()];
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
