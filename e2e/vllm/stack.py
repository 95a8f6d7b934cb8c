"""A real serving stack on this machine: node-agents, vLLM replicas with the kvtier connector,
and the kvtier router, as processes. Shared by the real-engine test and the benchmark.

Everything is started from paths given by the caller (the kvtier binary, the vLLM venv's
python, the model folder, the connector package folder); nothing is fetched.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, ok, timeout: float, proc: Optional[subprocess.Popen] = None,
               log: Optional[str] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited ({proc.returncode}):\n{tail_of(log)}")
        try:
            if ok():
                return
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s\n{tail_of(log)}")


def tail_of(log: Optional[str]) -> str:
    if not log or not os.path.exists(log):
        return ""
    with open(log) as f:
        return f.read()[-4000:]


def http_json(url: str, body: Optional[dict] = None, headers: Optional[dict] = None,
              timeout: float = 300) -> dict:
    data = None if body is None else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **(headers or {})}
    with urllib.request.urlopen(urllib.request.Request(url, data, h), timeout=timeout) as r:
        return json.load(r)


def get_text(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def prom(text: str) -> dict[str, float]:
    """Prometheus samples by their full name with labels (engine/model labels dropped)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        name = re.sub(r'(engine|model_name)="[^"]*",?', "", name).replace(",}", "}").replace("{}", "")
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            pass
    return out


