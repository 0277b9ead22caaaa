#!/usr/bin/env bash
# The test command: installs what the tests need, builds the gateway binary the end-to-end tests
# start, and runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh --with-test-peers
cargo build -p caregate --bins
cargo test --workspace --all-targets "$@"
