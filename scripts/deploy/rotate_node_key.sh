#!/usr/bin/env bash
# Rotate SuperNode I's authentication key in a running federation started by
# start_local.sh, with no window in which the node has no valid key:
#   1. generate a new ECDSA P-384 key pair         KEY_DIR/node_I.next(.pub)
#   2. flwr supernode register node_I.next.pub     -> new node id
#   3. restart SuperNode I with the new private key (same port and node-config)
#   4. flwr supernode unregister OLD_NODE_ID       -> the old key is dead for good
#   5. keep the old pair as node_I.retired-TIMESTAMP, the new one becomes node_I
# Note: the node id changes with the key (ids are bound to public keys), and a
# public key that was registered once can never be registered again
# ("[code: 23] Public key already in use"), even after unregistering.
#
# Usage: scripts/deploy/rotate_node_key.sh STATE I
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
open_state "I" "$@"
I=$2
resolve_flwr_bin
[[ -f "$STATE/node_ids/node_$I" && -f "$STATE/nodes/node_$I/port" ]] \
    || { echo "rotate_node_key.sh: node $I is not part of $STATE" >&2; exit 2; }

OLD_ID=$(cat "$STATE/node_ids/node_$I")
KEY="$FLWR_KEY_DIR/node_$I"
TMP=$(mktemp -d "$FLWR_KEY_DIR/.rotate.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# 1. new key pair
"$DEPLOY_DIR/make_node_keys.sh" "$TMP" 1 node >/dev/null
mv "$TMP/node_1" "$KEY.next"; mv "$TMP/node_1.pub" "$KEY.next.pub"

# 2. register it
out=$(flwr_json supernode register "$KEY.next.pub" "$FLWR_CONNECTION") \
    || { echo "rotate_node_key.sh: registering the new key failed" >&2; exit 1; }
NEW_ID=$(json_get node-id <<<"$out")
echo "[rotate] registered new key for node $I -> node id $NEW_ID"

# 3. restart SuperNode I with the new key
stop_pidfile "$STATE/pids/supernode_$I.pid"
mv "$STATE/logs/supernode_$I.log" "$STATE/logs/supernode_$I.before-rotation-$(date +%s).log" 2>/dev/null || true
start_supernode "$I" "$KEY.next"
if ! wait_for_line "supernode_$I" "$STATE/logs/supernode_$I.log" "SuperNode ID: $NEW_ID"; then
    tail -n 20 "$STATE/logs/supernode_$I.log" >&2
    echo "rotate_node_key.sh: SuperNode $I did not come back with the new key (old key still registered)" >&2
    exit 1
fi
echo "$NEW_ID" >"$STATE/node_ids/node_$I"

# 4. retire the old key on the SuperLink
flwr_json supernode unregister "$OLD_ID" "$FLWR_CONNECTION" >/dev/null \
    || { echo "rotate_node_key.sh: unregistering old node id $OLD_ID failed" >&2; exit 1; }
echo "[rotate] unregistered old node id $OLD_ID"

# 5. file bookkeeping
ts=$(date +%Y%m%d%H%M%S)
mv "$KEY" "$KEY.retired-$ts"; mv "$KEY.pub" "$KEY.retired-$ts.pub"
mv "$KEY.next" "$KEY"; mv "$KEY.next.pub" "$KEY.pub"
echo "[rotate] node $I now uses $KEY (node id $NEW_ID); old key kept as $KEY.retired-$ts"
