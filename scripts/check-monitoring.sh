#!/usr/bin/env bash
# Checks the monitoring assets: the Prometheus alert rules and their unit tests, the Prometheus
# config, and the Grafana dashboard's JSON.
#
#   scripts/check-monitoring.sh                  install promtool if missing, run every check
#   scripts/check-monitoring.sh --list-metrics   print every caregate metric name that the
#                                                dashboard and the rules use, one a line
#
# promtool comes from Debian's `prometheus` package. The script installs it without starting
# the Prometheus service. Exits non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DASHBOARD="conf/grafana/caregate-dashboard.json"
RULES="conf/prometheus/caregate-alerts.yml"
RULE_TESTS="conf/prometheus/caregate-alerts.test.yml"
PROM_CONFIG="conf/prometheus/prometheus.yml"

cd "$ROOT"

list_metrics() {
    # Metric names only (recording rules are named caregate:..., which this does not match);
    # histogram series map back to their family.
    grep -ohE 'caregate_[a-z_]+' "$DASHBOARD" "$RULES" \
        | sed -E 's/_(bucket|sum|count)$//' \
        | sort -u
}

case "${1:-}" in
    --list-metrics)
        list_metrics
        exit 0
        ;;
    "") ;;
    -h | --help)
        sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "unknown argument: $1 (try --help)" >&2
        exit 2
        ;;
esac

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "need root (or sudo) to run: $*" >&2
        return 1
    fi
}

install_promtool() {
    echo "== installing promtool (Debian package prometheus)"
    # Keep the package's postinst from starting the Prometheus server: a policy-rc.d that
    # refuses every start, for the length of the install, unless one is already there.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [ ! -e "$policy" ]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
        added_policy=1
    fi
    local rc=0
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || rc=$?
    if [ "$rc" -eq 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            prometheus || rc=$?
    fi
    if [ "$added_policy" -eq 1 ]; then
        as_root rm -f "$policy"
    fi
    # Under systemd, deb-systemd-invoke ignores policy-rc.d on some releases: stop and disable
    # the service if it came up anyway. Only the service this install created is touched.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        if systemctl is-active --quiet prometheus 2>/dev/null; then
            as_root systemctl stop prometheus || true
        fi
        as_root systemctl disable prometheus >/dev/null 2>&1 || true
    fi
    return "$rc"
}

if ! command -v promtool >/dev/null 2>&1; then
    install_promtool
fi
command -v promtool >/dev/null 2>&1 || {
    echo "promtool is still missing after the install" >&2
    exit 1
}
promtool --version 2>&1 | head -n 1

failures=0
check() {
    local name="$1"
    shift
    echo "== $name"
    if "$@"; then
        echo "-- ok: $name"
    else
        echo "-- FAILED: $name" >&2
        failures=$((failures + 1))
    fi
}

check_dashboard() {
    python3 -m json.tool "$DASHBOARD" >/dev/null || return 1
    # Every panel with queries uses the ${datasource} template variable.
    python3 - "$DASHBOARD" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
bad = []
for p in d["panels"]:
    for t in p.get("targets", []):
        for obj in (p, t):
            if obj.get("datasource", {}).get("uid") != "${datasource}":
                bad.append(p["title"])
names = [v["name"] for v in d["templating"]["list"]]
for n in ("datasource", "listener", "route"):
    if n not in names:
        bad.append("template variable " + n)
if bad:
    print("not using ${datasource}, or missing:", sorted(set(bad)), file=sys.stderr)
    sys.exit(1)
print(f"{len(d['panels'])} panels and rows")
EOF
}

check "promtool check rules $RULES" promtool check rules "$RULES"
check "promtool test rules $RULE_TESTS" promtool test rules "$RULE_TESTS"
check "promtool check config $PROM_CONFIG" promtool check config "$PROM_CONFIG"
check "dashboard JSON $DASHBOARD" check_dashboard

if [ "$failures" -ne 0 ]; then
    echo "check-monitoring: $failures check(s) failed" >&2
    exit 1
fi
echo "check-monitoring: all checks passed"
