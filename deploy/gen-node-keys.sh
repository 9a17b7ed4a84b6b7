#!/usr/bin/env bash
# SuperNode authentication keys: one ECDSA P-384 key pair (OpenSSH format) per site. Usage:
#   deploy/gen-node-keys.sh [OUT_DIR] [SITE ...]   (default: the four demo hospitals)
# Each site keeps OUT_DIR/<site> (private, passed to flower-supernode --auth-supernode-private-key);
# the federation operator registers OUT_DIR/<site>.pub: flwr supernode register OUT_DIR/<site>.pub <connection>
set -euo pipefail
OUT="${1:-deploy/keys}"; shift || true
SITES=("$@")
[ ${#SITES[@]} -gt 0 ] || SITES=(hospital-a hospital-b hospital-c hospital-d)
mkdir -p "$OUT"
for site in "${SITES[@]}"; do
  if [ -e "$OUT/$site" ]; then echo "$OUT/$site exists, kept"; continue; fi
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedmri-$site" -f "$OUT/$site"
  echo "wrote $OUT/$site (private) and $OUT/$site.pub"
done
