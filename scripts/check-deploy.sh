#!/usr/bin/env bash
# Checks the deployment assets: every Kubernetes manifest of deploy/kubernetes against the API
# schemas of Kubernetes 1.33 and 1.37 (kubernetes-validate, strict: unknown fields fail),
# deploy/kubernetes and the Dockerfile against checkov's policies (any failed check fails), and
# deploy/systemd/caregate.service with systemd-analyze verify (where systemd is installed).
#
#   scripts/check-deploy.sh
#
# The tools come from PyPI, pinned in deploy/requirements.txt, into the git-ignored virtual
# environment deploy/.venv (made once, reinstalled only when the pins change). Needs python3
# with venv (scripts/deps.sh installs both). Skipped checks: CRDs and the kustomization file
# below (SKIP_VALIDATE), checkov's in deploy/.checkov.yaml, each with its reason.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MANIFESTS=deploy/kubernetes
VENV=deploy/.venv
REQS=deploy/requirements.txt
CHECKOV_CONFIG=deploy/.checkov.yaml
K8S_VERSIONS=(1.33.0 1.37.0)

# Files kubernetes-validate cannot check, and why. Every other *.yaml in $MANIFESTS is checked,
# and one that holds a kind without a schema fails the run.
declare -A SKIP_VALIDATE=(
    [servicemonitor.yaml]="ServiceMonitor is a CRD (monitoring.coreos.com/v1, Prometheus Operator): kubernetes-validate has the built-in API schemas only"
    [kustomization.yaml]="a kustomize file (kustomize.config.k8s.io/v1beta1 Kustomization), not an object of the Kubernetes API"
)

case "${1:-}" in
    "") ;;
    -h | --help)
        sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "unknown argument: $1 (try --help)" >&2
        exit 2
        ;;
esac

started=$SECONDS

# The tools, once: a stamp in the venv holds the pins it was installed with.
stamp="$VENV/.installed-requirements"
if [ ! -x "$VENV/bin/python" ]; then
    echo "== making $VENV"
    python3 -m venv "$VENV"
fi
if ! cmp -s "$REQS" "$stamp" || [ ! -x "$VENV/bin/checkov" ] || [ ! -x "$VENV/bin/kubernetes-validate" ]; then
    echo "== installing $(grep -v '^#' "$REQS" | tr '\n' ' ')"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQS"
    cp "$REQS" "$stamp"
fi
echo "tools: $(grep -v '^#' "$stamp" | tr '\n' ' ')"

failures=0
fail() {
    echo "-- FAILED: $*" >&2
    failures=$((failures + 1))
}

# kubernetes-validate
files=()
for f in "$MANIFESTS"/*.yaml; do
    name="$(basename "$f")"
    if [ -n "${SKIP_VALIDATE[$name]:-}" ]; then
        echo "== kubernetes-validate: skipped $name: ${SKIP_VALIDATE[$name]}"
    else
        files+=("$f")
    fi
done
for v in "${K8S_VERSIONS[@]}"; do
    echo "== kubernetes-validate --strict, Kubernetes $v: ${files[*]##*/}"
    if ! out="$("$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$v" "${files[@]}" 2>&1)"; then
        grep -v ' passed for resource ' <<<"$out" >&2 || true
        fail "kubernetes-validate (Kubernetes $v)"
    elif grep -q "Couldn't find schema" <<<"$out"; then
        # Only a warning there: a kind without a schema fails here (list its file above instead).
        grep "Couldn't find schema" <<<"$out" >&2
        fail "kubernetes-validate (Kubernetes $v): a kind without a schema"
    else
        echo "$(grep -c ' passed for resource ' <<<"$out") resources valid"
    fi
done

# checkov
echo "== checkov: skipped checks (deploy/.checkov.yaml): $(grep -oE '^\s*- CKV[0-9A-Z_]+' "$CHECKOV_CONFIG" | tr -d ' -' | tr '\n' ' ')"
for target in "-d $MANIFESTS --framework kubernetes" "-f Dockerfile --framework dockerfile"; do
    # shellcheck disable=SC2086 # $target is two options, split on purpose
    if out="$("$VENV/bin/checkov" --config-file "$CHECKOV_CONFIG" $target 2>&1)"; then
        grep -E 'scan results|Passed checks' <<<"$out" | tr '\n' ' '
        echo
    else
        echo "$out" >&2
        fail "checkov $target"
    fi
done

# The systemd unit (the binary's path swapped for one that exists here).
if command -v systemd-analyze >/dev/null 2>&1; then
    unit_dir="$(mktemp -d)"
    sed 's#/usr/local/bin/caregate#/bin/true#g' deploy/systemd/caregate.service >"$unit_dir/caregate.service"
    if out="$(systemd-analyze verify "$unit_dir/caregate.service" 2>&1)" && [ -z "$out" ]; then
        echo "== systemd-analyze verify deploy/systemd/caregate.service: ok"
    else
        echo "$out" >&2
        fail "systemd-analyze verify deploy/systemd/caregate.service"
    fi
    rm -rf "$unit_dir"
else
    echo "== systemd-analyze verify: skipped: systemd-analyze is not installed"
fi

echo "check-deploy: $((SECONDS - started)) s"
if [ "$failures" -ne 0 ]; then
    echo "check-deploy: $failures check(s) failed" >&2
    exit 1
fi
echo "check-deploy: all checks passed"
