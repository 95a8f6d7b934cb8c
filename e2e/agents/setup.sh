#!/usr/bin/env bash
# The agents' real CLIs from npm, cached in ~/.cache/kvtier/agents; prints the folder that
# holds their executables (its last line).
set -euo pipefail
CLAUDE_CODE_VERSION=2.1.328
dir="${XDG_CACHE_HOME:-$HOME/.cache}/kvtier/agents"
mkdir -p "$dir"
if ! command -v npm >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
have="$(cd "$dir" && npm ls --depth=0 --parseable @anthropic-ai/claude-code 2>/dev/null || true)"
if [ -z "$have" ] || [ ! -x "$dir/node_modules/.bin/claude" ] ||
   ! grep -q "\"version\": \"$CLAUDE_CODE_VERSION\"" "$dir/node_modules/@anthropic-ai/claude-code/package.json"; then
  (cd "$dir" && npm install --no-audit --no-fund --loglevel=error \
    "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" >&2)
fi
echo "$dir/node_modules/.bin"
