#!/usr/bin/env bash
# TLS for the SuperLink: a private CA and a server certificate whose SANs cover the names the
# SuperNodes, the SuperExec and `flwr` use to reach it. Usage:
#   deploy/gen-certs.sh [OUT_DIR] [EXTRA_SAN ...]     e.g. deploy/gen-certs.sh deploy/certs DNS:flower.hospital-net.org IP:10.0.0.5
# Writes OUT_DIR/{ca.crt,ca.key,server.pem,server.key}. Keep ca.key offline; hand ca.crt to every site.
set -euo pipefail
OUT="${1:-deploy/certs}"; shift || true
SANS="DNS:superlink,DNS:localhost,IP:127.0.0.1"
for extra in "$@"; do SANS="$SANS,$extra"; done
mkdir -p "$OUT"
umask 077
openssl req -x509 -newkey rsa:4096 -sha256 -days 365 -nodes \
  -keyout "$OUT/ca.key" -out "$OUT/ca.crt" -subj "/CN=fedmri-federation-ca" 2>/dev/null
openssl req -newkey rsa:4096 -sha256 -nodes -keyout "$OUT/server.key" -out "$OUT/server.csr" \
  -subj "/CN=superlink" 2>/dev/null
printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" "$SANS" > "$OUT/server.ext"
openssl x509 -req -in "$OUT/server.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial \
  -out "$OUT/server.pem" -days 365 -sha256 -extfile "$OUT/server.ext" 2>/dev/null
rm -f "$OUT/server.csr" "$OUT/server.ext" "$OUT/ca.srl"
chmod 644 "$OUT/ca.crt" "$OUT/server.pem"
echo "wrote $OUT/ca.crt $OUT/server.pem $OUT/server.key (SAN $SANS)"
