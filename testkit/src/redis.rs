//! Real `redis-server` processes on loopback (Debian's `redis-server` package; `.ci/run`
//! installs it): one server, or a Redis Cluster of shards, for the remote tier's tests and
//! benchmark.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One `redis-server` on a free loopback port, in a directory of its own; killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl RedisServer {
    /// Starts a server with persistence off and `extra` arguments, and waits until it answers.
    ///
    /// # Panics
    /// When `redis-server` is not installed (`apt-get install redis-server`) or does not start.
    pub fn start(extra: &[&str]) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("kvtier-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir.to_string_lossy(),
            "--protected-mode",
            "no",
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        args.extend(extra.iter().map(ToString::to_string));
        let mut s = Self { child: None, port, dir, args };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server ({e}): the remote tier's tests need a real Redis \
                     (Debian: apt-get install redis-server redis-tools; .ci/run installs it)"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cmd::<String>(&["PING"]).is_err() {
            assert!(Instant::now() < deadline, "redis-server on {} did not answer", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:<port>`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs one command against this server (a plain client, for checks and for damage).
    ///
    /// # Errors
    /// The server's or the connection's.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let client = redis::Client::open(self.url())?;
        let mut c = client.get_connection_with_timeout(Duration::from_secs(1))?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut c)
    }

    /// Kills the server (SIGKILL: as a crash or a lost node).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections are accepted by the kernel and never
    /// answered, as with a store stalled by a long command or a swap storm.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill")
                .args([format!("-{sig}"), c.id().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill -{sig} redis-server");
        }
    }

    /// Starts it again on the same port, empty (no persistence).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of `n` shards (no replicas) on loopback, made with `redis-cli --cluster
/// create`; a shard's loss leaves the others serving their slots.
#[derive(Debug)]
pub struct RedisCluster {
    /// The shards.
    pub shards: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts the shards, joins them and waits until the cluster is ok.
    ///
    /// # Panics
    /// When the tools are missing or the cluster does not form.
    pub fn start(n: usize) -> Self {
        let shards: Vec<RedisServer> = (0..n)
            .map(|_| {
                RedisServer::start(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-require-full-coverage",
                    "no",
                ])
            })
            .collect();
        let addrs: Vec<String> = shards.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli (Debian: apt-get install redis-tools)");
        assert!(out.status.success(), "cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = shards.iter().all(|s| {
                s.cmd::<String>(&["CLUSTER", "INFO"]).is_ok_and(|i| i.contains("cluster_state:ok"))
            });
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "the cluster did not become ok");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { shards }
    }

    /// The shards' URLs (seed nodes).
    #[must_use]
    pub fn urls(&self) -> Vec<String> {
        self.shards.iter().map(RedisServer::url).collect()
    }

    /// The shard that owns `key`'s slot.
    ///
    /// # Panics
    /// When the cluster does not say.
    #[must_use]
    pub fn shard_of(&self, key: &str) -> usize {
        let slot: i64 = self.shards[0].cmd(&["CLUSTER", "KEYSLOT", key]).expect("keyslot");
        // CLUSTER SHARDS would do from 7.0; CLUSTER SLOTS is older and plain.
        let slots: redis::Value = self.shards[0].cmd(&["CLUSTER", "SLOTS"]).expect("slots");
        let redis::Value::Array(ranges) = slots else { panic!("CLUSTER SLOTS: {slots:?}") };
        for r in ranges {
            let redis::Value::Array(r) = r else { continue };
            let (redis::Value::Int(lo), redis::Value::Int(hi)) = (&r[0], &r[1]) else {
                continue;
            };
            if (*lo..=*hi).contains(&slot) {
                let redis::Value::Array(node) = &r[2] else { continue };
                let redis::Value::Int(port) = node[1] else { continue };
                return self.shards.iter().position(|s| i64::from(s.port) == port).expect("shard");
            }
        }
        panic!("no shard owns slot {slot}")
    }
}
