//! How the remote tier talks to Redis or Valkey: one server or a cluster behind one
//! connection type, pooled idle connections with timeouts, pipelines that fall back to one
//! command at a time on a cluster missing a shard, and the tier marked down for
//! [`RETRY_AFTER`] after a failure.

use std::sync::atomic::Ordering;
use std::time::Instant;

use redis::{ConnectionLike, RedisResult};
use tracing::{info, warn};

use super::{lock, Inner, RETRY_AFTER};

/// `words key args…` as one command, each argument copied once.
pub(super) fn command(words: &[&str], key: &str, args: &[&[u8]]) -> redis::Cmd {
    let mut c = redis::cmd(words[0]);
    for w in &words[1..] {
        c.arg(*w);
    }
    c.arg(key);
    for a in args {
        c.arg(*a);
    }
    c
}

/// Where the store is: one server, or a cluster's seed nodes.
pub(super) enum Target {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

/// A connection to it, of the same kind.
pub(super) enum Conn {
    Single(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl Conn {
    pub(super) fn query<T: redis::FromRedisValue>(&mut self, p: &Pipe) -> RedisResult<T> {
        match (self, p) {
            (Conn::Single(c), Pipe::Single(p)) => p.query(c),
            (Conn::Cluster(c), Pipe::Cluster(p)) => p.query(c.as_mut()),
            _ => unreachable!("a pipeline is made for its connection's kind"),
        }
    }

    pub(super) fn like(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Conn::Single(c) => c,
            Conn::Cluster(c) => c.as_mut(),
        }
    }
}

/// A pipeline for that kind of connection.
pub(super) enum Pipe {
    Single(redis::Pipeline),
    Cluster(redis::cluster::ClusterPipeline),
}

impl Pipe {
    pub(super) fn add(&mut self, cmd: redis::Cmd) {
        match self {
            Pipe::Single(p) => {
                p.add_command(cmd);
            }
            Pipe::Cluster(p) => {
                p.add_command(cmd);
            }
        }
    }
}

impl Inner {
    pub(super) fn up(&self) -> bool {
        lock(&self.down_until).is_none_or(|t| Instant::now() >= t)
    }

    pub(super) fn pipe(&self) -> Pipe {
        match self.target {
            Target::Single(_) => Pipe::Single(redis::pipe()),
            Target::Cluster(_) => Pipe::Cluster(redis::cluster::cluster_pipe()),
        }
    }

    pub(super) fn connect(&self) -> RedisResult<Conn> {
        match &self.target {
            Target::Single(c) => {
                let conn = c.get_connection_with_timeout(self.cfg.timeout)?;
                conn.set_read_timeout(Some(self.cfg.timeout))?;
                conn.set_write_timeout(Some(self.cfg.timeout))?;
                Ok(Conn::Single(conn))
            }
            Target::Cluster(c) => Ok(Conn::Cluster(Box::new(c.get_connection()?))),
        }
    }

    /// Runs `f` on an idle connection (or a new one); on failure the connection is dropped
    /// and the failure counted.
    pub(super) fn try_call<T>(
        &self,
        f: impl FnOnce(&mut Conn) -> RedisResult<T>,
    ) -> RedisResult<T> {
        let conn = lock(&self.idle).pop();
        let result = conn.map_or_else(|| self.connect(), Ok).and_then(|mut c| {
            let r = f(&mut c);
            if r.is_ok() && c.like().is_open() {
                lock(&self.idle).push(c);
            }
            r
        });
        match &result {
            Ok(_) => {
                if self.logged_down.swap(false, Ordering::Relaxed) {
                    info!("remote tier reachable again");
                }
            }
            Err(_) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    /// Marks the tier down for [`RETRY_AFTER`].
    pub(super) fn down(&self, e: &redis::RedisError) {
        *lock(&self.down_until) = Some(Instant::now() + RETRY_AFTER);
        if !self.logged_down.swap(true, Ordering::Relaxed) {
            warn!("remote tier unreachable (misses until it answers): {e}");
        }
    }

    /// As [`Inner::try_call`]; a failure marks the tier down.
    pub(super) fn call<T>(&self, f: impl FnOnce(&mut Conn) -> RedisResult<T>) -> Option<T> {
        self.try_call(f).map_err(|e| self.down(&e)).ok()
    }

    /// Sends the `n` commands `make` makes as one pipeline; each answer, `None` where it
    /// failed. On a cluster, a
    /// pipeline fails whole when one shard does not answer: the commands are then sent one
    /// by one, within one timeout in all, so a lost shard costs only the keys it held. The
    /// tier is marked down when nothing answered.
    pub(super) fn run<T: redis::FromRedisValue>(
        &self,
        n: usize,
        make: impl Fn(usize) -> redis::Cmd,
    ) -> Vec<Option<T>> {
        if n == 0 {
            return Vec::new();
        }
        let mut p = self.pipe();
        for i in 0..n {
            p.add(make(i));
        }
        let err = match self.try_call(|c| c.query::<Vec<T>>(&p)) {
            Ok(v) if v.len() == n => return v.into_iter().map(Some).collect(),
            Ok(v) => redis::RedisError::from(std::io::Error::other(format!(
                "{} answers to {n} commands",
                v.len()
            ))),
            Err(e) => e,
        };
        drop(p);
        if !matches!(self.target, Target::Cluster(_)) {
            self.down(&err);
            return (0..n).map(|_| None).collect();
        }
        let deadline = Instant::now() + self.cfg.timeout;
        let out: Vec<Option<T>> = (0..n)
            .map(|i| {
                (Instant::now() < deadline)
                    .then(|| self.try_call(|c| make(i).query::<T>(c.like())).ok())
                    .flatten()
            })
            .collect();
        if out.iter().all(Option::is_none) {
            self.down(&err);
        }
        out
    }
}
