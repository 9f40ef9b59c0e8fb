#!/usr/bin/env bash
# Generate N SuperNode authentication key pairs in the format flwr 1.41 needs:
# ECDSA on a NIST curve (we use P-384, like Flower's docs), private key in
# OpenSSH format ("-----BEGIN OPENSSH PRIVATE KEY-----", no passphrase), public
# key as a one-line OpenSSH public key ("ecdsa-sha2-nistp384 AAAA... comment").
# ed25519 / RSA keys are rejected by `flwr supernode register` and by
# `flower-supernode --auth-supernode-private-key`.
#
# Usage: scripts/deploy/make_node_keys.sh DIR N [PREFIX]
# Writes DIR/PREFIX_I and DIR/PREFIX_I.pub for I = 1..N (PREFIX: node).
#   DIR/node_I      -> flower-supernode --auth-supernode-private-key
#   DIR/node_I.pub  -> flwr supernode register DIR/node_I.pub CONNECTION
# Idempotent: existing key pairs are kept.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 DIR N [PREFIX]" >&2
    exit 2
fi
DIR=$1; N=$2; PREFIX=${3:-node}
[[ "$N" =~ ^[0-9]+$ ]] || { echo "make_node_keys.sh: N must be an integer" >&2; exit 2; }
mkdir -p "$DIR"

for ((i = 1; i <= N; i++)); do
    key="$DIR/${PREFIX}_$i"
    if [[ -s "$key" && -s "$key.pub" ]]; then
        continue
    fi
    rm -f "$key" "$key.pub"
    if command -v ssh-keygen >/dev/null; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "${PREFIX}_$i" -f "$key"
    else
        # Fallback without OpenSSH: the `cryptography` package (a flwr dependency).
        PY=${PYTHON:-python3}
        "$PY" - "$key" "${PREFIX}_$i" <<'PYEOF'
import os, sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
path, comment = sys.argv[1], sys.argv[2]
k = ec.generate_private_key(ec.SECP384R1())
priv = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                       serialization.NoEncryption())
pub = k.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                  serialization.PublicFormat.OpenSSH)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.write(fd, priv); os.close(fd)
with open(path + ".pub", "wb") as f:
    f.write(pub + b" " + comment.encode() + b"\n")
PYEOF
    fi
done
echo "make_node_keys.sh: $N key pair(s) (${PREFIX}_1..${PREFIX}_$N) in $DIR"
