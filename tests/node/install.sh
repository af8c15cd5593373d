#!/usr/bin/env bash
# install.sh: installs the npm packages of tests/node exactly as package-lock.json pins them
# (`npm ci`, with tests/node/.npmrc), into tests/node/node_modules, when they are missing or when
# package.json or package-lock.json changed since the last install: a stamp in node_modules keeps
# their hash, so a second run costs nothing. Two runs at once (`make test` and `make asan` in one
# tree) take turns on a lock. Prints what went wrong and exits 1 when node, npm or the install fail.
set -u
cd "$(dirname "$0")" || exit 2

for tool in node npm; do
    if ! command -v "$tool" > /dev/null 2>&1; then
        echo "$tool is not installed: 'make test' installs Debian's nodejs and npm (make deps)"
        exit 1
    fi
done

STAMP=node_modules/.aigate-lock-hash
wanted=$(cat package.json package-lock.json | sha256sum | cut -d' ' -f1)
installed() { [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$wanted" ]; }
installed && exit 0

# The lock file itself is the lock: it is always there and never rewritten by `npm ci`.
exec 9< package-lock.json
flock 9
installed && exit 0
if ! timeout 900 npm ci --no-audit --no-fund --loglevel=error > "${TMPDIR:-/tmp}/aigate-npm-ci.$$.log" 2>&1; then
    echo "npm ci failed in tests/node (is the npm registry reachable from here?); its output:"
    grep -m 4 "npm error" "${TMPDIR:-/tmp}/aigate-npm-ci.$$.log"
    rm -f "${TMPDIR:-/tmp}/aigate-npm-ci.$$.log"
    exit 1
fi
rm -f "${TMPDIR:-/tmp}/aigate-npm-ci.$$.log"
echo "$wanted" > "$STAMP"