def parse_bytes(s: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for u, m in units.items():
        if s.endswith(u):
            return int(s[: -len(u)]) * m
    return int(s)


@dataclass
class Agent:
    """A node-agent process: its DRAM pool, an NVMe directory, and its HTTP port
    (``/metrics``, ``/residency``)."""

    bin: str
    dir: str
    dram: str = "16MiB"
    slot: str = "512KiB"
    nvme: Optional[str] = "256MiB"  # None: DRAM only
    eviction: str = "s3-fifo"
    remote: Optional[str] = None  # a redis:// URL: the remote tier
    port: int = field(default_factory=free_port)
    proc: Optional[subprocess.Popen] = None

    @property
    def slots(self) -> int:
        """Chunks the DRAM tier holds."""
        return parse_bytes(self.dram) // parse_bytes(self.slot)

    @property
    def socket(self) -> str:
        return os.path.join(self.dir, "agent.sock")

    @property
    def nvme_dir(self) -> str:
        return os.path.join(self.dir, "nvme")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Agent":
        os.makedirs(self.dir, exist_ok=True)
        log = os.path.join(self.dir, "agent.log")
        args = [self.bin, "node-agent", "--socket", self.socket, "--dram", self.dram,
                "--slot", self.slot, "--mlock", "off", "--eviction", self.eviction,
                "--metrics-listen", f"127.0.0.1:{self.port}"]
        if self.nvme is not None:
            os.makedirs(self.nvme_dir, exist_ok=True)
            args += ["--nvme-dir", self.nvme_dir, "--nvme-bytes", self.nvme]
        if self.remote is not None:
            args += ["--remote", self.remote, "--remote-namespace", "e2e"]
        with open(log, "a") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        wait_until("node-agent", lambda: get_text(self.url + "/metrics") is not None, 30,
                   self.proc, log)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> dict[str, float]:
        return prom(get_text(self.url + "/metrics"))

    def reset_prefix_cache(self, timeout: float = 30) -> None:
        """Empties the engine's prefix cache ("HBM"). vLLM refuses while blocks are held,
        e.g. by the connector's saves still in flight after a request finished: ask again."""
        wait_until(f"{self.name}'s prefix cache reset",
                   lambda: http_json(self.url + "/reset_prefix_cache", {}).get("success"),
                   timeout, self.proc, self.log)


@dataclass
class Engine:
    """A vLLM OpenAI server (``python -m vllm.entrypoints.openai.api_server``): with the kvtier
    connector on ``agent`` when one is given."""

    name: str
    python: str
    model: str
    pythonpath: str
    logdir: str
    agent: Optional[Agent] = None
    prefix_caching: bool = True
    load_failure_policy: str = "recompute"
    chunk_tokens: int = 256
    connector: Optional[dict] = None  # another --kv-transfer-config (a peer's connector)
    extra: list = field(default_factory=list)
    env: dict = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return os.path.join(self.logdir, f"{self.name}.log")

    def kv_transfer_config(self) -> Optional[dict]:
        if self.connector is not None:
            return self.connector
        if self.agent is None:
            return None
        return {
            "kv_connector": "KvtierConnector",
            "kv_connector_module_path": "kvtier.connector",
            "kv_role": "kv_both",
            "kv_load_failure_policy": self.load_failure_policy,
            "kv_connector_extra_config": {
                "agent_socket": self.agent.socket, "chunk_tokens": self.chunk_tokens,
            },
        }

    def start(self) -> "Engine":
        args = [
            self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
            "--served-model-name", "model", "--max-model-len", "8192", "--host", "127.0.0.1",
            "--port", str(self.port), "--dtype", "bfloat16", "--enforce-eager",
            "--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching",
            *self.extra,
        ]
        cfg = self.kv_transfer_config()
        if cfg is not None:
            args += ["--kv-transfer-config", json.dumps(cfg)]
        env = dict(os.environ)
        env.update({
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONHASHSEED": "0",
            "PYTHONPATH": self.pythonpath, **self.env,
        })
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 300) -> "Engine":
        wait_until(f"vLLM {self.name}", lambda: get_text(self.url + "/health") is not None,
                   timeout, self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def worker_pid(self) -> int:
        """The engine's worker process (it runs the forward pass and the connector's copies)."""
        with open(self.log) as f:
            m = re.findall(r"\(Worker(?:_TP\d+)? pid=(\d+)\)", f.read())
        if not m:
            raise RuntimeError(f"{self.name}: no worker pid in the log")
        return int(m[-1])

    def metrics(self) -> dict[str, float]:
        return prom(get_text(self.url + "/metrics"))

    def reset_prefix_cache(self, timeout: float = 30) -> None:
        """Empties the engine's prefix cache ("HBM"). vLLM refuses while blocks are held,
        e.g. by the connector's saves still in flight after a request finished: ask again."""
        wait_until(f"{self.name}'s prefix cache reset",
                   lambda: http_json(self.url + "/reset_prefix_cache", {}).get("success"),
                   timeout, self.proc, self.log)

    def complete(self, prompt: list[int], max_tokens: int = 8, **kw) -> dict:
        """A greedy completion of token ids: its tokens' text and logprobs."""
        body = {"model": "model", "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "logprobs": 1, **kw}
        return http_json(self.url + "/v1/completions", body)["choices"][0]


class Counters:
    """Deltas of an engine's cache counters across a block of requests."""

    NAMES = {
        "device": 'vllm:prompt_tokens_cached_by_source_total{source="device"}',
        "host": 'vllm:prompt_tokens_cached_by_source_total{source="host"}',
        "disk": 'vllm:prompt_tokens_cached_by_source_total{source="disk"}',
        # vLLM's name for a cluster-wide store (it has none of its own): the remote tier.
        "remote": 'vllm:prompt_tokens_cached_by_source_total{source="external_unspecified"}',
        "external": "vllm:external_prefix_cache_hits_total",
        "load_failed": "vllm:kvtier_load_failed_blocks_total",
        "loaded_chunks": "vllm:kvtier_loaded_chunks_total",
        "saved_chunks": "vllm:kvtier_saved_chunks_total",
        "requests": 'vllm:request_success_total{finished_reason="length"}',
        "prompt_tokens": "vllm:prompt_tokens_total",
    }

    def __init__(self, engine: Engine):
        self.engine = engine
        self.before = engine.metrics()

    def delta(self) -> dict[str, float]:
        now = self.engine.metrics()
        return {k: now.get(n, 0.0) - self.before.get(n, 0.0) for k, n in self.NAMES.items()}


def stream_ttft(url: str, body: dict, headers: Optional[dict] = None) -> tuple[float, str]:
    """Time to the first streamed token (seconds) and the whole text."""
    body = {**body, "stream": True}
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json", **(headers or {})})
    t0 = time.perf_counter()
    first = None
    text = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            ev = json.loads(line[5:])
            for c in ev.get("choices", []):
                piece = c.get("text") or (c.get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter() - t0
                text.append(piece)
    return (first if first is not None else time.perf_counter() - t0), "".join(text)


class Redis:
    """A ``redis-server`` on a free loopback port, persistence off (Debian's package)."""

    def __init__(self, dir: str):
        self.dir = dir
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> "Redis":
        os.makedirs(self.dir, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

        def answers() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        wait_until("redis-server", answers, 10, self.proc)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_router(bin: str, engines: list[Engine], logdir: str, node: str = "node1",
                 residency: Optional[Agent] = None,
                 extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [bin, "router", "--listen", f"127.0.0.1:{port}", "--health-interval", "1s", *extra]
    for e in engines:
        args += ["--endpoint", f"{node}={e.url}" if residency else e.url]
    if residency is not None:
        args += ["--residency", f"{node}={residency.url}/residency"]
    log = os.path.join(logdir, "router.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until("router", lambda: get_text(url + "/metrics") is not None, 30, proc, log)
    return proc, url


def main_paths() -> dict:
    """Paths the caller gives in the environment."""
    need = ("KVTIER_BIN", "KVTIER_MODEL", "KVTIER_CONNECTOR_PATH", "KVTIER_WORKDIR")
    missing = [k for k in need if not os.environ.get(k)]
    if missing:
        sys.exit(f"set {', '.join(missing)}")
    return {k: os.environ[k] for k in need} | {"python": sys.executable}
