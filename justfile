# hearth: every routine task. `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Install what the build and tests need (apt packages, just).
setup:
    ./scripts/setup.sh

build:
    cargo build --release -p hearth-agent -p hearth-host

# Start an agent and drive it with the hearth CLI.
demo: build
    ./scripts/demo.sh

# Every test in the workspace (unit, property, agent integration).
test:
    cargo test --workspace

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
