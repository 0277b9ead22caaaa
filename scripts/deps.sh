#!/usr/bin/env bash
# Installs the system packages caregate needs to build and test on Debian/Ubuntu:
# cmake (Pingora's zlib-ng), a C toolchain and perl (vendored OpenSSL), pkg-config.
set -euo pipefail
need=()
for pkg in cmake build-essential perl pkg-config curl openssl; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
