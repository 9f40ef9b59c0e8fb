#!/usr/bin/env bash
# Generate a self-signed CA and a TLS server certificate for a local Flower
# SuperLink on 127.0.0.1 / localhost.
#
# Usage: scripts/deploy/make_certs.sh DIR [EXTRA_SAN...]
#   DIR        output folder (created if missing)
#   EXTRA_SAN  optional extra subjectAltName entries, e.g. DNS:myhost IP:10.0.0.5
#
# Writes (the file names Flower's docs use):
#   DIR/ca.key      CA private key          (keep secret; only needed to sign)
#   DIR/ca.crt      CA certificate          -> --ssl-ca-certfile (SuperLink),
#                                              --root-certificates (SuperNode),
#                                              root-certificates (flwr config.toml)
#   DIR/server.key  server private key      -> --ssl-keyfile (SuperLink)
#   DIR/server.pem  server certificate      -> --ssl-certfile (SuperLink)
#                   (SAN: IP:127.0.0.1, DNS:localhost, IP:::1 + EXTRA_SAN)
#
# Idempotent: if all four files exist and server.pem verifies against ca.crt,
# nothing is regenerated. Delete DIR to force new certificates.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 DIR [EXTRA_SAN...]" >&2
    exit 2
fi
DIR=$1; shift
command -v openssl >/dev/null || { echo "make_certs.sh: openssl not found" >&2; exit 1; }
mkdir -p "$DIR"
cd "$DIR"

if [[ -s ca.key && -s ca.crt && -s server.key && -s server.pem ]] \
    && openssl verify -CAfile ca.crt server.pem >/dev/null 2>&1; then
    echo "make_certs.sh: certificates already present in $(pwd)"
    exit 0
fi

SAN="IP:127.0.0.1,DNS:localhost,IP:::1"
for extra in "$@"; do SAN="$SAN,$extra"; done

umask 077
# 1. Certificate authority (self-signed, 10 years).
openssl genrsa -out ca.key 4096 2>/dev/null
openssl req -x509 -new -key ca.key -sha256 -days 3650 \
    -subj "/CN=seedtune-local-ca" -out ca.crt
# 2. Server key + CSR + certificate signed by the CA, with SAN for loopback.
openssl genrsa -out server.key 4096 2>/dev/null
openssl req -new -key server.key -subj "/CN=localhost" -out server.csr
cat > server.ext <<EXT
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $SAN
EXT
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -days 825 -sha256 -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 600 ca.key server.key
chmod 644 ca.crt server.pem
openssl verify -CAfile ca.crt server.pem >/dev/null
echo "make_certs.sh: wrote ca.crt ca.key server.pem server.key to $(pwd) (SAN: $SAN)"
