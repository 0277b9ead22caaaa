#!/usr/bin/env bash
# Installs what caregate needs to build and test on Debian/Ubuntu: cmake (Pingora's zlib-ng), a C
# toolchain and perl (vendored OpenSSL), pkg-config, curl and openssl (TLS tests), Node.js and npm
# (the OpenID provider and the FHIR schema validator the tests run), their npm packages, and
# the fhirpy client and the HL7 v2 peers (python-hl7, hl7apy) in Python virtual environments.
#   --with-portal      also installs Redoc (npm, into portal/node_modules) for the developer portal
#   --with-test-peers  also installs the test peers, Redoc, and the portal test's peers
#                      (openapi-spec-validator, schemathesis, Debian's chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for pkg in cmake build-essential perl pkg-config curl openssl redis-server; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
# Headless Chromium renders the developer portal's Redoc page (integration-tests/tests/portal.rs).
if [ "${1:-}" = "--with-test-peers" ]; then
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
fi
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
# Redoc for the developer portal's page, from the npm registry (pinned by portal/package-lock.json).
install_portal() {
  if [ -f portal/package-lock.json ]; then
    npm ci --prefix portal --no-audit --no-fund --loglevel=error
  else
    npm install --prefix portal --no-audit --no-fund --loglevel=error
  fi
}
if [ "${1:-}" = "--with-portal" ]; then
  install_portal
fi
if [ "${1:-}" = "--with-test-peers" ]; then
  install_portal
  # The developer portal's peers: openapi-spec-validator and schemathesis (integration-tests/tests/portal.rs).
  venv=integration-tests/peers/portal/.venv
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r integration-tests/peers/portal/requirements.txt
  for peer in integration-tests/peers/oidc integration-tests/peers/fhir-schema; do
    npm ci --prefix "$peer" --no-audit --no-fund --loglevel=error
  done
  venv=integration-tests/peers/fhirpy/.venv
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r integration-tests/peers/fhirpy/requirements.txt
  # The HL7 v2 peers: python-hl7's MLLP client and hl7apy's MLLP server (integration-tests/tests/hl7_mllp.rs).
  venv=integration-tests/peers/hl7/.venv
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r integration-tests/peers/hl7/requirements.txt
fi
