#!/usr/bin/env bash
# Checks the monitoring assets: the Prometheus alert rules, their unit tests and runbook links,
# the Prometheus config, and the Grafana dashboard's JSON.
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
    grep -ohE 'caregate_[a-z0-9_]+' "$DASHBOARD" "$RULES" \
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
    # Every panel with queries uses the ${datasource} template variable; the four variables are
    # there; every metric selector of every query (panels and variables, listener and route
    # included) is filtered by instance=~"$instance".
    python3 - "$DASHBOARD" <<'EOF'
import json, re, sys
d = json.load(open(sys.argv[1]))
bad = []
queries = []
for p in d["panels"]:
    for t in p.get("targets", []):
        for obj in (p, t):
            if obj.get("datasource", {}).get("uid") != "${datasource}":
                bad.append(p["title"] + ": not on ${datasource}")
        queries.append((p["title"], t.get("expr", "")))
variables = d["templating"]["list"]
names = [v["name"] for v in variables]
for n in ("datasource", "instance", "listener", "route"):
    if n not in names:
        bad.append("template variable " + n + " missing")
for v in variables:
    if v["name"] in ("listener", "route"):
        queries.append(("variable " + v["name"], v.get("definition", "")))
        queries.append(("variable " + v["name"], v.get("query", {}).get("query", "")))
selector = re.compile(r"\b((?:caregate|process)_[a-z0-9_]+)(\{[^}]*\})?")
for title, expr in queries:
    if not expr:
        bad.append(title + ": empty query")
    for m in selector.finditer(expr):
        if 'instance=~"$instance"' not in (m.group(2) or ""):
            bad.append(title + ": " + m.group(1) + ' without instance=~"$instance"')
if bad:
    print("dashboard problems:", *sorted(set(bad)), sep="\n  ", file=sys.stderr)
    sys.exit(1)
print(f"{len(d['panels'])} panels and rows, {len(queries)} queries, variables {', '.join(names)}")
EOF
}

check_runbooks() {
    # Every alert has one runbook_url: <Cargo.toml repository>/blob/main/docs/<file>.md#<anchor>,
    # where the file exists and the anchor is the GitHub slug of one of its headings.
    local repo
    repo="$(sed -nE 's/^repository *= *"([^"]+)".*/\1/p' Cargo.toml | head -n 1)"
    [ -n "$repo" ] || {
        echo "no repository = \"...\" in Cargo.toml" >&2
        return 1
    }
    python3 - "$RULES" "$repo" <<'EOF'
import os, re, sys
rules, repo = sys.argv[1], sys.argv[2].rstrip("/")
prefix = repo + "/blob/main/"

def anchors(path):
    seen, out, fence = {}, set(), None
    for line in open(path, encoding="utf-8"):
        f = re.match(r"\s*(```|~~~)", line)
        if f:
            fence = None if fence == f.group(1) else (fence or f.group(1))
            continue
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fence or not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out

bad, urls, alert = [], {}, None
for line in open(rules, encoding="utf-8"):
    m = re.match(r"\s*- (alert|record):\s*(\S+)", line)
    if m:
        alert = m.group(2) if m.group(1) == "alert" else None
        if alert:
            urls.setdefault(alert, [])
        continue
    m = re.match(r'\s*runbook_url:\s*"?([^"\s]+)"?\s*$', line)
    if m and alert:
        urls[alert].append(m.group(1))
cache = {}
for alert, found in urls.items():
    if len(found) != 1:
        bad.append(f"{alert}: {len(found)} runbook_url")
        continue
    url = found[0]
    if not url.startswith(prefix) or "#" not in url:
        bad.append(f"{alert}: {url} is not {prefix}<file>#<anchor>")
        continue
    path, anchor = url[len(prefix):].split("#", 1)
    if not path.startswith("docs/") or not os.path.isfile(path):
        bad.append(f"{alert}: no file {path}")
        continue
    if anchor not in cache.setdefault(path, anchors(path)):
        bad.append(f"{alert}: no heading #{anchor} in {path}")
if not urls:
    bad.append("no alert found")
if bad:
    print("runbook problems:", *bad, sep="\n  ", file=sys.stderr)
    sys.exit(1)
print(f"{len(urls)} alerts, each with a runbook_url to a heading under {prefix}docs/")
EOF
}

check "promtool check rules $RULES" promtool check rules "$RULES"
check "promtool test rules $RULE_TESTS" promtool test rules "$RULE_TESTS"
check "promtool check config $PROM_CONFIG" promtool check config "$PROM_CONFIG"
check "runbook links in $RULES" check_runbooks
check "dashboard JSON $DASHBOARD" check_dashboard

if [ "$failures" -ne 0 ]; then
    echo "check-monitoring: $failures check(s) failed" >&2
    exit 1
fi
echo "check-monitoring: all checks passed"
