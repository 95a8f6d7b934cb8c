#!/usr/bin/env bash
# Builds the kvtier image with podman: `bash images/build.sh [TAG]` (default localhost/kvtier:dev).
#
#   KVTIER_IMAGE_BASE   the base to build FROM; unset: a minimal Debian bookworm rootfs made
#                       here with mmdebstrap (libc, libgcc, tzdata, CA certificates; no shell),
#                       cached in ~/.cache/kvtier/images and imported as localhost/kvtier-base
#   KVTIER_IMAGE_PROFILE cargo profile of the binary: release (default) or dev
#   KVTIER_BIN          use this kvtier binary instead of building one
#
# Needs podman (Debian: podman buildah runc uidmap), mmdebstrap without a base, and a Python
# with maturin and ziglang for the connector's wheel (made in ~/.cache/kvtier/images/venv).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-localhost/kvtier:dev}
PROFILE=${KVTIER_IMAGE_PROFILE:-release}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/kvtier/images
PODMAN=(podman --runtime runc --cgroup-manager=cgroupfs)
mkdir -p "$CACHE"
t0=$SECONDS

# The base.
BASE=${KVTIER_IMAGE_BASE:-}
if [ -z "$BASE" ]; then
  BASE=localhost/kvtier-base:bookworm
  if ! "${PODMAN[@]}" image exists "$BASE"; then
    if [ ! -s "$CACHE/bookworm-base.tar" ]; then
      # `extract`: the packages' files without their maintainer scripts, so no shell or
      # package manager comes along; the CA bundle is added by the Containerfile.
      mmdebstrap --quiet --variant=extract --format=tar \
        --include=base-files,libc6,libgcc-s1,netbase,tzdata \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        bookworm "$CACHE/bookworm-base.tar.tmp"
      mv "$CACHE/bookworm-base.tar.tmp" "$CACHE/bookworm-base.tar"
    fi
    "${PODMAN[@]}" import "$CACHE/bookworm-base.tar" "$BASE" >/dev/null
  fi
fi

# The context: the binary, the connector package, the CA bundle.
ctx=target/image-context
rm -rf "$ctx" && mkdir -p "$ctx/python"
if [ -n "${KVTIER_BIN:-}" ]; then
  cp "$KVTIER_BIN" "$ctx/kvtier"
else
  cargo build --locked --profile "$PROFILE" -p kvtier
  dir=$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
  cp "target/$dir/kvtier" "$ctx/kvtier"
fi
# The release profile keeps line tables for backtraces while developing; the image does not
# need them (112 MB -> 22 MB).
[ "$PROFILE" = dev ] || strip "$ctx/kvtier"
py=${KVTIER_IMAGE_PYTHON:-}
if [ -z "$py" ]; then
  if [ ! -x "$CACHE/venv/bin/maturin" ] || ! "$CACHE/venv/bin/python" -c 'import ziglang' 2>/dev/null; then
    python3 -m venv "$CACHE/venv"
    "$CACHE/venv/bin/pip" install -q "maturin>=1.9,<2" ziglang
  fi
  py=$CACHE/venv/bin/python
fi
wheels=$(mktemp -d)
(cd connector && PATH="$(dirname "$py"):$PATH" CARGO_TARGET_DIR=../target/connector-wheel \
  "$(dirname "$py")/maturin" build -q --locked --zig --profile "$PROFILE" -o "$wheels")
"$py" -m pip install -q --no-deps --target "$ctx/python" "$wheels"/kvtier-*.whl
rm -rf "$wheels"
cp /etc/ssl/certs/ca-certificates.crt "$ctx/"

"${PODMAN[@]}" build -q --build-arg "BASE=$BASE" -f images/Containerfile -t "$TAG" "$ctx" >/dev/null
size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$TAG")
echo "built $TAG from $BASE: $((size / 1024 / 1024)) MiB in $((SECONDS - t0)) s" >&2
echo "$TAG"
