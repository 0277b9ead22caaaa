#!/usr/bin/env bash
# The test command: installs what the tests need, builds the gateway binary the end-to-end tests
# start, and runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh --with-test-peers
# The end-to-end tests run the binary with every optional feature (OTLP export) built in.
cargo build -p caregate --bins --features otlp
cargo test --workspace --all-targets --features caregate/otlp "$@"
