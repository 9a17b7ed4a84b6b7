#!/usr/bin/env bash
# Vendor NiiVue (npm @niivue/niivue, BSD-2-Clause) for the web page: its single-file UMD bundle goes to
# server/api/static/vendor/niivue.umd.js and is served by fedmri itself (no CDN at run time).
# Needs npm and the npm registry (install time only); safe to run again (does nothing when the pinned
# file is in place). Without npm it says so and exits 0: the page then shows the server-rendered slices.
# The bundle (2.2 MB minified) is git-ignored, not committed: this script rebuilds it from the pin.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.69.0
SHA256=47b896b77ec4a5be3ef1949c33ad393b6f45629921f326c279000bcf51bdb4af  # sha256 of package/dist/niivue.umd.js in @niivue/niivue@$VERSION
dest=server/api/static/vendor/niivue.umd.js

if [ -f "$dest" ] && echo "$SHA256  $dest" | sha256sum -c --status; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "note: npm not found; NiiVue not vendored, the web page will show server-rendered slices only" >&2
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# npm pack checks the tarball against the registry's integrity hash; the sha256 below pins the file itself.
(cd "$tmp" && npm pack --silent --ignore-scripts "@niivue/niivue@$VERSION" >/dev/null)
tar -xzf "$tmp/niivue-niivue-$VERSION.tgz" -C "$tmp" package/dist/niivue.umd.js
echo "$SHA256  $tmp/package/dist/niivue.umd.js" | sha256sum -c --quiet
mkdir -p "$(dirname "$dest")"
cp "$tmp/package/dist/niivue.umd.js" "$dest.tmp" && mv "$dest.tmp" "$dest"
echo "vendored @niivue/niivue@$VERSION -> $dest"
