#!/usr/bin/env bash
# Follows docs/writing-a-filter.md literally: every code block marked `file=PATH` is written into a
# fresh crate outside the workspace (blocks with the same PATH joined with one blank line between
# them), whose caregate dependencies point at this checkout; then the crate's tests run (the
# filter's unit tests and the end-to-end test of its binary). The blocks must also be, byte for
# byte, the files of examples/consent-filter/ (its Cargo.toml aside: the guide shows the form for
# a crate of your own), so the guide and the example cannot drift apart.
#
# Run it after the tests, never beside another build: it shares the target directory (and so the
# compiled dependencies) with the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
guide=docs/writing-a-filter.md
example=examples/consent-filter
scratch=$(mktemp -d "${TMPDIR:-/tmp}/caregate-guide.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

python3 - "$guide" "$scratch" <<'PY'
import os, re, sys
guide, out = sys.argv[1], sys.argv[2]
files, current, body = {}, None, []
in_fence = False
for n, line in enumerate(open(guide, encoding="utf-8"), 1):
    if not in_fence and line.startswith("```"):
        in_fence = True
        m = re.match(r"^```\w*\s+file=(\S+)\s*$", line)
        current, body = (m.group(1) if m else None), []
    elif in_fence and line.rstrip("\n") == "```":
        in_fence = False
        if current:
            files.setdefault(current, []).append("".join(body))
        current = None
    elif in_fence:
        body.append(line)
if in_fence:
    sys.exit(f"{guide}: a code block is not closed")
if not files:
    sys.exit(f"{guide}: no `file=` code blocks")
for path, blocks in files.items():
    target = os.path.join(out, path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "w", encoding="utf-8") as f:
        f.write("\n".join(blocks))
    print(f"guide-check: {path} ({len(blocks)} block{'s' if len(blocks) > 1 else ''})")
PY

# The guide's files are the example's, and the example has no file the guide leaves out.
status=0
while IFS= read -r f; do
  if [ ! -f "$scratch/$f" ]; then
    echo "guide-check: $example/$f is not in $guide" >&2
    status=1
  elif ! diff -u "$example/$f" "$scratch/$f" >&2; then
    echo "guide-check: $guide differs from $example/$f (above: - example, + guide)" >&2
    status=1
  fi
done < <(cd "$example" && find . -type f ! -name Cargo.toml ! -name '*.jsonl' | sed 's|^\./||' | sort)
[ "$status" -eq 0 ] || exit 1

# A crate of its own, on this checkout, starting from the workspace's locked versions.
sed -i "s|\.\./caregate/|$root/|g" "$scratch/Cargo.toml"
cp Cargo.lock "$scratch/Cargo.lock"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
# The workspace's dev profile (a crate outside the workspace does not inherit it): shared
# dependencies are reused, and the debug info stays as small as the workspace's.
export CARGO_PROFILE_DEV_DEBUG="${CARGO_PROFILE_DEV_DEBUG:-line-tables-only}"
cargo test --offline --manifest-path "$scratch/Cargo.toml" --lib --bins --tests
echo "guide-check: ok"
