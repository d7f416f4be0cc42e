#!/usr/bin/env bash
# Build cnitool (the CNI project's reference client) offline from Debian's source package of
# golang-github-appc-cni, against the libcni that golang-github-appc-cni-dev installs.
# Idempotent: does nothing when the binary is already built. /etc/apt is never touched: the
# source package is fetched with a private, throwaway apt configuration.
# Usage: scripts/build-cnitool.sh [output dir]       (default .cache/cnitool; prints the binary path)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.cache/cnitool}
VERSION=1.1.2-1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [[ -x $OUT/cnitool ]]; then
  echo "$OUT/cnitool"
  exit 0
fi
for cmd in go apt-get tar; do
  command -v "$cmd" >/dev/null || { echo "build-cnitool: $cmd is missing (apt-get install golang-go)" >&2; exit 1; }
done
[[ -d /usr/share/gocode/src/github.com/containernetworking/cni/libcni ]] || {
  echo "build-cnitool: libcni is missing (apt-get install golang-github-appc-cni-dev)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/sources" "$work/lists/partial" "$work/cache/archives/partial"
cat > "$work/sources/debian-src.sources" <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
O=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/sources"
   -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
apt-get "${O[@]}" -q update >/dev/null
(cd "$work" && apt-get "${O[@]}" -q source --download-only "golang-github-appc-cni=$VERSION" >/dev/null)
tar -C "$work" -xJf "$work"/golang-github-appc-cni_*.orig.tar.* --wildcards '*/cnitool/cnitool.go'
mkdir -p "$work/gopath/src/cnitool"
cp "$work"/golang-github-appc-cni-*/cnitool/cnitool.go "$work/gopath/src/cnitool/"
(cd "$work/gopath/src/cnitool" && GO111MODULE=off GOPATH="$work/gopath:/usr/share/gocode" GOPROXY=off \
  GOCACHE="$work/gocache" go build -o "$OUT/cnitool.tmp" . )
mv "$OUT/cnitool.tmp" "$OUT/cnitool"
echo "$OUT/cnitool"
