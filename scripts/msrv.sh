#!/usr/bin/env bash
# Checks that the minimum Rust stated in Cargo.toml (`rust-version`) still
# builds everything: installs that toolchain with rustup (minimal profile)
# and runs `cargo check` with it. Where rustup or the toolchain cannot be
# had, says so and succeeds: the check needs the network once.
set -euo pipefail
cd "$(dirname "$0")/.."

msrv=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml)
[ -n "$msrv" ] || { echo "msrv.sh: no rust-version in Cargo.toml" >&2; exit 1; }
if ! command -v rustup >/dev/null 2>&1; then
  echo "msrv.sh: no rustup; rust-version $msrv not checked" >&2
  exit 0
fi
if ! rustup toolchain install "$msrv" --profile minimal >/dev/null 2>&1; then
  echo "msrv.sh: the Rust $msrv toolchain cannot be installed here; rust-version not checked" >&2
  exit 0
fi
echo "msrv.sh: cargo +$msrv check --all-targets" >&2
cargo +"$msrv" check --locked --all-targets --target-dir target/msrv
