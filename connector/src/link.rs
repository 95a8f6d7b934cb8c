//! A connection to the node-agent that comes back when the agent does. The agent's pod can
//! restart (an upgrade, an OOM kill) while the engines on its node keep running: a connection
//! whose socket fails is marked down, and a new one is made to the new agent, whose pool has
//! another id, so the slots and pins learnt from one pool are never used on another.
//!
//! A down connection keeps its client, and so its mapping of the old pool: copies in flight
//! may still be reading or writing it. The scheduler side, which never touches pool memory,
//! reconnects on its own at the next call ([`Link::auto`]); the worker side reconnects only
//! once its copies on the old pool are done, and swaps the mapping itself
//! ([`Link::reconnect`], [`Link::replace`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kvtier_agent_client::client::{Client, ClientError};

/// How often a lost agent is tried again.
pub const RETRY: Duration = Duration::from_secs(1);

/// A connection to the node-agent.
#[derive(Debug)]
pub struct Link {
    socket: PathBuf,
    name: String,
    client: Client,
    up: bool,
    auto: bool,
    retry_at: Instant,
    slot_bytes: u32,
    checksums: bool,
}

impl Link {
    /// Connects to the agent at `socket` as `name`; the first connection must succeed (a
    /// connector that starts with no agent is misconfigured and says so).
    ///
    /// # Errors
    /// When the agent cannot be reached or refuses.
    pub fn connect(socket: &Path, name: &str) -> Result<Self, ClientError> {
        let client = Client::connect(socket, name)?;
        Ok(Self {
            socket: socket.to_owned(),
            name: name.to_owned(),
            slot_bytes: client.slot_bytes(),
            client,
            up: true,
            auto: false,
            retry_at: Instant::now(),
            checksums: true,
        })
    }

    /// Reconnects on its own at the next call after the connection went down (for users that
    /// never touch pool memory).
    #[must_use]
    pub fn auto(mut self) -> Self {
        self.auto = true;
        self
    }

    /// Whether commits carry checksums, on this connection and the ones after it.
    pub fn set_checksums(&mut self, on: bool) {
        self.checksums = on;
        self.client.set_checksums(on);
    }

    /// The pool the connection is (or was) attached to.
    #[must_use]
    pub fn pool_id(&self) -> u64 {
        self.client.pool_id()
    }

    /// Bytes per pool slot (fixed for the link's life: chunk parts are cut to it).
    #[must_use]
    pub fn slot_bytes(&self) -> u32 {
        self.slot_bytes
    }

    /// Whether the connection is up, as far as its last call knows.
    #[must_use]
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// The current client, whatever its state (its pool mapping stays valid while it is the
    /// current one).
    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    /// Runs `f` on the client. A socket or protocol failure marks the connection down; a
    /// refusal keeps it. When down, an [`Link::auto`] link first connects again (at most once
    /// per [`RETRY`]); any other fails at once.
    ///
    /// # Errors
    /// As `f`, or when the agent is away.
    pub fn call<T>(
        &mut self,
        f: impl FnOnce(&mut Client) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        if !self.up {
            if !self.auto || !self.retry_due() {
                return Err(away());
            }
            let c = self.reconnect()?;
            self.replace(c);
        }
        let r = f(&mut self.client);
        if let Err(ClientError::Io(_) | ClientError::Protocol(_)) = &r {
            if self.up {
                tracing::warn!(socket = %self.socket.display(), "node-agent connection lost");
            }
            self.up = false;
        }
        r
    }

    /// Whether a lost connection may be tried again now; counts as a try.
    pub fn retry_due(&mut self) -> bool {
        if Instant::now() < self.retry_at {
            return false;
        }
        self.retry_at = Instant::now() + RETRY;
        true
    }

    /// A new connection to the agent, not yet in use. An agent that came back with another
    /// slot size is refused: every chunk's parts would be cut differently.
    ///
    /// # Errors
    /// When the agent is away, refuses, or changed its slot size.
    pub fn reconnect(&self) -> Result<Client, ClientError> {
        let mut c = Client::connect(&self.socket, &self.name)?;
        c.set_checksums(self.checksums);
        if c.slot_bytes() != self.slot_bytes {
            return Err(ClientError::Io(std::io::Error::other(format!(
                "the node-agent came back with {} byte slots instead of {}; restart the engine \
                 to use it",
                c.slot_bytes(),
                self.slot_bytes
            ))));
        }
        tracing::info!(socket = %self.socket.display(), pool = c.pool_id(), "node-agent attached");
        Ok(c)
    }

    /// Makes `client` the connection, and returns the old one (whose pool mapping the caller
    /// may need until its copies are done).
    pub fn replace(&mut self, client: Client) -> Client {
        self.up = true;
        std::mem::replace(&mut self.client, client)
    }
}

fn away() -> ClientError {
    ClientError::Io(std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "the node-agent is away; trying again",
    ))
}
