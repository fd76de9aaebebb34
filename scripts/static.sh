#!/usr/bin/env bash
# `make static`: the fully static x86_64 musl binary, the way most users run
# httprouter. Adds the rustup target and Debian's musl-tools (for the C of
# mimalloc, the musl build's allocator) when missing, then prints the
# binary's path, its size and what ldd says of it.
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-musl
bin=target/$target/release/httprouter

if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
  echo "static.sh: adding the rustup target $target" >&2
  rustup target add "$target"
fi
if ! command -v musl-gcc >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then as_root=(); else as_root=(sudo); fi
  echo "static.sh: installing musl-tools" >&2
  "${as_root[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq musl-tools >/dev/null
fi
cargo build --locked --release --bin httprouter --target "$target"
size=$(stat -c %s "$bin")
echo "$bin: $size bytes ($(awk -v s="$size" 'BEGIN { printf "%.2f", s / 1048576 }') MiB)"
# ldd exits 1 on a static binary; its message is the point.
ldd "$bin" 2>&1 || true
