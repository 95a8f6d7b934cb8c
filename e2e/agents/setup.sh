#!/usr/bin/env bash
# The agents' real CLIs from npm, cached in ~/.cache/kvtier/agents; prints the folder that
# holds their executables (its last line).
set -euo pipefail
CLAUDE_CODE_VERSION=2.1.328
CODEX_VERSION=0.169.0
dir="${XDG_CACHE_HOME:-$HOME/.cache}/kvtier/agents"
mkdir -p "$dir"
exec 9>"$dir/.lock" && flock 9  # tests running at once install once
if ! command -v npm >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
installed() {  # package version
  grep -qs "\"version\": \"$2\"" "$dir/node_modules/$1/package.json"
}
if ! installed @anthropic-ai/claude-code "$CLAUDE_CODE_VERSION" || ! installed @openai/codex "$CODEX_VERSION"; then
  (cd "$dir" && npm install --no-audit --no-fund --loglevel=error \
    "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" "@openai/codex@$CODEX_VERSION" >&2)
fi
echo "$dir/node_modules/.bin"
