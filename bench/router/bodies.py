"""Writes the two request bodies of the router benchmark.

small.json: a two-message chat (~200 B).
agentic.json: a ~425 KB agent turn as coding agents send it: 40 tool definitions, a long
system prompt, then ~240 messages of code, tool results and replies, with the escapes
(newlines, quotes, backslashes) that real code puts in JSON strings.
"""
import json
import random
import sys

out = sys.argv[1]
rng = random.Random(7)
WORDS = ("fn let mut match impl struct pub use crate self Ok Err Some None return if else for "
         "while loop async await tokio hyper router endpoint chunk tier pool slot session "
         "cargo test build src/lib.rs Cargo.toml error warning note help \"quoted\" path\\to\\file").split(" ")


def text(n):
    parts, size = [], 0
    while size < n:
        w = rng.choice(WORDS)
        if rng.random() < 0.08:
            w += "\n"
        parts.append(w)
        size += len(w) + 1
    return " ".join(parts)[:n]


small = {"model": "stub-model", "max_tokens": 64, "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a haiku about routers."}]}

tools = [{"type": "function", "function": {
    "name": f"tool_{i}", "description": text(600),
    "parameters": {"type": "object", "properties": {
        f"arg{j}": {"type": "string", "description": text(80)} for j in range(4)},
        "required": ["arg0"]}}} for i in range(40)]
messages = [{"role": "system", "content": text(12_000)}]
i = 0
while len(json.dumps({"tools": tools, "messages": messages})) < 425_000:
    kind = i % 3
    if kind == 0:
        messages.append({"role": "user", "content": text(rng.randint(200, 2500))})
    elif kind == 1:
        messages.append({"role": "assistant", "content": text(rng.randint(100, 800)),
                         "tool_calls": [{"id": f"call_{i}", "type": "function", "function": {
                             "name": f"tool_{i % 40}", "arguments": json.dumps({"arg0": text(60)})}}]})
    else:
        messages.append({"role": "tool", "tool_call_id": f"call_{i - 1}", "content": text(rng.randint(500, 4000))})
    i += 1
agentic = {"model": "stub-model", "max_tokens": 256, "stream": False, "tools": tools, "messages": messages}

with open(f"{out}/small.json", "w") as f:
    json.dump(small, f)
with open(f"{out}/agentic.json", "w") as f:
    json.dump(agentic, f)
print(f"small.json {len(json.dumps(small))} B, agentic.json {len(json.dumps(agentic))} B, "
      f"{len(messages)} messages")
