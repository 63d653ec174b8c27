#!/usr/bin/env bash
# Builds the `shoal:local` container image FROM scratch: the release binary (or the build of
# profile $SHOAL_PROFILE) plus exactly the shared libraries it links (as ldd reports them),
# staged in target/docker-context.
set -euo pipefail
cd "$(dirname "$0")/.."

profile="${SHOAL_PROFILE:-release}"
cargo build --profile "$profile" -p shoal-cli
bin="target/$profile/shoal"
ctx=target/docker-context
rm -rf "$ctx"
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/var/lib/shoal" "$ctx/rootfs/tmp"
cp "$bin" "$ctx/rootfs/usr/local/bin/shoal"
strip "$ctx/rootfs/usr/local/bin/shoal" 2>/dev/null || true
# Every library the binary needs, at the path the loader looks for it.
ldd "$bin" | awk '/=> \// { print $3 } /^[ \t]*\// { print $1 }' | while read -r lib; do
  mkdir -p "$ctx/rootfs$(dirname "$lib")"
  cp -L "$lib" "$ctx/rootfs$lib"
done
cp deploy/Dockerfile "$ctx/Dockerfile"
docker build -q -t shoal:local "$ctx"
echo "built shoal:local ($(du -sh "$ctx/rootfs" | cut -f1) of files)"
