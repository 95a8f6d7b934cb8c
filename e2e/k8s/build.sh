#!/usr/bin/env bash
# Build a real kube-apiserver + kube-controller-manager (Kubernetes v1.20.2) offline, from
# Debian bookworm's `kubernetes` SOURCE package (full upstream tree incl. vendor/), with Debian's Go 1.19.
# Idempotent: skips everything if the binaries are already in $K8S_HOME/bin.
set -euo pipefail
K8S_HOME=${K8S_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/kvtier/k8s}
BIN="$K8S_HOME/bin"
if ! command -v kubectl >/dev/null; then   # Debian's kubectl (1.20) is enough for the tests
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null
fi
if [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ] && command -v etcd >/dev/null; then
  echo "k8s-build: cached in $BIN"; exit 0
fi
mkdir -p "$K8S_HOME" "$BIN"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq golang-go etcd-server rsync dpkg-dev openssl golang-github-modern-go-reflect2-dev >/dev/null
# A private apt config that adds deb-src to the machine's own Debian entries (no host named here).
A="$K8S_HOME/apt"; mkdir -p "$A/sources.list.d" "$A/lists/partial"
[ -f /etc/apt/sources.list.d/debian.sources ] && sed 's/^Types: deb$/Types: deb deb-src/' /etc/apt/sources.list.d/debian.sources > "$A/sources.list.d/debian.sources"
[ -f /etc/apt/sources.list ] && sed -n 's/^deb /deb-src /p' /etc/apt/sources.list > "$A/sources.list.d/src.list"
O=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$A/sources.list.d" -o "Dir::State::Lists=$A/lists")
apt-get "${O[@]}" update -qq
W="$K8S_HOME/work"; rm -rf "$W"; mkdir -p "$W"; cd "$W"
apt-get "${O[@]}" source --download-only kubernetes 2>&1 | grep -v 'unsandboxed' || true
dpkg-source -x kubernetes_*.dsc src >/dev/null
cd src
# vendored reflect2 v1.0.1 crashes (SIGSEGV in map iteration) under Go >= 1.18; use Debian's 1.0.2 instead.
R=vendor/github.com/modern-go/reflect2
rm -f "$R"/*.go "$R"/*.s
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go /usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$R"/
HOME=${HOME:-/root} make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >"$K8S_HOME/build.log" 2>&1 || { tail -40 "$K8S_HOME/build.log"; exit 1; }
cp _output/bin/kube-apiserver _output/bin/kube-controller-manager "$BIN/"
cd /; rm -rf "$W"          # ~2 GB of sources + Go build cache
"$BIN/kube-apiserver" --version
