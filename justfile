# hearth: every routine task. `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Install what the build and tests need (apt packages, just).
setup:
    ./scripts/setup.sh

build:
    cargo build --release -p hearth-agent -p hearth-host

# Bring a node up on this machine (hearthd, pool, image), create a container "demo" and
# print how to get into it.
up: build
    ./target/release/hearth up
    ./target/release/hearth containers get demo >/dev/null 2>&1 || ./target/release/hearth containers create --name demo
    ./target/release/hearth containers list
    @echo
    ./target/release/hearth urls demo
    @echo
    @echo "get in:   ./target/release/hearth containers shell demo"
    @echo "run:      ./target/release/hearth containers exec demo -- uname -a"
    @echo "copy:     ./target/release/hearth containers cp ./file demo:/root/file"

# Stop the node's daemon (containers keep running; `just up` brings it back).
down:
    -kill $(cat /run/hearth/hearthd.pid)

# Start an agent alone and drive it with the hearth CLI (no node needed).
demo: build
    ./scripts/demo.sh

# Every test in the workspace: unit, property, agent integration, and (as root) the
# end-to-end node test on real LXC, btrfs and nftables.
test:
    cargo build --workspace --bins
    cargo test --workspace

# Create/stop/delete timings against this node, beside the raw snapshot+start floor.
bench-lifecycle *ARGS: build
    ./target/release/hearth bench lifecycle --json {{ARGS}}

# Snapshot, restore and branch timings beside a raw btrfs snapshot and a plain create;
# the database phase installs PostgreSQL, MariaDB, Redis and sqlite3 in a guest
# (`--no-dbs` skips it). Needs the node up (`just up`).
bench-snapshots *ARGS: build
    ./target/release/hearth bench snapshots --json {{ARGS}}

# Requests/s and p99 through the HTTPS front door beside nginx as a TLS reverse proxy to
# the same guest app (needs the node up: `just up`; `--tool wrk` for wrk's figures).
bench-proxy *ARGS: build
    ./target/release/hearth bench proxy --json {{ARGS}}

fmt:
    cargo fmt --all

lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Agent RPC/exec/file figures beside this machine's floors, as JSON.
bench-agent *ARGS: build
    ./target/release/hearth bench agent --json {{ARGS}}

# Fuzz the protocol decoder (needs `cargo install cargo-fuzz`).
fuzz SECONDS="60":
    cd protocol/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run decode -- -max_total_time={{SECONDS}}
