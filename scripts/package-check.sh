#!/usr/bin/env bash
# Package each publishable crate and test the packaged copy as crates.io users get it:
# `cargo package` (which also builds the unpacked crate), then unpack the .crate file
# outside the workspace and run `cargo test` there — unit, integration and doc tests,
# the README's examples included — with default features and with all features.
# Catches files the package leaves out (README, licences, golden files, includes of
# paths outside the crate) and doc tests that only pass inside the repository.
#
# Usage: scripts/package-check.sh [CRATE...]   (default: the crates listed below).
# Needs crates.io (the index and the dev-dependencies). Exits non-zero on the first
# failure. Called by .ci/run after the main test command.
#
# A new publishable crate (no `publish = false`) follows crates/vlapic: its own
# README.md, CHANGELOG.md and copies of LICENSE-MIT/LICENSE-APACHE in its directory,
# `readme`/`keywords`/`categories`/`include`/docs.rs metadata in its Cargo.toml, and
# its name in the default list here. (A crate that depends on another workspace crate
# by path also needs a `version` on that dependency; check with this cargo whether
# both can be packaged in one `cargo package -p A -p B` before the first is published.)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

crates=("$@")
if [ ${#crates[@]} -eq 0 ]; then
  crates=(vlapic)
fi

# The unpacked copies get their own target directory (the workspace's stays untouched;
# dependencies are reused across runs) and a fixed place outside the workspace, one per
# checkout, so that paths compiled into test binaries (CARGO_MANIFEST_DIR) stay valid.
# Each run unpacks afresh with new modification times (tar -m), so cargo rebuilds the
# crate itself every time and never reuses a binary built from an older package.
check_target="$root/target/package-check"
work="${TMPDIR:-/tmp}/vlapic-package-check-$(printf '%s' "$root" | cksum | cut -d' ' -f1)"
mkdir -p "$work"

# vlapic-kvm depends on vlapic, which is not on crates.io yet: cargo packages and
# verifies the two together (through a temporary local registry). Its packaged tests
# need /dev/kvm and run in the workspace (`cargo test -p vlapic-kvm`).
echo "== package-check: vlapic + vlapic-kvm packaged and built together"
cargo package -p vlapic -p vlapic-kvm --allow-dirty
listing=$(cargo package -p vlapic-kvm --allow-dirty --list)
for f in Cargo.toml README.md CHANGELOG.md LICENSE-MIT LICENSE-APACHE src/lib.rs examples/two_vcpus.rs; do
  grep -qx "$f" <<<"$listing" || { echo "package-check: vlapic-kvm: $f is not in the package" >&2; exit 1; }
done

for crate in "${crates[@]}"; do
  # `cargo pkgid` prints e.g. path+file:///…/crates/vlapic#0.1.0 (or …#name@0.1.0).
  pkgid=$(cargo pkgid -p "$crate")
  ver=${pkgid##*[#@]}
  echo "== package-check: $crate $ver"

  # 1. Package (cargo verifies the packaged crate builds). --allow-dirty: CI and
  #    local runs may have uncommitted changes; the check is about contents.
  cargo package -p "$crate" --allow-dirty
  crate_file="$root/target/package/$crate-$ver.crate"
  test -f "$crate_file" || { echo "package-check: $crate_file missing" >&2; exit 1; }

  # 2. What must ship.
  listing=$(cargo package -p "$crate" --allow-dirty --list)
  for f in Cargo.toml README.md CHANGELOG.md LICENSE-MIT LICENSE-APACHE src/lib.rs; do
    if ! grep -qx "$f" <<<"$listing"; then
      echo "package-check: $crate: $f is not in the package" >&2
      exit 1
    fi
  done

  # 3. Unpack outside the workspace (inside it, cargo would take the repository's
  #    Cargo.toml for the package's workspace root) and test it there. Cargo ships
  #    the workspace's lock file in the package; should it not (older cargo), use the
  #    workspace's, so the dependency versions are the ones the workspace tests with.
  dir="$work/$crate-$ver"
  rm -rf "$dir"
  tar -xzmf "$crate_file" -C "$work"
  if [ ! -f "$dir/Cargo.lock" ]; then
    cp "$root/Cargo.lock" "$dir/Cargo.lock"
  fi
  (
    cd "$dir"
    export CARGO_TARGET_DIR="$check_target/$crate"
    cargo test
    cargo test --all-features
  )
  echo "== package-check: $crate $ver OK"
done
