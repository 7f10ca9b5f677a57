#!/usr/bin/env bash
# Installs everything hearth's build, tests and demo need on a fresh Debian machine.
# Idempotent: a second run only checks. Run as root.
set -euo pipefail

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# The Rust toolchain comes from rustup on these machines; make sure it is on PATH.
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found (install Rust with rustup)" >&2; exit 1; }

# Debian packages. Add to this list, never install by hand.
#   build:   compilers, libclang for lxc-sys's bindgen, liblxc and libsqlite3 headers
#   node:    LXC, debootstrap (templates), btrfs, nftables, iproute2, zstd (image export)
#   bench:   nginx and wrk (`hearth bench proxy` compares the front door with them)
APT_PACKAGES=(build-essential pkg-config ca-certificates python3-pip clang libclang-dev
  lxc lxc-dev libsqlite3-dev debootstrap btrfs-progs nftables iproute2 uidmap zstd xz-utils
  curl procps nginx wrk)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# just: prebuilt from PyPI in seconds (rust-just); building it from crates.io is the
# fallback.
if ! command -v just >/dev/null 2>&1; then
  log "installing just"
  if ! python3 -m pip install -q rust-just 2>/dev/null; then
    cargo install --locked -q just
  fi
fi
command -v just >/dev/null 2>&1 || { echo "setup: just is installed but not on PATH" >&2; exit 1; }
# Unprivileged guests get their uids from root's subordinate range (hearthd also adds it
# on start; doing it here makes a fresh machine ready before the first start).
for f in /etc/subuid /etc/subgid; do
  grep -q '^root:' "$f" 2>/dev/null || echo "root:1000000:1000000000" >> "$f"
done
log "setup done"
