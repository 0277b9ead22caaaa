#!/usr/bin/env bash
# One command for the side-by-side load benchmark (caregate vs nginx vs HAProxy):
#   bash benches/load/run.sh            full run: 5 rounds, 10 s per point, open-loop latency with oha
#   bash benches/load/run.sh --quick    every scenario briefly, 2 rounds, no oha (what CI runs)
# Other flags go to harness.py (--rounds, --duration, --idle, --latency on|off, --out FILE).
# Installs what it needs (Debian nginx-light, haproxy, wrk, nodejs, redis-server; oha from
# crates.io unless --quick or --latency off), builds caregate and the MLLP responder
# (integration-tests' mllp-responder) in release mode, then runs benches/load/harness.py.
set -euo pipefail
cd "$(dirname "$0")/../.."

quick=0
no_latency=0
prev=""
for a in "$@"; do
  [[ "$a" == "--quick" ]] && quick=1
  [[ "$a" == "--latency=off" || ("$prev" == "--latency" && "$a" == "off") ]] && no_latency=1
  prev=$a
done

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
need=()
for pair in nginx:nginx-light haproxy:haproxy wrk:wrk node:nodejs taskset:util-linux openssl:openssl python3:python3 redis-server:redis-server; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  if ! command -v "$cmd" >/dev/null 2>&1 && [[ ! -x /usr/sbin/$cmd ]]; then need+=("$pkg"); fi
done
if ((${#need[@]})); then
  echo "installing ${need[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ((quick == 0 && no_latency == 0)) && ! command -v oha >/dev/null 2>&1; then
  echo "installing oha (open-loop load generator) from crates.io" >&2
  cargo install --locked oha
fi

# The harness holds thousands of idle connections; nginx and caregate inherit this limit.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

cargo build --release -p caregate --bins
# The mllp scenario's ACK responder and load client.
cargo build --release -p caregate-integration-tests --bin mllp-responder
exec python3 benches/load/harness.py "$@"
