"""kvtier around a real vLLM (PyPI's CPU build): two replicas with the kvtier connector sharing
one node-agent's DRAM and NVMe tiers, the kvtier router in front, a plain vLLM computing every
prompt as the reference, a replica whose first load fails (the connector's failpoint), a
replica configured with the traps the operator guards against, and a replica on a node of its
own whose agent uses the remote tier on a real ``redis-server``. The tests run in order; the
last restarts the node-agent.

Run by ``cli/tests/real_engine.rs`` (which builds what it needs); by hand:

    KVTIER_BIN=target/debug/kvtier KVTIER_MODEL=DIR KVTIER_CONNECTOR_PATH=DIR \\
    KVTIER_WORKDIR=DIR $VLLM_VENV/bin/python -m unittest -v e2e/vllm/test_real_engine.py

Every check reads the engines' own outputs and Prometheus counters. Prompts are token ids (a
model with random weights: output depends on every KV byte), so turn 2 extends turn 1 token for
token, as an agent's next turn does.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import random
import signal
import sys
import time
import unittest
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from stack import (Agent, Counters, Engine, Redis, get_text, http_json,  # noqa: E402
                   main_paths, start_router)

CHUNK = 256
MAX_TOKENS = 8
LOGPROB_TOLERANCE = 0.05  # bf16: a loaded prefix and a computed one may round differently


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 4096) for _ in range(n)]


def full_chunks(n_tokens: int) -> int:
    return n_tokens // CHUNK


class RealEngine(unittest.TestCase):
    paths: dict
    agent: Agent
    a: Engine
    b: Engine
    ref: Engine
    trap: Engine

    @classmethod
    def setUpClass(cls):
        cls.paths = p = main_paths()
        work = p["KVTIER_WORKDIR"]
        os.makedirs(work, exist_ok=True)
        cls.agent = Agent(p["KVTIER_BIN"], os.path.join(work, "agent")).start()
        common = dict(python=p["python"], model=p["KVTIER_MODEL"],
                      pythonpath=p["KVTIER_CONNECTOR_PATH"], logdir=work)
        # Responses are stored (the Responses API's `store`, off by default in vLLM) so that a
        # continuation by `previous_response_id` works on the replica that stored it.
        store = {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}
        cls.a = Engine("replica-a", agent=cls.agent, env=store, **common)
        cls.b = Engine("replica-b", agent=cls.agent, env=store, **common)
        # What the prompt gives computed from scratch: no connector, no prefix cache.
        cls.ref = Engine("reference", prefix_caching=False, **common)
        # A replica whose first load fails (the connector's `kvtier-load` failpoint; the
        # wheel is built with the `failpoints` feature): it must recompute.
        cls.c = Engine("replica-c", agent=cls.agent, env={"FAILPOINTS": "kvtier-load=1*return"},
                       **common)
        # The operator's traps: prefix caching off, and vLLM's default failure policy (a
        # failed load fails the request) with the same failpoint.
        cls.trap = Engine("traps", agent=cls.agent, prefix_caching=False,
                          load_failure_policy="fail",
                          env={"FAILPOINTS": "kvtier-load=1*return"}, **common)
        # A replica on a node of its own whose agent uses the remote tier (a real Redis);
        # dev mode lets the test empty its HBM prefix cache, as a replica on another node has.
        cls.redis = Redis(os.path.join(work, "redis")).start()
        cls.remote_agent = Agent(p["KVTIER_BIN"], os.path.join(work, "remote-agent"), nvme=None,
                                 remote=cls.redis.url).start()
        cls.d = Engine("replica-d", agent=cls.remote_agent, env={"VLLM_SERVER_DEV_MODE": "1"},
                       **common)
        cls.engines = [cls.a, cls.b, cls.ref, cls.c, cls.trap, cls.d]
        t0 = time.monotonic()
        for e in cls.engines:
            e.start()
        try:
            for e in cls.engines:
                e.wait_ready()
        except Exception:
            cls.tearDownClass()
            raise
        print(f"\n{len(cls.engines)} vLLM servers ready in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        # Tier-aware, and passing Anthropic `cache_control` breakpoints on as holds (ADR 0013).
        cls.router, cls.router_url = start_router(p["KVTIER_BIN"], [cls.a, cls.b], work,
                                                  residency=cls.agent,
                                                  extra=("--cache-control-holds",))

    @classmethod
    def tearDownClass(cls):
        if getattr(cls, "router", None) is not None:
            cls.router.terminate()
            cls.router.wait()
        for e in cls.engines:
            e.stop()
        cls.agent.stop()
        cls.remote_agent.stop()
        cls.redis.kill()

    # ------------------------------------------------------------------ helpers

    def assert_same_output(self, got: dict, want: dict, what: str):
        self.assertEqual(got["text"], want["text"], f"{what}: greedy text differs")
        g, w = got["logprobs"]["token_logprobs"], want["logprobs"]["token_logprobs"]
        worst = max(abs(x - y) for x, y in zip(g, w))
        self.assertLessEqual(worst, LOGPROB_TOLERANCE, f"{what}: logprobs differ by {worst}")

    def evict_dram(self, seed: int):
        """Prompts enough to push every earlier chunk out of the agent's DRAM tier."""
        slots = self.agent.slots
        n = 0
        i = 0
        while n < 2 * slots:
            self.a.complete(tokens(seed + i, 8 * CHUNK + 1), max_tokens=1)
            n += 8
            i += 1

    def nvme_files(self) -> set[str]:
        return {f for f in glob.glob(os.path.join(self.agent.nvme_dir, "**", "*"), recursive=True)
                if os.path.isfile(f) and not f.endswith(".tmp")}

    def wait_files_settle(self) -> set[str]:
        last, same = None, 0
        while same < 3:
            now = self.nvme_files()
            same = same + 1 if now == last else 0
            last = now
            time.sleep(0.3)
        return last

    # ------------------------------------------------------------------ the tests

    def test_1_turn_two_on_the_other_replica_loads_from_dram(self):
        turn1 = tokens(1, 7 * CHUNK + 100)
        turn2 = turn1 + tokens(2, 300)
        want = self.ref.complete(turn2, MAX_TOKENS)
        self.a.complete(turn1, MAX_TOKENS)
        cb = Counters(self.b)
        got = self.b.complete(turn2, MAX_TOKENS)
        d = cb.delta()
        prefix = full_chunks(len(turn1)) * CHUNK
        print(f"\nDRAM: turn 2 on the other replica: {d['host']:.0f} of {prefix} prefix "
              f"tokens from DRAM ({d})", file=sys.stderr)
        self.assertGreaterEqual(d["host"], 0.9 * prefix, d)
        self.assertEqual(d["load_failed"], 0, d)
        self.assert_same_output(got, want, "turn 2 loaded from DRAM")
        # Each replica's one worker says which transfer backend it picked (CPU: host copies).
        m = self.b.metrics()
        self.assertEqual(m.get('vllm:kvtier_workers_total{backend="host"}'), 1.0,
                         {k: v for k, v in m.items() if "kvtier_workers" in k})

    def test_2_turn_two_loads_through_nvme_after_dram_evicted_it(self):
        turn1 = tokens(11, 6 * CHUNK + 10)
        turn2 = turn1 + tokens(12, 200)
        want = self.ref.complete(turn2, MAX_TOKENS)
        self.a.complete(turn1, MAX_TOKENS)
        self.wait_files_settle()
        self.evict_dram(1000)
        cb = Counters(self.b)
        got = self.b.complete(turn2, MAX_TOKENS)
        d = cb.delta()
        prefix = full_chunks(len(turn1)) * CHUNK
        print(f"\nNVMe: {d['disk']:.0f} of {prefix} prefix tokens from NVMe ({d})", file=sys.stderr)
        self.assertGreaterEqual(d["disk"], 0.9 * prefix, d)
        self.assert_same_output(got, want, "turn 2 loaded through NVMe")

    def test_3_a_chunk_corrupted_on_disk_is_recomputed(self):
        turn1 = tokens(21, 6 * CHUNK + 10)
        turn2 = turn1 + tokens(22, 200)
        want = self.ref.complete(turn2, MAX_TOKENS)
        before = self.wait_files_settle()
        self.a.complete(turn1, MAX_TOKENS)
        mine = sorted(self.wait_files_settle() - before)
        self.assertGreaterEqual(len(mine), full_chunks(len(turn1)), "turn 1's chunks on NVMe")
        self.evict_dram(2000)
        # Flip bytes inside the payload of the chunk in the middle of the prefix.
        victim = mine[len(mine) // 2]
        with open(victim, "r+b") as f:
            f.seek(4096)
            b = f.read(64)
            f.seek(4096)
            f.write(bytes(x ^ 0xFF for x in b))
        cb = Counters(self.b)
        got = self.b.complete(turn2, MAX_TOKENS)
        d = cb.delta()
        prefix = full_chunks(len(turn1)) * CHUNK
        print(f"\ncorrupted chunk: {d['disk']:.0f} of {prefix} tokens loaded ({d})", file=sys.stderr)
        self.assertLess(d["disk"], prefix, "the corrupted chunk was not loaded")
        corrupt = sum(v for k, v in self.agent.metrics().items()
                      if k.startswith("kvtier_agent_nvme_corrupt"))
        self.assertGreater(corrupt, 0, "the agent saw the corruption")
        self.assert_same_output(got, want, "turn 2 with a corrupted chunk")

    def test_4_a_load_that_fails_is_recomputed(self):
        turn1 = tokens(41, 6 * CHUNK + 7)
        turn2 = turn1 + tokens(42, 150)
        want = self.ref.complete(turn2, MAX_TOKENS)
        self.a.complete(turn1, MAX_TOKENS)
        cc = Counters(self.c)
        got = self.c.complete(turn2, MAX_TOKENS)
        d = cc.delta()
        print(f"\nfailed load: {d}", file=sys.stderr)
        self.assertGreater(d["load_failed"], 0, d)
        self.assert_same_output(got, want, "turn 2 whose load failed")
        # The recomputed chunks were saved again: another turn loads them.
        turn3 = turn2 + tokens(43, 100)
        cc = Counters(self.c)
        got = self.c.complete(turn3, MAX_TOKENS)
        self.assertEqual(cc.delta()["load_failed"], 0)
        self.assert_same_output(got, self.ref.complete(turn3, MAX_TOKENS), "turn 3")

    def chat(self, messages: list, session: str | None = None) -> dict:
        headers = {"X-Session-ID": session} if session else {}
        body = {"model": "model", "messages": messages, "max_tokens": MAX_TOKENS,
                "temperature": 0}
        return http_json(self.router_url + "/v1/chat/completions", body, headers)

    def served_by(self, counters: list[Counters]) -> list[float]:
        return [c.delta()["requests"] for c in counters]

    def conversation(self, seed: int, session: str | None):
        rng = random.Random(seed)
        words = [f"w{rng.randrange(10**6)}" for _ in range(700)]
        system = {"role": "system", "content": " ".join(words)}
        turn1 = [system, {"role": "user", "content": "first question " + str(seed)}]
        c = [Counters(self.a), Counters(self.b)]
        r1 = self.chat(turn1, session)
        first = self.served_by(c)
        self.assertEqual(sorted(first), [0, 1], first)
        home = first.index(1)
        turn2 = turn1 + [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
                         {"role": "user", "content": "and a follow-up"}]
        c = [Counters(self.a), Counters(self.b)]
        self.chat(turn2, session)
        d = [x.delta() for x in c]
        self.assertEqual(d[home]["requests"], 1, f"turn 2 went to the other replica: {d}")
        self.assertGreaterEqual(d[home]["device"], 0.8 * r1["usage"]["prompt_tokens"],
                                f"turn 2 found turn 1's KV in HBM: {d[home]}")
        return home

    def test_5_the_router_keeps_a_conversation_where_its_kv_is(self):
        self.conversation(51, "session-51")  # the session header
        self.conversation(52, None)  # prefix affinity alone
        # The router tagged the conversations (kv_transfer_params, which vLLM passes to the
        # connector): the agent's residency stream names them, and the router follows it.
        events = []
        with urllib.request.urlopen(self.agent.url + "/residency", timeout=5) as r:
            try:
                for line in r:
                    events.append(json.loads(line))
                    if len(events) >= 2:
                        break
            except TimeoutError:
                pass
        tagged = [e for e in events if int(e.get("conversation", "0"), 16) != 0]
        self.assertTrue(tagged, f"conversations in the residency stream: {events}")
        with open(os.path.join(self.paths["KVTIER_WORKDIR"], "router.log")) as f:
            log = f.read()
        self.assertNotIn("residency stream failed", log)

    def test_6_the_traps_matter_on_the_real_engine(self):
        # vLLM's default kv_load_failure_policy ("fail"): a chunk that does not load fails
        # the request, where "recompute" (the operator's setting) answered it (test 4).
        turn1 = tokens(71, 6 * CHUNK + 7)
        turn2 = turn1 + tokens(72, 150)
        self.a.complete(turn1, MAX_TOKENS)
        ct = Counters(self.trap)
        try:
            out = self.trap.complete(turn2, MAX_TOKENS)
            failed = out.get("finish_reason") not in ("length", "stop")
            detail = out
        except urllib.error.HTTPError as e:
            failed, detail = True, f"HTTP {e.code}: {e.read()[:300]!r}"
        print(f"\nfail policy: {detail}; {ct.delta()}", file=sys.stderr)
        self.assertTrue(failed, f"the request should have failed: {detail}")
        self.assertGreater(ct.delta()["load_failed"], 0)
        # Prefix caching off: the same replica gets none of its own KV back from HBM; every
        # turn reloads it from the node's DRAM (or recomputes it without a connector).
        prompt = tokens(61, 6 * CHUNK + 50)
        for engine, hbm in ((self.a, True), (self.trap, False)):
            engine.complete(prompt, 2)
            c = Counters(engine)
            engine.complete(prompt, 2)
            d = c.delta()
            if hbm:
                self.assertGreater(d["device"], 0, d)
            else:
                self.assertEqual(d["device"], 0, d)
                self.assertGreater(d["host"], 0, d)
        ref = Counters(self.ref)
        self.ref.complete(prompt, 2)
        self.ref.complete(prompt, 2)
        self.assertEqual(ref.delta()["device"], 0, "no prefix cache: every turn recomputed")


    def test_7_claude_code_and_codex_speak_their_own_apis(self):
        """The real SDKs through the router: Anthropic Messages as Claude Code sends it
        (system blocks, `cache_control` breakpoints that move every turn, the session in
        `metadata.user_id`) and OpenAI Responses as Codex does, streamed and whole."""
        import anthropic
        import openai

        rng = random.Random(71)
        words = " ".join(f"w{rng.randrange(10**6)}" for _ in range(700))
        ephemeral = {"type": "ephemeral"}
        greedy = {"temperature": 0}  # the SDK no longer takes it as an argument; vLLM does
        claude = anthropic.Anthropic(base_url=self.router_url, api_key="unused", max_retries=0)
        system = [{"type": "text", "text": "You are Claude Code."},
                  {"type": "text", "text": words, "cache_control": ephemeral}]
        metadata = {"user_id": json.dumps({"device_id": "d", "account_uuid": "",
                                           "session_id": "cc-71"})}
        ask = [{"type": "text", "text": "first question"}]
        c = [Counters(self.a), Counters(self.b)]
        with claude.messages.stream(
                model="model", max_tokens=MAX_TOKENS, extra_body=greedy, system=system,
                messages=[{"role": "user", "content": [ask[0] | {"cache_control": ephemeral}]}],
                metadata=metadata, extra_query={"beta": "true"}) as s:
            first = s.get_final_message()
        self.assertEqual(first.type, "message")
        self.assertGreater(first.usage.output_tokens, 0)
        # The breakpoint on the newest message asked the node tier to keep the whole prompt
        # (its full chunks) for five minutes: the router passed it to the engine, the
        # connector to the agent once the request's chunks were saved.
        # (Its share of the prompt is measured on the text: allow a chunk for rounding.)
        want = min(max(full_chunks(first.usage.input_tokens) - 1, 1), self.agent.slots // 4)
        held = lambda: self.agent.metrics().get("kvtier_agent_held_chunks", 0)  # noqa: E731
        deadline = time.monotonic() + 20
        while held() < want and time.monotonic() < deadline:
            time.sleep(0.2)
        self.assertGreaterEqual(held(), want, self.agent.metrics())
        print(f"\nholds: {held():.0f} chunks held of turn 1's "
              f"{full_chunks(first.usage.input_tokens)} full chunks", file=sys.stderr)
        served = self.served_by(c)
        home = served.index(1)
        # Turn 2: the breakpoint moved to the newest message, the earlier turn is unchanged.
        turn2 = [{"role": "user", "content": ask},
                 {"role": "assistant", "content": [{"type": "text", "text": "".join(
                     b.text for b in first.content if b.type == "text") or "ok"}]},
                 {"role": "user", "content": [{"type": "text", "text": "and a follow-up",
                                               "cache_control": ephemeral}]}]
        c = [Counters(self.a), Counters(self.b)]
        second = claude.messages.create(model="model", max_tokens=MAX_TOKENS, extra_body=greedy,
                                        system=system, messages=turn2, metadata=metadata)
        d = [x.delta() for x in c]
        self.assertEqual(d[home]["requests"], 1, f"turn 2 went to the other replica: {d}")
        self.assertGreaterEqual(d[home]["device"], 0.8 * first.usage.input_tokens,
                                f"turn 2 found turn 1's KV in HBM: {d[home]}")
        self.assertGreater(second.usage.output_tokens, 0)
        counted = claude.messages.count_tokens(model="model", system=system, messages=turn2)
        self.assertGreater(counted.input_tokens, first.usage.input_tokens)

        codex = openai.OpenAI(base_url=self.router_url + "/v1", api_key="unused", max_retries=0)
        r1 = codex.responses.create(model="model", instructions=words, input="first task",
                                    max_output_tokens=MAX_TOKENS, temperature=0,
                                    extra_headers={"session_id": "codex-71"})
        self.assertTrue(r1.id)
        # A continuation names the stored response: only the replica that stored it has it.
        for session in ("codex-71", "codex-72", "codex-73"):
            r2 = codex.responses.create(model="model", input="and test it",
                                        previous_response_id=r1.id,
                                        max_output_tokens=MAX_TOKENS, temperature=0,
                                        extra_headers={"session_id": session})
            self.assertEqual(r2.previous_response_id, r1.id)
            self.assertTrue(r2.output, r2)
        self.assertEqual(codex.responses.retrieve(r1.id).id, r1.id)
        events = list(codex.responses.create(model="model", input="streamed", stream=True,
                                             max_output_tokens=MAX_TOKENS, temperature=0))
        self.assertEqual(events[0].type, "response.created")
        self.assertEqual(events[-1].type, "response.completed")
        text = get_text(self.router_url + "/metrics")
        for route in ("messages", "messages_count_tokens", "responses", "responses_by_id"):
            self.assertIn(f'route="{route}",outcome="ok"', text.replace(" ", ""))

    def test_9_the_node_agent_killed_mid_load(self):
        turn1 = tokens(31, 7 * CHUNK + 5)
        turn2 = turn1 + tokens(32, 100)
        want = self.ref.complete(turn2, MAX_TOKENS)
        self.a.complete(turn1, MAX_TOKENS)
        worker = self.b.worker_pid()
        # The engine plans the load (looked up and pinned in the agent), its worker is held
        # before copying, the agent dies and a new one takes the socket, then the worker runs.
        os.kill(worker, signal.SIGSTOP)
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                fut = pool.submit(self.b.complete, turn2, MAX_TOKENS)
                time.sleep(3)
                self.agent.kill()
                self.agent.start()
                os.kill(worker, signal.SIGCONT)
                got = fut.result(timeout=120)
        finally:
            os.kill(worker, signal.SIGCONT)
        self.assert_same_output(got, want, "turn 2 across an agent killed mid-load")
        # Both replicas carry on with the new agent: saves and loads resume (the first
        # calls after the restart find the old connection broken and reconnect).
        deadline = time.monotonic() + 60
        seed = 3300
        while True:
            seed += 2
            turn1 = tokens(seed, 5 * CHUNK + 5)
            turn2 = turn1 + tokens(seed + 1, 100)
            self.a.complete(turn1, MAX_TOKENS)
            cb = Counters(self.b)
            got = self.b.complete(turn2, MAX_TOKENS)
            d = cb.delta()
            if d["host"] > 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        self.assertGreater(d["host"], 0, f"loads after the agent came back: {d}")
        self.assert_same_output(got, self.ref.complete(turn2, MAX_TOKENS),
                                "turn 2 after the agent came back")


    def new_node(self):
        """Replica d's node replaced by a fresh one: a new agent (an empty pool) on the same
        socket, which the connector reconnects to, and the engine's HBM prefix cache emptied."""
        self.remote_agent.kill()
        self.remote_agent.start()
        deadline = time.monotonic() + 60
        seed = 7000
        # The first calls after the restart find the old connection broken and reconnect.
        while self.remote_agent.metrics().get("kvtier_agent_commits_total", 0) == 0:
            self.assertLess(time.monotonic(), deadline, "replica d did not reconnect")
            seed += 1
            self.d.complete(tokens(seed, 2 * CHUNK + 1), max_tokens=1)
        self.d.reset_prefix_cache()

    def remote_writes_settle(self, at_least: int):
        deadline = time.monotonic() + 30
        while True:
            m = self.remote_agent.metrics()
            if (m.get("kvtier_agent_remote_writes_total", 0) >= at_least
                    and m.get("kvtier_agent_remote_pending_writes", 1) == 0):
                return
            self.assertLess(time.monotonic(), deadline, f"remote writes: {m}")
            time.sleep(0.2)

    def test_8_a_conversation_whose_node_is_gone_loads_from_the_remote_tier(self):
        turn1 = tokens(51, 6 * CHUNK + 9)
        turn2 = turn1 + tokens(52, 150)
        want = self.ref.complete(turn2, MAX_TOKENS)
        self.d.complete(turn1, MAX_TOKENS)
        self.remote_writes_settle(full_chunks(len(turn1)))
        self.new_node()
        cd = Counters(self.d)
        got = self.d.complete(turn2, MAX_TOKENS)
        d = cd.delta()
        prefix = full_chunks(len(turn1)) * CHUNK
        fetched = self.remote_agent.metrics().get("kvtier_agent_remote_fetches_total", 0)
        print(f"\nremote: turn 2 on a fresh node: {d['remote']:.0f} of {prefix} prefix tokens "
              f"loaded, {fetched:.0f} chunks fetched ({d})", file=sys.stderr)
        self.assertEqual(d["device"], 0, f"the HBM prefix cache was emptied: {d}")
        # Counted as the remote tier's, not NVMe's.
        self.assertGreaterEqual(d["remote"], 0.9 * prefix, d)
        self.assertEqual(d["disk"], 0, d)
        self.assertGreaterEqual(fetched, full_chunks(len(turn1)))
        self.assert_same_output(got, want, "turn 2 loaded from the remote tier")

        # The store dies with a conversation in it: the next turn recomputes, and succeeds.
        turn1 = tokens(53, 5 * CHUNK + 3)
        turn2 = turn1 + tokens(54, 120)
        want = self.ref.complete(turn2, MAX_TOKENS)
        writes = self.remote_agent.metrics().get("kvtier_agent_remote_writes_total", 0)
        self.d.complete(turn1, MAX_TOKENS)
        self.remote_writes_settle(writes + full_chunks(len(turn1)))
        self.new_node()
        self.redis.kill()
        cd = Counters(self.d)
        got = self.d.complete(turn2, MAX_TOKENS)
        d = cd.delta()
        print(f"\nremote down: {d}", file=sys.stderr)
        self.assertEqual(d["disk"] + d["remote"], 0, d)
        self.assertEqual(d["load_failed"], 0, d)
        self.assert_same_output(got, want, "turn 2 with the remote tier down")


if __name__ == "__main__":
    unittest.main(verbosity=2)
